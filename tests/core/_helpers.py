"""Shared checks for lift tests: lifted == merged forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def randomize_b(adapted, key=3, scale=0.1):
    """Gives every adapter non-zero A and B (host-side numpy RNG: no per-shape compiles)."""
    rng = np.random.default_rng(key)

    def fill(v):
        return jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype)

    def f(leaf):
        if not jlora.is_node(leaf):
            return leaf
        return leaf.with_(b={n: fill(v) for n, v in leaf.b.items()},
                          a={n: v if bool(jnp.any(v != 0)) else fill(v) for n, v in leaf.a.items()})
    return jax.tree_util.tree_map(f, adapted, is_leaf=jlora.is_node)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def assert_lift_matches_merge(apply_fn, adapted, *args, atol=1e-5, strict=True):
    """Lifted forward == forward on merged params; grads wrt trainable == materialised grads."""
    lifted = jlora.lift(apply_fn, strict=strict)
    out = lifted(adapted, *args)
    ref = jax.jit(lambda a, *xs: apply_fn(jlora.merge(a), *xs))(adapted, *args)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=atol, rtol=atol)
    trainable, frozen = jlora.partition(adapted)

    def loss(t):
        return jnp.mean(jnp.tanh(lifted(jlora.combine(t, frozen), *args).astype(jnp.float32)))

    def loss_ref(t):
        return jnp.mean(jnp.tanh(apply_fn(jlora.merge(jlora.combine(t, frozen)), *args).astype(jnp.float32)))

    g = jax.jit(jax.grad(loss))(trainable)
    g_ref = jax.jit(jax.grad(loss_ref))(trainable)
    leaves, leaves_ref = jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)
    assert len(leaves) == len(leaves_ref) and leaves
    for x, y in zip(leaves, leaves_ref):
        assert x.shape == y.shape
        scale = float(np.abs(y).max(initial=0.0))   # zero-size leaves (tCURLoRA's u_im for n3 = 2) have no max
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol * max(1.0, scale), rtol=1e-4)
    return out
