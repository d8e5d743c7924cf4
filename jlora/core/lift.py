"""``jlora.lift``: run any JAX/Flax function on adapted parameter trees, factored.

``lift(fn)`` traces ``fn`` once (per input structure/shapes) with each adapter node replaced by
a plain array of the base's shape, then evaluates the resulting jaxpr with the nodes carried
through the equations. Matmuls, embedding lookups and convolutions whose weight is a node are
emitted as ``x.W0 + s * ((x.A).B)``; ``scan`` / ``remat`` / ``jit`` / ``cond`` / ``while`` are
re-emitted around the interpreter so stacked layers stay stacked. Only primal equations are
interpreted; ``jax.grad``/``jax.jit``/``jax.vmap`` around the lifted function work unchanged.

An equation that cannot be factored falls back to materialising that one weight for that one
op and warns once per (primitive, path); ``strict=True`` raises instead.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from jlora.core import _compat as C
from jlora.core.api import expand
from jlora.core.errors import FactoringError
from jlora.core.nodes import AdaptedWeight, Trainable, dense, is_adapter_leaf, is_node


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Live:
    """A node inside the interpreter, with the dtype it has been cast to (if any)."""

    node: AdaptedWeight
    dtype: Any = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def base(self):
        """The dense base in the dtype the program uses; a quantised base is dequantised here,
        inside the op that consumes it (one layer at a time under scan)."""
        return dense(self.node.base, self.dtype)

    @property
    def out_dtype(self):
        return self.dtype if self.dtype is not None else self.node.dtype


@dataclasses.dataclass(frozen=True)
class _LiveCat:
    """Nodes concatenated along their (single) output axis, e.g. a model's q / k / v kernels
    joined for one matmul. ``x @ concat(W_i)`` is emitted as one matmul on the concatenated bases
    and, for plain low-rank nodes, one matmul on the concatenated ``A`` factors: ``x @ [A_1 ..
    A_n]``, then each slice times its own ``B_i``. Nodes that scale their base (DoRA, IA3) keep
    their own factored matmul, one per part, joined after."""

    parts: tuple   # _Live nodes, and plain arrays for kernels without an adapter

    @property
    def live(self):
        return [p for p in self.parts if isinstance(p, _Live)]

    @property
    def out_dtype(self):
        return self.live[0].out_dtype

    def materialize(self):
        return jnp.concatenate([p.node.materialize(p.out_dtype) if isinstance(p, _Live) else p.astype(self.out_dtype)
                                for p in self.parts], axis=-1)

    @property
    def path(self):
        return " + ".join(p.node.path or "?" for p in self.live)


@dataclasses.dataclass
class _Ctx:
    strict: bool
    warned: set
    rng: Any = None
    counter: list = dataclasses.field(default_factory=lambda: [0])

    def with_rng(self, rng):
        return _Ctx(self.strict, self.warned, rng, [0])

    def next_key(self):
        self.counter[0] += 1
        return jax.random.fold_in(self.rng, self.counter[0])

    def fallback(self, prim, live, why: str):
        path = (live.path if isinstance(live, _LiveCat) else live.node.path) or "<adapted weight>"
        msg = (f"jlora.lift: cannot factor `{prim}` on adapted weight {path!r} ({why}); "
               f"materialising W0 + delta for this op")
        if self.strict:
            raise FactoringError(msg)
        if (str(prim), path) not in self.warned:
            self.warned.add((str(prim), path))
            warnings.warn(msg, stacklevel=4)
        if isinstance(live, _LiveCat):
            return live.materialize()
        return live.node.materialize(live.out_dtype)


def _is_live(x):
    return isinstance(x, (_Live, _LiveCat))


def _base_op(eqn, live: _Live, operands, where: int, params=None):
    """Binds ``eqn`` with the node's dense base at position ``where`` of ``operands``.

    A quantised base is dequantised inside a ``jax.checkpoint``: the backward pass then keeps the
    codes (not a dense copy of every layer's weight) and dequantises again when it needs W0."""
    def run(base, *others):
        vals = list(others)
        vals.insert(where, dense(base, live.dtype))
        if params is None:
            return C.bind(eqn, vals)[0]
        return eqn.primitive.bind(*vals, **params)

    others = [v for i, v in enumerate(operands) if i != where]
    if live.node.quantized:
        return jax.checkpoint(run)(live.node.base, *others)
    return run(live.node.base, *others)


# ------------------------------------------------------------------------------------------
# interpreter

def _eval(jaxpr, consts, args, ctx):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
    if len(args) != len(jaxpr.invars):
        raise AssertionError(f"jaxpr expects {len(jaxpr.invars)} inputs, got {len(args)}")
    for v, a in zip(jaxpr.invars, args):
        env[v] = a
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with C.source_context(eqn):
            outs = _dispatch(eqn, invals, ctx) if any(_is_live(x) for x in invals) else C.bind(eqn, invals)
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _arrays(vals, ctx, prim):
    return [ctx.fallback(prim, v, "returned or carried as a value") if _is_live(v) else v for v in vals]


def _dispatch(eqn, invals, ctx):
    prim = eqn.primitive
    if any(isinstance(v, _LiveCat) for v in invals) and prim not in (C.dot_general_p, C.convert_element_type_p,
                                                                      *C.PASS_THROUGH):
        return _materialising(eqn, invals, ctx, "a concatenated kernel used other than in a matmul")
    rule = _RULES.get(prim)
    if rule is None and prim in C.PASS_THROUGH:
        return [invals[0]] if _is_live(invals[0]) and len(eqn.outvars) == 1 else _materialising(eqn, invals, ctx, "")
    if rule is not None:
        out = rule(eqn, invals, ctx)
        if out is not None:
            return out
    return _materialising(eqn, invals, ctx, "no factoring rule for this use")


def _materialising(eqn, invals, ctx, why):
    vals = [ctx.fallback(eqn.primitive, v, why) if _is_live(v) else v for v in invals]
    return C.bind(eqn, vals)


# ------------------------------------------------------------------------------------------
# rules

def _convert(eqn, invals, ctx):
    live = invals[0]
    new = eqn.params["new_dtype"]
    if not jnp.issubdtype(new, jnp.floating):
        return None
    if isinstance(live, _LiveCat):
        return [_LiveCat(tuple(_Live(p.node, jnp.dtype(new)) if isinstance(p, _Live) else p.astype(new)
                               for p in live.parts))]
    return [_Live(live.node, jnp.dtype(new))]


def _concat(eqn, invals, ctx):
    """Kernels joined along their last (output) axis: kept as nodes for the matmul that follows."""
    dim = eqn.params["dimension"]
    live = [v for v in invals if isinstance(v, _Live)]
    if len(live) < len([v for v in invals if _is_live(v)]):
        return None
    layouts = {(v.node.layout.stack, v.node.layout.inputs, v.node.layout.ndim) for v in live}
    dtypes = {jnp.dtype(v.out_dtype) for v in live} | {jnp.dtype(v.dtype) for v in invals if not _is_live(v)}
    if len(layouts) != 1 or len(dtypes) != 1:
        return None
    stack, inputs, ndim = layouts.pop()
    if ndim - stack - inputs != 1 or dim != ndim - 1 or any(np.ndim(v) != ndim for v in invals if not _is_live(v)):
        return None
    return [_LiveCat(tuple(invals))]


def _dropout(x, p, ctx):
    if ctx.rng is None or p <= 0.0:
        return x
    keep = jax.random.bernoulli(ctx.next_key(), 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), jnp.zeros((), x.dtype)).astype(x.dtype)


def _plain(live: _Live) -> bool:
    """A node whose matmul is ``x @ W0 + sum_i s_i (x @ A_i) @ B_i`` and nothing more."""
    return not live.node.scales_base and not _denser_than_dense(live.node)


def _dot_cat(eqn, x, cat: _LiveCat, ctx):
    """``x @ concat(W_1 .. W_n)`` (the concatenated axis the result's last): one matmul on the
    joined bases; for plain nodes without active dropout one matmul on the joined ``A`` factors,
    then each part's ``B``; any other node its own factored matmul. The parts' outputs are joined."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lay = cat.live[0].node.layout
    s, ni = lay.stack, lay.inputs
    if tuple(rb) != tuple(range(s)) or set(rc) != set(range(s, s + ni)) or len(rc) != ni:
        return None
    live = cat.live
    plain = [p for p in live if _plain(p)]
    if len(plain) < len(live) or (ctx.rng is not None and any(
            m.dropout > 0 for p in plain for _, _, _, m in p.node.active_factors())):
        outs = []
        for p in cat.parts:
            if not isinstance(p, _Live):
                outs.append(C.bind(eqn, [x, p])[0])
                continue
            out = _dot(eqn, [x, p], ctx)
            outs.append(out[0] if out is not None else C.bind(eqn, [x, ctx.fallback(eqn.primitive, p, "unfactorable")])[0])
        return [jnp.concatenate(outs, axis=-1)]
    w_dtype = jnp.dtype(cat.out_dtype)

    def base_matmul(x, *bases):
        return C.bind(eqn, [x, jnp.concatenate([dense(b, p.dtype) if isinstance(p, _Live) else b
                                                for b, p in zip(bases, cat.parts)], axis=-1)])[0]

    bases = [p.node.base if isinstance(p, _Live) else p for p in cat.parts]
    if any(p.node.quantized for p in live):   # dequantised again in the backward pass, as _base_op
        total = jax.checkpoint(base_matmul)(x, *bases)
    else:
        total = base_matmul(x, *bases)
    factors = [(a, b, meta) for p in live for _, a, b, meta in p.node.active_factors()]
    if not factors:
        return [total]
    owner = [i for i, p in enumerate(cat.parts) if isinstance(p, _Live) for _ in p.node.active_factors()]
    precision, preferred = eqn.params.get("precision"), eqn.params.get("preferred_element_type")
    stack = tuple(range(s))
    a_cat = jnp.concatenate([a.astype(w_dtype) for a, _, _ in factors], axis=-1)
    first = lax.dot_general(x, a_cat, ((tuple(lc), tuple(rc)), (tuple(lb), stack)), precision=precision,
                            preferred_element_type=preferred)
    cuts = np.cumsum([a.shape[-1] for a, _, _ in factors])[:-1].tolist()
    terms = [[] for _ in cat.parts]
    for i, (piece, (_, b, meta)) in enumerate(zip(jnp.split(first, cuts, axis=-1), factors)):
        term = lax.dot_general(piece, b.astype(w_dtype), (((piece.ndim - 1,), (s,)), (stack, stack)),
                               precision=precision, preferred_element_type=preferred)
        terms[owner[i]].append(term * jnp.asarray(meta.scale, term.dtype))
    widths = [p.node.shape[-1] if isinstance(p, _Live) else p.shape[-1] for p in cat.parts]
    delta = jnp.concatenate([sum(t) if t else jnp.zeros(total.shape[:-1] + (w,), total.dtype)
                             for t, w in zip(terms, widths)], axis=-1)
    return [total + delta.astype(total.dtype)]


def _dot(eqn, invals, ctx):
    lhs, rhs = invals
    if isinstance(rhs, _LiveCat) and not _is_live(lhs):
        return _dot_cat(eqn, lhs, rhs, ctx)
    if isinstance(lhs, _LiveCat) or isinstance(rhs, _LiveCat):
        return None
    if _is_live(lhs) and _is_live(rhs):
        return None
    node_is_rhs = _is_live(rhs)
    live, x = (rhs, lhs) if node_is_rhs else (lhs, rhs)
    node = live.node
    lay = node.layout
    s, ni = lay.stack, lay.inputs
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, wb = (rc, rb) if node_is_rhs else (lc, lb)
    xc, xb = (lc, lb) if node_is_rhs else (rc, rb)
    if tuple(wb) != tuple(range(s)):
        return None
    in_dims = set(range(s, s + ni))
    out_dims = set(range(s + ni, lay.ndim))
    if set(wc) == in_dims and len(wc) == ni:
        mode = "in"
    elif set(wc) == out_dims and len(wc) == len(out_dims):
        mode = "out"
    else:
        return None
    if _denser_than_dense(node):
        # the factored path would cost more than the dense matmul itself: run x @ (W0 + delta)
        w = node.materialize(live.out_dtype)
        return C.bind(eqn, [x, w] if node_is_rhs else [w, x])
    w_dtype = jnp.dtype(live.out_dtype)
    n_free = x.ndim - len(xc) - len(xb)
    out_gain = in_gain = None
    term_gains = {}
    x_base = x
    if node.scales_base:  # gains on W0 along its output (or input) axes: factored only when W is rhs-like
        if mode != "in":
            return None
        out_gain, in_gain, term_gains = node.gains(live.base if node.needs_base else None, jnp.float32)
        if in_gain is not None:
            x_base = x * _align_to_x(in_gain, x.ndim, xb, xc, wc).astype(x.dtype)
    base_out = _base_op(eqn, live, [x_base, None] if node_is_rhs else [None, x_base], 1 if node_is_rhs else 0)
    if out_gain is not None:
        base_out = base_out * _align_to_result(out_gain, s, n_free, node_is_rhs).astype(base_out.dtype)
    total = base_out
    for name, a, b, meta in node.active_factors():
        term = _low_rank_term(eqn, _dropout(x, meta.dropout, ctx), a.astype(w_dtype), b.astype(w_dtype),
                              lay, mode, node_is_rhs, xc, xb, wc)
        term = term * jnp.asarray(meta.scale, term.dtype)
        if name in term_gains:
            term = term * _align_to_result(term_gains[name], s, n_free, node_is_rhs).astype(term.dtype)
        total = total + term.astype(total.dtype)
    return [total]


def _low_rank_term(eqn, x, a, b, layout, mode, node_is_rhs, x_contract, x_batch, w_contract):
    """``(x . A) . B`` (or its mirror) for a ``dot_general`` whose weight operand is a node, as two
    rank-r contractions. Factor layouts: ``A: stack + inputs + r``, ``B: stack + r + outputs``.

    ``mode == "in"``: the op contracts the kernel's input axes (``x @ W``), so ``x`` meets ``A``
    first; ``"out"``: it contracts the output axes (``x @ W^T``, a tied head), so ``x`` meets ``B``
    first. The stacked axes are batch dimensions of both contractions; ``node_is_rhs`` keeps the
    result's axis order that of the original equation (batch, lhs free, rhs free)."""
    stack_n, inputs_n = layout.stack, layout.inputs
    stack = tuple(range(stack_n))
    if mode == "in":
        first_factor, second_factor = a, b
        position = {d: d for d in range(stack_n, stack_n + inputs_n)}              # A's input axes
        second_rank_axis = stack_n                                                  # B: S + r + O
    else:
        first_factor, second_factor = b, a
        position = {d: d - inputs_n + 1 for d in range(stack_n + inputs_n, layout.ndim)}  # B's output axes
        second_rank_axis = a.ndim - 1                                               # A: S + I + r
    factor_contract = tuple(position[d] for d in w_contract)
    precision = eqn.params.get("precision")
    preferred = eqn.params.get("preferred_element_type")
    if (node_is_rhs and mode == "in" and not stack_n and not x_batch
            and tuple(x_contract) == tuple(range(x.ndim - inputs_n, x.ndim))
            and tuple(w_contract) == tuple(range(inputs_n))):
        k, r = int(np.prod(a.shape[:inputs_n])), a.shape[-1]
        y = _lora_matmul(x.reshape(-1, k), a.reshape(k, r), b.reshape(r, -1), precision, preferred)
        return y.reshape(x.shape[:x.ndim - inputs_n] + b.shape[1:])
    batch = tuple(range(len(stack)))
    if node_is_rhs:
        first = lax.dot_general(x, first_factor, ((tuple(x_contract), factor_contract), (tuple(x_batch), stack)),
                                precision=precision, preferred_element_type=preferred)
        return lax.dot_general(first, second_factor, (((first.ndim - 1,), (second_rank_axis,)), (batch, stack)),
                               precision=precision, preferred_element_type=preferred)
    first = lax.dot_general(first_factor, x, ((factor_contract, tuple(x_contract)), (stack, tuple(x_batch))),
                            precision=precision, preferred_element_type=preferred)
    return lax.dot_general(second_factor, first, (((second_rank_axis,), (len(stack),)), (stack, batch)),
                           precision=precision, preferred_element_type=preferred)


def _mm(p, q, precision, preferred):
    return lax.dot_general(p, q, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lora_matmul(x, a, b, precision, preferred):
    """``(x @ a) @ b`` for ``x (T, in)``, ``a (in, r)``, ``b (r, out)``: autodiff's numbers. On XLA:CPU the
    backward computes the factor gradients as plain row-major GEMMs over the tokens, ``(xa)^T @ g``
    and ``((g b^T)^T @ x)^T``, with only the small ``(r, T)`` transposes materialised: left to itself,
    XLA:CPU lays out the large ``(T, out)`` cotangent transposed (a copy per projection) and runs the
    contraction over tokens outside its fast GEMM path (benchmarks/README.md, "Where the CPU time
    goes"). Other platforms get autodiff's own contractions, whose transposes cuBLAS takes for free
    (``lax.platform_dependent``: chosen when the step is lowered, so a compile for a GPU from a CPU
    host gets the GPU's)."""
    return _mm(_mm(x, a, precision, preferred), b, precision, preferred)


def _lora_matmul_fwd(x, a, b, precision, preferred):
    xa = _mm(x, a, precision, preferred)
    return _mm(xa, b, precision, preferred), (x, a, b, xa)


def _lora_matmul_bwd(precision, preferred, res, g):
    x, a, b, xa = res
    dt = g.dtype
    gb = _mm(g, b.astype(dt).T, precision, preferred)                                            # (T, r)
    dx = _mm(gb.astype(dt), a.astype(dt).T, precision, preferred)                                # (T, in)

    def factor_grads(barrier):   # (xa^T @ g, gb^T @ x): (T, r) and (T, d) -> (r, d), twice
        def over_tokens(small, big):
            t = small.astype(dt).T
            return _mm(lax.optimization_barrier(t) if barrier else t, big.astype(dt), precision, preferred)
        return lambda xa, g, gb, x: (over_tokens(xa, g), over_tokens(gb, x))

    db, da_t = lax.platform_dependent(xa, g, gb, x, cpu=factor_grads(True), default=factor_grads(False))
    return dx.astype(x.dtype), da_t.T.astype(a.dtype), db.astype(b.dtype)


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def _denser_than_dense(node) -> bool:
    """The cheaper-path rule. Per token (row of ``x``), ``x @ W0`` costs ``d_in * d_out``
    multiply-adds and the factored low-rank path adds ``R * (d_in + d_out)``, ``R`` the total
    active rank. When ``R * (d_in + d_out) > d_in * d_out`` the "low-rank" path costs more than a
    second dense matmul, so ``lift`` materialises ``W0 + delta`` for that op instead (one
    ``R * d_in * d_out`` product per call and a full-size weight gradient, independent of the
    number of tokens). This happens for high ranks on small kernels, e.g. tCURLoRA, whose factors
    have rank ``n3 * r``. No warning: both paths compute the same function."""
    ranks = sum(int(a.shape[-1]) for _, a, _, _ in node.active_factors())
    if not ranks:
        return False
    _, ins, outs = node.layout.split(node.shape)
    d_in, d_out = int(np.prod(ins)), int(np.prod(outs))
    return ranks * (d_in + d_out) > d_in * d_out


def _align_to_result(gain, s, n_free, node_is_rhs):
    """A stack + outputs gain laid out against a dot_general result: the batch (stack) dims come
    first, then the lhs free dims, then the rhs free dims."""
    stack, outs = gain.shape[:s], gain.shape[s:]
    ones = (1,) * n_free
    return gain.reshape(stack + ones + outs) if node_is_rhs else gain.reshape(stack + outs + ones)


def _align_to_x(gain, x_ndim, xb, xc, wc):
    """A stack + inputs gain laid out against the operand ``x`` of a dot_general: x's batch dims
    pair with the stack axes, its contracting dims ``xc[i]`` with the kernel's input axis ``wc[i]``."""
    src = []
    shape = []
    for d in range(x_ndim):
        if d in xb:
            ax = list(xb).index(d)
        elif d in xc:
            ax = wc[list(xc).index(d)]
        else:
            shape.append(1)
            continue
        src.append(ax)
        shape.append(gain.shape[ax])
    return jnp.transpose(gain, src).reshape(shape)


def _gather(eqn, invals, ctx):
    live, idx = invals[0], invals[1]
    if not _is_live(live) or _is_live(idx):
        return None
    node = live.node
    if node.scales_base:
        return None
    lay = node.layout
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    shape = node.shape
    ok = (lay.stack == 0 and lay.inputs == 1 and lay.outputs == 1
          and tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
          and tuple(getattr(dn, "operand_batching_dims", ())) == () and sizes == (1, shape[1])
          and len(dn.offset_dims) == 1)
    if not ok:
        return None
    base_out = _base_op(eqn, live, [None, idx], 0)
    w_dtype = jnp.dtype(live.out_dtype)
    off = dn.offset_dims[0]
    total = base_out
    for name, a, b, meta in node.active_factors():
        a, b = a.astype(w_dtype), b.astype(w_dtype)
        params = dict(C.bind_params(eqn)[1])
        params["slice_sizes"] = (1, a.shape[1])
        rows = eqn.primitive.bind(a, idx, **params)
        rows = jnp.moveaxis(rows, off, -1)
        delta = jnp.moveaxis(jnp.tensordot(rows, b, axes=1), -1, off)
        total = total + (delta * jnp.asarray(meta.scale, delta.dtype)).astype(total.dtype)
    return [total]


def _conv(eqn, invals, ctx):
    x, live = invals[0], invals[1]
    if _is_live(x) or not _is_live(live):
        return None
    node, lay = live.node, live.node.layout
    if node.scales_base:
        return None
    p = eqn.params
    rhs_spec = p["dimension_numbers"].rhs_spec
    out_spec = p["dimension_numbers"].out_spec
    if (lay.stack != 0 or lay.outputs != 1 or rhs_spec[0] != lay.ndim - 1
            or p["feature_group_count"] != 1 or p["batch_group_count"] != 1):
        return None
    base_out = _base_op(eqn, live, [x, None], 1)
    w_dtype = jnp.dtype(live.out_dtype)
    feat = out_spec[1]
    total = base_out
    _, params = C.bind_params(eqn)
    for name, a, b, meta in node.active_factors():
        a, b = a.astype(w_dtype), b.astype(w_dtype)
        xin = _dropout(x, meta.dropout, ctx)
        low = eqn.primitive.bind(xin, a, **params)        # window conv to r channels
        low = jnp.moveaxis(low, feat, -1)
        delta = jnp.moveaxis(jnp.tensordot(low, b, axes=1), -1, feat)  # 1x1 conv with B
        total = total + (delta * jnp.asarray(meta.scale, delta.dtype)).astype(total.dtype)
    return [total]


def _transpose(eqn, invals, ctx):
    """``W^T`` (inputs and outputs swapped, a tied LM head): a node on the transposed base whose
    adapters are transposed by their states (None from any state: not factored)."""
    live = invals[0]
    node, lay = live.node, live.node.layout
    perm = tuple(eqn.params["permutation"])
    s, ni = lay.stack, lay.inputs
    want = tuple(range(s)) + tuple(range(s + ni, lay.ndim)) + tuple(range(s, s + ni))
    if perm != want:
        return None
    states = {n: st.transposed(lay) for n, st in node.states.items()}
    if any(st is None for st in states.values()):
        return None
    new = node.with_(base=jnp.transpose(dense(node.base), perm), states=states, layout=lay.transposed())
    return [_Live(new, live.dtype)]


def _scalar_mul(eqn, invals, ctx):
    """``c * W`` for a scalar ``c``: a node with base ``c*W0`` and ``B`` scaled by ``c``."""
    if _is_live(invals[0]) and _is_live(invals[1]):
        return None
    live, c = (invals[0], invals[1]) if _is_live(invals[0]) else (invals[1], invals[0])
    if np.ndim(c) != 0:
        return None
    node = live.node
    states = {n: st.scaled(c) for n, st in node.states.items()}
    if any(st is None for st in states.values()):
        return None
    return [_Live(node.with_(base=live.base * c, states=states), live.dtype)]


def _inline(eqn, invals, ctx):
    sub, consts = C.call_jaxpr(eqn.params)
    return _eval(sub, consts, invals, ctx)


def _remat(eqn, invals, ctx):
    sub, consts = C.call_jaxpr(eqn.params)
    opts = C.remat_options(eqn.params)

    def body(*vals):  # adapter nodes may pass through (NNX returns module state)
        return _eval(sub, consts, list(vals), ctx)

    return list(jax.checkpoint(body, **opts)(*invals))


def _unstack(live: _Live) -> _Live:
    node = live.node
    return _Live(node.with_(layout=node.layout.unstacked(1)), live.dtype)


def _scan(eqn, invals, ctx):
    body, bconsts, nc, ncarry, length, reverse, unroll = C.scan_info(eqn.params)
    consts = invals[:nc]
    carry = _arrays(invals[nc:nc + ncarry], ctx, eqn.primitive)
    xs = list(invals[nc + ncarry:])
    for i, x in enumerate(xs):
        if _is_live(x) and x.node.layout.stack < 1:
            xs[i] = ctx.fallback(eqn.primitive, x, "scanned over an axis that is not a stacked-layer axis")
    xs = [_unstack(x) if _is_live(x) else x for x in xs]
    keys = jax.random.split(ctx.rng, length) if ctx.rng is not None else None

    def step(c, inp):
        x_slices, key = inp
        sub_ctx = ctx.with_rng(key) if key is not None else ctx
        outs = _eval(body, bconsts, [*consts, *c, *x_slices], sub_ctx)
        # nodes may come out as per-layer outputs (NNX returns module state), not as carry
        return _arrays(outs[:ncarry], ctx, eqn.primitive), outs[ncarry:]

    new_carry, ys = lax.scan(step, list(carry), (xs, keys), length=length, reverse=reverse, unroll=unroll)
    ys = [_Live(y.node.with_(layout=_restack(y.node.layout)), y.dtype)
          if _is_live(y) else y for y in ys]
    return [*new_carry, *ys]


def _restack(layout):
    return type(layout)(layout.stack + 1, layout.inputs, layout.outputs)


def _cond(eqn, invals, ctx):
    index, ops = invals[0], invals[1:]
    branches = C.cond_branches(eqn.params)
    fns = [functools.partial(lambda j, c, *o: _arrays(_eval(j, c, list(o), ctx), ctx, eqn.primitive), j, c)
           for j, c in branches]
    return list(lax.switch(index, fns, *ops))


def _while(eqn, invals, ctx):
    cj, cc, bj, bc, cn, bn = C.while_info(eqn.params)
    cconsts, bconsts = invals[:cn], invals[cn:cn + bn]
    init = _arrays(invals[cn + bn:], ctx, eqn.primitive)

    def cond_fun(carry):
        return _eval(cj, cc, [*cconsts, *carry], ctx)[0]

    def body_fun(carry):
        return _arrays(_eval(bj, bc, [*bconsts, *carry], ctx), ctx, eqn.primitive)

    return list(lax.while_loop(cond_fun, body_fun, list(init)))


_RULES = {
    C.dot_general_p: _dot,
    C.gather_p: _gather,
    C.conv_p: _conv,
    C.convert_element_type_p: _convert,
    C.transpose_p: _transpose,
    C.mul_p: _scalar_mul,
    C.concatenate_p: _concat,
    C.jit_p: _inline,
    C.remat_p: _remat,
    C.scan_p: _scan,
    C.cond_p: _cond,
    C.while_p: _while,
}


# ------------------------------------------------------------------------------------------
# public entry point


def lift(fn, strict: bool = False):
    """Returns ``fn`` made to accept adapted trees (adapter nodes) anywhere in its arguments.

    Adapted matmuls run factored: ``x @ W0 + s * ((dropout(x) @ A) @ B)``; no ``W0 + s*A@B``
    and no full-size weight gradient is formed. Pass ``jlora_rng=key`` to the lifted function to
    enable adapter dropout (training); without it dropout is off (evaluation).

    Example:

    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, jlora
    >>> model, x = nn.Dense(3), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)
    >>> adapted = jlora.apply(params, jlora.LoRA(rank=2, targets="kernel"), key=jax.random.key(1))
    >>> trainable, frozen = jlora.partition(adapted)
    >>> forward = jlora.lift(model.apply, strict=True)      # x @ W0 + s (x @ A) @ B, never W0 + s A B
    >>> y = forward(jlora.combine(trainable, frozen), x)
    >>> bool(np.allclose(y, model.apply(jlora.merge(adapted), x), atol=1e-6))
    True
    >>> grads = jax.grad(lambda t: forward(jlora.combine(t, frozen), x).sum())(trainable)
    >>> grads["params"]["kernel"].states["default"].a.shape    # gradients for A and B only
    (4, 2)

    Non-array arguments (Python numbers, strings, flags) are treated as static. The traced
    program is cached per (tree structure, static values, shapes/dtypes, JAX's trace context: the
    mesh, user contexts such as the activation sharding of a sharded step), so eager calls don't
    re-trace; put the lifted function under ``jax.jit`` for speed.

    Args:
      fn: any function of pytrees of arrays.
      strict: raise :class:`FactoringError` instead of materialising a weight the interpreter
        cannot factor.
    """
    cache: dict = {}
    warned: set = set()

    @functools.wraps(fn)
    def lifted(*args, jlora_rng=None, **kwargs):
        # methods with shared parameters (tCURLoRA) -> per-node factors
        args = tuple(expand(a) for a in args)
        kwargs = {k: expand(v) for k, v in kwargs.items()}
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_adapter_leaf)
        leaves = [l.value if isinstance(l, Trainable) else l for l in leaves]
        if not any(is_node(l) for l in leaves):
            a, k = jax.tree_util.tree_unflatten(treedef, leaves)
            return fn(*a, **k)
        dyn_pos = [i for i, l in enumerate(leaves) if is_node(l) or _is_arraylike(l)]
        static = tuple((i, leaves[i]) for i in range(len(leaves)) if i not in set(dyn_pos))
        avals = []
        for i in dyn_pos:
            l = leaves[i]
            if is_node(l):
                avals.append(jax.ShapeDtypeStruct(l.shape, l.dtype))
            else:
                avals.append(jax.ShapeDtypeStruct(np.shape(l), jnp.result_type(l)))
        key = (treedef, tuple(i for i in dyn_pos), tuple((a.shape, str(a.dtype)) for a in avals),
               C.trace_context())
        try:
            key = key + (static,)
            hash(key)
        except TypeError:
            key = None
        entry = cache.get(key) if key is not None else None
        if entry is None:
            template = list(leaves)

            def flat_fn(*dyn):
                full = list(template)
                for i, v in zip(dyn_pos, dyn):
                    full[i] = v
                a, k = jax.tree_util.tree_unflatten(treedef, full)
                return fn(*a, **k)

            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)

            def run(vals, rng, closed=closed):
                ctx = _Ctx(strict=strict, warned=warned, rng=rng)
                return _arrays(_eval(closed.jaxpr, closed.consts, vals, ctx), ctx, "output")

            # compiled, so eager calls are not interpreted op by op; a no-op under an outer jit
            entry = (jax.jit(run), jax.tree_util.tree_structure(out_shape))
            if key is not None:
                cache[key] = entry
        run, out_tree = entry
        vals = [_Live(leaves[i]) if is_node(leaves[i]) else leaves[i] for i in dyn_pos]
        return jax.tree_util.tree_unflatten(out_tree, run(vals, jlora_rng))

    lifted.cache = cache
    return lifted


def _is_arraylike(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or hasattr(x, "aval")
