"""Blockwise weight quantisation (QLoRA NF4, int4, int8) as jittable JAX ops.

Layout: a Flax kernel ``stack + inputs_dims + outputs_dims`` is, per stack index, reshaped to
``(n_in, n_out)``, transposed to PyTorch's ``(out, in)`` layout and flattened row-major, so blocks
of ``block`` consecutive elements run along the input dimension exactly as bitsandbytes
quantises a ``(out, in)`` weight. A trailing partial block gets its own scale.

NF4 follows bitsandbytes' reference kernel (``backends/default/ops.py::quantize_4bit``)
bit-for-bit: fp32 ``absmax`` per block, ``x * (1/absmax)`` (the partial block: ``x / absmax``),
clamped to [-1, 1], nearest code with a value on a midpoint going to the LOWER code
(``torch.bucketize(right=False)``), two codes per byte with the first in the high nibble.

Double quantisation (``compress_statistics=True``): ``offset = mean(absmax)``; ``absmax - offset``
is quantised in blocks of 256 with the signed 8-bit dynamic map and an fp32 absmax per block,
rounding exactly as bitsandbytes' CPU kernel does (``csrc/cpu_ops.cpp::quantize_cpu_impl``: the
normalised value is binned into a 65536-entry lookup table, ``lut[int((v + 1) * 0.5 * 65535 +
0.5)]``). That table picks the nearest code except within ~1.5e-5 of a midpoint and among the
dynamic map's sub-1.5e-5 codes near zero, where it differs from exact nearest by at most one
code (~0.15% of values, absolute error < 3e-5 * absmax2); we follow it for bit parity.
``offset`` is ``sum / n`` with a deterministic compensated pairwise fp32 sum; torch's fp32
``mean`` sums in another order, so for general data the two can differ in the last ulp
(identical whenever the sum is exact).

int schemes follow qwix (``qwix/_src/core/numerics.py``): symmetric int4 ``scale = absmax/7.5``,
``q = round(x/scale)`` clipped to [-8, 7]; asymmetric int4 (min-max) ``scale = (max-min)/15``
with ``min <= 0 <= max``, ``zp = round(-8 - min/scale)``, ``q = clip(round(x/scale + zp))``,
dequant ``(q - zp) * scale``; int8 ``scale = absmax/127.5``, clipped to [-128, 127]. Codes are
stored unsigned (offset by +8 / +128); round is half-to-even (``jnp.round``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QuantizedArray", "quantize", "dequantize", "requantize_like", "NF4_CODE", "dynamic_map",
           "SCHEMES"]

SCHEMES = ("nf4", "int4", "int4_asym", "int8")
_DQ_SCHEMES = ("nf4", "int4")
_DQ_BLOCK = 256  # bitsandbytes quantises the absmax statistics in blocks of 256

# bitsandbytes/functional.py::get_4bit_type("nf4") (== backends/utils.py::_NF4_QUANT_TABLE).
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_CODE.setflags(write=False)
# Decision thresholds, computed in fp32 as bnb does: (code[:-1] + code[1:]) / 2.
_NF4_BOUNDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)`` bit-for-bit on CPU: fp32 step, each value
    ``start + step*i`` (first half) / ``end - step*(steps-1-i)`` rounded once (fused multiply-add)."""
    s, e = np.float32(start), np.float32(end)
    step = np.float32((e - s) / np.float32(steps - 1))
    half = steps // 2
    out = [float(s) + float(step) * i if i < half else float(e) - float(step) * (steps - 1 - i)
           for i in range(steps)]
    return np.array(out, dtype=np.float64).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map`` (the 8-bit "dynamic tree" code), fp32, sorted."""
    data: list = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bnd = _torch_linspace_f32(0.1, 1, fraction_items)
        means = (bnd[:-1] + bnd[1:]) / np.float32(2)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += list(scale * means)
        if signed:
            data += list(-scale * means)
    if additional_items > 0:
        bnd = _torch_linspace_f32(0.1, 1, additional_items + 1)
        means = (bnd[:-1] + bnd[1:]) / np.float32(2)
        scale = np.float32(10 ** (-(max_exponent_bits - 1) + i))
        data += list(scale * means)
        if signed:
            data += list(-scale * means)
    data += [0.0, 1.0]
    assert len(data) == 2 ** total_bits
    data += [0.0] * (256 - len(data))
    return np.sort(np.array(data, dtype=np.float32))


_DYN = dynamic_map(signed=True)
_DYN.setflags(write=False)
_LUT_SIZE = 65536


def _quantize_lut(code: np.ndarray) -> np.ndarray:
    """bnb ``cpu_ops.cpp::build_quantize_lut``: for each of 65536 bins of [-1, 1], the index of the
    first code whose upper midpoint is >= the bin's value."""
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    val = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)  # count of midpoints < val


_DYN_LUT = _quantize_lut(_DYN)


# --------------------------------------------------------------------------------------------
# The container
# --------------------------------------------------------------------------------------------

def _leaf_nbytes(a) -> int:
    if a is None:
        return 0
    return int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A blockwise-quantised kernel (or a stack of them). Every array field has the stack dims
    leading, so slicing all leaves along axis 0 (as ``lax.scan`` does) gives one layer's array."""

    data: Any                      # uint8 stack + (n_bytes,)
    scale: Any = None              # f32 stack + (n_blocks,) (None when double-quantised)
    qscale: Any = None             # uint8 stack + (n_blocks,) (double quant)
    scale2: Any = None             # f32 stack + (n_blocks2,) (double quant)
    offset: Any = None             # f32 stack + () (double quant)
    zero: Any = None               # f32 stack + (n_blocks,) (int4_asym zero points)
    matrix_shape: tuple = ()
    inputs: int = 1
    dtype: Any = np.dtype(np.float32)
    scheme: str = "nf4"
    block: int = 64
    double_quant: bool = False

    @property
    def stack_shape(self) -> tuple:
        return tuple(self.data.shape[:-1])

    @property
    def shape(self) -> tuple:
        return self.stack_shape + tuple(self.matrix_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def matrix_size(self) -> int:
        return math.prod(self.matrix_shape)

    @property
    def nbytes(self) -> int:
        return sum(_leaf_nbytes(getattr(self, f)) for f in _DATA_FIELDS)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / max(self.size, 1)

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"QuantizedArray({self.scheme}, shape={self.shape}, block={self.block}{dq}, "
                f"dtype={np.dtype(self.dtype).name}, {self.bits_per_param:.3f} bits/param)")


_DATA_FIELDS = ("data", "scale", "qscale", "scale2", "offset", "zero")
_META_FIELDS = ("matrix_shape", "inputs", "dtype", "scheme", "block", "double_quant")
jax.tree_util.register_dataclass(QuantizedArray, data_fields=list(_DATA_FIELDS),
                                 meta_fields=list(_META_FIELDS))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _to_blocks(flat, block: int):
    """(..., n) -> (..., n_blocks, block) zero-padded, plus n_blocks and the trailing remainder."""
    n = flat.shape[-1]
    nb = -(-n // block)
    pad = nb * block - n
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
    return flat.reshape(flat.shape[:-1] + (nb, block)), nb, n % block


def _from_blocks(blocks, n: int):
    flat = blocks.reshape(blocks.shape[:-2] + (-1,))
    return flat[..., :n]


def _pack4(q, pad_code: int):
    """(..., n) codes 0..15 -> (..., ceil(n/2)) uint8, first code in the high nibble."""
    q = q.astype(jnp.uint8)
    if q.shape[-1] % 2:
        q = jnp.concatenate([q, jnp.full(q.shape[:-1] + (1,), pad_code, jnp.uint8)], axis=-1)
    q = q.reshape(q.shape[:-1] + (-1, 2))
    return (q[..., 0] << 4) | q[..., 1]


def _unpack4(data, n: int):
    hi = data >> 4
    lo = data & jnp.uint8(0x0F)
    q = jnp.stack([hi, lo], axis=-1).reshape(data.shape[:-1] + (-1,))
    return q[..., :n]


def _count_above(x, bounds: np.ndarray):
    """Index of the nearest code, ties to the lower: the number of thresholds strictly below x
    (== torch.bucketize(x, bounds, right=False)); a fused loop of compares, no (n, 15) temp."""
    q = jnp.zeros(x.shape, jnp.uint8)
    for b in bounds:
        q = q + (x > np.float32(b)).astype(jnp.uint8)
    return q


def _safe(scale):
    return jnp.where(scale > 0, scale, jnp.float32(1.0))


def _absmax_normalise(blocks, rem: int):
    """bnb's ``absmax`` and ``clamp(x * (1/absmax), -1, 1)`` (the partial block: ``x / absmax``)."""
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    am = jnp.maximum(absmax, jnp.float32(1e-38))
    scaled = blocks * (jnp.float32(1.0) / am)[..., None]
    if rem:
        last = blocks[..., -1, :] / am[..., -1:]
        scaled = jnp.concatenate([scaled[..., :-1, :], last[..., None, :]], axis=-2)
    # An all-zero block: bnb gives 0 * (1/1e-38) = 0 (guards against a flushed-to-zero 1e-38).
    scaled = jnp.where((absmax > 0)[..., None], scaled, jnp.float32(0.0))
    return absmax, jnp.clip(scaled, -1.0, 1.0)


def _accurate_sum(x):
    """Sum over the last axis by a fixed pairwise tree with two-sum error terms: deterministic
    (the same bits whatever the leading/stack shape, unlike an XLA reduce) and nearly always the
    correctly rounded fp32 sum."""
    n = x.shape[-1]
    m = 1 << max(n - 1, 0).bit_length()
    if m != n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, m - n)])
    hi, lo = x, jnp.zeros_like(x)
    while hi.shape[-1] > 1:
        h = hi.shape[-1] // 2
        a, b = hi[..., :h], hi[..., h:]
        s = a + b
        bb = s - a
        err = (a - (s - bb)) + (b - bb)
        lo = lo[..., :h] + lo[..., h:] + err
        hi = s
    return (hi + lo)[..., 0]


def _quantize_stats(stats):
    """Double quantisation of per-block stats (..., n_blocks) f32 -> (qscale, scale2, offset)."""
    offset = _accurate_sum(stats) / jnp.float32(stats.shape[-1])
    c = stats - offset[..., None]
    n = c.shape[-1]
    blocks, _, _ = _to_blocks(c, _DQ_BLOCK)
    absmax2 = jnp.max(jnp.abs(blocks), axis=-1)
    inv = jnp.float32(1.0) / _safe(absmax2)
    v = jnp.clip(blocks * inv[..., None], -1.0, 1.0)
    t = (v + jnp.float32(1.0)) * jnp.float32(0.5) * jnp.float32(_LUT_SIZE - 1)
    idx = jnp.clip(jnp.floor(t + jnp.float32(0.5)), 0, _LUT_SIZE - 1).astype(jnp.int32)
    codes = jnp.take(jnp.asarray(_DYN_LUT), idx, axis=0)
    codes = jnp.where((absmax2 > 0)[..., None], codes, jnp.uint8(0))  # bnb: zero block -> code 0
    return _from_blocks(codes, n), absmax2, offset


def _dequantize_stats(qscale, scale2, offset, n: int):
    blocks, _, _ = _to_blocks(qscale, _DQ_BLOCK)
    vals = jnp.take(jnp.asarray(_DYN), blocks.astype(jnp.int32), axis=0) * scale2[..., None]
    # NB bnb rounds this product before adding the offset; XLA:CPU may contract the two into one
    # fused multiply-add, so a dequantised absmax can differ from bnb's in the last bit.
    return _from_blocks(vals, n) + offset[..., None]


# --------------------------------------------------------------------------------------------
# quantize / dequantize
# --------------------------------------------------------------------------------------------

def quantize(x, scheme: str = "nf4", block: int = 64, double_quant: bool = False, stack: int = 0,
             inputs: int = 1, dtype=None) -> QuantizedArray:
    """Quantises a Flax kernel ``x`` (``stack + input dims + output dims``) blockwise along its input
    dimension (bitsandbytes' ``(out, in)`` row-major order); ``stack`` leading axes index separate
    matrices, the next ``inputs`` axes are input axes. ``dtype`` (default ``x.dtype``) is what
    :func:`dequantize` returns. Jittable with ``scheme``, ``block``, ``double_quant``, ``stack``,
    ``inputs`` and ``dtype`` static (eager calls run one compiled program per configuration)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    block = int(block)
    if double_quant and scheme not in _DQ_SCHEMES:
        raise ValueError(f"double_quant applies to {_DQ_SCHEMES} only, not {scheme!r}")
    x = jnp.asarray(x)
    stack, inputs = int(stack), int(inputs)
    mshape = tuple(x.shape[stack:])
    if stack < 0 or not mshape:
        raise ValueError(f"stack={stack} leaves no matrix dims in shape {x.shape}")
    if not 0 < inputs < len(mshape):
        raise ValueError(f"inputs={inputs} must split matrix shape {mshape} into input and output dims")
    out_dtype = np.dtype(x.dtype if dtype is None else dtype)
    return _quantize_jit(x, scheme, block, bool(double_quant), stack, inputs, out_dtype)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _quantize_jit(x, scheme, block, double_quant, stack, inputs, out_dtype) -> QuantizedArray:
    mshape = tuple(x.shape[stack:])
    sshape = tuple(x.shape[:stack])
    n_in, n_out = math.prod(mshape[:inputs]), math.prod(mshape[inputs:])
    n = n_in * n_out

    w = x.astype(jnp.float32).reshape(sshape + (n_in, n_out))
    flat = jnp.swapaxes(w, -1, -2).reshape(sshape + (n,))  # torch (out, in), row-major
    blocks, nb, rem = _to_blocks(flat, block)

    scale = zero = None
    if scheme == "nf4":
        scale, scaled = _absmax_normalise(blocks, rem)
        q = _count_above(scaled, _NF4_BOUNDS)
        # bnb pads an odd tail with a normalised 0 (code 7)
        data = _pack4(_from_blocks(q, n), pad_code=7)
    elif scheme == "int4":
        scale = jnp.max(jnp.abs(blocks), axis=-1) / jnp.float32(7.5)
        q = jnp.clip(jnp.round(blocks / _safe(scale)[..., None]), -8, 7)
        data = _pack4(_from_blocks((q + 8).astype(jnp.uint8), n), pad_code=8)
    elif scheme == "int4_asym":
        if rem:  # padding zeros must not widen a partial block's range: replicate its first value
            valid = (jnp.arange(block) < rem)
            last = jnp.where(valid, blocks[..., -1, :], blocks[..., -1, :1])
            blocks = jnp.concatenate([blocks[..., :-1, :], last[..., None, :]], axis=-2)
        lo = jnp.minimum(jnp.min(blocks, axis=-1), 0.0)
        hi = jnp.maximum(jnp.max(blocks, axis=-1), 0.0)
        scale = (hi - lo) / jnp.float32(15.0)
        zero = jnp.round(jnp.float32(-8.0) - lo / _safe(scale))
        q = jnp.clip(jnp.round(blocks / _safe(scale)[..., None] + zero[..., None]), -8, 7)
        data = _pack4(_from_blocks((q + 8).astype(jnp.uint8), n), pad_code=8)
    else:  # int8
        scale = jnp.max(jnp.abs(blocks), axis=-1) / jnp.float32(127.5)
        q = jnp.clip(jnp.round(blocks / _safe(scale)[..., None]), -128, 127)
        data = _from_blocks((q + 128).astype(jnp.uint8), n)

    qscale = scale2 = offset = None
    if double_quant:
        qscale, scale2, offset = _quantize_stats(scale)
        scale = None
    return QuantizedArray(data=data, scale=scale, qscale=qscale, scale2=scale2, offset=offset,
                          zero=zero, matrix_shape=mshape, inputs=inputs, dtype=out_dtype,
                          scheme=scheme, block=block, double_quant=bool(double_quant))


def block_scales(q: QuantizedArray):
    """The per-block fp32 scales (absmax for nf4), double quantisation undone."""
    n = q.matrix_size
    nb = -(-n // q.block)
    if q.double_quant:
        return _dequantize_stats(q.qscale, q.scale2, q.offset, nb)
    return q.scale


def dequantize(q: QuantizedArray, dtype=None):
    """The Flax-layout array ``q.shape`` (``dtype`` default ``q.dtype``), computed in fp32. Works on a
    per-layer slice of a stacked QuantizedArray; jittable."""
    return _dequantize_jit(q, np.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_jit(q: QuantizedArray, out_dtype):
    mshape = tuple(q.matrix_shape)
    sshape = q.stack_shape
    n_in, n_out = math.prod(mshape[:q.inputs]), math.prod(mshape[q.inputs:])
    n = n_in * n_out
    scale = block_scales(q).astype(jnp.float32)
    if q.scheme == "int8":
        codes = q.data.astype(jnp.float32) - jnp.float32(128.0)
    else:
        c = _unpack4(q.data, n)
        if q.scheme == "nf4":
            codes = jnp.take(jnp.asarray(NF4_CODE), c.astype(jnp.int32), axis=0)
        else:
            codes = c.astype(jnp.float32) - jnp.float32(8.0)
    blocks, _, _ = _to_blocks(codes, q.block)
    if q.scheme == "int4_asym":
        blocks = blocks - q.zero[..., None].astype(jnp.float32)
    flat = _from_blocks(blocks * scale[..., None], n)
    w = jnp.swapaxes(flat.reshape(sshape + (n_out, n_in)), -1, -2)
    return w.reshape(sshape + mshape).astype(out_dtype)


def requantize_like(x, q: QuantizedArray) -> QuantizedArray:
    """Quantises ``x`` (shape ``q.shape``, Flax layout) with ``q``'s scheme, block, double_quant,
    stack/inputs split and dequantised dtype."""
    if tuple(x.shape) != q.shape:
        raise ValueError(f"requantize_like: shape {tuple(x.shape)} != quantised shape {q.shape}")
    return quantize(x, scheme=q.scheme, block=q.block, double_quant=q.double_quant,
                    stack=len(q.stack_shape), inputs=q.inputs, dtype=q.dtype)
