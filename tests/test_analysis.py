"""jlora.analysis and ``jlora analyze``: the LoRA paper's §7 (Hu et al. 2021) against independent
NumPy versions of its formulas, on real adapted trees, and the command end to end on tiny runs."""

import argparse
import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import analysis
from jlora.cli import analyze as cli_analyze
from tests.core._helpers import randomize_b

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# independent reference implementations (eigendecompositions and projection matrices, no SVD)

def _top_eigvecs(m, k):
    """The top-k eigenvectors of the symmetric PSD matrix ``m`` (columns, by decreasing eigenvalue)."""
    vals, vecs = np.linalg.eigh(m)
    return vecs[:, np.argsort(vals)[::-1][:k]]


def _phi_ref(a1, a2, i, j):
    """φ(A1, A2, i, j) = tr(P1 P2) / min(i, j), P the projector on the top-i (top-j) directions of
    the paper's A (rows of A = columns of jlora's a): eigenvectors of a a^T."""
    u1, u2 = _top_eigvecs(a1 @ a1.T, i), _top_eigvecs(a2 @ a2.T, j)
    p1, p2 = u1 @ u1.T, u2 @ u2.T
    return float(np.trace(p1 @ p2)) / min(i, j)


def _amplification_ref(w, dw, r):
    """The paper's Table 7 in its own (d_out, d_in) layout: W_p = w^T, ΔW_p = dw^T,
    ||U^T W_p V^T||_F with U / V^T the top-r left / right singular vectors of ΔW_p."""
    wp, dwp = w.T, dw.T
    u = _top_eigvecs(dwp @ dwp.T, r)          # (d_out, r)
    v = _top_eigvecs(dwp.T @ dwp, r)          # (d_in, r): rows of the paper's V^T
    proj = np.sqrt(np.sum((u.T @ wp @ v) ** 2))
    own = np.sqrt(np.sum(np.sort(np.linalg.eigvalsh(wp @ wp.T))[::-1][:r]))
    return np.sqrt(np.sum(dwp ** 2)) / proj, proj, own


# ---------------------------------------------------------------------------------------------
# (a) φ and amplification

def test_subspace_similarity_matches_the_projection_formula():
    a1, a2 = RNG.standard_normal((20, 4)), RNG.standard_normal((20, 8))
    a2[:, :2] += 3 * a1[:, :2]                              # some shared directions
    grid = analysis.similarity_grid(a1, a2)
    assert grid.shape == (4, 8)
    for i in range(1, 5):
        for j in range(1, 9):
            ref = _phi_ref(a1, a2, i, j)
            assert analysis.subspace_similarity(a1, a2, i, j) == pytest.approx(ref, abs=1e-10)
            assert grid[i - 1, j - 1] == pytest.approx(ref, abs=1e-10)
            assert analysis.subspace_similarity(a2, a1, j, i) == pytest.approx(ref, abs=1e-10)   # φ is symmetric
    assert np.all((grid >= -1e-12) & (grid <= 1 + 1e-12))
    # the full column spaces through QR: ||Q1^T Q2||_F^2 / min(r1, r2)
    q1, q2 = np.linalg.qr(a1)[0], np.linalg.qr(a2)[0]
    assert grid[-1, -1] == pytest.approx(np.sum((q1.T @ q2) ** 2) / 4, abs=1e-10)


def test_subspace_similarity_known_cases():
    a = RNG.standard_normal((16, 4))
    mixed = a @ RNG.standard_normal((4, 4))                 # the same column space, other basis
    assert analysis.subspace_similarity(a, mixed, 4, 4) == pytest.approx(1.0, abs=1e-10)
    assert np.allclose(analysis.similarity_grid(a, a), 1.0)  # φ(A, A, i, j) = 1: nested top directions
    for i, j in ((1, 3), (2, 4), (3, 1)):
        assert analysis.subspace_similarity(a, a, i, j) == pytest.approx(analysis.subspace_similarity(a, a, j, i))
    left, right = np.zeros((16, 3)), np.zeros((16, 5))
    left[:3] = RNG.standard_normal((3, 3))
    right[3:8] = RNG.standard_normal((5, 5))                # orthogonal subspaces
    assert np.allclose(analysis.similarity_grid(left, right), 0.0)
    with pytest.raises(ValueError, match=r"i must be an int in \[1, 4\].*got 5"):
        analysis.subspace_similarity(a, a, 5, 1)
    with pytest.raises(ValueError, match="a1 has 16 rows.*a2 has 4.*transpose"):
        analysis.similarity_grid(a, a.T)


def test_amplification_matches_the_papers_table_7_formula():
    w = RNG.standard_normal((24, 16))
    dw = RNG.standard_normal((24, 3)) @ RNG.standard_normal((3, 16)) * 0.1
    for r in (1, 2, 3):
        got = analysis.amplification(w, dw, r, random_trials=4)
        factor, proj, own = _amplification_ref(w, dw, r)
        assert got["r"] == r
        assert got["proj_dw"] == pytest.approx(proj, rel=1e-8)
        assert got["amplification"] == pytest.approx(factor, rel=1e-8)
        assert got["proj_w"] == pytest.approx(own, rel=1e-8)
        assert got["dw_norm"] == pytest.approx(np.linalg.norm(dw)) and got["w_norm"] == pytest.approx(np.linalg.norm(w))
        # the same numbers in the transposed (PyTorch) layout
        t = analysis.amplification(w.T, dw.T, r, random_trials=4)
        assert t["proj_dw"] == pytest.approx(got["proj_dw"], rel=1e-8)
        assert t["amplification"] == pytest.approx(got["amplification"], rel=1e-8)


def test_amplification_random_baseline_and_known_directions():
    rng = np.random.default_rng(7)   # its own generator: the figures must not depend on test order (xdist)
    q1, q2 = np.linalg.qr(rng.standard_normal((30, 30)))[0], np.linalg.qr(rng.standard_normal((20, 20)))[0]
    sigma = np.linspace(10, 1, 20)
    w = q1[:, :20] @ np.diag(sigma) @ q2.T                       # W's singular directions known
    dw = 0.5 * np.outer(q1[:, 19], q2[:, 19])                    # ΔW on W's weakest direction (σ = 1)
    got = analysis.amplification(w, dw, 1, random_trials=300, seed=1)
    assert got["proj_dw"] == pytest.approx(1.0) and got["amplification"] == pytest.approx(0.5)
    assert got["proj_w"] == pytest.approx(10.0)
    # E ||U^T W V||_F^2 = r^2 ||W||_F^2 / (m n) for independent random orthonormal U (m x r), V (n x r);
    # proj_random is the mean of the norm, which sits just under that root mean square once the r x r
    # matrix has a few entries (at r = 1 it is |one number|, sqrt(2/pi) of the RMS), so check at r = 4
    dw4 = q1[:, 16:20] @ np.diag([0.5, 0.4, 0.3, 0.2]) @ q2[:, 16:20].T
    rms = 4 * np.sqrt(np.sum(sigma ** 2) / (30 * 20))
    assert analysis.amplification(w, dw4, 4, random_trials=300, seed=1)["proj_random"] == pytest.approx(rms, rel=0.15)
    assert analysis.amplification(w, dw, 1, random_trials=5, seed=3) == \
        analysis.amplification(w, dw, 1, random_trials=5, seed=3)          # seeded
    assert np.isnan(analysis.amplification(w, np.zeros_like(w), 2)["amplification"])
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 20\].*got 21"):
        analysis.amplification(w, dw, 21)
    with pytest.raises(ValueError, match="same shape"):
        analysis.amplification(w, dw.T, 1)


# ---------------------------------------------------------------------------------------------
# (b) ranks of known spectra

def test_effective_stable_and_energy_ranks_of_known_spectra():
    for k in (1, 3, 7):
        s = np.r_[np.full(k, 2.5), np.zeros(4)]
        assert analysis.effective_rank(s) == pytest.approx(k)
        assert analysis.stable_rank(s) == pytest.approx(k)
        assert analysis.energy_rank(s, 0.9) == k and analysis.energy_rank(s, 0.99) == k
    s = np.array([4.0, 2.0, 1.0, 1.0])
    p = s / s.sum()
    assert analysis.effective_rank(s) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert analysis.stable_rank(s) == pytest.approx(22 / 16)
    assert analysis.energy_rank(s, 0.7) == 1 and analysis.energy_rank(s, 0.9) == 2 and analysis.energy_rank(s, 0.99) == 4
    m = RNG.standard_normal((9, 2)) @ RNG.standard_normal((2, 7))       # a matrix works as well as its spectrum
    assert analysis.stable_rank(m) == pytest.approx(analysis.stable_rank(analysis.spectrum(m)))
    assert analysis.effective_rank(np.zeros(5)) == 0 and analysis.stable_rank(np.zeros((3, 3))) == 0
    assert np.allclose(analysis.spectrum(m), np.linalg.svd(m, compute_uv=False))
    with pytest.raises(ValueError, match="non-negative"):
        analysis.effective_rank(np.array([1.0, -1.0]))


# ---------------------------------------------------------------------------------------------
# (c) delta_weights / factors / analyze on real jlora.apply trees

def _params():
    return {"params": {
        "fc": {"kernel": RNG.standard_normal((12, 10)).astype(np.float32)},
        "blocks": {"kernel": RNG.standard_normal((3, 8, 6)).astype(np.float32)},      # scanned: (layers, in, out)
        "attn": {"query": {"kernel": RNG.standard_normal((8, 2, 4)).astype(np.float32)},   # (d, heads, head_dim)
                 "out": {"kernel": RNG.standard_normal((2, 4, 8)).astype(np.float32)}},    # (heads, head_dim, d)
    }}


_AXES = {"blocks/kernel": jlora.Axes(stack=1, inputs=1), "query/kernel": jlora.Axes(stack=0, inputs=1),
         "out/kernel": jlora.Axes(stack=0, inputs=2)}


def test_delta_weights_are_scale_a_b_per_layer_and_flattened():
    params = _params()
    ad = randomize_b(jlora.apply(params, jlora.LoRA(rank=2, alpha=6, targets=".*kernel", axes=_AXES), key=0))
    dws, fs = analysis.delta_weights(ad), analysis.factors(ad)
    assert sorted(dws) == sorted(fs) == sorted(
        ["params/fc/kernel", "params/attn/query/kernel", "params/attn/out/kernel"] +
        [f"params/blocks/kernel[layer {i}]" for i in range(3)])
    merged = jlora.merge(ad)["params"]
    a = lambda *p: np.asarray(_leaf(ad, *p).states["default"].a, np.float64)
    b = lambda *p: np.asarray(_leaf(ad, *p).states["default"].b, np.float64)
    s = 6 / 2
    np.testing.assert_allclose(dws["params/fc/kernel"], s * a("fc") @ b("fc"), atol=1e-6)
    np.testing.assert_allclose(dws["params/fc/kernel"], merged["fc"]["kernel"] - params["params"]["fc"]["kernel"],
                               atol=1e-5)
    for i in range(3):
        dw = dws[f"params/blocks/kernel[layer {i}]"]
        assert dw.shape == (8, 6) and dw.dtype == np.float64
        np.testing.assert_allclose(dw, s * a("blocks")[i] @ b("blocks")[i], atol=1e-6)
        np.testing.assert_array_equal(fs[f"params/blocks/kernel[layer {i}]"], a("blocks")[i])
    q = dws["params/attn/query/kernel"]                                # (8, 2 * 4)
    assert q.shape == (8, 8)
    np.testing.assert_allclose(q, s * a("attn", "query") @ b("attn", "query").reshape(2, 8), atol=1e-6)
    o = dws["params/attn/out/kernel"]                                  # (2 * 4, 8)
    np.testing.assert_allclose(o, s * a("attn", "out").reshape(8, 2) @ b("attn", "out"), atol=1e-6)
    np.testing.assert_allclose(o, (merged["attn"]["out"]["kernel"] - params["params"]["attn"]["out"]["kernel"])
                               .reshape(8, 8), atol=1e-5)
    assert all(np.linalg.matrix_rank(d, tol=1e-5 * np.abs(d).max()) == 2 for d in dws.values())


def _leaf(ad, *path):
    node = ad["params"]
    for p in path:
        node = node[p]
    return node["kernel"]


def test_analyze_report_and_comparison_of_two_adapters(tmp_path):
    params = _params()
    r2 = randomize_b(jlora.apply(params, jlora.LoRA(rank=2, targets=".*kernel", axes=_AXES), key=0))
    r4 = randomize_b(jlora.apply(params, jlora.LoRA(rank=4, targets=[r".*fc/kernel", r".*blocks/kernel"],
                                                    axes=_AXES), key=1), key=5)
    report = analysis.analyze(r2, other=r4)
    json.dumps(report, allow_nan=False)                                # JSON-able, no NaN
    layer = report["layers"]["params/blocks/kernel[layer 1]"]
    assert layer["path"] == "params/blocks/kernel" and layer["layer"] == [1] and layer["shape"] == [8, 6]
    assert layer["rank"] == 2 and layer["low_rank"] and layer["numerical_rank"] == 2
    assert len(layer["singular_values"]) == 6 and layer["energy_rank_99"] <= 2
    dw = analysis.delta_weights(r2)["params/blocks/kernel[layer 1]"]
    w = params["params"]["blocks"]["kernel"][1].astype(np.float64)
    assert layer["dw_norm"] == pytest.approx(np.linalg.norm(dw))
    assert layer["amplification"]["amplification"] == pytest.approx(_amplification_ref(w, dw, 2)[0], rel=1e-6)
    assert analysis.analyze(r2, top_r=1)["layers"]["params/fc/kernel"]["amplification"]["r"] == 1
    sim = report["similarity"]
    assert sorted(sim) == ["params/blocks/kernel[layer 0]", "params/blocks/kernel[layer 1]",
                           "params/blocks/kernel[layer 2]", "params/fc/kernel"]
    a1, a2 = analysis.factors(r2)["params/fc/kernel"], analysis.factors(r4)["params/fc/kernel"]
    assert sim["params/fc/kernel"]["r1"] == 2 and sim["params/fc/kernel"]["r2"] == 4
    np.testing.assert_allclose(sim["params/fc/kernel"]["grid"], analysis.similarity_grid(a1, a2), atol=1e-12)
    assert "does not adapt" in report["similarity_skipped"]["params/attn/query/kernel"]
    paths = analysis.plot(report, tmp_path / "plots")
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["amplification.png", "similarity.png", "spectrum.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_ia3_dora_and_pissa_are_recorded_not_crashed():
    params = _params()
    ia3 = jlora.apply(params, jlora.IA3(targets=[r".*fc/kernel"]), key=0)
    node = ia3["params"]["fc"]["kernel"]
    ia3["params"]["fc"]["kernel"] = node.with_(states={"default": node.states["default"].replace(
        l=jnp.asarray(1 + 0.1 * RNG.standard_normal(10), jnp.float32))})
    lora = randomize_b(jlora.apply(params, jlora.LoRA(rank=2, targets=[r".*fc/kernel"]), key=0))
    report = analysis.analyze(ia3, other=lora)
    layer = report["layers"]["params/fc/kernel"]
    assert layer["low_rank"] is False and layer["rank"] == 0 and layer["amplification"] is None
    assert "no low-rank ΔW" in layer["amplification_skipped"] and layer["numerical_rank"] == 10
    assert "φ needs an a factor" in report["similarity_skipped"]["params/fc/kernel"] and report["similarity"] == {}
    assert analysis.factors(ia3) == {}
    assert analysis.analyze(ia3, top_r=2)["layers"]["params/fc/kernel"]["amplification"]["r"] == 2
    dora = randomize_b(jlora.apply(params, jlora.DoRA(rank=2, targets=[r".*fc/kernel"]), key=0))
    layer = analysis.analyze(dora)["layers"]["params/fc/kernel"]
    assert layer["low_rank"] is False and layer["rank"] == 2 and "rescales W0" in layer["notes"][0]
    np.testing.assert_allclose(analysis.delta_weights(dora)["params/fc/kernel"],
                               jlora.merge(dora)["params"]["fc"]["kernel"] - params["params"]["fc"]["kernel"], atol=1e-5)
    # PiSSA: the frozen base is a residual; measured from the pretrained W the fresh update is 0
    pissa = jlora.apply(params, jlora.LoRA(rank=2, init="pissa", targets=[r".*fc/kernel"]), key=0)
    assert np.abs(analysis.delta_weights(pissa, params)["params/fc/kernel"]).max() < 1e-5
    assert np.linalg.matrix_rank(analysis.delta_weights(pissa)["params/fc/kernel"], tol=1e-4) == 2
    assert "residual" in analysis.analyze(pissa)["layers"]["params/fc/kernel"]["notes"][0]
    with pytest.raises(ValueError, match="no weight update"):
        analysis.analyze(params)


# ---------------------------------------------------------------------------------------------
# (d) jlora analyze on tiny trained runs

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from jlora import cli
    from tests._local_models import write_bert_dir

    d = tmp_path_factory.mktemp("analyze")
    bert = write_bert_dir(d / "bert", hidden=32, layers=2)
    with open(d / "reviews.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["review", "sentiment"])
        for i in range(40):
            out.writerow([f"the film {i} was " + ("wonderful" if i % 2 else "dull"), "pos" if i % 2 else "neg"])
    for rank, seed in ((4, 0), (8, 1)):
        assert cli.main(["train", "--model", str(bert), "--data", str(d / "reviews.csv"), "--text-column", "review",
                         "--label-column", "sentiment", "--rank", str(rank), "--seed", str(seed), "--steps", "3",
                         "--batch", "8", "--max-length", "16", "--lr", "1e-2", "--out", str(d / f"r{rank}"),
                         "--no-progress"]) == 0
    return d


def _args(*argv):
    parser = argparse.ArgumentParser(prog="jlora")
    cli_analyze.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["analyze", *argv])


def _analyze(*argv):
    """`jlora analyze ARGV` through the command's entry point."""
    import jlora.cli

    return jlora.cli.main(["analyze", *argv])


def test_cli_analyzes_and_compares_two_runs(runs, tmp_path, capsys):
    from jlora.cli import _load_run

    capsys.readouterr()
    assert _analyze("--run", str(runs / "r4"), "--compare", str(runs / "r8"),
                                  "--out", str(tmp_path / "a")) == 0
    printed = capsys.readouterr().out
    assert "eff. rank" in printed and "amplif." in printed and "params/encoder/layer_1/attention/self/value/kernel" in printed
    report = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert report["run"] == str(runs / "r4") and report["method"] == "lora"
    assert {p.name for p in (tmp_path / "a").glob("*.png")} == {"spectrum.png", "amplification.png", "similarity.png"}
    _, _, adapted = _load_run(str(runs / "r4"))
    dws = analysis.delta_weights(adapted)
    assert set(report["layers"]) == set(dws) == set(report["similarity"]) and len(dws) == 4
    for key, layer in report["layers"].items():
        assert layer["rank"] == 4 and layer["shape"] == [32, 32] and layer["numerical_rank"] <= 4
        assert layer["dw_norm"] == pytest.approx(np.linalg.norm(dws[key]), rel=1e-6)
        assert 1 <= layer["effective_rank"] <= 4 and layer["amplification"]["r"] == 4
        grid = np.asarray(report["similarity"][key]["grid"])
        assert grid.shape == (4, 8) and np.all((grid >= 0) & (grid <= 1 + 1e-9))
    # --json prints the report; --out defaults to <run>/analysis; --top-r overrides the rank
    assert _analyze("--run", str(runs / "r8"), "--json", "--top-r", "2") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["compare"] is None and all(l["amplification"]["r"] == 2 for l in printed["layers"].values())
    assert (runs / "r8" / "analysis" / "analysis.json").is_file()


def test_cli_refuses_bad_input_with_the_reason(runs, tmp_path, monkeypatch):
    import jlora.cli

    with pytest.raises(SystemExit, match="--top-r must be a positive"):
        _analyze("--run", str(runs / "r4"), "--top-r", "0")
    with pytest.raises(SystemExit, match="jlora: .* is not a run directory"):
        _analyze("--run", str(tmp_path))
    real = jlora.cli._load_run

    def other_model(run):   # a second run of another model
        cfg, task, adapted = real(run)
        return ({**cfg, "model": "smollm2"} if run.endswith("r8") else cfg), task, adapted

    monkeypatch.setattr(jlora.cli, "_load_run", other_model)
    with pytest.raises(SystemExit, match="--compare .* fine-tunes the model 'smollm2'.* same model"):
        _analyze("--run", str(runs / "r4"), "--compare", str(runs / "r8"), "--out", str(tmp_path))

    def prompt_run(run):    # a run whose adapter adapts no weight matrix (prompt tuning, head only)
        cfg, task, _ = real(run)
        return {**cfg, "method": "prompt"}, task, task.params

    monkeypatch.setattr(jlora.cli, "_load_run", prompt_run)
    with pytest.raises(SystemExit, match="--method 'prompt', which adapts no weight matrix: there is no ΔW"):
        _analyze("--run", str(runs / "r4"), "--out", str(tmp_path))


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(analysis, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0
