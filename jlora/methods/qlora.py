"""QLoRA (Dettmers et al. 2023): LoRA on a frozen base stored in 4 bits.

``jlora.QLoRA(...)`` is :class:`jlora.LoRA` plus the quantisation of the frozen base: every
targeted kernel's base becomes a :class:`jlora.quant.QuantizedArray` (NF4 with double
quantisation by default, blocks of 64 along the input dimension as bitsandbytes does), and with
``quantize_frozen`` other frozen kernels too. ``jlora.lift`` dequantises a base inside the matmul
that uses it (one layer at a time under ``scan``), to ``compute_dtype`` or to the dtype the program
casts the weight to (a float32 model promotes it: no bfloat16 rounding then, while :func:`jlora.merge`
returns the merged weight in ``compute_dtype``); gradients flow through the
dequantised weight to the activations, never to the codes. The LoRA factors stay in ``dtype``
(float32 by default).

Example::

    spec = jlora.QLoRA(rank=8, alpha=16, targets=r".*/(query|value)/kernel")
    adapted = jlora.apply(params, spec, key)            # frozen half holds QuantizedArrays
    merged = jlora.merge(adapted)                        # dequantised + delta (full precision)
    merged4 = jlora.merge(adapted, requantize=True)      # re-quantised (lossy; see merge_error)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jlora.core.nodes import Layout
from jlora.core.paths import normalize_patterns
from jlora.core.spec import CliField
from jlora.core.state import LoRAState, register_state_type
from jlora.methods.lora import LoRA
from jlora.quant import quantize

QUANT_SCHEMES = ("nf4", "int4", "int4_asym", "int8")

register_state_type("qlora", LoRAState)   # LoRA's factors; only the base differs


@dataclasses.dataclass(frozen=True)
class QLoRA(LoRA):
    """LoRA with a quantised frozen base.

    Args (beyond :class:`jlora.LoRA`'s):
      quant: "nf4" (default), "int4" (symmetric), "int4_asym", or "int8".
      block: quantisation block size along the input dimension (default 64).
      double_quant: quantise the per-block scales again (8-bit, blocks of 256): about 4.13
        bits/param instead of 4.5 for NF4.
      compute_dtype: dtype the base is dequantised to inside the matmul (default bfloat16).
      quantize_frozen: also quantise frozen kernels that carry no adapter: "all-linear" (every
        other leaf named ``kernel``) or path patterns; None (default) quantises targets only.
    """

    quant: str = "nf4"
    block: int = 64
    double_quant: bool = True
    compute_dtype: Any = jnp.bfloat16
    quantize_frozen: Any = None

    method = "qlora"
    cli_method = "qlora"
    cli_fields = (
        CliField("quant", "nf4", "qlora: frozen-base scheme", "choice", QUANT_SCHEMES),
        CliField("double_quant", True, "qlora: do not quantise the block scales again", "flag_off"),
        CliField("quantize_frozen", None, "qlora: also quantise frozen kernels: 'all-linear' or a regex"),
    )

    @classmethod
    def from_cli(cls, settings, common, context):
        return cls(**common, quant=settings["quant"], double_quant=settings["double_quant"] and settings["quant"] != "int8",
                   quantize_frozen=settings["quantize_frozen"])

    def __post_init__(self):
        super().__post_init__()
        if self.quant not in QUANT_SCHEMES:
            raise ValueError(f"QLoRA quant must be one of {QUANT_SCHEMES}, got {self.quant!r}")
        if not isinstance(self.block, int) or isinstance(self.block, bool) or self.block < 2 or self.block % 2:
            raise ValueError(f"QLoRA block must be an even int >= 2, got {self.block!r}")
        if self.double_quant and self.quant == "int8":
            raise ValueError("QLoRA double_quant applies to 4-bit schemes only; use double_quant=False with int8")
        self._check_float_dtype("compute_dtype")
        qf = self.quantize_frozen
        if qf is not None and qf != "all-linear":
            object.__setattr__(self, "quantize_frozen", normalize_patterns(qf, "quantize_frozen"))

    def quantize_base(self, base, layout: Layout):
        return quantize(base, self.quant, block=self.block, double_quant=self.double_quant,
                        stack=layout.stack, inputs=layout.inputs, dtype=jnp.dtype(self.compute_dtype))

    def init_factors(self, key, base, layout: Layout, path: str, embedding: bool = False):
        a, b, new_base, meta = super().init_factors(key, base, layout, path, embedding=embedding)
        return a, b, self.quantize_base(new_base, layout), meta

    def frozen_patterns(self):
        """Patterns of non-targeted leaves whose frozen base is quantised too."""
        if self.quantize_frozen is None:
            return ()
        if self.quantize_frozen == "all-linear":
            return (r".*/kernel", "kernel")
        return tuple(self.quantize_frozen)
