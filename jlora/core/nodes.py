"""Adapter nodes: registered pytree dataclasses that replace a matched parameter leaf.

A :class:`LoRANode` sits where the original kernel was. It holds the frozen ``base``
(the original array) and, per named adapter, the low-rank factors ``a`` and ``b``.
Everything that is not an array (rank, scale, which adapters are active, how the
kernel's axes split into stacked / input / output groups) is static pytree aux data.

Factor layout, for a base of shape ``stack + inputs + outputs``::

    a: stack + inputs + (rank,)
    b: stack + (rank,) + outputs
    delta = scale * a @ b          (contracting the rank axis, batched over stack)

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


@dataclasses.dataclass(frozen=True)
class AdapterMeta:
    """Static description of one named adapter on one leaf."""

    method: str
    rank: int
    scale: float
    dropout: float = 0.0
    init: str = "kaiming"


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

    def active_factors(self):
        """Yields ``(name, a, b, meta)`` for every active adapter."""
        meta = self.meta
        for name in self.active:
            yield name, self.a[name], self.b[name], meta[name]

    # -- math ----------------------------------------------------------------------------
    def delta(self, names=None, dtype=None) -> Array:
        """The dense update ``sum_name scale * a @ b`` with the base's shape (materialises)."""
        names = self.active if names is None else tuple(names)
        meta = self.meta
        dtype = dtype or jnp.promote_types(self.dtype, jnp.float32)
        total = jnp.zeros(self.shape, dtype)
        for name in names:
            total = total + _factor_product(self.a[name], self.b[name], self.layout).astype(dtype) * jnp.asarray(meta[name].scale, dtype)
        return total

    def materialize(self, dtype=None) -> Array:
        """``base + delta`` in ``dtype`` (default: the base's dtype)."""
        dtype = dtype or self.dtype
        if not self.active:
            return dense(self.base, dtype)
        full = dense(self.base, jnp.promote_types(self.dtype, jnp.float32)) + self.delta()
        return full.astype(dtype)

    def with_(self, **changes) -> "LoRANode":
        return dataclasses.replace(self, **changes)


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
