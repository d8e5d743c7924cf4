"""Working out each kernel's (stacked, input, output) axes.

The rule, in order:
1. an explicit hint in ``spec.axes`` (``{pattern: jlora.Axes(stack=1, inputs=1)}``) wins;
2. else, when ``jlora.apply(..., model=fn, example=args)`` is given, ``fn(params, *args)`` is
   traced once on abstract values and each kernel's use is read off the jaxpr: a
   ``dot_general`` gives stacked axes = axes stripped by enclosing ``scan``s + the op's batch
   axes, inputs = its contracting axes; a ``gather`` (embedding lookup) gives inputs = the
   collapsed (row) axes; a ``conv`` gives inputs = window + input features;
3. else a 2-D kernel is (in, out) and an embedding table (leaf named ``embedding``) is
   (rows, features); any other N-D kernel is ambiguous and raises an error naming the hint.
"""

from __future__ import annotations

import jax
from jax.extend import core as jcore

from jlora.core import _compat as C
from jlora.core.nodes import Layout
from jlora.core.nodes import unwrap


class _Use:
    __slots__ = ("leaf", "stripped")

    def __init__(self, leaf, stripped):
        self.leaf, self.stripped = leaf, stripped


def _record(found, leaf, layout):
    for one in (leaf if isinstance(leaf, tuple) else (leaf,)):   # a tuple: kernels joined by a concatenate
        if one not in found and layout is not None:
            found[one] = layout


def _dot_layout(ndim, stripped, batch, contract):
    nb, nc = len(batch), len(contract)
    if tuple(batch) != tuple(range(nb)):
        return None
    if tuple(contract) == tuple(range(nb, nb + nc)) and nb + nc < ndim:
        return Layout(stripped + nb, nc, ndim - nb - nc)
    if tuple(contract) == tuple(range(ndim - nc, ndim)) and nb + nc < ndim:  # x @ W.T use
        return Layout(stripped + nb, ndim - nb - nc, nc)
    return None


def _walk(jaxpr, env, found):
    def get(v):
        return None if isinstance(v, jcore.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        if not any(ins):
            continue
        prim = eqn.primitive
        if prim is C.dot_general_p:
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            for use, contract, batch, var in ((ins[0], lc, lb, eqn.invars[0]), (ins[1], rc, rb, eqn.invars[1])):
                if use is not None:
                    _record(found, use.leaf, _dot_layout(len(var.aval.shape), use.stripped, batch, contract))
        elif prim is C.gather_p and ins[0] is not None:
            dn = eqn.params["dimension_numbers"]
            ndim = len(eqn.invars[0].aval.shape)
            collapsed = tuple(dn.collapsed_slice_dims)
            if collapsed == tuple(range(len(collapsed))) and 0 < len(collapsed) < ndim:
                _record(found, ins[0].leaf, Layout(ins[0].stripped, len(collapsed), ndim - len(collapsed)))
        elif prim is C.conv_p and ins[1] is not None:
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec
            ndim = len(eqn.invars[1].aval.shape)
            if rhs_spec[0] == ndim - 1 and ins[1].stripped == 0:
                _record(found, ins[1].leaf, Layout(0, ndim - 1, 1))
        elif prim is C.scan_p:
            body, _, num_consts, num_carry, *_ = C.scan_info(eqn.params)
            inner = {}
            for k, (use, var) in enumerate(zip(ins, body.invars[-len(ins):] if ins else [])):
                if use is not None:
                    stripped = use.stripped + (1 if k >= num_consts + num_carry else 0)
                    inner[var] = _Use(use.leaf, stripped)
            _walk(body, inner, found)
        elif prim is C.while_p:
            cj, _, bj, _, cn, bn = C.while_info(eqn.params)
            inner = {v: u for v, u in zip(bj.invars, ins[cn:]) if u is not None}
            _walk(bj, inner, found)
        elif prim is C.cond_p:
            for branch, _ in C.cond_branches(eqn.params):
                inner = {v: u for v, u in zip(branch.invars, ins[1:]) if u is not None}
                _walk(branch, inner, found)
        elif prim in (C.convert_element_type_p,) + C.PASS_THROUGH:
            for v in eqn.outvars:
                env[v] = ins[0]
        elif prim is C.concatenate_p and all(ins) and len({u.stripped for u in ins}) == 1 \
                and eqn.params["dimension"] == len(eqn.outvars[0].aval.shape) - 1:
            # kernels joined along their output axis for one matmul (fused q/k/v): each is used as the join is
            leaves = tuple(l for u in ins for l in (u.leaf if isinstance(u.leaf, tuple) else (u.leaf,)))
            env[eqn.outvars[0]] = _Use(leaves, ins[0].stripped)
        else:
            for sub, _ in C.sub_jaxprs(eqn):
                if len(sub.invars) == len(ins):
                    inner = {v: u for v, u in zip(sub.invars, ins) if u is not None}
                    _walk(sub, inner, found)


def infer_layouts(fn, params, example, is_leaf=None):
    """Traces ``fn(params, *example)`` abstractly; returns ``{leaf_index: Layout}`` for every
    parameter leaf (index in ``tree_flatten(params, is_leaf)``) used by a matmul/gather/conv."""
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_leaf)

    plain = [unwrap(leaf) if is_leaf and is_leaf(leaf) else leaf for leaf in leaves]
    abstract = [jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)) for x in plain]
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)

    def flat_fn(flat, ex):
        return fn(jax.tree_util.tree_unflatten(treedef, flat), *ex)

    closed = jax.make_jaxpr(flat_fn)(abstract, example)
    jaxpr = closed.jaxpr
    env = {var: _Use(i, 0) for i, var in enumerate(jaxpr.invars[: len(leaves)])}
    found = {}
    _walk(jaxpr, env, found)
    return found
