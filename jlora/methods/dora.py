"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

``W' = m * (W0 + s A B) / ||W0 + s A B||`` with the norm taken per output unit (over a Flax
kernel's input axes; PyTorch's ``norm(W, dim=1)``), ``m`` a trainable magnitude initialised to
that norm (so the adapter is a no-op at init) and the norm treated as a constant in the backward
pass (paper §4.3, as PEFT). The bias is not rescaled.

jlora never forms ``W0 + s A B``: ``||W0_j||^2`` is cached (frozen) at apply time and the norm is
completed in closed form from an ``r x outputs`` product (see :func:`jlora.core.nodes.dora_norm`);
the adapted matmul stays factored, ``out = g * (x W0) + g * s (x A) B`` with ``g = m / norm``.

Example::

    spec = jlora.DoRA(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    y = jlora.lift(model.apply)(adapted, x)

    qspec = jlora.QDoRA(rank=8, alpha=16, targets=..., quant="nf4")   # on a 4-bit base
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jlora.core.nodes import Layout, column_sq_norms, dense, dora_norm
from jlora.methods.lora import LoRA
from jlora.methods.qlora import QLoRA


def _dora_extra(spec, base, layout: Layout, a, b, meta):
    """``extra = {"m": ||W0 + s A B||}`` (trainable), ``cache = {"w0_sq": ||W0||^2}`` (frozen), per
    output unit; a quantised base is dequantised once here."""
    w0 = dense(base, jnp.float32)
    w0_sq = column_sq_norms(w0, layout)
    m = dora_norm(w0, a, b, meta.scale, w0_sq, layout)
    return {"m": m.astype(jnp.dtype(spec.dtype))}, {"w0_sq": w0_sq}


@dataclasses.dataclass(frozen=True)
class DoRA(LoRA):
    """DoRA: :class:`jlora.LoRA`'s arguments (rank, alpha, targets, init, rslora, patterns, ...);
    the magnitude ``m`` is trained with the factors."""

    method = "dora"

    def init_extra(self, key, base, layout: Layout, path: str, a, b, meta):
        return _dora_extra(self, base, layout, a, b, meta)


@dataclasses.dataclass(frozen=True)
class QDoRA(QLoRA):
    """DoRA on a quantised frozen base: :class:`jlora.QLoRA`'s arguments (quant, block,
    double_quant, compute_dtype, quantize_frozen). ``||W0||^2`` is taken from the dequantised
    base once, at apply time."""

    method = "dora"

    def init_extra(self, key, base, layout: Layout, path: str, a, b, meta):
        return _dora_extra(self, base, layout, a, b, meta)
