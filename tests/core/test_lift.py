"""jlora.lift: factored execution equals the merged model, for every module kind we support."""

import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

import jlora
from jlora.core.lift import FactoringError

from ._helpers import assert_lift_matches_merge, randomize_b

KEY = jax.random.key(0)


def _adapt(params, targets, fn=None, example=None, **kw):
    spec = jlora.LoRA(rank=2, alpha=4, targets=targets, **kw)
    ad = jlora.apply(params, spec, jax.random.key(1), model=fn, example=example)
    return randomize_b(ad)


# ---------------------------------------------------------------------------------------------
# Linen modules

class Attention(nn.Module):
    """Multi-axis kernels: (d, heads, head_dim) in, (heads, head_dim, d) out."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((4, 12), name="query")(x)
        k = nn.DenseGeneral((4, 12), name="key")(x)
        v = nn.DenseGeneral((4, 12), name="value")(x)
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(12.0))
        h = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        return nn.DenseGeneral(48, axis=(-2, -1), name="out")(h)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        x = x + Attention(name="attn")(nn.LayerNorm()(x))
        h = nn.Dense(96, name="up")(nn.LayerNorm()(x))
        x = x + nn.Dense(48, name="down")(jax.nn.gelu(h))
        return x, None


class LM(nn.Module):
    """Embedding -> scanned, remat'ed blocks -> tied-embedding logits."""

    layers: int = 2

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(64, 48, name="embed")
        x = embed(ids)
        x, _ = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.layers)(name="blocks")(x, None)
        return embed.attend(x)


IDS = (jnp.arange(10).reshape(2, 5) * 7) % 64
X48 = jax.random.normal(jax.random.key(5), (2, 5, 48))


@pytest.mark.parametrize("module,x,targets", [
    (nn.Dense(7), jax.random.normal(KEY, (3, 5)), ".*kernel"),
    (Attention(), X48, r".*/(query|key|value|out)/kernel"),
    (nn.Einsum((48, 4, 6), "btd,dhk->bthk"), X48, ".*kernel"),
    (nn.Conv(6, (3, 3), strides=2, padding="SAME"), jax.random.normal(KEY, (2, 8, 8, 3)), ".*kernel"),
    (nn.Conv(6, (3,), kernel_dilation=2), jax.random.normal(KEY, (2, 9, 4)), ".*kernel"),
    (nn.Embed(30, 8), jnp.array([[0, 3, 29], [5, 5, 1]]), ".*embedding"),
    (LM(), IDS, r".*(kernel|embedding)"),
], ids=["dense", "dense_general_attention", "einsum", "conv2d", "conv1d_dilated", "embed", "scan_remat_lm"])
def test_linen_lifted_equals_merged(module, x, targets):
    params = module.init(KEY, x)
    ad = _adapt(params, targets, module.apply, (x,))
    assert_lift_matches_merge(module.apply, ad, x)


def test_lifted_ops_keep_their_module_names():
    """What lift re-binds keeps the equation's name stack, so the compiled HLO's op_name (what a
    profile shows per op) names the module: the LoRA matmuls of attn/query, and the softmax."""
    model = LM()
    params = model.init(KEY, IDS)
    adapted = _adapt(params, r".*/(query|up)/kernel", model.apply, (IDS,))
    hlo = jax.jit(jlora.lift(model.apply)).lower(adapted, IDS).as_text(debug_info=True)
    names = set(re.findall(r'loc\("([^"]*)"', hlo))
    assert any("blocks/attn/query/" in n for n in names), sorted(names)[:20]
    assert any("blocks/up/" in n for n in names), sorted(names)[:20]


def test_factor_gradients_as_row_major_gemms():
    """On CPU the LoRA product runs through lift's _lora_matmul, whose backward writes the factor
    gradients as (r, T) @ (T, d) GEMMs: the same gradients as autodiff (float32, and bfloat16 with
    float32 accumulation), and the path is taken for Dense, multi-axis DenseGeneral and scanned layers."""
    from jlora.core.lift import _lora_matmul

    rng = np.random.default_rng(0)
    x, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((12, 6), (6, 3), (3, 5)))
    g = jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)
    for dt, pref, tol in ((jnp.float32, None, 1e-5), (jnp.bfloat16, jnp.float32, 2e-2)):
        args = tuple(v.astype(dt) for v in (x, a, b))

        def ref(x, a, b):
            xa = jax.lax.dot_general(x, a, (((1,), (0,)), ((), ())), preferred_element_type=pref)
            return jax.lax.dot_general(xa.astype(dt) if pref is None else xa, b.astype(xa.dtype), (((1,), (0,)), ((), ())),
                                       preferred_element_type=pref)

        y, vjp = jax.vjp(lambda *v: _lora_matmul(*v, None, pref), *args)
        y_ref, vjp_ref = jax.vjp(ref, *args)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol)
        for got, want in zip(vjp(g.astype(y.dtype)), vjp_ref(g.astype(y_ref.dtype))):
            assert got.dtype == want.dtype
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 10)

    for module, xin, targets in ((nn.Dense(7), jax.random.normal(KEY, (3, 5)), ".*kernel"),
                                 (Attention(), X48, r".*/(query|out)/kernel"), (LM(), IDS, r".*/up/kernel")):
        params = module.init(KEY, xin)
        adapted = _adapt(params, targets, module.apply, (xin,))
        trainable, frozen = jlora.partition(adapted)
        loss = lambda t: jnp.sum(jlora.lift(module.apply)(jlora.combine(t, frozen), xin) ** 2)  # noqa: E731
        assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(trainable)), type(module).__name__
        assert_lift_matches_merge(module.apply, adapted, xin)


def test_layouts_inferred_for_scanned_multi_axis_kernels():
    params = LM().init(KEY, IDS)
    ad = jlora.apply(params, jlora.LoRA(rank=2, alpha=4, targets=r".*kernel"), KEY, model=LM().apply, example=(IDS,))
    layouts = {n.path: n.layout for n in jax.tree_util.tree_leaves(ad, is_leaf=jlora.is_node) if jlora.is_node(n)}
    assert layouts["params/blocks/attn/query/kernel"] == jlora.Layout(1, 1, 2)
    assert layouts["params/blocks/attn/out/kernel"] == jlora.Layout(1, 2, 1)
    assert layouts["params/blocks/up/kernel"] == jlora.Layout(1, 1, 1)
    node = next(n for n in jax.tree_util.tree_leaves(ad, is_leaf=jlora.is_node) if jlora.is_node(n) and n.path.endswith("out/kernel"))
    assert node.a["default"].shape == (2, 4, 12, 2) and node.b["default"].shape == (2, 2, 48)


def test_ambiguous_nd_kernel_without_model_asks_for_a_hint():
    params = LM().init(KEY, IDS)
    with pytest.raises(ValueError, match=r"jlora.Axes\(stack="):
        jlora.apply(params, jlora.LoRA(rank=2, alpha=4, targets=r".*query/kernel"), KEY)
    hinted = jlora.LoRA(rank=2, alpha=4, targets=r".*query/kernel", axes={r".*query/kernel": jlora.Axes(stack=1, inputs=1)})
    ad = randomize_b(jlora.apply(params, hinted, KEY))
    assert_lift_matches_merge(LM().apply, ad, IDS)


# ---------------------------------------------------------------------------------------------
# NNX modules

class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 8, rngs=rngs)
        self.q = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
        self.o = nnx.LinearGeneral((2, 4), 8, axis=(-2, -1), rngs=rngs)
        self.conv = nnx.Conv(8, 4, (3,), rngs=rngs)
        self.ein = nnx.Einsum("btd,dk->btk", (4, 6), rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.o(self.q(h))
        return self.head(self.ein(self.conv(h)))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return x + jax.nn.relu(self.lin(x))


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NNXBlock(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_nnx_modules_lifted_equals_merged():
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(0)))
    ids = (jnp.arange(12).reshape(2, 6) * 3) % 20
    fn = lambda s, i: nnx.merge(graphdef, s)(i)
    ad = _adapt(state, r".*(kernel|embedding)", fn, (ids,))
    paths = {n.path for n in jax.tree_util.tree_leaves(ad, is_leaf=jlora.is_node) if jlora.is_node(n)}
    assert paths == {"embed/embedding", "q/kernel", "o/kernel", "conv/kernel", "ein/kernel", "head/kernel"}
    assert_lift_matches_merge(fn, ad, ids)


def test_nnx_scan_remat_stacked_layers():
    graphdef, state = nnx.split(NNXStack(nnx.Rngs(0)))
    x = jax.random.normal(KEY, (4, 8))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    ad = _adapt(state, r".*kernel", fn, (x,))
    node = jax.tree_util.tree_leaves(ad, is_leaf=jlora.is_node)
    node = next(n for n in node if jlora.is_node(n))
    assert node.layout == jlora.Layout(1, 1, 1) and node.a["default"].shape == (3, 8, 2)
    assert_lift_matches_merge(fn, ad, x)


# ---------------------------------------------------------------------------------------------
# transformations around and inside the lifted function

def test_nested_jit_vmap_and_outer_jit():
    dense = nn.Dense(5)
    x = jax.random.normal(KEY, (4, 3, 6))
    params = dense.init(KEY, x[0])
    ad = _adapt(params, ".*kernel")

    @jax.jit
    def inner(p, x):
        return jax.vmap(lambda xi: dense.apply(p, xi))(x)

    out = jax.jit(jlora.lift(inner, strict=True))(ad, x)
    np.testing.assert_allclose(out, inner(jlora.merge(ad), x), atol=1e-5)
    # vmap around the lifted function (params broadcast)
    out2 = jax.vmap(lambda xi: jlora.lift(dense.apply, strict=True)(ad, xi))(x)
    np.testing.assert_allclose(out2, inner(jlora.merge(ad), x), atol=1e-5)


def test_cond_and_while_carry_adapters():
    dense = nn.Dense(6)
    x = jax.random.normal(KEY, (2, 6))
    params = dense.init(KEY, x)
    ad = _adapt(params, ".*kernel")

    def fn(p, x, flag):
        y = jax.lax.cond(flag > 0, lambda: dense.apply(p, x), lambda: -dense.apply(p, x))
        y = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(dense.apply(p, h)), y)  # a scan
        _, y = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(dense.apply(p, c[1]))), (0, y))
        return y

    for flag in (1, -1):
        f = jnp.asarray(flag)
        np.testing.assert_allclose(jlora.lift(fn, strict=True)(ad, x, f), fn(jlora.merge(ad), x, f), atol=1e-5)


def test_bf16_base_fp32_adapters_bf16_compute():
    module = Attention(dtype=jnp.bfloat16) if hasattr(Attention, "dtype") else None
    block = Block()
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), block.init(KEY, X48))
    x = X48.astype(jnp.bfloat16)
    fn = lambda p, x: block.apply(p, x)[0]
    ad = _adapt(params, r".*kernel", fn, (x,))
    trainable, frozen = jlora.partition(ad)
    assert {l.dtype for l in jax.tree_util.tree_leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert {l.dtype for l in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    out = jlora.lift(fn, strict=True)(ad, x)
    assert out.dtype == fn(params, x).dtype == jnp.bfloat16
    ref = fn(jlora.merge(ad, dtype=jnp.float32), x.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))
    grads = jax.grad(lambda t: jnp.mean(jlora.lift(fn)(jlora.combine(t, frozen), x).astype(jnp.float32)))(trainable)
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------------------------------------
# fallbacks

def _scaled_kernel_fn(p, x):  # an elementwise non-linearity of the kernel cannot be factored
    return x @ jnp.tanh(p["params"]["kernel"])


def test_fallback_materialises_warns_once_and_is_correct():
    params = {"params": {"kernel": jax.random.normal(KEY, (6, 4))}}
    ad = _adapt(params, ".*kernel")
    x = jax.random.normal(KEY, (3, 6))
    lifted = jlora.lift(_scaled_kernel_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = lifted(ad, x)
        out2 = lifted(ad, x)
    msgs = [str(w.message) for w in caught if "jlora.lift" in str(w.message)]
    assert len(msgs) == 1 and "params/kernel" in msgs[0] and "tanh" in msgs[0]
    np.testing.assert_allclose(out1, _scaled_kernel_fn(jlora.merge(ad), x), atol=1e-5)
    np.testing.assert_allclose(out1, out2)


def test_strict_raises_instead_of_materialising():
    params = {"params": {"kernel": jax.random.normal(KEY, (6, 4))}}
    ad = _adapt(params, ".*kernel")
    with pytest.raises(FactoringError, match="params/kernel"):
        jlora.lift(_scaled_kernel_fn, strict=True)(ad, jnp.ones((3, 6)))


@pytest.mark.parametrize("fn,shape", [
    (lambda p, y: y @ p["params"]["kernel"].T, (3, 4)),                      # transpose
    (lambda p, y: y @ (0.5 * p["params"]["kernel"]), (3, 6)),                # scalar scale
    (lambda p, y: jnp.einsum("bi,io->bo", y, p["params"]["kernel"] * jnp.float32(3.0)), (3, 6)),
], ids=["transpose", "scalar_mul", "scalar_mul_rhs"])
def test_transposed_and_scaled_uses_are_factored(fn, shape):
    params = {"params": {"kernel": jax.random.normal(KEY, (6, 4))}}
    ad = _adapt(params, ".*kernel")
    y = jax.random.normal(KEY, shape)
    np.testing.assert_allclose(jlora.lift(fn, strict=True)(ad, y), fn(jlora.merge(ad), y), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the factored path, proven on the gradient's jaxpr

def _kernel_sized_ops(jaxpr, sizes, found):
    arithmetic = {"dot_general", "add", "add_any", "mul", "sub", "reduce_sum", "neg", "div", "scatter-add"}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if eqn.primitive.name in arithmetic and int(np.prod(shape)) in sizes and len(shape) >= 2:
                found.append((eqn.primitive.name, shape))
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jcore.ClosedJaxpr):
                    _kernel_sized_ops(sub.jaxpr, sizes, found)
                elif isinstance(sub, jcore.Jaxpr):
                    _kernel_sized_ops(sub, sizes, found)
    return found


def _grad_jaxpr(fn, ad, x):
    trainable, frozen = jlora.partition(ad)
    loss = lambda t: jnp.mean(fn(jlora.combine(t, frozen), x) ** 2)
    return jax.make_jaxpr(jax.grad(loss))(trainable)


def test_gradient_jaxpr_has_no_kernel_sized_ops_two_layer_transformer():
    model = LM(layers=2)
    params = model.init(KEY, IDS)
    ad = _adapt(params, r".*(query|key|value|out|up|down)/kernel", model.apply, (IDS,))
    sizes = set()
    for n in jax.tree_util.tree_leaves(ad, is_leaf=jlora.is_node):
        if jlora.is_node(n):
            sizes.add(int(np.prod(n.shape)))
            sizes.add(int(np.prod(n.shape[1:])))  # one layer's slice
    assert not {480, 960} & sizes  # activation sizes must not collide with kernel sizes
    found = _kernel_sized_ops(_grad_jaxpr(jlora.lift(model.apply, strict=True), ad, IDS).jaxpr, sizes, [])
    assert found == []
    # negative control: the materialising reference does create kernel-sized ops
    merged_fn = lambda p, x: model.apply(jlora.merge(p), x)
    assert _kernel_sized_ops(_grad_jaxpr(merged_fn, ad, IDS).jaxpr, sizes, [])


# ---------------------------------------------------------------------------------------------
# dropout, caching, static arguments

def test_dropout_only_with_rng_and_only_on_adapter_path():
    dense = nn.Dense(16)
    x = jax.random.normal(KEY, (64, 16))
    params = dense.init(KEY, x)
    ad = jlora.apply(params, jlora.LoRA(rank=4, alpha=4, targets=".*kernel", dropout=0.5), KEY)
    lifted = jlora.lift(dense.apply, strict=True)
    # B == 0 at init: dropout cannot change anything
    np.testing.assert_allclose(lifted(ad, x, jlora_rng=jax.random.key(3)), dense.apply(params, x), atol=1e-6)
    ad = randomize_b(ad, scale=1.0)
    eval_out = lifted(ad, x)
    np.testing.assert_allclose(eval_out, dense.apply(jlora.merge(ad), x), atol=1e-5)
    train_a = lifted(ad, x, jlora_rng=jax.random.key(3))
    train_b = lifted(ad, x, jlora_rng=jax.random.key(4))
    assert not np.allclose(train_a, eval_out) and not np.allclose(train_a, train_b)
    np.testing.assert_allclose(train_a, lifted(ad, x, jlora_rng=jax.random.key(3)))


def test_trace_is_cached_and_static_args_respected():
    dense = nn.Dense(4)
    x = jnp.ones((2, 3))
    ad = _adapt(dense.init(KEY, x), ".*kernel")

    def fn(p, x, negate):
        y = dense.apply(p, x)
        return -y if negate else y

    lifted = jlora.lift(fn, strict=True)
    a = lifted(ad, x, True)
    lifted(ad, x + 1.0, True)
    assert len(lifted.cache) == 1
    b = lifted(ad, x, False)
    assert len(lifted.cache) == 2
    np.testing.assert_allclose(a, -b)


def test_lift_cache_follows_jax_trace_context():
    """A lifted function traced under one JAX context (a mesh, a ``jax.make_user_context`` value such
    as the activation sharding a sharded step enters) is traced again under another, as jax.jit
    would: lift's cache must not replay the first trace (it did, and the sharded step then ran
    without its batch constraints)."""
    import jax
    import jax.numpy as jnp
    import jlora

    flag = jax.make_user_context(default_value=False)

    def f(params, x):
        y = x @ params["w"]
        return y * 2.0 if flag.value else y

    adapted = jlora.apply({"w": jnp.ones((3, 2))}, jlora.LoRA(rank=1, targets="w"), key=jax.random.key(0))
    lifted = jlora.lift(f)
    x = jnp.ones((4, 3))
    plain = lifted(adapted, x)
    with flag(True):
        doubled = lifted(adapted, x)
    assert jnp.allclose(doubled, 2 * plain) and not jnp.allclose(plain, 0)
    assert jnp.allclose(lifted(adapted, x), plain)   # back outside: the first trace again
