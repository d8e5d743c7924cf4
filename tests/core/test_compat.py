"""Self-test of jlora/core/_compat.py against the installed JAX: every internal parameter that
lift reads is found where _compat says it is."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core import _compat as C


def _eqn(fn, *args, prim):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    eqns = [e for e in jaxpr.eqns if e.primitive is prim]
    assert eqns, f"no {prim} in {jaxpr}"
    return eqns[0]


def test_scan_info_counts_consts_carry_xs():
    w = jnp.ones((3, 3))

    def fn(c0, xs, w):  # 1 const (w), 2 carries, 1 xs: every group a different size
        def body(c, x):
            h, n = c
            return (h @ w + x, n + 1), h.sum()
        return lax.scan(body, (c0, jnp.int32(0)), xs, length=4, reverse=True)

    eqn = _eqn(fn, jnp.ones(3), jnp.ones((4, 3)), w, prim=C.scan_p)
    body, consts, num_consts, num_carry, length, reverse, unroll = C.scan_info(eqn.params)
    assert (num_consts, num_carry, length, reverse) == (1, 2, 4, True)
    assert num_consts + num_carry + 1 == len(eqn.invars) == len(body.invars)
    assert len(body.outvars) == 3 and isinstance(consts, list)
    assert eqn.invars[0].aval.shape == (3, 3)  # the const comes first


def test_call_jaxpr_of_jit_remat_custom_jvp():
    x = jnp.ones(4)
    for fn, prim in ((jax.jit(lambda x: x * 2), C.jit_p),
                     (jax.checkpoint(lambda x: jnp.sin(x), prevent_cse=False), C.remat_p),
                     (jax.nn.relu, C.custom_jvp_call_p)):
        eqn = _eqn(fn, x, prim=prim)
        sub, consts = C.call_jaxpr(eqn.params)
        assert len(sub.invars) == len(eqn.invars)
    eqn = _eqn(jax.checkpoint(lambda x: jnp.sin(x), prevent_cse=False), x, prim=C.remat_p)
    assert C.remat_options(eqn.params)["prevent_cse"] is False


def test_cond_and_while_params():
    eqn = _eqn(lambda p, x: lax.cond(p, lambda: x + 1, lambda: x - 1), True, jnp.ones(2), prim=C.cond_p)
    branches = C.cond_branches(eqn.params)
    assert len(branches) == 2 and all(len(b.invars) == len(eqn.invars) - 1 for b, _ in branches)
    w = jnp.full(2, 0.5)
    eqn = _eqn(lambda x, w: lax.while_loop(lambda h: h.sum() < 10, lambda h: h * 2 + w, x), jnp.ones(2), w,
               prim=C.while_p)
    cj, _, bj, _, cn, bn = C.while_info(eqn.params)
    n_carry = len(eqn.invars) - cn - bn
    assert (cn, bn, n_carry) == (0, 1, 1)
    assert len(cj.invars) == cn + n_carry and len(bj.invars) == bn + n_carry and len(bj.outvars) == n_carry


def test_bind_reproduces_equation():
    eqn = _eqn(lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ()))), jnp.ones((2, 3)), jnp.ones((3, 4)),
               prim=C.dot_general_p)
    out = C.bind(eqn, [jnp.ones((2, 3)), 2 * jnp.ones((3, 4))])
    assert len(out) == 1
    np.testing.assert_allclose(out[0], 6 * np.ones((2, 4)))


def test_sub_jaxprs_finds_nested_programs():
    eqn = _eqn(lambda c, xs: lax.scan(lambda c, x: (c + x, None), c, xs), jnp.ones(2), jnp.ones((3, 2)), prim=C.scan_p)
    assert len(C.sub_jaxprs(eqn)) == 1
