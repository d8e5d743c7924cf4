"""Adapter nodes: registered pytree dataclasses that replace a matched parameter leaf.

A :class:`LoRANode` sits where the original kernel was. It holds the frozen ``base``
(the original array) and, per named adapter, the low-rank factors ``a`` and ``b``.
Everything that is not an array (rank, scale, which adapters are active, how the
kernel's axes split into stacked / input / output groups) is static pytree aux data.

Factor layout, for a base of shape ``stack + inputs + outputs``::

    a: stack + inputs + (rank,)
    b: stack + (rank,) + outputs
    delta = scale * a @ b          (contracting the rank axis, batched over stack)

Methods beyond plain LoRA keep their extra trainable arrays in ``extra[name]`` and frozen
derived arrays in ``cache[name]`` (both dicts of arrays):

    lora / qlora   W = W0 + s A B
    adalora        W = W0 + s (A * E) B            extra: e (stack + (r,)), the singular values
    dora           W = g * (W0 + s A B),           extra: m (stack + outputs), the magnitude
                   g = m / ||W0 + s A B||          cache: w0_sq = ||W0||^2 per output unit
                   (norm over the input axes, per output unit, treated as a constant in backward)
    ia3            W = W0 * l                      extra: l (stack + outputs, or stack + inputs
                   (outputs scaled; feedforward:   for feedforward layers); no A, B
                   inputs scaled)

With several active adapters on one kernel the forward is
``out = (x*l_in) W0 * (1 + sum_dora (g-1)) * l_out + sum_lowrank g_k s (x A_k) B_k``
(``g_k = 1`` for non-DoRA adapters), which is PEFT's DoRA forward for one adapter; IA3 is not
mixed with other methods on one kernel.

This is the Flax (in, out) convention; PyTorch/PEFT's ``lora_A`` (r, in) and ``lora_B``
(out, r) are the transposes of ``a`` and ``b`` for a 2-D kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

Array = Any


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a kernel's axes split: ``stack`` leading stacked-layer axes, then ``inputs``
    contracted axes, then ``outputs`` axes (``stack + inputs + outputs == ndim``)."""

    stack: int
    inputs: int
    outputs: int

    def __post_init__(self):
        for name in ("stack", "inputs", "outputs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Layout.{name} must be a non-negative int, got {value!r}")
        if self.inputs < 1 or self.outputs < 1:
            raise ValueError(
                f"Layout needs at least one input and one output axis, got {self}")

    @property
    def ndim(self) -> int:
        return self.stack + self.inputs + self.outputs

    def split(self, shape):
        """Returns (stack_shape, input_shape, output_shape) of ``shape``."""
        if len(shape) != self.ndim:
            raise ValueError(f"shape {tuple(shape)} has {len(shape)} axes, layout {self} expects {self.ndim}")
        s, i = self.stack, self.stack + self.inputs
        return tuple(shape[:s]), tuple(shape[s:i]), tuple(shape[i:])

    def unstacked(self, n: int = 1) -> "Layout":
        if n > self.stack:
            raise ValueError(f"cannot remove {n} stacked axes from {self}")
        return Layout(self.stack - n, self.inputs, self.outputs)

    def transposed(self) -> "Layout":
        return Layout(self.stack, self.outputs, self.inputs)


LOWRANK_METHODS = ("lora", "qlora", "dora", "adalora", "tcur")
SCALING_METHODS = ("ia3",)


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
    """Static description of one named adapter on one leaf (``rank`` 0 for IA3;
    ``feedforward`` only for IA3: scale the inputs instead of the outputs).

    ``group`` / ``slices``: for methods whose factors are derived from parameters shared by several
    leaves (tCURLoRA: one trainable core per stacked tensor), the name of the shared group under
    the tree's reserved top-level entry and this leaf's slice index (one per stacked layer of the
    kernel, in row-major order). Such a node has no ``a`` / ``b`` of its own until
    :func:`jlora.core.api.expand` fills them in."""

    method: str
    rank: int
    scale: float
    dropout: float = 0.0
    init: str = "kaiming"
    feedforward: bool = False
    group: str = ""
    slices: tuple = ()

    def __post_init__(self):  # JSON gives a list; static metadata must be hashable
        object.__setattr__(self, "slices", tuple(int(k) for k in self.slices))

    @property
    def lowrank(self) -> bool:
        return self.method in LOWRANK_METHODS or self.method not in SCALING_METHODS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRANode:
    """A kernel with one or more named low-rank adapters.

    ``base`` is frozen; ``a[name]`` / ``b[name]`` are trainable for the names in ``active``.
    ``adapters`` is a tuple of ``(name, AdapterMeta)`` pairs (static, hashable).
    """

    base: Array
    a: dict
    b: dict
    layout: Layout = dataclasses.field(metadata=dict(static=True))
    adapters: tuple = dataclasses.field(metadata=dict(static=True))
    active: tuple = dataclasses.field(metadata=dict(static=True))
    path: str = dataclasses.field(default="", metadata=dict(static=True))
    extra: dict = dataclasses.field(default_factory=dict)   # name -> {key: trainable array}
    cache: dict = dataclasses.field(default_factory=dict)   # name -> {key: frozen array}

    # -- static helpers ---------------------------------------------------------------
    @property
    def meta(self) -> Mapping[str, AdapterMeta]:
        return dict(self.adapters)

    @property
    def shape(self):
        return tuple(self.base.shape)

    @property
    def dtype(self):
        return jnp.dtype(self.base.dtype)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base)

    @property
    def names(self) -> tuple:
        """Every adapter name on this node, active or not, in the order they were added."""
        return tuple(n for n, _ in self.adapters)

    @property
    def plain(self) -> bool:
        """True when every active adapter is plain low-rank (LoRA / QLoRA / AdaLoRA): the
        adapted op is ``x W0 + sum s (x A) B`` with no gain on W0."""
        meta = self.meta
        return all(meta[n].method not in ("dora", "ia3") for n in self.active)

    def factors(self, name):
        """``(a, b)`` of a low-rank adapter, with AdaLoRA's singular values folded into ``a``."""
        if name not in self.a:
            meta = self.meta[name]
            raise ValueError(
                f"adapter {name!r} ({meta.method}) on {self.path!r} has no factors of its own: they are derived "
                f"from the shared group {meta.group!r}. Pass the whole adapted tree (with its reserved top-level "
                f"entry, e.g. 'jlora_tcur') to jlora.lift / merge, or expand it first with jlora.core.api.expand")
        a, b = self.a[name], self.b[name]
        if self.meta[name].method == "adalora":
            e = self.extra[name]["e"]
            s = self.layout.stack
            a = a * e.reshape(e.shape[:s] + (1,) * self.layout.inputs + e.shape[s:]).astype(a.dtype)
        return a, b

    def active_factors(self):
        """Yields ``(name, a, b, meta)`` for every active low-rank adapter (AdaLoRA's ``a`` has
        its singular values folded in)."""
        meta = self.meta
        for name in self.active:
            if meta[name].lowrank:
                a, b = self.factors(name)
                yield name, a, b, meta[name]

    def dora_gain(self, name, w0=None):
        """``g = m / ||W0 + s A B||`` per output unit (stack + outputs), the norm computed in closed
        form from the cached ``||W0||^2`` without forming ``W0 + s A B``, under ``stop_gradient``."""
        if w0 is None:
            w0 = dense(self.base, jnp.float32)
        a, b = self.a[name], self.b[name]
        norm = dora_norm(w0, a, b, self.meta[name].scale, self.cache[name]["w0_sq"], self.layout)
        m = self.extra[name]["m"]
        return m / lax.stop_gradient(norm).astype(m.dtype)

    def gains(self, w0=None, dtype=jnp.float32):
        """``(out_gain, in_gain, dora)``: the factors on W0 along the output axes (stack +
        outputs) and the input axes (stack + inputs), or None where there are none, and
        ``{name: g}`` for the active DoRA adapters."""
        meta = self.meta
        out_gain = in_gain = None
        dora = {}
        for name in self.active:
            method = meta[name].method
            if method == "dora":
                g = self.dora_gain(name, w0).astype(dtype)
                dora[name] = g
                out_gain = (g - 1) if out_gain is None else out_gain + (g - 1)
            elif method == "ia3":
                l = self.extra[name]["l"].astype(dtype)
                if meta[name].feedforward:
                    in_gain = l if in_gain is None else in_gain * l
                else:
                    out_gain = l if out_gain is None else out_gain * l
        if dora:  # W0 * (1 + sum (g - 1))
            out_gain = out_gain + 1
        return out_gain, in_gain, dora

    # -- math ----------------------------------------------------------------------------
    def _affine(self, w0, dtype):
        """``(gain_on_w0, additive)`` with ``W = W0 * gain + additive`` (broadcast shapes)."""
        lay = self.layout
        out_gain, in_gain, dora = self.gains(w0, dtype)
        gain = jnp.ones((), dtype)
        if out_gain is not None:
            gain = gain * _on_outputs(out_gain, lay)
        if in_gain is not None:
            gain = gain * _on_inputs(in_gain, lay)
        add = jnp.zeros(self.shape, dtype)
        for name, a, b, meta in self.active_factors():
            d = _factor_product(a, b, lay).astype(dtype) * jnp.asarray(meta.scale, dtype)
            if name in dora:
                d = d * _on_outputs(dora[name], lay)
            add = add + d
        return gain, add

    def delta(self, names=None, dtype=None) -> Array:
        """The dense update ``W_adapted - W0`` with the base's shape (materialises)."""
        node = self if names is None else self.with_(active=tuple(names))
        dtype = dtype or jnp.promote_types(self.dtype, jnp.float32)
        w0 = dense(self.base, dtype)
        gain, add = node._affine(w0, dtype)
        return w0 * (gain - 1) + add

    def materialize(self, dtype=None) -> Array:
        """``W0`` with the active adapters applied, in ``dtype`` (default: the base's dtype)."""
        dtype = dtype or self.dtype
        if not self.active:
            return dense(self.base, dtype)
        work = jnp.promote_types(self.dtype, jnp.float32)
        w0 = dense(self.base, work)
        gain, add = self._affine(w0, work)
        return (w0 * gain + add).astype(dtype)

    def unapply(self, merged, dtype=None):
        """The base that :meth:`materialize` turns into ``merged``: ``(W - additive) / gain``
        (DoRA's gain comes from this node's own base and factors, as PEFT's cached norm does)."""
        work = jnp.promote_types(self.dtype, jnp.float32)
        gain, add = self._affine(dense(self.base, work), work)
        return ((jnp.asarray(merged).astype(work) - add) / gain).astype(dtype or self.dtype)

    def with_(self, **changes) -> "LoRANode":
        return dataclasses.replace(self, **changes)


def _on_outputs(v, layout: Layout):
    """A stack + outputs array broadcast against a stack + inputs + outputs kernel."""
    s = layout.stack
    return v.reshape(v.shape[:s] + (1,) * layout.inputs + v.shape[s:])


def _on_inputs(v, layout: Layout):
    """A stack + inputs array broadcast against a stack + inputs + outputs kernel."""
    return v.reshape(v.shape + (1,) * layout.outputs)


def dora_norm(w0, a, b, scale, w0_sq, layout: Layout):
    """``||W0 + s A B||`` per output unit, in closed form (float32)::

        ||W0_j + s (AB)_j||^2 = ||W0_j||^2 + 2 s <W0_j, (AB)_j> + s^2 ||(AB)_j||^2
        <W0_j, (AB)_j> = sum_k (A^T W0)_kj B_kj          (A^T W0: rank x outputs)
        ||(AB)_j||^2   = sum_k B_kj ((A^T A) B)_kj

    W0 is read once (one rank-r contraction), never written; no kernel-sized array is formed.
    """
    s, ni = layout.stack, layout.inputs
    S = tuple(range(s))
    I = tuple(range(s, s + ni))
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    # W0 stays in its own dtype (no float32 copy of a bf16 kernel); accumulate in float32
    atw = lax.dot_general(a.astype(w0.dtype), w0, ((I, I), (S, S)), precision=hi,
                          preferred_element_type=jnp.float32)             # S + r + O
    ata = lax.dot_general(a, a, ((I, I), (S, S)), precision=hi)          # S + r + r
    atab = lax.dot_general(ata, b, (((s + 1,), (s,)), (S, S)), precision=hi)  # S + r + O
    cross = jnp.sum(atw * b, axis=s)
    square = jnp.sum(atab * b, axis=s)
    sq = w0_sq.astype(jnp.float32) + 2.0 * scale * cross + scale * scale * square
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def column_sq_norms(w0, layout: Layout):
    """``||W0_j||^2`` per output unit (stack + outputs), summing over the input axes."""
    w = w0.astype(jnp.float32)
    return jnp.sum(w * w, axis=tuple(range(layout.stack, layout.stack + layout.inputs)))


def _factor_product(a, b, layout: Layout):
    """``a @ b`` over the rank axis, batched over stacked axes -> stack + inputs + outputs."""
    s = layout.stack
    return lax.dot_general(
        a, b,
        dimension_numbers=(((a.ndim - 1,), (s,)), (tuple(range(s)), tuple(range(s)))),
        precision=lax.Precision.HIGHEST,
    )


def is_quantized(x) -> bool:
    """True for a :class:`jlora.quant.QuantizedArray` (checked without importing jlora.quant)."""
    return hasattr(x, "scheme") and hasattr(x, "matrix_shape")


def dense(base, dtype=None):
    """The base as a dense array: a quantised base is dequantised (to ``dtype`` or its own)."""
    if is_quantized(base):
        from jlora.quant import dequantize

        return dequantize(base, dtype)
    return base if dtype is None else base.astype(dtype)


def is_node(x) -> bool:
    return isinstance(x, LoRANode)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trainable:
    """Marks a plain leaf that is trained in full (``train_also``, PEFT's modules_to_save)."""

    value: Array
    path: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def shape(self):
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype


def is_adapter_leaf(x) -> bool:
    """True for every jlora wrapper that stands in place of one original leaf."""
    return isinstance(x, (LoRANode, Trainable))


def unwrap(x, dtype=None):
    """The plain array a wrapper stands for (materialising a LoRANode)."""
    if isinstance(x, LoRANode):
        return x.materialize(dtype)
    if isinstance(x, Trainable):
        return x.value
    return x


def fan_in(shape, layout: Layout) -> int:
    _, inputs, _ = layout.split(shape)
    return int(math.prod(inputs))
