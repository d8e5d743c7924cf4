"""QLoRA: quantised frozen bases inside adapted matmuls, merge/unmerge, training, checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.quant import QuantizedArray, dequantize

from ..core._helpers import randomize_b
from ..core.test_lift import _kernel_sized_ops

KEY = jax.random.key(0)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(128, name="up")(x)
        return x + nn.Dense(64, name="down")(jax.nn.gelu(h)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="blocks")(x, None)
        return nn.Dense(8, name="head")(x)


X = jax.random.normal(jax.random.key(1), (4, 64))


def _adapted(**kw):
    model = Stack()
    params = model.init(KEY, X)
    spec = jlora.QLoRA(rank=4, alpha=8, targets=r".*/(up|down)/kernel", **kw)
    return model, params, randomize_b(jlora.apply(params, spec, KEY, model=model.apply, example=(X,)))


def _nodes(tree):
    return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=jlora.is_node) if jlora.is_node(n)]


def test_frozen_half_holds_quantised_bases_and_lift_equals_merge():
    model, params, ad = _adapted(compute_dtype=jnp.float32)
    nodes = _nodes(ad)
    assert len(nodes) == 2 and all(isinstance(n.base, QuantizedArray) for n in nodes)
    up = next(n for n in nodes if n.path.endswith("up/kernel"))
    assert up.base.shape == (3, 64, 128) and up.base.scheme == "nf4" and up.base.double_quant
    # the quantised base is close to the original weights (NF4 error), not equal
    w = params["params"]["blocks"]["up"]["kernel"]
    err = float(jnp.mean(jnp.abs(dequantize(up.base, jnp.float32) - w)) / jnp.mean(jnp.abs(w)))
    assert 0.01 < err < 0.2
    _, frozen = jlora.partition(ad)
    assert isinstance(frozen["params"]["blocks"]["up"]["kernel"].base, QuantizedArray)
    lifted = jlora.lift(model.apply, strict=True)
    np.testing.assert_allclose(lifted(ad, X), model.apply(jlora.merge(ad), X), atol=1e-5, rtol=1e-5)
    c = jlora.count(ad)
    assert c["total"] == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)) + c["trainable"]
    assert c["frozen_bytes"] < 0.5 * sum(x.nbytes for x in jax.tree_util.tree_leaves(params))


def test_bf16_compute_and_gradients_flow_to_factors_only():
    model, params, ad = _adapted()
    trainable, frozen = jlora.partition(ad)
    lifted = jlora.lift(model.apply, strict=True)

    def loss(t):
        return jnp.mean(lifted(jlora.combine(t, frozen), X).astype(jnp.float32) ** 2)

    grads = jax.grad(loss)(trainable)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)
    ref = model.apply(jlora.merge(ad, dtype=jnp.float32), X)
    out = lifted(ad, X)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_no_dense_copy_of_all_layers_exists_at_once():
    model, params, ad = _adapted()
    trainable, frozen = jlora.partition(ad)
    lifted = jlora.lift(model.apply, strict=True)
    loss = lambda t: jnp.mean(lifted(jlora.combine(t, frozen), X).astype(jnp.float32) ** 2)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr
    stacked = {(3, 64, 128), (3, 128, 64)}

    def top_level_outputs(j):  # equations outside any scan body (recursing into jit/remat only)
        for eqn in j.eqns:
            if eqn.primitive.name == "scan":
                continue
            for v in eqn.outvars:
                yield eqn.primitive.name, tuple(getattr(v.aval, "shape", ())), getattr(v.aval, "dtype", None)
            for sub in eqn.params.values():
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from top_level_outputs(inner)

    dense_stacked = [(p, s) for p, s, d in top_level_outputs(jaxpr) if s in stacked and jnp.issubdtype(d, jnp.floating)]
    assert dense_stacked == []
    sizes = {64 * 128, 3 * 64 * 128}
    assert [op for op in _kernel_sized_ops(jaxpr, sizes, []) if op[0] == "dot_general"] == []


@pytest.mark.parametrize("scan,remat", [(True, False), (False, False), (True, True)])
def test_llama_backward_keeps_no_dequantised_kernel(scan, remat):
    """On jlora's Llama with QLoRA on every projection, nothing autodiff saves for the backward pass
    has a kernel's size: each dequantised kernel is rebuilt from its codes where the backward pass
    needs it, with or without remat, stacked or unrolled layers."""
    from jlora.core import _compat
    from jlora.models import llama

    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, scan_layers=scan, remat=remat)
    model = llama.LlamaForCausalLM(cfg)
    ids = np.zeros((3, 16), np.int32)   # batch 3, 2 layers: a stacked kernel would lead with 2
    adapted = jlora.apply(model.init_params(), jlora.QLoRA(rank=4, targets=llama.DEFAULT_TARGETS["all-linear"]),
                          key=KEY, model=model.apply, example=(ids[:1],))
    trainable, frozen = jlora.partition(adapted)
    lifted = jlora.lift(model.apply, strict=True)
    saved = _compat.saved_residuals(lambda t, f: lifted(jlora.combine(t, f), ids, ids, method="loss")[0],
                                    trainable, frozen)
    kernels = {128 * 128, 128 * 64, 128 * 384}
    computed = [(tuple(a.shape), why) for a, why in saved if "from the argument" not in why]
    assert computed, "the backward pass saves activations"
    assert [c for c in computed if int(np.prod(c[0][-2:])) in kernels and len(c[0]) >= 2
            and c[0][0] != 3] == []


def test_merge_requantize_reports_error_and_unmerge_restores_codes():
    model, params, ad = _adapted(compute_dtype=jnp.float32)
    full = jlora.merge(ad)
    assert not isinstance(full["params"]["blocks"]["up"]["kernel"], QuantizedArray)
    q = jlora.merge(ad, requantize=True)
    assert isinstance(q["params"]["blocks"]["up"]["kernel"], QuantizedArray)
    errors = jlora.merge_error(ad)
    assert set(errors) == {"params/blocks/up/kernel", "params/blocks/down/kernel"}
    assert all(0 < e < 5 for e in errors.values())
    restored = jlora.unmerge(q, ad)
    for n, r in zip(_nodes(ad), _nodes(restored)):
        np.testing.assert_array_equal(np.asarray(n.base.data), np.asarray(r.base.data))


def test_training_step_and_quantize_frozen_all_linear():
    model, params, ad = _adapted(quantize_frozen="all-linear")
    head = ad["params"]["head"]["kernel"]
    assert jlora.is_node(head) and isinstance(head.base, QuantizedArray) and head.active == ()
    trainable, frozen = jlora.partition(ad)
    assert jax.tree_util.tree_leaves(trainable["params"]["head"]["kernel"]) == []
    lifted = jlora.lift(model.apply, strict=True)
    target = jnp.sin(X[:, :8])

    def loss_fn(p, batch, key):
        return jnp.mean((lifted(p, batch).astype(jnp.float32) - target) ** 2)

    opt = optax.adam(1e-2)
    step = jlora.train.make_step(loss_fn, opt, donate=False)
    state = opt.init(trainable)
    losses = []
    for i in range(25):
        trainable, state, m = step(trainable, frozen, state, X, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0]


def test_quantised_trees_checkpoint_with_orbax_and_adapter_size_matches_lora(tmp_path):
    import orbax.checkpoint as ocp

    model, params, ad = _adapted()
    _, frozen = jlora.partition(ad)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "frozen", frozen)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "frozen", jax.tree_util.tree_map(lambda x: x, frozen))
    for a, b in zip(jax.tree_util.tree_leaves(frozen), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    jlora.io.save_adapter(str(tmp_path / "q"), ad)
    lora = randomize_b(jlora.apply(params, jlora.LoRA(rank=4, alpha=8, targets=r".*/(up|down)/kernel"), KEY,
                                   model=model.apply, example=(X,)))  # same values: compression alike
    jlora.io.save_adapter(str(tmp_path / "l"), lora)
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    assert abs(size(tmp_path / "q") - size(tmp_path / "l")) < 0.2 * size(tmp_path / "l")


def test_qlora_spec_validation():
    for kw, msg in ((dict(quant="nf3"), "quant must be one of"), (dict(block=63), "block must be an even int"),
                    (dict(quant="int8", double_quant=True), "double_quant applies to 4-bit"),
                    (dict(compute_dtype=jnp.int32), "compute_dtype must be a floating")):
        with pytest.raises((ValueError, TypeError), match=msg):
            jlora.QLoRA(rank=2, targets="kernel", **kw)


def test_qlora_adapter_reloads_onto_a_quantised_base(tmp_path):
    model, params, ad = _adapted(compute_dtype=jnp.float32)
    spec = jlora.QLoRA(rank=4, alpha=8, targets=r".*/(up|down)/kernel", compute_dtype=jnp.float32)
    jlora.io.save_adapter(str(tmp_path / "a"), ad, spec=spec)
    fresh = jlora.apply(params, spec, jax.random.key(7), model=model.apply, example=(X,))
    loaded = jlora.io.load_adapter(str(tmp_path / "a"), fresh)
    assert all(isinstance(n.base, QuantizedArray) for n in _nodes(loaded))
    lifted = jlora.lift(model.apply)
    np.testing.assert_array_equal(np.asarray(lifted(loaded, X)), np.asarray(lifted(ad, X)))
