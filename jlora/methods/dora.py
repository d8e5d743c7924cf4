"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation.

``W' = m * (W0 + s A B) / ||W0 + s A B||`` with the norm taken per output unit (over a Flax
kernel's input axes; PyTorch's ``norm(W, dim=1)``), ``m`` a trainable magnitude initialised to
that norm (so the adapter is a no-op at init) and the norm treated as a constant in the backward
pass (paper §4.3, as PEFT). The bias is not rescaled.

jlora never forms ``W0 + s A B``: ``||W0_j||^2`` is cached (frozen) at apply time and the norm is
completed in closed form from an ``r x outputs`` product (see :func:`dora_norm`);
the adapted matmul stays factored, ``out = g * (x W0) + g * s (x A) B`` with ``g = m / norm``.

Example::

    spec = jlora.DoRA(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
    adapted = jlora.apply(params, spec, key=jax.random.key(0))
    y = jlora.lift(model.apply)(adapted, x)

    qspec = jlora.QDoRA(rank=8, alpha=16, targets=..., quant="nf4")   # on a 4-bit base
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.core.errors import PeftFormatError
from jlora.core.nodes import AdaptedWeight, AdapterMeta, Layout, dense
from jlora.core.state import Gain, LoRAState, register_state_type
from jlora.methods import _peft as peft_format
from jlora.methods.lora import LoRA, LoRACodec, _peft_dropout, read_lora_factors
from jlora.methods.qlora import QLoRA

Array = Any


def dora_norm(w0, a, b, scale, w0_sq, layout: Layout):
    """``||W0 + s A B||`` per output unit, in closed form (float32)::

        ||W0_j + s (AB)_j||^2 = ||W0_j||^2 + 2 s <W0_j, (AB)_j> + s^2 ||(AB)_j||^2
        <W0_j, (AB)_j> = sum_k (A^T W0)_kj B_kj          (A^T W0: rank x outputs)
        ||(AB)_j||^2   = sum_k B_kj ((A^T A) B)_kj

    W0 is read once (one rank-r contraction), never written; no kernel-sized array is formed.
    """
    s, ni = layout.stack, layout.inputs
    stack = tuple(range(s))
    inputs = tuple(range(s, s + ni))
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    hi = lax.Precision.HIGHEST
    # W0 stays in its own dtype (no float32 copy of a bf16 kernel); accumulate in float32
    atw = lax.dot_general(a.astype(w0.dtype), w0, ((inputs, inputs), (stack, stack)), precision=hi,
                          preferred_element_type=jnp.float32)                     # S + r + O
    ata = lax.dot_general(a, a, ((inputs, inputs), (stack, stack)), precision=hi)  # S + r + r
    atab = lax.dot_general(ata, b, (((s + 1,), (s,)), (stack, stack)), precision=hi)  # S + r + O
    cross = jnp.sum(atw * b, axis=s)
    square = jnp.sum(atab * b, axis=s)
    sq = w0_sq.astype(jnp.float32) + 2.0 * scale * cross + scale * scale * square
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def column_sq_norms(w0, layout: Layout):
    """``||W0_j||^2`` per output unit (stack + outputs), summing over the input axes."""
    w = w0.astype(jnp.float32)
    return jnp.sum(w * w, axis=tuple(range(layout.stack, layout.stack + layout.inputs)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DoRAState(LoRAState):
    """DoRA's state: the factors ``a`` / ``b``, the trainable magnitude ``m`` (stack + outputs) and
    the frozen ``w0_sq = ||W0||^2`` per output unit the closed-form norm starts from.

    Its gain is ``g = m / ||W0 + s A B||`` (the norm under ``stop_gradient``): ``W0`` is scaled by
    ``g`` (a shift of ``g - 1``) and so is its own low-rank term."""

    a: Array = None
    b: Array = None
    m: Array = None
    w0_sq: Array = None

    frozen: ClassVar[tuple] = ("w0_sq",)
    needs_base: ClassVar[bool] = True
    additive: ClassVar[bool] = False
    title: ClassVar[str] = "DoRA"

    def gain(self, meta, layout, w0) -> Gain:
        norm = dora_norm(w0, self.a, self.b, meta.scale, self.w0_sq, layout)
        g = self.m / lax.stop_gradient(norm).astype(self.m.dtype)
        return Gain(shift=g - 1, term=g)

    def transposed(self, layout):
        return None   # the magnitude is per output unit; it has no transposed form

    def scaled(self, c):
        return None


register_state_type("dora", DoRAState)


class _Magnitude:
    """DoRA's magnitude on top of any low-rank spec's init (plain or quantised base): one method
    over two base kinds, so :class:`DoRA` and :class:`QDoRA` share this one ``init_state``."""

    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(DoRAState, new_base, meta)``: ``m = ||W0 + s A B||`` (a no-op at init) and
        ``w0_sq = ||W0||^2`` per output unit; a quantised base is dequantised once here."""
        lora, new_base, meta = super().init_state(key, base, layout, path, embedding=embedding)
        w0 = dense(new_base, jnp.float32)
        w0_sq = column_sq_norms(w0, layout)
        m = dora_norm(w0, lora.a, lora.b, meta.scale, w0_sq, layout)
        return DoRAState(lora.a, lora.b, m.astype(jnp.dtype(self.dtype)), w0_sq), new_base, meta


@dataclasses.dataclass(frozen=True)
class DoRA(_Magnitude, LoRA):
    """DoRA: :class:`jlora.LoRA`'s arguments (rank, alpha, targets, init, rslora, patterns, ...);
    the magnitude ``m`` is trained with the factors."""

    method = "dora"
    cli_method = "dora"


@dataclasses.dataclass(frozen=True)
class QDoRA(_Magnitude, QLoRA):
    """DoRA on a quantised frozen base: :class:`jlora.QLoRA`'s arguments (quant, block,
    double_quant, compute_dtype, quantize_frozen). ``||W0||^2`` is taken from the dequantised
    base once, at apply time."""

    method = "dora"
    cli_method = None   # not a --method of its own


# ------------------------------------------------------------------------------------------
# PEFT files: peft_type "LORA" with use_dora=true and a lora_magnitude_vector (out,) per module

class DoRACodec(LoRACodec):
    """DoRA as PEFT writes it: a LoRA file with ``use_dora: true`` and ``lora_magnitude_vector``
    (jlora's ``m`` flattened over the output axes). ``w0_sq`` is recomputed from the base on load.
    ``use_dora`` is global in PEFT, so one file cannot mix DoRA and plain LoRA modules."""

    title = "DoRA"
    kind = "dora"
    use_dora = True

    def export(self, node, adapter, leaf_path, stack, n_in, n_out, embedding):
        tensors, r, infos = super().export(node, adapter, leaf_path, stack, n_in, n_out, embedding)
        if embedding:
            raise ValueError(f"{leaf_path!r}: DoRA on an embedding table is not written to PEFT files by save_peft "
                             f"(only DoRA on Linear-like kernels)")
        m = node.states[adapter].m
        if m is None:
            raise ValueError(f"{leaf_path!r}: DoRA adapter {adapter!r} has no magnitude m; pass the full adapted "
                             f"tree (jlora.combine(trainable, frozen))")
        m = np.asarray(m)
        want = stack + tuple(node.layout.split(node.shape)[2])
        if m.shape != want:
            raise ValueError(f"{leaf_path!r}: DoRA magnitude of shape {m.shape}, expected stack + outputs {want}")
        tensors["lora_magnitude_vector"] = m.reshape(stack + (n_out,))  # (out,): PEFT's key has no .weight
        return tensors, r, infos

    def check_parts(self, module, parts, weights_file):
        super().check_parts(module, parts, weights_file)
        if "M" not in parts:
            raise PeftFormatError(f"{weights_file}: the config has use_dora=true (DoRA) but module {module!r} has no "
                                  f"lora_magnitude_vector")
        if parts.get("embedding"):
            raise PeftFormatError(f"{weights_file}: module {module!r}: DoRA on an embedding (lora_embedding_A/B) is not "
                                  f"supported by jlora.io.load_peft")

    def build(self, target):
        a, b, layout, rank, scale = read_lora_factors(target)
        _, _, outputs = layout.split(target.shape)
        n_out = math.prod(outputs)
        mags = []
        for n in target.names:
            m = target.parts[n]["M"]
            if m.shape != (n_out,):
                raise PeftFormatError(f"{target.weights_file}: shape mismatch for module {n!r} (params "
                                      f"{target.leaf_path!r} {target.shape}, layout {layout}): expected "
                                      f"lora_magnitude_vector ({n_out},), found {tuple(m.shape)}")
            mags.append(m.reshape(outputs))
        base = target.leaf.base if isinstance(target.leaf, AdaptedWeight) else target.leaf
        state = DoRAState(a, b, jnp.asarray(peft_format.stack_layers(mags, target.stacked)),
                          column_sq_norms(dense(base, jnp.float32), layout))
        meta = AdapterMeta(method="dora", rank=rank, scale=scale, dropout=_peft_dropout(target.config), init="peft")
        return peft_format.attach(target.leaf, target.leaf_path, layout, target.adapter, meta, state)


peft_format.register_peft_codec("dora", DoRACodec())
