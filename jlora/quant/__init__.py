"""Blockwise weight quantisation for QLoRA: NF4 (bitsandbytes-exact, with double quantisation),
int4 (symmetric / asymmetric) and int8, as jittable JAX ops over a pytree ``QuantizedArray``."""

from jlora.quant.core import (NF4_CODE, SCHEMES, QuantizedArray, block_scales, dequantize,
                              dynamic_map, quantize, requantize_like)

__all__ = ["QuantizedArray", "quantize", "dequantize", "requantize_like", "block_scales",
           "NF4_CODE", "dynamic_map", "SCHEMES"]
