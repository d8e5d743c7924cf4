"""DoRA: PEFT's formula, closed-form norms, factored forward, merge/unmerge, QDoRA, PEFT parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.methods.dora import dora_norm, column_sq_norms

from ..core._helpers import assert_lift_matches_merge, randomize_b
from ..core.test_lift import IDS, LM, X48, Attention, _grad_jaxpr, _kernel_sized_ops

KEY = jax.random.key(0)


def _perturb(adapted, seed=3):
    """Non-zero A, B and a magnitude away from its init, so every term of DoRA matters."""
    rng = np.random.default_rng(seed)
    adapted = randomize_b(adapted, key=seed, scale=0.3)

    def f(leaf):
        if not jlora.is_node(leaf):
            return leaf
        extra = {n: {k: v * jnp.asarray(1 + 0.2 * rng.standard_normal(v.shape), v.dtype) for k, v in d.items()}
                 for n, d in leaf.extra.items()}
        return leaf.with_(extra=extra)
    return jax.tree_util.tree_map(f, adapted, is_leaf=jlora.is_node)


def _peft_reference(w0, a, b, m, scale):
    """PEFT's DoRA weight in float64, Flax (in, out) layout: m * (W0 + sAB) / ||W0 + sAB||_col."""
    w = np.asarray(w0, np.float64) + scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    return np.asarray(m, np.float64) * w / np.linalg.norm(w, axis=0)


def _dense_adapted(rank=4, alpha=8.0, shape=(24, 16), seed=0):
    dense = nn.Dense(shape[1])
    x = jax.random.normal(jax.random.key(seed), (5, shape[0]))
    params = dense.init(jax.random.key(seed + 1), x)
    ad = jlora.apply(params, jlora.DoRA(rank=rank, alpha=alpha, targets=".*kernel"), jax.random.key(seed + 2))
    return dense, params, x, ad


def _node(ad):
    return ad["params"]["kernel"]


def test_noop_at_init_and_magnitude_is_column_norm():
    dense, params, x, ad = _dense_adapted()
    node = _node(ad)
    w0 = np.asarray(params["params"]["kernel"])
    np.testing.assert_allclose(node.extra["default"]["m"], np.linalg.norm(w0, axis=0), rtol=1e-6)
    np.testing.assert_allclose(node.cache["default"]["w0_sq"], (w0 ** 2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(jlora.lift(dense.apply, strict=True)(ad, x), dense.apply(params, x), atol=1e-5)
    assert node.meta["default"].method == "dora"


def test_closed_form_norm_equals_materialised_norm():
    rng = np.random.default_rng(0)
    cases = ((jlora.Layout(0, 1, 1), (40, 12), "ir,ro->io"),
             (jlora.Layout(1, 2, 1), (3, 10, 6, 7), "sijr,sro->sijo"))
    for lay, shape, eq in cases:
        w0 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        stack, ins, outs = lay.split(shape)
        a = jnp.asarray(rng.standard_normal(stack + ins + (3,)), jnp.float32)
        b = jnp.asarray(rng.standard_normal(stack + (3,) + outs), jnp.float32)
        got = dora_norm(w0, a, b, 0.7, column_sq_norms(w0, lay), lay)
        full = np.asarray(w0, np.float64) + 0.7 * np.einsum(eq, np.asarray(a, np.float64), np.asarray(b, np.float64))
        ref = np.sqrt((full ** 2).sum(axis=tuple(range(lay.stack, lay.stack + lay.inputs))))
        assert got.shape == stack + outs
        np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_equals_peft_formula_and_gradients_match_materialised():
    dense, params, x, ad = _dense_adapted()
    ad = _perturb(ad)
    node = _node(ad)
    ref = _peft_reference(params["params"]["kernel"], node.a["default"], node.b["default"],
                          node.extra["default"]["m"], node.meta["default"].scale)
    np.testing.assert_allclose(node.materialize(jnp.float32), ref, rtol=1e-5, atol=1e-6)
    out = jlora.lift(dense.apply, strict=True)(ad, x)
    np.testing.assert_allclose(out, np.asarray(x, np.float64) @ ref + np.asarray(params["params"]["bias"]),
                               rtol=1e-5, atol=1e-5)
    assert_lift_matches_merge(dense.apply, ad, x)


def test_norm_is_a_constant_in_backward():
    """Paper §4.3 / PEFT: the gradient w.r.t. A and B flows through the numerator only."""
    dense, params, x, ad = _dense_adapted()
    ad = _perturb(ad)
    trainable, frozen = jlora.partition(ad)
    lifted = jlora.lift(dense.apply, strict=True)
    g = jax.grad(lambda t: jnp.sum(lifted(jlora.combine(t, frozen), x) ** 2))(trainable)
    node = _node(ad)
    w0 = params["params"]["kernel"]
    s = node.meta["default"].scale

    def ref_loss(a, b, m):
        w = w0 + s * a @ b
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
        return jnp.sum((x @ (m * w / norm) + params["params"]["bias"]) ** 2)

    ga, gb, gm = jax.grad(ref_loss, argnums=(0, 1, 2))(node.a["default"], node.b["default"], node.extra["default"]["m"])
    gnode = _node(g)
    np.testing.assert_allclose(gnode.a["default"], ga, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gnode.b["default"], gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gnode.extra["default"]["m"], gm, rtol=1e-4, atol=1e-5)
    # and it differs from the gradient with the norm NOT detached (the check could fail)
    def full_loss(a, b, m):
        w = w0 + s * a @ b
        return jnp.sum((x @ (m * w / jnp.linalg.norm(w, axis=0)) + params["params"]["bias"]) ** 2)
    assert not np.allclose(jax.grad(full_loss)(node.a["default"], node.b["default"], node.extra["default"]["m"]), ga,
                           rtol=1e-3)


def test_merge_unmerge_exact_and_bias_not_rescaled():
    dense, params, x, ad = _dense_adapted()
    ad = _perturb(ad)
    merged = jlora.merge(ad)
    np.testing.assert_array_equal(merged["params"]["bias"], params["params"]["bias"])
    np.testing.assert_allclose(dense.apply(merged, x), jlora.lift(dense.apply)(ad, x), atol=1e-5)
    back = jlora.unmerge(merged, ad)
    np.testing.assert_allclose(_node(back).base, params["params"]["kernel"], atol=1e-6)


@pytest.mark.parametrize("module,x,targets", [
    (Attention(), X48, r".*/(query|key|value|out)/kernel"),
    (nn.Einsum((48, 4, 6), "btd,dhk->bthk"), X48, ".*kernel"),
])
def test_multi_axis_kernels_lift_equals_merge(module, x, targets):
    params = module.init(KEY, x)
    ad = _perturb(jlora.apply(params, jlora.DoRA(rank=2, alpha=4, targets=targets), jax.random.key(1),
                              model=module.apply, example=(x,)))
    assert_lift_matches_merge(module.apply, ad, x)


def test_scanned_transformer_no_kernel_sized_ops_in_gradient():
    model = LM(layers=2)
    params = model.init(KEY, IDS)
    ad = _perturb(jlora.apply(params, jlora.DoRA(rank=2, alpha=4, targets=r".*(query|key|value|out|up|down)/kernel"),
                              jax.random.key(1), model=model.apply, example=(IDS,)))
    assert_lift_matches_merge(model.apply, ad, IDS)
    sizes = set()
    for n in jax.tree_util.tree_leaves(ad, is_leaf=jlora.is_node):
        if jlora.is_node(n):
            sizes |= {int(np.prod(n.shape)), int(np.prod(n.shape[1:]))}
    assert not {480, 960} & sizes
    found = _kernel_sized_ops(_grad_jaxpr(jlora.lift(model.apply, strict=True), ad, IDS).jaxpr, sizes, [])
    assert found == []
    merged_fn = lambda p, x: model.apply(jlora.merge(p), x)  # negative control
    assert _kernel_sized_ops(_grad_jaxpr(merged_fn, ad, IDS).jaxpr, sizes, [])


def test_training_step_changes_only_dora_params_and_round_trips(tmp_path):
    import optax
    dense, params, x, ad = _dense_adapted()
    trainable, frozen = jlora.partition(ad)
    lifted = jlora.lift(dense.apply)
    y = jax.random.normal(jax.random.key(9), (5, 16))
    loss = lambda t: jnp.mean((lifted(jlora.combine(t, frozen), x) - y) ** 2)
    opt = optax.adam(1e-2)
    st = opt.init(trainable)
    for _ in range(3):
        g = jax.grad(loss)(trainable)
        upd, st = opt.update(g, st, trainable)
        trainable = optax.apply_updates(trainable, upd)
    new = jlora.combine(trainable, frozen)
    node0, node1 = _node(ad), _node(new)
    assert not np.allclose(node1.extra["default"]["m"], node0.extra["default"]["m"])
    assert not np.allclose(node1.b["default"], 0)
    np.testing.assert_array_equal(node1.base, node0.base)
    np.testing.assert_array_equal(node1.cache["default"]["w0_sq"], node0.cache["default"]["w0_sq"])
    jlora.io.save_adapter(tmp_path / "dora", new, jlora.DoRA(rank=4, alpha=8.0, targets=".*kernel"))
    back = jlora.io.load_adapter(tmp_path / "dora", params)
    np.testing.assert_allclose(lifted(back, x), lifted(new, x), atol=1e-6)
    assert "dora" in jlora.summary(new)
    c = jlora.count(new)
    assert c["trainable"] == 24 * 4 + 4 * 16 + 16  # A, B and the magnitude


def test_qdora_on_nf4_base():
    dense = nn.Dense(128)
    x = jax.random.normal(KEY, (4, 128))
    params = dense.init(jax.random.key(1), x)
    spec = jlora.QDoRA(rank=4, alpha=8, targets=".*kernel", compute_dtype=jnp.float32)
    ad = _perturb(jlora.apply(params, spec, jax.random.key(2)))
    node = _node(ad)
    assert node.quantized
    w0 = np.asarray(jlora.quant.dequantize(node.base, jnp.float32))
    np.testing.assert_allclose(node.cache["default"]["w0_sq"], (w0.astype(np.float64) ** 2).sum(0), rtol=1e-5)
    ref = _peft_reference(w0, node.a["default"], node.b["default"], node.extra["default"]["m"],
                          node.meta["default"].scale)
    out = jlora.lift(dense.apply, strict=True)(ad, x)
    np.testing.assert_allclose(out, np.asarray(x, np.float64) @ ref + np.asarray(params["params"]["bias"]),
                               rtol=2e-5, atol=2e-5)
    assert_lift_matches_merge(dense.apply, ad, x, atol=2e-5)


def test_dora_cannot_be_combined_linearly():
    dense, params, x, ad = _dense_adapted()
    ad = jlora.apply(ad, jlora.LoRA(rank=2, targets=".*kernel"), jax.random.key(3), name="second")
    with pytest.raises(ValueError, match="not additive"):
        jlora.combine_adapters(ad, {"default": 1.0, "second": 1.0}, method="cat")


def test_matches_peft_dora_linear():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(0)
    n_in, n_out, r, alpha = 12, 10, 4, 8
    lin = torch.nn.Sequential()
    lin.add_module("proj", torch.nn.Linear(n_in, n_out))
    model = peft.get_peft_model(lin, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=True))
    layer = model.base_model.model.proj
    a_pt = rng.standard_normal((r, n_in)).astype(np.float32)
    b_pt = rng.standard_normal((n_out, r)).astype(np.float32) * 0.3
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(a_pt))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(b_pt))
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_(torch.from_numpy(1 + 0.2 * rng.standard_normal(m.shape).astype(np.float32)))
    x = rng.standard_normal((6, n_in)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    base = layer.base_layer
    params = {"params": {"proj": {"kernel": jnp.asarray(base.weight.detach().numpy().T),
                                  "bias": jnp.asarray(base.bias.detach().numpy())}}}
    ad = jlora.apply(params, jlora.DoRA(rank=r, alpha=alpha, targets=".*kernel"), KEY)
    node = ad["params"]["proj"]["kernel"]
    node = node.with_(a={"default": jnp.asarray(a_pt.T)}, b={"default": jnp.asarray(b_pt.T)},
                      extra={"default": {"m": jnp.asarray(m.detach().numpy())}})
    ad = {"params": {"proj": {"kernel": node, "bias": params["params"]["proj"]["bias"]}}}
    fwd = lambda p, x: x @ p["params"]["proj"]["kernel"] + p["params"]["proj"]["bias"]
    np.testing.assert_allclose(jlora.lift(fwd, strict=True)(ad, jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
