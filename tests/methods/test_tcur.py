"""tCURLoRA: the official selection (NumPy reference on real MiniLM weights), the zero initial update,
Hermitian symmetry of the core, n3*r^2 parameters, lift == merge, factored == materialised paths,
training only U, checkpoints, summary, and the selection modes."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.core.state import LoRAState
from jlora.core import lift as lift_mod
from jlora.core.paths import flatten_with_paths
from jlora.methods import tcur
from jlora.models import bert

TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64, num_labels=3)
IDS = np.array([[2, 17, 45, 98, 3, 61, 7], [2, 11, 9, 3, 0, 0, 0]], np.int32)
MASK = (IDS > 0).astype(np.int32)
LABELS = np.array([0, 2], np.int32)


def _bert(cfg=TINY, seed=0):
    model = bert.BertForSequenceClassification(cfg)
    return model, model.init(jax.random.key(seed), IDS, MASK)


def _perturb(adapted, scale=0.05, seed=3):
    """Moves every core away from U0 (Hermitian-symmetric by construction: the stored half)."""
    key = jax.random.key(seed)
    groups = {}
    for i, (g, gp) in enumerate(adapted["jlora_tcur"].items()):
        new = dict(gp)
        for name in ("u_re", "u_im"):
            v = gp[name].value
            noise = scale * jax.random.normal(jax.random.fold_in(key, 2 * i + (name == "u_im")), v.shape)
            new[name] = jlora.Trainable(v + noise * (1 + jnp.abs(v)), gp[name].path)
        groups[g] = new
    return {**adapted, "jlora_tcur": groups}


def _kernels(tree):
    return {p: np.asarray(v) for p, v in flatten_with_paths(tree)[0] if p.endswith("kernel")}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------
# the official selection on a real MiniLM tensor

def _numpy_official(t, r):
    """``cur_decomposition`` of the official t-CURLora.py, in NumPy (float64): column scores
    sum_k ||D_k[:, j]||, rows on the column-reduced tensor, top-r each (descending)."""
    d = np.fft.fft(np.asarray(t, np.float64), axis=0)
    col = np.linalg.norm(d, axis=1).sum(0)
    cols = np.argsort(-col, kind="stable")[:r]
    row = np.linalg.norm(d[:, :, cols], axis=2).sum(0)
    rows = np.argsort(-row, kind="stable")[:r]
    c, rr = d[:, :, cols], d[:, rows, :]
    u0 = np.linalg.pinv(d[:, rows][:, :, cols])
    return cols, rows, c, rr, u0, col, row


@pytest.fixture(scope="module")
def minilm():
    model, params, _ = bert.load_pretrained()
    return model, params


def test_norm_selection_matches_numpy_reference_on_minilm(minilm):
    _, params = minilm
    r = 8
    spec = jlora.TCURLoRA(rank=r)
    adapted = jlora.apply(params, spec, jax.random.key(0))
    groups = adapted["jlora_tcur"]
    assert set(groups) == {"attention", "mlp_up", "mlp_down"}
    flat = flatten_with_paths(params)[0]
    entries = spec.resolve_groups(flat, lambda p, leaf, i: jlora.Layout(0, 1, 1))
    # the official stacking order: per layer [output/dense (out_proj), query, key, value]
    order = [e[0][2].split("/encoder/")[1] for e in entries["attention"][:5]]
    assert order == ["layer_0/attention/output/dense/kernel", "layer_0/attention/self/query/kernel",
                     "layer_0/attention/self/key/kernel", "layer_0/attention/self/value/kernel",
                     "layer_1/attention/output/dense/kernel"]
    kern = dict(flat)
    for g, n3, shape in (("attention", 24, (384, 384)), ("mlp_up", 6, (1536, 384)), ("mlp_down", 6, (384, 1536))):
        t = np.stack([np.asarray(kern[e[0][2]]).T for e in entries[g]])
        assert t.shape == (n3,) + shape
        cols, rows, c, rr, u0, col_s, row_s = _numpy_official(t, r)
        # the top-r boundary is not a near tie (else float32 vs float64 could legitimately differ)
        assert np.sort(col_s)[::-1][r - 1] - np.sort(col_s)[::-1][r] > 1e-4 * col_s.max()
        gp = groups[g]
        np.testing.assert_array_equal(np.asarray(gp["cols"]), cols)
        np.testing.assert_array_equal(np.asarray(gp["rows"]), rows)
        h = n3 // 2 + 1
        np.testing.assert_allclose(np.asarray(gp["c_re"]) + 1j * np.asarray(gp["c_im"]), c[:h],
                                   rtol=0, atol=2e-4 * np.abs(c).max())
        np.testing.assert_allclose(np.asarray(gp["r_re"]) + 1j * np.asarray(gp["r_im"]), rr[:h],
                                   rtol=0, atol=2e-4 * np.abs(rr).max())
        np.testing.assert_allclose(np.asarray(gp["u0_re"]) + 1j * np.asarray(gp["u0_im"]), u0[:h],
                                   rtol=0, atol=2e-3 * np.abs(u0).max())
        # the pure selection function gives the same, jitted
        i2, j2 = jax.jit(tcur.select_norm, static_argnums=1)(jnp.asarray(t, jnp.float32), r)
        np.testing.assert_array_equal(np.asarray(i2), cols)
        np.testing.assert_array_equal(np.asarray(j2), rows)
    # the update is exactly zero at init: every expanded B_k is 0, merge returns the base bit for bit
    for leaf in jax.tree_util.tree_leaves(tcur.expand(adapted), is_leaf=jlora.is_node):
        if jlora.is_node(leaf):
            assert not np.any(np.asarray(leaf.b["default"]))
    base, merged = _kernels(params), _kernels(jlora.merge(adapted))
    assert max(_rel(merged[p], base[p]) for p in base) < 1e-6
    # a real forward through lift (float32 evaluation-order noise only)
    model, _ = minilm
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], np.int32)
    mask = np.ones_like(ids)
    seq0, _ = model.apply(params, ids, mask)
    seq1, _ = jlora.lift(model.apply)(adapted, ids, mask)
    assert _rel(seq1, seq0) < 1e-5


# ---------------------------------------------------------------------------------------------
# invariants on a tiny BERT

@pytest.fixture(scope="module")
def tiny():
    model, params = _bert()
    adapted = jlora.apply(params, jlora.TCURLoRA(rank=3, train_also=r".*/classifier/(kernel|bias)"),
                          jax.random.key(1))
    return model, params, adapted


def test_update_is_exactly_zero_at_init(tiny):
    model, params, adapted = tiny
    base, merged = _kernels(params), _kernels(jlora.merge(adapted))
    for p in base:
        assert _rel(merged[p], base[p]) < 1e-6, p
    y0 = model.apply(params, IDS, MASK)
    assert _rel(jlora.lift(model.apply)(adapted, IDS, MASK), y0) < 1e-6
    for gp in adapted["jlora_tcur"].values():
        assert float(jnp.max(jnp.abs(tcur.reference_delta(gp)))) == 0.0
        assert not np.any(np.asarray(tcur.group_factors(gp)[1]))


def test_ifft_imaginary_part_vanishes_and_matches_merged_slices(tiny):
    model, params, adapted = tiny
    moved = _perturb(adapted)
    gp = moved["jlora_tcur"]["attention"]
    ref = np.asarray(tcur.reference_delta(gp))
    assert np.abs(ref.real).max() > 1e-3
    assert np.abs(ref.imag).max() <= 1e-6 * np.abs(ref.real).max()
    # slice k of Re IFFT(C (U - U0) R) is what merge adds to kernel k (transposed back to (in, out))
    entries = jlora.TCURLoRA(rank=3).resolve_groups(flatten_with_paths(params)[0], lambda p, leaf, i: jlora.Layout(0, 1, 1))
    base, merged = _kernels(params), _kernels(jlora.merge(moved))
    for k, e in enumerate(entries["attention"]):
        p = e[0][2]
        np.testing.assert_allclose(merged[p] - base[p], ref.real[k].T, atol=1e-6 * np.abs(ref.real).max() + 1e-7)


def test_anti_hermitian_perturbations_do_not_change_the_update(tiny):
    _, _, adapted = tiny
    gp = _perturb(adapted)["jlora_tcur"]["attention"]
    u = tcur.full_core(gp)
    n3 = u.shape[0]
    rng = np.random.default_rng(0)
    e = rng.standard_normal(u.shape) + 1j * rng.standard_normal(u.shape)
    anti = (e - np.conj(e[(-np.arange(n3)) % n3])) / 2      # E_{n3-k} = -conj(E_k)
    herm = (e + np.conj(e[(-np.arange(n3)) % n3])) / 2
    ref = tcur.reference_delta(gp)
    moved = tcur.reference_delta(gp, u + jnp.asarray(anti, u.dtype))
    scale = float(jnp.abs(ref.real).max())
    assert float(jnp.abs(moved.real - ref.real).max()) < 1e-5 * scale
    assert float(jnp.abs(moved.imag).max()) > 1e-3 * scale            # it went to the discarded imaginary part
    changed = tcur.reference_delta(gp, u + jnp.asarray(herm, u.dtype))
    assert float(jnp.abs(changed.real - ref.real).max()) > 1e-2 * scale  # a Hermitian one does change it


@pytest.mark.parametrize("layers", [2, 3])
def test_parameter_count_is_n3_r_squared_per_tensor(layers):
    cfg = bert.BertConfig(**{**TINY.__dict__, "num_hidden_layers": layers})
    model, params = _bert(cfg)
    r = 3
    adapted = jlora.apply(params, jlora.TCURLoRA(rank=r), jax.random.key(0))
    n3 = {"attention": 4 * layers, "mlp_up": layers, "mlp_down": layers}   # n3 even and odd
    for g, gp in adapted["jlora_tcur"].items():
        h = n3[g] // 2 + 1
        assert gp["u_re"].shape == (h, r, r) and gp["u_im"].shape == (n3[g] - h, r, r)
    trainable, _ = jlora.partition(adapted)
    leaves = jax.tree_util.tree_leaves(trainable)
    assert sum(x.size for x in leaves) == sum(n * r * r for n in n3.values())
    assert jlora.count(adapted)["trainable"] == sum(n * r * r for n in n3.values())


def test_lift_equals_merge_and_factored_equals_materialised(tiny, monkeypatch):
    model, params, adapted = tiny
    moved = _perturb(adapted)
    merged_out = model.apply(jlora.merge(moved), IDS, MASK)
    assert _rel(jlora.lift(model.apply)(moved, IDS, MASK), merged_out) < 1e-5

    def loss(fwd):
        def f(t, frozen):
            logits = fwd(jlora.combine(t, frozen), IDS, MASK)
            return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
        return f

    trainable, frozen = jlora.partition(moved)
    results = {}
    for forced in (True, False):   # the cheaper-path rule forced each way
        monkeypatch.setattr(lift_mod, "_denser_than_dense", lambda node, forced=forced: forced)
        results[forced] = jax.value_and_grad(loss(jlora.lift(model.apply)))(trainable, frozen)
    monkeypatch.undo()
    (l1, g1), (l2, g2) = results[True], results[False]
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    _assert_grads_close(g1, g2)
    # and the merged (plain model) gradient through merge agrees too
    lm, gm = jax.value_and_grad(lambda t, f: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(jlora.merge(jlora.combine(t, f)), IDS, MASK), LABELS).mean())(trainable, frozen)
    np.testing.assert_allclose(lm, l2, rtol=1e-6)
    _assert_grads_close(gm, g2)


def _assert_grads_close(g1, g2):
    leaves1, leaves2 = jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)
    assert len(leaves1) == len(leaves2) and any(np.abs(b).max() > 0 for b in leaves2 if b.size)
    for a, b in zip(leaves1, leaves2):
        if b.size:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-9)


def test_cheaper_path_rule_counts_flops():
    def node(rank, d_in, d_out):
        meta = jlora.AdapterMeta("lora", rank, 1.0)
        return jlora.AdaptedWeight(jnp.zeros((d_in, d_out)), {"x": LoRAState(jnp.zeros((d_in, rank)), jnp.zeros((rank, d_out)))},
                                   jlora.Layout(0, 1, 1), (("x", meta),), ("x",))
    assert not lift_mod._denser_than_dense(node(8, 384, 384))
    assert not lift_mod._denser_than_dense(node(192, 384, 384))      # R (d_in + d_out) == d_in d_out: factored
    assert lift_mod._denser_than_dense(node(193, 384, 384))
    assert lift_mod._denser_than_dense(node(24, 32, 32))             # tiny tCURLoRA attention, n3 r = 8 * 3


def test_training_step_changes_only_the_cores(tiny):
    model, params, _ = tiny
    adapted = jlora.apply(params, jlora.TCURLoRA(rank=2), jax.random.key(1))
    trainable, frozen = jlora.partition(adapted)
    paths = [p for p, x in flatten_with_paths(trainable)[0] if x is not None]
    assert sorted(paths) == sorted(f"jlora_tcur/{g}/{n}" for g in ("attention", "mlp_up", "mlp_down")
                                   for n in ("u_re", "u_im"))
    forward = jlora.lift(model.apply)

    def loss_fn(p, batch, key):
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, *batch[:2]), batch[2]).mean()

    before = jax.tree_util.tree_map(np.array, trainable)
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    opt = optax.adam(1e-2)
    step = jlora.train.make_step(loss_fn, opt)
    state = opt.init(trainable)
    losses = []
    for i in range(5):
        trainable, state, metrics = step(trainable, frozen, state, (IDS, MASK, LABELS), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for g in ("attention", "mlp_up", "mlp_down"):
        assert not np.allclose(trainable["jlora_tcur"][g]["u_re"].value, before["jlora_tcur"][g]["u_re"].value)
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(frozen_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    after = jlora.combine(trainable, frozen)
    assert _rel(jlora.lift(model.apply)(after, IDS, MASK), model.apply(params, IDS, MASK)) > 1e-4


def test_save_load_round_trip_and_unmerge(tiny, tmp_path):
    model, params, adapted = tiny
    moved = _perturb(adapted)
    spec = jlora.TCURLoRA(rank=3, train_also=r".*/classifier/(kernel|bias)")
    jlora.io.save_adapter(tmp_path / "a", moved, spec=spec)
    restored = jlora.io.load_adapter(tmp_path / "a", params)
    forward = jlora.lift(model.apply)
    np.testing.assert_allclose(forward(restored, IDS, MASK), forward(moved, IDS, MASK), rtol=1e-6, atol=1e-7)
    assert jlora.count(restored)["trainable"] == jlora.count(moved)["trainable"]
    meta = jlora.io.read_adapter_metadata(tmp_path / "a")
    assert meta["spec"]["method"] == "tcur" and meta["spec"]["rank"] == 3
    # unmerge recovers the base kernels and keeps the shared cores
    back = jlora.unmerge(jlora.merge(moved), moved)
    assert "jlora_tcur" in back
    for p, k in _kernels(jlora.merge(jlora.activate(back, []))).items():
        np.testing.assert_allclose(k, _kernels(params)[p], atol=1e-5)


def test_summary_shows_tensors_n3_r_and_counts(tiny):
    _, _, adapted = tiny
    text = jlora.summary(adapted)
    assert "attention: 8 kernels stacked, n3=8, slice 32x32 (out x in), r=3, selection=norm, trainable 72" in text
    assert "mlp_up: 2 kernels stacked, n3=2, slice 37x32 (out x in), r=3" in text
    assert "trainable: 207 / " in text     # 8*9 + 2*9 + 2*9 cores + the 99-parameter classifier


# ---------------------------------------------------------------------------------------------
# selection modes, ranks, groups

class _Parallel(nn.Module):
    """y = sum_l x @ K_l over four same-shape Dense kernels: a group whose useful input columns
    (features 0-3, the only non-zero inputs) have the smallest weights."""

    @nn.compact
    def __call__(self, x):
        return sum(nn.Dense(8, use_bias=False, name=f"layer_{i}")(x) for i in range(4))


def _parallel_setup():
    model = _Parallel()
    x = np.zeros((32, 16), np.float32)
    x[:, :4] = np.random.default_rng(0).standard_normal((32, 4))
    y = np.sin(x[:, :4] @ np.ones((4, 8), np.float32))
    params = model.init(jax.random.key(0), x)
    params = jax.tree_util.tree_map(lambda k: k.at[:4].multiply(0.01), params)   # tiny rows for features 0-3

    def loss_fn(p, batch):
        return jnp.mean((model.apply(p, batch[0]) - batch[1]) ** 2)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    return model, params, loss_fn, batches, x, y


@pytest.mark.parametrize("selection", tcur.SELECTIONS)
def test_every_selection_mode_runs(selection):
    model, params, loss_fn, batches, x, y = _parallel_setup()
    spec = jlora.TCURLoRA(rank=2, groups={"dense": r".*/layer_\d+/kernel"}, selection=selection,
                          calibration=(loss_fn, batches))
    adapted = jlora.apply(params, spec, jax.random.key(4))
    forward = jlora.lift(model.apply)
    assert _rel(forward(adapted, x), model.apply(params, x)) < 1e-6
    moved = _perturb(adapted, scale=0.2)
    assert _rel(forward(moved, x), model.apply(jlora.merge(moved), x)) < 1e-5
    assert _rel(forward(moved, x), model.apply(params, x)) > 1e-4
    if selection == "svd":
        assert "cols" not in adapted["jlora_tcur"]["dense"]


def test_gradient_and_fisher_select_the_fibres_the_loss_uses():
    model, params, loss_fn, batches, x, y = _parallel_setup()
    picked = {}
    for sel in ("norm", "gradient", "fisher"):
        spec = jlora.TCURLoRA(rank=3, groups={"dense": r".*/layer_\d+/kernel"}, selection=sel,
                              calibration=(loss_fn, batches))
        picked[sel] = set(np.asarray(jlora.apply(params, spec, 0)["jlora_tcur"]["dense"]["cols"]).tolist())
    # columns of the (out, in) tensor are input features: only 0-3 carry signal, and they have tiny weights
    assert picked["norm"].isdisjoint(range(4))
    assert picked["gradient"] <= set(range(4)) and picked["fisher"] <= set(range(4))


def test_random_selection_is_seeded():
    _, params, *_ = _parallel_setup()
    spec = jlora.TCURLoRA(rank=3, groups={"dense": r".*/layer_\d+/kernel"}, selection="random")
    cols = lambda k: np.asarray(jlora.apply(params, spec, k)["jlora_tcur"]["dense"]["cols"])
    np.testing.assert_array_equal(cols(1), cols(1))
    assert not np.array_equal(cols(1), cols(2))


def test_auto_rank_allocates_the_budget_by_importance(tiny):
    model, params, _ = tiny
    budget = 8 * 9 + 2 * 9 + 2 * 9
    spec = jlora.TCURLoRA(rank="auto", budget=budget)
    adapted = jlora.apply(params, spec, 0)
    ranks = {g: gp["u_re"].shape[-1] for g, gp in adapted["jlora_tcur"].items()}
    n3 = {"attention": 8, "mlp_up": 2, "mlp_down": 2}
    assert sum(n3[g] * r * r for g, r in ranks.items()) <= budget
    assert min(ranks.values()) >= 1
    energy = {g: sum(float(np.sum(np.asarray(k) ** 2)) for p, k in _kernels(params).items() if p in
                     {e[0][2] for e in spec.resolve_groups(flatten_with_paths(params)[0], lambda p, l, i: jlora.Layout(0, 1, 1))[g]})
              for g in ranks}
    top = max(energy, key=energy.get)
    assert ranks[top] == max(ranks.values())
    with pytest.raises(ValueError, match="budget"):
        jlora.TCURLoRA(rank="auto")
    with pytest.raises(ValueError, match="below the minimum"):
        jlora.apply(params, jlora.TCURLoRA(rank="auto", budget=5), 0)


def test_rank_per_group_and_user_groups():
    model, params = _bert()
    spec = jlora.TCURLoRA(rank={"qv": 2, "down": 1},
                          groups={"qv": [r".*/self/query/kernel", r".*/self/value/kernel"], "down": r".*/layer_\d+/output/dense/kernel"})
    adapted = jlora.apply(params, spec, 0)
    assert adapted["jlora_tcur"]["qv"]["u_re"].shape == (3, 2, 2)        # n3 = 4
    assert adapted["jlora_tcur"]["down"]["u_re"].shape == (2, 1, 1)
    assert not jlora.is_node(adapted["params"]["encoder"]["layer_0"]["attention"]["self"]["key"]["kernel"])
    moved = _perturb(adapted)
    assert _rel(jlora.lift(model.apply)(moved, IDS, MASK), model.apply(jlora.merge(moved), IDS, MASK)) < 1e-5


def test_scale_multiplies_the_update_in_lift_merge_and_checkpoints(tiny, tmp_path):
    model, params, _ = tiny
    y0 = model.apply(params, IDS, MASK)
    outs = {}
    for scale in (1.0, 4.0):
        moved = _perturb(jlora.apply(params, jlora.TCURLoRA(rank=3, scale=scale), 0))
        outs[scale] = jlora.lift(model.apply)(moved, IDS, MASK)
        merged = jlora.merge(moved)
        np.testing.assert_allclose(model.apply(merged, IDS, MASK), outs[scale], rtol=1e-5, atol=1e-6)
        if scale == 4.0:
            d1 = {p: k - _kernels(params)[p] for p, k in _kernels(jlora.merge(_perturb(
                jlora.apply(params, jlora.TCURLoRA(rank=3), 0)))).items()}
            for p, k in _kernels(merged).items():
                np.testing.assert_allclose(k - _kernels(params)[p], 4.0 * d1[p], rtol=1e-4, atol=1e-6)
            jlora.io.save_adapter(tmp_path / "s", moved, spec=jlora.TCURLoRA(rank=3, scale=scale))
            back = jlora.io.load_adapter(tmp_path / "s", params)
            np.testing.assert_allclose(jlora.lift(model.apply)(back, IDS, MASK), outs[scale], rtol=1e-6, atol=1e-7)
            assert jlora.io.read_adapter_metadata(tmp_path / "s")["spec"]["scale"] == 4.0
    assert _rel(outs[4.0], y0) > _rel(outs[1.0], y0) > 1e-4
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="scale must be a positive finite number"):
            jlora.TCURLoRA(scale=bad)


def test_group_errors():
    _, params = _bert()
    with pytest.raises(ValueError, match="mixes kernel shapes"):
        jlora.apply(params, jlora.TCURLoRA(groups={"g": [r".*/query/kernel", r".*/intermediate/dense/kernel"]}), 0)
    with pytest.raises(ValueError, match="match no kernel"):
        jlora.apply(params, jlora.TCURLoRA(groups={"g": r".*/nothing/kernel"}), 0)
    with pytest.raises(ValueError, match="disjoint"):
        jlora.apply(params, jlora.TCURLoRA(groups={"a": r".*/query/kernel", "b": r".*/self/.*/kernel"}), 0)
    with pytest.raises(ValueError, match="exceeds"):
        jlora.apply(params, jlora.TCURLoRA(rank=33), 0)
    with pytest.raises(ValueError, match="calibration"):
        jlora.TCURLoRA(selection="gradient")
    with pytest.raises(ValueError, match="selection"):
        jlora.TCURLoRA(selection="leverage")
    with pytest.raises(ValueError, match="bert / llama / vit"):
        jlora.apply({"params": {"d": {"kernel": jnp.ones((4, 4))}}}, jlora.TCURLoRA(), 0)
    # the nodes cannot be run without their shared group
    adapted = jlora.apply(params, jlora.TCURLoRA(rank=2), 0)
    with pytest.raises(ValueError, match="shared group"):
        jlora.merge({"params": adapted["params"]})


def test_llama_default_groups_split_grouped_query_attention():
    from jlora.models import llama
    config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2)
    model = llama.LlamaForCausalLM(config)
    params = model.init_params(jax.random.key(0))
    adapted = jlora.apply(params, jlora.TCURLoRA(rank=2), 0)
    shapes = {g: (gp["u_re"].shape[0], gp["c_re"].shape[1:], gp["r_re"].shape[2]) for g, gp in adapted["jlora_tcur"].items()}
    assert set(shapes) == {"attention", "attention_16x32", "mlp_up", "mlp_down"}   # o/q: 32x32; k/v: 16x32
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
    moved = _perturb(adapted)
    out = jlora.lift(model.apply)(moved, ids)
    assert _rel(out, model.apply(jlora.merge(moved), ids)) < 1e-5


def test_scanned_layers_give_the_same_tensor_and_output():
    model, params = _bert()
    cfg_s = bert.BertConfig(**{**TINY.__dict__, "scan_layers": True})
    model_s = bert.BertForSequenceClassification(cfg_s)
    params_s = {"params": bert.stack_layers(params["params"])}
    spec = jlora.TCURLoRA(rank=2, axes={r".*/layers/.*/kernel": jlora.Axes(stack=1, inputs=1)})
    a_u = jlora.apply(params, jlora.TCURLoRA(rank=2), 0)
    a_s = jlora.apply(params_s, spec, 0)
    for g in a_u["jlora_tcur"]:
        np.testing.assert_array_equal(np.asarray(a_u["jlora_tcur"][g]["cols"]), np.asarray(a_s["jlora_tcur"][g]["cols"]))
    m_u, m_s = _perturb(a_u), _perturb(a_s)
    np.testing.assert_allclose(jlora.lift(model_s.apply)(m_s, IDS, MASK), jlora.lift(model.apply)(m_u, IDS, MASK),
                               rtol=1e-4, atol=1e-6)


def test_ablation_script_runs_on_a_tiny_step_count(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "tcurlora_ablation.py"
    spec = importlib.util.spec_from_file_location("tcurlora_ablation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--steps", "2", "--eval-limit", "16", "--data", "rotten_tomatoes", "--runs",
                    "head,lora,tcur_fisher_auto", "--calib-batches", "1", "--json", str(tmp_path / "t.json"),
                    "--md", str(tmp_path / "t.md"), "--tcur-scale", "0.5"])
    runs = {r["run"]: r for r in res["results"]["rotten_tomatoes"]}
    head = 384 * 2 + 2 + 384 * 384 + 384                     # the new classifier + the (untrained) pooler
    assert runs["head"]["trainable_params"] == head and runs["head"]["adapter_params"] == 0
    assert runs["lora"]["adapter_params"] == 6 * 2 * 2 * 8 * 384 and runs["lora"]["trainable_params"] == 73_728 + head
    assert 0 < runs["tcur_fisher_auto"]["adapter_params"] <= 36 * 4 ** 2             # within the core budget
    assert runs["tcur_fisher_auto"]["scale"] == 0.5 and runs["lora"]["scale"] is None
    saved = json.loads((tmp_path / "t.json").read_text())
    assert [r["run"] for r in saved["results"]["rotten_tomatoes"]] == ["head", "lora", "tcur_fisher_auto"]
    assert "| tCURLoRA fisher, auto ranks (same budget) |" in (tmp_path / "t.md").read_text()
    # results of separate runs (one per data set) merge into one table, training nothing
    other = dict(saved, command="other", results={"bbc_news": saved["results"]["rotten_tomatoes"]})
    (tmp_path / "o.json").write_text(json.dumps(other))
    merged = mod.main(["--from-json", f"{tmp_path / 't.json'},{tmp_path / 'o.json'}", "--json", "",
                       "--md", str(tmp_path / "m.md")])
    assert list(merged["results"]) == ["rotten_tomatoes", "bbc_news"] and len(merged["commands"]) == 2
    md = (tmp_path / "m.md").read_text()
    assert md.count("| head only (no adapter) |") == 2 and "`other`" in md
    (tmp_path / "x.json").write_text(json.dumps(dict(other, steps=7)))
    with pytest.raises(SystemExit, match="steps differs"):
        mod.main(["--from-json", f"{tmp_path / 't.json'},{tmp_path / 'x.json'}", "--json", "", "--md", ""])
