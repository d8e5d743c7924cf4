"""Every read of JAX-internal primitive parameters lives here (they move between versions).

Tested by tests/core/test_compat.py against the installed JAX. Known differences:
jax 0.10: scan has ``num_consts``/``num_carry`` and a ClosedJaxpr ``jaxpr``; jax 0.11 replaced
the counts by ``ft_in`` / ``ft_out`` (``jax._src.flattree`` trees whose ``unpack()`` gives the
(consts, carry, xs) and (carry, ys) groups) and made ``jaxpr`` open (consts passed as leading
inputs). Checked on jax 0.10.2 (CPU) and 0.11.2 (CUDA).
"""

from __future__ import annotations

import contextlib

from jax.extend import core as jcore

try:   # JAX's own tracing-cache context (meshes, user contexts, dtype and precision settings)
    from jax._src.config import trace_context as _trace_context
except ImportError:   # pragma: no cover - a JAX without it: cache on shapes alone
    _trace_context = None

try:   # what reverse-mode differentiation keeps from the forward pass (jax.ad_checkpoint.print_saved_residuals' source)
    from jax._src.ad_checkpoint import saved_residuals as _saved_residuals
except ImportError:   # pragma: no cover - a JAX without it
    _saved_residuals = None

try:   # an equation's module path and source line, re-entered when lift re-binds it (profiles, HLO op_name)
    from jax._src import source_info_util as _source_info
except ImportError:   # pragma: no cover - a JAX without it: re-bound ops lose their names
    _source_info = None

P = jcore.primitives

scan_p = P.scan_p
jit_p = P.jit_p
remat_p = P.remat_p
custom_jvp_call_p = P.custom_jvp_call_p
custom_vjp_call_p = P.custom_vjp_call_p
cond_p = P.cond_p
while_p = P.while_p
dot_general_p = P.dot_general_p
gather_p = P.gather_p
conv_p = P.conv_general_dilated_p
convert_element_type_p = P.convert_element_type_p
transpose_p = P.transpose_p
sharding_constraint_p = P.sharding_constraint_p
copy_p = P.copy_p
mul_p = P.mul_p
concatenate_p = P.concatenate_p

PASS_THROUGH = tuple(p for p in (P.sharding_constraint_p, P.copy_p, getattr(P, "device_put_p", None),
                                 getattr(P, "reduce_precision_p", None)) if p is not None)


def open_jaxpr(j):
    """(Jaxpr, consts) from either a ClosedJaxpr or an open Jaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def _group_len(value, group: int) -> int:
    """Leaf count of group ``group`` of a jax>=0.11 FlatTree (``ft_in``: consts, carry, xs)."""
    return len(value.unpack()[group])


def scan_info(params):
    """(body Jaxpr, body consts, num_consts, num_carry, length, reverse, unroll)."""
    body, consts = open_jaxpr(params["jaxpr"])
    if "num_consts" in params:
        num_consts, num_carry = int(params["num_consts"]), int(params["num_carry"])
    elif "ft_in" in params and hasattr(params["ft_in"], "unpack"):
        num_consts, num_carry = _group_len(params["ft_in"], 0), _group_len(params["ft_in"], 1)
    else:
        raise KeyError(f"neither num_consts/num_carry nor ft_in in scan params {sorted(params)}; "
                       "update jlora/core/_compat.py for this JAX")
    return body, consts, num_consts, num_carry, params["length"], params["reverse"], params.get("unroll", 1)


def call_jaxpr(params):
    """Sub-jaxpr of jit / remat / custom_jvp_call / custom_vjp_call, as (Jaxpr, consts)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in params:
            return open_jaxpr(params[key])
    raise KeyError(f"no sub-jaxpr in params {sorted(params)}")


def remat_options(params):
    return dict(prevent_cse=params.get("prevent_cse", True), policy=params.get("policy"))


def cond_branches(params):
    return [open_jaxpr(b) for b in params["branches"]]


def while_info(params):
    """(cond Jaxpr, cond consts, body Jaxpr, body consts, cond_nconsts, body_nconsts)."""
    cj, cc = open_jaxpr(params["cond_jaxpr"])
    bj, bc = open_jaxpr(params["body_jaxpr"])
    return cj, cc, bj, bc, params["cond_nconsts"], params["body_nconsts"]


def bind_params(eqn):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        return subfuns, params
    return [], params


def bind(eqn, invals):
    subfuns, params = bind_params(eqn)
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None)
    if manager is not None:
        with manager:
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    else:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def source_context(eqn):
    """A context that re-binds ``eqn``'s results under its own name stack (``model/layers/self_attn/...``)
    and traceback, as ``jax.core.eval_jaxpr`` does: what lift re-binds keeps the module names that
    profiles and the compiled HLO's ``op_name`` show."""
    info = getattr(eqn, "source_info", None)
    if _source_info is None or info is None:
        return contextlib.nullcontext()
    return _source_info.user_context(info.traceback, name_stack=_source_info.current_name_stack() + info.name_stack)


def sub_jaxprs(eqn):
    """All (Jaxpr, consts) nested in an equation's params (for analyses)."""
    out = []
    for v in eqn.params.values():
        items = v if isinstance(v, (tuple, list)) else (v,)
        for item in items:
            if isinstance(item, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                out.append(open_jaxpr(item))
    return out


def trace_context():
    """What JAX adds to its own tracing cache keys (the current mesh, ``jax.make_user_context``
    values such as jlora's activation sharding, matmul precision, x64, ...): a cache of traced
    programs keyed on shapes alone would otherwise replay a trace made under other settings."""
    return _trace_context() if _trace_context is not None else ()


def saved_residuals(f, *args) -> list:
    """``[(aval, why)]``: the values JAX's autodiff saves from ``f``'s forward pass for its backward
    pass, given abstract or concrete ``args`` (the list ``jax.ad_checkpoint.print_saved_residuals``
    prints). ``why`` says where each comes from ("from the argument ...", "from a constant", "output of
    ..."). Used by :func:`jlora.estimate` for the activations a step keeps."""
    if _saved_residuals is None:   # pragma: no cover - a JAX without it
        raise RuntimeError("this JAX has no jax._src.ad_checkpoint.saved_residuals; jlora.estimate needs it "
                           "(it was checked on jax 0.10)")
    return list(_saved_residuals(f, *args))
