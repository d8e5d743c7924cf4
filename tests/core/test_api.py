"""jlora.apply / partition / combine / merge / unmerge / multi-adapter / summary, checked against
hand-computed numpy references on a tiny hand-built parameter tree."""

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import chex

import jlora
from jlora.core.paths import flatten_with_paths

from ._helpers import randomize_b

RNG = np.random.default_rng(0)


def _params():
    """A Linen-style variable dict (query -> norm -> value -> out), all float32."""
    r = np.random.default_rng(0)
    f = lambda *s: r.standard_normal(s).astype(np.float32) * 0.5
    return {"params": {
        "query": {"kernel": f(6, 8), "bias": f(8)},
        "norm": {"scale": 1.0 + f(8), "bias": f(8)},
        "value": {"kernel": f(8, 8), "bias": f(8)},
        "out": {"kernel": f(8, 4), "bias": f(4)},
    }}


def fwd(p, x, xp=jnp):
    p = p["params"]
    h = xp.tanh(x @ p["query"]["kernel"] + p["query"]["bias"])
    h = h * p["norm"]["scale"] + p["norm"]["bias"]
    h = xp.tanh(h @ p["value"]["kernel"] + p["value"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def np_fwd(p, x):
    return fwd(jax.tree_util.tree_map(np.asarray, p), np.asarray(x, np.float64), xp=np)


X = RNG.standard_normal((3, 6)).astype(np.float32)
QV = r"(.*/)?(query|value)/kernel"


def _nodes(tree):
    return {n.path: n for n in jax.tree_util.tree_leaves(tree, is_leaf=jlora.is_node) if jlora.is_node(n)}


def _np(x):
    return np.asarray(x, np.float64)


def _np_delta(node, name):
    """scale * A @ B in numpy, batched over stacked axes."""
    a, b = _np(node.a[name]), _np(node.b[name])
    return node.meta[name].scale * np.matmul(a, b)


# ---------------------------------------------------------------------------------------------
# apply: containers, matching, errors

class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(6, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.value = nnx.Linear(8, 8, rngs=rngs)
        self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.value(self.norm(jnp.tanh(self.query(x))))))


def test_apply_on_dict_frozendict_and_nnx_state():
    spec = jlora.LoRA(rank=2, alpha=4, targets=QV)
    params = _params()
    outs = {}
    for kind, tree in [("dict", params), ("frozen", flax.core.freeze(params))]:
        ad = jlora.apply(tree, spec, key=0)
        assert type(ad) is type(tree)
        nodes = _nodes(ad)
        assert set(nodes) == {"params/query/kernel", "params/value/kernel"}
        # same structure once nodes are merged back, and bases are the original arrays
        merged = jlora.merge(ad)
        assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tree)
        for path, node in nodes.items():
            _, mod, leaf = path.split("/")
            np.testing.assert_array_equal(node.base, params["params"][mod][leaf])
        assert not jlora.is_node(ad["params"]["out"]["kernel"])
        outs[kind] = ad
    a1, a2 = (outs[k]["params"]["query"]["kernel"].a["default"] for k in ("dict", "frozen"))
    np.testing.assert_array_equal(a1, a2)

    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
    ad = jlora.apply(state, spec, key=0)
    assert type(ad) is type(state)
    assert set(_nodes(ad)) == {"query/kernel", "value/kernel"}
    merged = jlora.merge(ad)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(state)
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    # B == 0 at init: the adapted NNX model computes exactly the base model
    np.testing.assert_allclose(jlora.lift(fn, strict=True)(ad, X), fn(state, X), atol=1e-6)
    np.testing.assert_allclose(fn(merged, X), fn(state, X), atol=1e-6)


def test_targets_regex_string_and_list_of_names():
    params = _params()
    by_regex = _nodes(jlora.apply(params, jlora.LoRA(rank=2, targets=QV)))
    # PEFT list semantics: a name matches the module whose path ends in it; only its kernel
    # is adapted (the module's bias is left alone, as in PEFT).
    by_names = jlora.apply(params, jlora.LoRA(rank=2, targets=["query", "value"]))
    assert set(_nodes(by_names)) == set(by_regex) == {"params/query/kernel", "params/value/kernel"}
    assert isinstance(by_names["params"]["query"]["bias"], np.ndarray)
    # a single name as a string behaves the same way
    assert set(_nodes(jlora.apply(params, jlora.LoRA(rank=2, targets="out")))) == {"params/out/kernel"}
    # "value" must not match a module that merely contains the word
    p2 = {"params": {"myvalue": {"kernel": np.ones((4, 4), np.float32)},
                     "value": {"kernel": np.ones((4, 4), np.float32)}}}
    assert set(_nodes(jlora.apply(p2, jlora.LoRA(rank=2, targets=["value"])))) == {"params/value/kernel"}


def test_exclude_wins_over_targets():
    ad = jlora.apply(_params(), jlora.LoRA(rank=2, targets=r".*kernel", exclude=["out", r".*/query/.*"]))
    assert set(_nodes(ad)) == {"params/value/kernel"}


def _many_paths():
    z = lambda: np.zeros((4, 4), np.float32)
    return {"params": {f"layers_{i}": {"query": {"kernel": z()}, "key": {"kernel": z()},
                                      "mlp": {"kernel": z()}} for i in range(4)}}


def test_pattern_matching_nothing_lists_near_misses():
    params = _many_paths()
    with pytest.raises(ValueError, match="matched no parameter path") as e:
        jlora.apply(params, jlora.LoRA(rank=2, targets=r".*/qurey/kernel"))
    msg = str(e.value)
    assert "qurey" in msg
    for i in range(4):
        assert f"params/layers_{i}/query/kernel" in msg
    assert "mlp" not in msg  # only the closest paths are listed
    with pytest.raises(ValueError, match="layers_0/query/kernel"):
        jlora.apply(params, jlora.LoRA(rank=2, targets=["querry"]))
    with pytest.raises(ValueError, match="train_also"):
        jlora.apply(params, jlora.LoRA(rank=2, targets=["query"], train_also=["nrm"]))


@pytest.mark.parametrize("pattern,bad", [(r".*bias", "params/query/bias"),
                                         (r".*norm/scale", "params/norm/scale"),
                                         (r".*query/.*", "params/query/bias")])
def test_pattern_matching_vector_leaf_raises_naming_it(pattern, bad):
    with pytest.raises(ValueError, match="cannot be adapted") as e:
        jlora.apply(_params(), jlora.LoRA(rank=2, targets=pattern))
    assert bad in str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(rank=0), "got 0"), (dict(rank=-3), "got -3"), (dict(rank=2.5), "got 2.5"),
    (dict(alpha=-1.0), "got -1.0"), (dict(alpha=0), "got 0"), (dict(alpha=float("nan")), "got nan"),
    (dict(dropout=1.0), "got 1.0"), (dict(dropout=-0.1), "got -0.1"),
    (dict(init="xavier"), "'xavier'"),
    (dict(targets=r".*(kernel"), "'.*(kernel'"), (dict(targets=[]), "[]"),
    (dict(exclude=["[a-"]), "'[a-'"),
    (dict(rank_pattern={"query": 0}), "got 0"), (dict(alpha_pattern={"query": -2}), "got -2"),
])
def test_invalid_specs_raise_with_bad_value(kw, needle):
    kw = {"targets": ".*kernel", **kw}
    with pytest.raises(ValueError) as e:
        jlora.LoRA(**kw)
    assert needle in str(e.value)


def test_apply_rejects_bad_names_and_specs():
    with pytest.raises(ValueError, match="'a/b'"):
        jlora.apply(_params(), jlora.LoRA(targets=QV, rank=2), name="a/b")
    with pytest.raises(TypeError):
        jlora.apply(_params(), {"rank": 2})


# ---------------------------------------------------------------------------------------------
# partition / combine / optimizer

def _two_adapters(targets=QV, **kw):
    ad = jlora.apply(_params(), jlora.LoRA(rank=2, alpha=4, targets=targets, **kw), key=1)
    ad = jlora.apply(ad, jlora.LoRA(rank=3, alpha=3, targets=targets), key=2, name="b")
    return randomize_b(ad)


def test_partition_holds_active_factors_and_train_also_only():
    ad = _two_adapters(train_also=["norm"])
    ad = jlora.activate(ad, ["b"])
    trainable, frozen = jlora.partition(ad)
    t_leaves, _ = jax.tree_util.tree_flatten_with_path(trainable)
    t_paths = sorted(jax.tree_util.keystr(p) for p, _ in t_leaves)
    # trainable: b's A/B on two nodes + the two Trainable norm leaves; nothing else
    assert len(t_paths) == 6, t_paths
    assert sum("'b'" in p for p in t_paths) == 4 and sum("norm" in p for p in t_paths) == 2
    assert not any("default" in p or "base" in p for p in t_paths)
    for path, node in _nodes(trainable).items():
        assert node.base is None and node.a["default"] is None and node.b["default"] is None
        assert node.a["b"].shape[-1] == 3
    norm = trainable["params"]["norm"]
    assert isinstance(norm["scale"], jlora.Trainable)
    np.testing.assert_array_equal(norm["scale"].value, _params()["params"]["norm"]["scale"])
    # frozen: bases (+ inactive 'default' factors, biases, out/kernel); no 'b' factors, no norms
    assert frozen["params"]["norm"]["scale"] is None
    for path, node in _nodes(frozen).items():
        assert node.base is not None and node.a["b"] is None and node.a["default"] is not None
    n_frozen = len(jax.tree_util.tree_leaves(frozen))
    assert n_frozen == 2 * 3 + 4  # 2 nodes x (base, a_default, b_default) + 3 biases + out/kernel


def test_combine_inverts_partition():
    ad = _two_adapters(train_also=["norm"])
    for tree in (ad, jlora.activate(ad, "default"), jlora.activate(ad, [])):
        back = jlora.combine(*jlora.partition(tree))
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
        for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(tree)):
            assert x is y


def test_optax_state_only_for_adapter_leaves():
    ad = _two_adapters()
    trainable, _ = jlora.partition(ad)
    state = optax.adam(1e-3).init(trainable)
    n_t = len(jax.tree_util.tree_leaves(trainable))
    assert n_t == 8  # (A, B) x 2 adapters x 2 nodes
    mu, nu = state[0].mu, state[0].nu
    assert len(jax.tree_util.tree_leaves(mu)) == len(jax.tree_util.tree_leaves(nu)) == n_t
    assert len(jax.tree_util.tree_leaves(state)) == 2 * n_t + 1  # + step count
    assert sum(x.size for x in jax.tree_util.tree_leaves(mu)) == jlora.count(ad)["trainable"]
    # an update step only touches adapter leaves and leaves the frozen half as it was
    grads = jax.tree_util.tree_map(jnp.ones_like, trainable)
    updates, _ = optax.adam(1e-3).update(grads, state, trainable)
    new = optax.apply_updates(trainable, updates)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(trainable)


# ---------------------------------------------------------------------------------------------
# merge / unmerge

def test_merge_is_base_plus_scaled_product_2d():
    params = _params()
    ad = randomize_b(jlora.apply(params, jlora.LoRA(rank=2, alpha=5, targets=QV), key=0))
    merged = jlora.merge(ad)
    for mod in ("query", "value"):
        node = ad["params"][mod]["kernel"]
        a, b = _np(node.a["default"]), _np(node.b["default"])
        ref = _np(params["params"][mod]["kernel"]) + 2.5 * a @ b
        assert merged["params"][mod]["kernel"].dtype == np.float32
        np.testing.assert_allclose(merged["params"][mod]["kernel"], ref, atol=1e-6, rtol=1e-6)
        assert np.abs(ref - _np(params["params"][mod]["kernel"])).max() > 1e-3  # delta is non-trivial
    np.testing.assert_array_equal(merged["params"]["out"]["kernel"], params["params"]["out"]["kernel"])
    # the lifted (factored) forward agrees with the forward on merged params and with numpy
    np.testing.assert_allclose(jlora.lift(fwd, strict=True)(ad, X), np_fwd(merged, X), atol=1e-5)


def test_merge_stacked_3d_kernel_with_axes_hint():
    w = RNG.standard_normal((3, 6, 8)).astype(np.float32)
    params = {"params": {"blocks": {"kernel": w}}}
    spec = jlora.LoRA(rank=2, alpha=2, targets=".*kernel", axes={"blocks/kernel": jlora.Axes(stack=1, inputs=1)})
    ad = randomize_b(jlora.apply(params, spec, key=0))
    node = ad["params"]["blocks"]["kernel"]
    assert node.layout == jlora.Layout(1, 1, 1)
    assert node.a["default"].shape == (3, 6, 2) and node.b["default"].shape == (3, 2, 8)
    a, b = _np(node.a["default"]), _np(node.b["default"])
    ref = np.stack([w[i] + 1.0 * a[i] @ b[i] for i in range(3)])
    np.testing.assert_allclose(jlora.merge(ad)["params"]["blocks"]["kernel"], ref, atol=1e-6, rtol=1e-6)


def test_unmerge_recovers_bases():
    ad = _two_adapters()
    merged = jlora.merge(ad)
    back = jlora.unmerge(merged, ad)
    for path, node in _nodes(back).items():
        orig = _nodes(ad)[path]
        np.testing.assert_allclose(node.base, orig.base, atol=1e-6)
        assert node.a["b"] is orig.a["b"]
    np.testing.assert_array_equal(back["params"]["out"]["bias"], _params()["params"]["out"]["bias"])
    with pytest.raises(ValueError, match="shape"):
        bad = jax.tree_util.tree_map(lambda x: x, merged)
        bad["params"]["query"]["kernel"] = np.zeros((8, 6), np.float32)
        jlora.unmerge(bad, ad)


# ---------------------------------------------------------------------------------------------
# multiple adapters

def _with_deltas(params, ad, names):
    out = jax.tree_util.tree_map(np.asarray, params)
    for path, node in _nodes(ad).items():
        _, mod, leaf = path.split("/")
        out["params"][mod][leaf] = _np(out["params"][mod][leaf]) + sum(_np_delta(node, n) for n in names)
    return out


def test_activate_runs_only_chosen_adapters():
    params, ad = _params(), _two_adapters()
    assert jlora.adapter_names(ad) == ("default", "b")
    lifted = jlora.lift(fwd, strict=True)
    both = lifted(ad, X)
    np.testing.assert_allclose(both, np_fwd(_with_deltas(params, ad, ["default", "b"]), X), atol=1e-5)
    only_b = lifted(jlora.activate(ad, ["b"]), X)
    np.testing.assert_allclose(only_b, np_fwd(_with_deltas(params, ad, ["b"]), X), atol=1e-5)
    assert np.abs(_np(only_b) - _np(both)).max() > 1e-3
    off = jlora.activate(ad, [])
    np.testing.assert_allclose(lifted(off, X), np_fwd(params, X), atol=1e-5)
    for path, leaf in jax.tree_util.tree_leaves_with_path(jlora.merge(off)):
        mod, name = jax.tree_util.keystr(path).split("'")[3::2]
        np.testing.assert_array_equal(leaf, params["params"][mod][name])
    assert jlora.count(off)["trainable"] == 0


def test_activate_and_apply_name_errors():
    ad = _two_adapters()
    with pytest.raises(ValueError, match="nope"):
        jlora.activate(ad, ["b", "nope"])
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        jlora.apply(ad, jlora.LoRA(rank=2, targets=QV), name="b")


def _delta(ad, name):
    return {p: _np(n.delta([name])) for p, n in _nodes(ad).items()}


def test_combine_adapters_cat_and_svd_equal_weighted_sum():
    ad = _two_adapters()
    w = {"default": 0.7, "b": -0.4}
    expect = {p: w["default"] * _np_delta(n, "default") + w["b"] * _np_delta(n, "b") for p, n in _nodes(ad).items()}
    cat = jlora.combine_adapters(ad, w, method="cat", name="mix")
    assert jlora.adapter_names(cat) == ("default", "b", "mix")
    for p, n in _nodes(cat).items():
        assert n.meta["mix"].rank == 5 and n.meta["mix"].scale == 1.0
        assert n.active == ("default", "b")  # added, not activated
        np.testing.assert_allclose(_delta(cat, "mix")[p], expect[p], atol=1e-6)
    svd = jlora.combine_adapters(ad, w, method="svd", name="mix", rank=5)
    for p, d in _delta(svd, "mix").items():
        np.testing.assert_allclose(d, expect[p], atol=1e-5)
    # default rank (max of the ranks = 3) is the best rank-3 approximation of the weighted sum
    svd3 = jlora.combine_adapters(ad, w, method="svd", name="mix")
    for p, d in _delta(svd3, "mix").items():
        u, s, vh = np.linalg.svd(expect[p])
        assert _nodes(svd3)[p].meta["mix"].rank == 3
        np.testing.assert_allclose(d, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
    with pytest.raises(ValueError, match="equal ranks"):
        jlora.combine_adapters(ad, w, method="linear")
    with pytest.raises(ValueError, match="already exists"):
        jlora.combine_adapters(ad, w, name="b")
    with pytest.raises(ValueError, match="'zzz'"):
        jlora.combine_adapters(ad, {"zzz": 1.0})
    with pytest.raises(ValueError, match="'ties'"):
        jlora.combine_adapters(ad, w, method="ties")


def test_combine_adapters_linear_matches_peft():
    """PEFT ``add_weighted_adapter(combination_type="linear")`` (``_generalized_task_arithmetic_
    weighted_adapter``): ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i``, new scale 1."""
    ad = jlora.apply(_params(), jlora.LoRA(rank=2, alpha=4, targets=QV), key=1)       # s = 2
    ad = randomize_b(jlora.apply(ad, jlora.LoRA(rank=2, alpha=1, targets=QV), key=2, name="c"))  # s = 0.5
    w = {"default": 0.6, "c": 0.3}
    lin = jlora.combine_adapters(ad, w, method="linear", name="lin")
    for p, n in _nodes(lin).items():
        assert n.meta["lin"].scale == 1.0 and n.meta["lin"].rank == 2
        ca, cc = np.sqrt(0.6 * 2.0), np.sqrt(0.3 * 0.5)
        a = ca * _np(n.a["default"]) + cc * _np(n.a["c"])
        b = ca * _np(n.b["default"]) + cc * _np(n.b["c"])
        np.testing.assert_allclose(n.a["lin"], a, atol=1e-6)
        np.testing.assert_allclose(n.b["lin"], b, atol=1e-6)
        np.testing.assert_allclose(_np(n.delta(["lin"])), a @ b, atol=1e-6)


def test_delete_adapter():
    params, ad = _params(), _two_adapters()
    one = jlora.delete_adapter(ad, "b")
    assert jlora.adapter_names(one) == ("default",)
    for p, n in _nodes(one).items():
        assert set(n.a) == set(n.b) == {"default"} and n.active == ("default",)
        assert [k for k, _ in n.adapters] == ["default"]
    np.testing.assert_allclose(jlora.lift(fwd)(one, X), np_fwd(_with_deltas(params, ad, ["default"]), X), atol=1e-5)
    none = jlora.delete_adapter(one, "default")
    assert not _nodes(none) and jlora.adapter_names(none) == ()
    for x, y in zip(jax.tree_util.tree_leaves(none), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="'b'"):
        jlora.delete_adapter(one, "b")


# ---------------------------------------------------------------------------------------------
# summary / count

def test_count_by_hand():
    ad = jlora.apply(_params(), jlora.LoRA(rank=2, targets=QV))
    # query: A 6x2 + B 2x8 = 28; value: A 8x2 + B 2x8 = 32
    n_base = 6 * 8 + 8 + 8 + 8 + 8 * 8 + 8 + 8 * 4 + 4
    assert n_base == 180
    assert jlora.count(ad) == {"trainable": 60, "total": 240, "trainable_bytes": 240, "frozen_bytes": 720}
    ad2 = jlora.apply(_params(), jlora.LoRA(rank=2, targets=QV, train_also=["norm"]))
    assert jlora.count(ad2) == {"trainable": 76, "total": 240, "trainable_bytes": 304, "frozen_bytes": 656}
    bf = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _params())
    c = jlora.count(jlora.apply(bf, jlora.LoRA(rank=2, targets=QV)))
    assert c["trainable_bytes"] == 240 and c["frozen_bytes"] == 360  # f32 factors, bf16 base


def test_summary_lists_paths_ranks_and_percentage():
    ad = _two_adapters(train_also=["norm"])
    ad = jlora.activate(ad, ["default"])
    printed = []
    text = jlora.summary(ad, print_fn=printed.append)
    assert printed == [text]
    for path in ("params/query/kernel", "params/value/kernel", "params/norm/scale", "params/norm/bias"):
        assert path in text
    assert "params/out/kernel" not in text
    assert "default:2" in text and "b:3(off)" in text
    row = next(l for l in text.splitlines() if l.startswith("params/query/kernel"))
    assert "(6, 8)" in row and "28" in row.split()  # 6*2 + 2*8 active params
    c = jlora.count(ad)
    pct = float(re.search(r"\(([\d.]+)%\)", text).group(1))
    assert pct == pytest.approx(100 * c["trainable"] / c["total"], abs=1e-4)
    assert f"{c['trainable']:,} / {c['total']:,}" in text
    assert c["trainable"] == 28 + 32 + 16


def test_mark_trainable_head_only():
    params = {"params": {"enc": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
    marked = jlora.mark_trainable(params, r".*/head/(kernel|bias)")
    trainable, frozen = jlora.partition(marked)
    t_paths = sorted(p for p, leaf in flatten_with_paths(trainable, is_leaf=lambda x: isinstance(x, jlora.Trainable))[0]
                     if isinstance(leaf, jlora.Trainable))
    assert t_paths == ["params/head/bias", "params/head/kernel"]
    assert jax.tree_util.tree_leaves(frozen)[0].shape == (4, 4) and len(jax.tree_util.tree_leaves(frozen)) == 1
    chex.assert_trees_all_equal(jlora.merge(jlora.combine(trainable, frozen)), params)
    with pytest.raises(ValueError, match="matched no plain leaf"):
        jlora.mark_trainable(params, r".*/nothing")


def test_dot_star_slash_pattern_matches_top_level_module():
    params = {"query": {"kernel": jnp.ones((4, 4))}, "other": {"kernel": jnp.ones((4, 4))}}
    ad = jlora.apply(params, jlora.LoRA(rank=2, targets=r".*/query/kernel"), jax.random.key(0))
    assert jlora.is_node(ad["query"]["kernel"]) and not jlora.is_node(ad["other"]["kernel"])


def test_donating_trainable_leaves_never_deletes_the_callers_params():
    params = {"params": {"enc": {"kernel": jnp.ones((4, 4))}, "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}}
    for marked in (jlora.mark_trainable(params, r".*/head/bias"),
                   jlora.apply(params, jlora.LoRA(rank=2, targets=r".*/enc/kernel", train_also=r".*/head/bias"), jax.random.key(0))):
        trainable, _ = jlora.partition(marked)
        jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 1, t), donate_argnums=0)(trainable)
        np.testing.assert_array_equal(params["params"]["head"]["bias"], np.zeros(2))  # still alive


def test_module_name_targets_adapt_stacked_kernels_not_stacked_biases():
    params = {"layers": {"fc": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.zeros((3, 4))}}}
    spec = jlora.LoRA(rank=2, targets=["fc"], axes={r".*kernel": jlora.Axes(stack=1, inputs=1)})
    ad = jlora.apply(params, spec, jax.random.key(0))
    assert jlora.is_node(ad["layers"]["fc"]["kernel"]) and not jlora.is_node(ad["layers"]["fc"]["bias"])
