"""jlora.LoRA: initialisation, scaling and per-path overrides against PEFT's semantics
(``peft/tuners/lora/layer.py``: reset_lora_parameters, pissa_init, olora_init)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora

try:
    from scipy import stats
except ImportError:  # pragma: no cover
    stats = None

R = np.random.default_rng(0)
W64 = R.standard_normal((64, 32)).astype(np.float32)   # Flax kernel: (in=64, out=32)
W12 = R.standard_normal((12, 8)).astype(np.float32)    # (in=12, out=8)
X64 = R.standard_normal((3, 64)).astype(np.float32)


def _one(w, name="lin", leaf="kernel"):
    return {"params": {name: {leaf: w}}}


def _node(ad, name="lin", leaf="kernel"):
    return ad["params"][name][leaf]


def _np(x):
    return np.asarray(x, np.float64)


def _matmul_fn(p, x):
    return x @ p["params"]["lin"]["kernel"]


def _check_dist(samples, dist, args):
    samples = _np(samples).ravel()
    if stats is not None:
        assert stats.kstest(samples, dist, args=args).pvalue > 1e-3
    else:  # moment checks
        loc, scale = args
        mean, var = (loc + scale / 2, scale ** 2 / 12) if dist == "uniform" else (loc, scale ** 2)
        assert abs(samples.mean() - mean) < 4 * math.sqrt(var / samples.size)
        assert abs(samples.var() / var - 1) < 0.15


# ---------------------------------------------------------------------------------------------
# default / gaussian / embedding init

def test_kaiming_init_uniform_a_zero_b_identity_forward():
    ad = jlora.apply(_one(W64), jlora.LoRA(rank=16, alpha=16, targets=".*kernel"), key=0)
    node = _node(ad)
    a, b = _np(node.a["default"]), _np(node.b["default"])
    assert a.shape == (64, 16) and b.shape == (16, 32)
    assert node.meta["default"].init == "kaiming"
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert a.min() >= -bound and a.max() <= bound
    assert a.min() < -0.95 * bound and a.max() > 0.95 * bound
    _check_dist(a, "uniform", (-bound, 2 * bound))
    assert np.all(b == 0)
    np.testing.assert_array_equal(node.base, W64)
    out = jlora.lift(_matmul_fn, strict=True)(ad, X64)
    np.testing.assert_allclose(out, X64 @ W64, atol=1e-5)


def test_gaussian_init_std_is_one_over_rank():
    ad = jlora.apply(_one(W64), jlora.LoRA(rank=16, init="gaussian", targets=".*kernel"), key=0)
    a, b = _np(_node(ad).a["default"]), _np(_node(ad).b["default"])
    assert abs(a.std() * 16 - 1) < 0.1
    _check_dist(a, "norm", (0.0, 1 / 16))
    assert np.all(b == 0)


def test_embedding_init_is_reversed():
    emb = R.standard_normal((64, 32)).astype(np.float32)
    ad = jlora.apply(_one(emb, "embed", "embedding"), jlora.LoRA(rank=16, targets=".*embedding"), key=0)
    node = _node(ad, "embed", "embedding")
    assert node.meta["default"].init == "zeros_b_normal"
    a, b = _np(node.a["default"]), _np(node.b["default"])
    assert a.shape == (64, 16) and b.shape == (16, 32)  # A indexed by token id, B: r x dim
    assert np.all(a == 0)
    assert abs(b.std() - 1) < 0.15 and abs(b.mean()) < 0.2
    _check_dist(b, "norm", (0.0, 1.0))
    ids = jnp.array([[0, 5, 63], [7, 7, 1]])
    lookup = lambda p, i: jnp.take(p["params"]["embed"]["embedding"], i, axis=0)
    np.testing.assert_allclose(jlora.lift(lookup, strict=True)(ad, ids), emb[np.asarray(ids)], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# scaling and per-path overrides

def test_scale_alpha_over_r_and_rslora():
    spec = jlora.LoRA(rank=4, alpha=6, targets=".*kernel")
    assert spec.scale_for("params/lin/kernel") == 1.5
    assert _node(jlora.apply(_one(W12), spec)).meta["default"].scale == 1.5
    rs = jlora.LoRA(rank=4, alpha=6, rslora=True, targets=".*kernel")
    assert rs.scale_for("params/lin/kernel") == 3.0
    node = _node(jlora.apply(_one(W12), rs))
    assert node.meta["default"].scale == 3.0
    # the scale is the one merge applies
    node = node.with_(b={"default": jnp.ones((4, 8))})
    np.testing.assert_allclose(_np(node.materialize()) - W12, 3.0 * _np(node.a["default"]) @ np.ones((4, 8)), atol=1e-5)


def test_rank_and_alpha_pattern_override_per_path():
    z = lambda: np.zeros((8, 8), np.float32)
    params = {"params": {"layers_0": {"query": {"kernel": z()}, "value": {"kernel": z()}, "myvalue": {"kernel": z()}},
                         "layers_1": {"query": {"kernel": z()}}}}
    spec = jlora.LoRA(rank=2, alpha=4, targets=".*kernel",
                      rank_pattern={"value": 4, "layers_1/query": 3}, alpha_pattern={"query": 12})
    nodes = {n.path: n for n in jax.tree_util.tree_leaves(jlora.apply(params, spec), is_leaf=jlora.is_node)}
    got = {p: (n.meta["default"].rank, n.meta["default"].scale, n.a["default"].shape[-1]) for p, n in nodes.items()}
    assert got == {
        "params/layers_0/query/kernel": (2, 6.0, 2),    # alpha 12 / r 2
        "params/layers_1/query/kernel": (3, 4.0, 3),    # rank 3, alpha 12
        "params/layers_0/value/kernel": (4, 1.0, 4),    # rank 4, alpha 4
        "params/layers_0/myvalue/kernel": (2, 2.0, 2),  # "value" only matches at a '/' boundary
    }
    # a key must match the end of the path ("(.*/)?key$"), not a prefix
    spec2 = jlora.LoRA(rank=2, targets=".*kernel", rank_pattern={"layers_0": 5})
    assert spec2.rank_for("params/layers_0/query/kernel") == 2
    assert spec2.rank_for("params/layers_0") == 5


# ---------------------------------------------------------------------------------------------
# PiSSA / OLoRA

def _sv(m):
    return np.linalg.svd(_np(m), compute_uv=False)


def test_pissa_init():
    r, alpha = 3, 6  # scale 2
    ad = jlora.apply(_one(W12), jlora.LoRA(rank=r, alpha=alpha, init="pissa", targets=".*kernel"))
    node = _node(ad)
    s = node.meta["default"].scale
    assert s == 2.0 and node.meta["default"].init == "pissa"
    a, b, res = _np(node.a["default"]), _np(node.b["default"]), _np(node.base)
    np.testing.assert_allclose(res + s * a @ b, W12, atol=1e-5)
    sw = _sv(W12)
    np.testing.assert_allclose(_sv(s * a @ b)[:r], sw[:r], rtol=1e-5)
    np.testing.assert_allclose(_sv(a @ b)[:r], sw[:r] / s, rtol=1e-5)  # PEFT: S_r <- S_r / s
    np.testing.assert_allclose(_sv(res)[0], sw[r], rtol=1e-5)
    np.testing.assert_allclose(_sv(res)[: 8 - r], sw[r:], rtol=1e-4, atol=1e-5)
    # balanced factors: A^T A == B B^T == diag(S_r / s)
    np.testing.assert_allclose(a.T @ a, np.diag(sw[:r] / s), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.diag(sw[:r] / s), atol=1e-5)
    # merged == original weight, so the adapted model equals the base model at init
    np.testing.assert_allclose(jlora.merge(ad)["params"]["lin"]["kernel"], W12, atol=1e-5)


def test_pissa_stacked_kernel_is_per_layer():
    w = R.standard_normal((2, 12, 8)).astype(np.float32)
    spec = jlora.LoRA(rank=3, alpha=3, init="pissa", targets=".*kernel", axes={"kernel": jlora.Axes(stack=1, inputs=1)})
    node = _node(jlora.apply(_one(w), spec))
    for i in range(2):
        a, b = _np(node.a["default"][i]), _np(node.b["default"][i])
        np.testing.assert_allclose(_np(node.base[i]) + a @ b, w[i], atol=1e-5)
        np.testing.assert_allclose(_sv(a @ b)[:3], _sv(w[i])[:3], rtol=1e-5)


def test_olora_init():
    r, alpha = 3, 6
    node = _node(jlora.apply(_one(W12), jlora.LoRA(rank=r, alpha=alpha, init="olora", targets=".*kernel")))
    s = node.meta["default"].scale
    a, b, res = _np(node.a["default"]), _np(node.b["default"]), _np(node.base)
    assert a.shape == (12, r) and b.shape == (r, 8)
    np.testing.assert_allclose(res + s * a @ b, W12, atol=1e-5)
    # PEFT: Q, R = qr(W_pt) with W_pt = kernel^T (out, in); B_pt = Q[:, :r], A_pt = R[:r]
    np.testing.assert_allclose(b @ b.T, np.eye(r), atol=1e-5)   # B_pt's columns orthonormal
    np.testing.assert_allclose(a, _np(W12) @ b.T, atol=1e-5)    # R[:r] = Q[:, :r]^T W_pt
    np.testing.assert_allclose(np.tril(a.T, -1), 0, atol=1e-6)  # R upper triangular
    q, _ = np.linalg.qr(_np(W12).T)
    np.testing.assert_allclose(np.abs(b), np.abs(q[:, :r].T), atol=1e-5)


@pytest.mark.parametrize("init", ["kaiming", "pissa", "olora"])
def test_rank_above_min_dim_raises(init):
    with pytest.raises(ValueError, match=r"rank 9 .*min\(inputs=12, outputs=8\)"):
        jlora.apply(_one(W12), jlora.LoRA(rank=9, init=init, targets=".*kernel"))
    with pytest.raises(ValueError, match="rank 9"):
        jlora.apply(_one(W12), jlora.LoRA(rank=2, rank_pattern={"lin": 9}, targets=".*kernel"))


# ---------------------------------------------------------------------------------------------
# dtypes, determinism, train_also

@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_bf16_base_gets_float32_factors(init):
    w = jnp.asarray(W12, jnp.bfloat16)
    node = _node(jlora.apply(_one(w), jlora.LoRA(rank=2, init=init, targets=".*kernel")))
    assert node.base.dtype == jnp.bfloat16
    assert node.a["default"].dtype == node.b["default"].dtype == jnp.float32
    assert jlora.merge({"k": node})["k"].dtype == jnp.bfloat16
    if init == "pissa":
        back = _np(node.base) + node.meta["default"].scale * _np(node.a["default"]) @ _np(node.b["default"])
        np.testing.assert_allclose(back, _np(w), atol=0.05)
    node16 = _node(jlora.apply(_one(w), jlora.LoRA(rank=2, init=init, dtype=jnp.bfloat16, targets=".*kernel")))
    assert node16.a["default"].dtype == jnp.bfloat16


def test_init_reproducible_per_key_and_distinct_per_leaf():
    params = {"params": {"x": {"kernel": W12}, "y": {"kernel": W12}}}
    spec = jlora.LoRA(rank=2, targets=".*kernel")
    a = lambda ad, n: np.asarray(ad["params"][n]["kernel"].a["default"])
    ad0, ad0b, ad1 = jlora.apply(params, spec, key=0), jlora.apply(params, spec, key=jax.random.key(0)), jlora.apply(params, spec, key=1)
    np.testing.assert_array_equal(a(ad0, "x"), a(ad0b, "x"))
    np.testing.assert_array_equal(a(ad0, "y"), a(ad0b, "y"))
    assert not np.allclose(a(ad0, "x"), a(ad1, "x"))
    assert not np.allclose(a(ad0, "x"), a(ad0, "y"))  # each leaf gets its own key


def test_train_also_leaf_becomes_trainable():
    params = {"params": {"lin": {"kernel": W12, "bias": np.ones(8, np.float32)},
                         "head": {"kernel": W12[:, :4], "bias": np.zeros(4, np.float32)}}}
    # PEFT: modules_to_save are trained in full and never get an adapter themselves
    ad = jlora.apply(params, jlora.LoRA(rank=2, targets=".*kernel", train_also=["head"]))
    assert jlora.is_node(ad["params"]["lin"]["kernel"])
    for leaf in ("kernel", "bias"):
        t = ad["params"]["head"][leaf]
        assert isinstance(t, jlora.Trainable) and t.path == f"params/head/{leaf}"
        np.testing.assert_array_equal(t.value, params["params"]["head"][leaf])
    assert isinstance(ad["params"]["lin"]["bias"], np.ndarray)
    trainable, frozen = jlora.partition(ad)
    assert isinstance(trainable["params"]["head"]["kernel"], jlora.Trainable)
    assert frozen["params"]["head"]["kernel"] is None and trainable["params"]["lin"]["bias"] is None
    assert jlora.count(ad)["trainable"] == (12 * 2 + 2 * 8) + (12 * 4 + 4)
    merged = jlora.merge(ad)
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], params["params"]["head"]["kernel"])
    # grads reach the Trainable leaf
    frozen_ = frozen
    g = jax.grad(lambda t: jnp.sum(jlora.merge(jlora.combine(t, frozen_))["params"]["head"]["kernel"] ** 2))(trainable)
    np.testing.assert_allclose(g["params"]["head"]["kernel"].value, 2 * W12[:, :4], rtol=1e-6)
