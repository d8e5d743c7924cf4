"""jlora.quant: NF4 (bitsandbytes-exact), double quantisation, int4/int8, stacking, jit."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.quant import (NF4_CODE, SCHEMES, QuantizedArray, dequantize, dynamic_map, quantize,
                         requantize_like)

# methods-spec §2.1 (bitsandbytes get_4bit_type("nf4")), index 0..15
SPEC_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
# bnb tests/test_functional.py::test_4bit_quant, nf4 (mean, std) of err / rel_err over 200 draws
BNB_NF4_STATS = {32: (0.067746, 0.189726), 64: (0.072798, 0.203339), 128: (0.076831, 0.215237),
                 256: (0.080337, 0.226105)}


@pytest.fixture(scope="module")
def big():
    """bnb's test matrix, numpy-seeded: randn(1024, 1024) as a torch (out, in) weight."""
    return np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)


def bnb_errors(w, deq):
    """bnb test_4bit_quant: err = mean|A1 - A2|, relerr = mean(|A1 - A2| / (|A1| + 1e-8))."""
    err = np.abs(w - deq)
    return float(err.mean()), float((err / (np.abs(w) + 1e-8)).mean())


def roundtrip(w, **kw):
    """Quantise the torch-layout weight ``w`` (out, in) as its Flax kernel w.T; back to (out, in)."""
    q = quantize(w.T, **kw)
    return q, np.asarray(dequantize(q)).T


def nf4_reference(flat, block):
    """Straight numpy NF4 of a flat fp32 vector (bnb semantics): codes and absmax."""
    n = flat.size
    nb = -(-n // block)
    codes, absmax = np.zeros(n, np.uint8), np.zeros(nb, np.float32)
    bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
    for b in range(nb):
        x = flat[b * block:(b + 1) * block]
        am = np.abs(x).max()
        absmax[b] = am
        full = x.size == block
        s = x * (np.float32(1) / max(am, np.float32(1e-38))) if full else x / max(am, np.float32(1e-38))
        s = np.clip(s.astype(np.float32), -1, 1)
        codes[b * block:b * block + x.size] = np.searchsorted(bounds, s, side="left")
    return codes, absmax


def unpack(data, n):
    data = np.asarray(data)
    return np.stack([data >> 4, data & 15], -1).reshape(data.shape[:-1] + (-1,))[..., :n]


# --------------------------------------------------------------------------------------------
# code books
# --------------------------------------------------------------------------------------------

def test_nf4_code_book_is_the_spec_table():
    assert NF4_CODE.dtype == np.float32 and NF4_CODE.shape == (16,)
    np.testing.assert_array_equal(NF4_CODE, np.array(SPEC_NF4, np.float32))
    assert NF4_CODE[7] == 0.0 and NF4_CODE[0] == -1.0 and NF4_CODE[15] == 1.0


def test_nf4_from_normal_map_construction():
    """bnb create_normal_map(offset=0.9677083, use_extra_value=True) with the stdlib inverse normal."""
    inv = statistics.NormalDist().inv_cdf
    offset = 0.9677083

    def lin(a, b, k):
        return [a + (b - a) * i / (k - 1) for i in range(k)]

    pos = [inv(p) for p in lin(offset, 0.5, 9)[:-1]]
    neg = [-inv(p) for p in lin(offset, 0.5, 8)[:-1]]
    v = sorted(pos + [0.0] + neg)
    v = np.array(v) / max(v)
    assert np.abs(v - NF4_CODE.astype(np.float64)).max() < 1e-6


def test_dynamic_map_shape():
    d = dynamic_map(signed=True)
    assert d.shape == (256,) and d.dtype == np.float32
    assert np.all(np.diff(d) >= 0) and d[-1] == 1.0 and 0.0 in d
    assert -1.0 < d[0] < -0.99 and (d < 0).sum() == 127
    u = dynamic_map(signed=False)
    assert u.shape == (256,) and u.min() == 0.0 and u[-1] == 1.0


# --------------------------------------------------------------------------------------------
# numerics (bnb's test_4bit_quant / test_4bit_compressed_stats)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_nf4_error_matches_bnb(big, block):
    q, deq = roundtrip(big, block=block)
    err, rel = bnb_errors(big, deq)
    e0, r0 = BNB_NF4_STATS[block]
    tol_e, tol_r = (0.0005, 0.002) if block == 64 else (0.0007, 0.003)
    assert abs(err - e0) < tol_e and abs(rel - r0) < tol_r, (block, err, rel)
    assert q.bits_per_param == pytest.approx(4 + 32 / block)


def test_double_quant_error_and_storage(big):
    q1, d1 = roundtrip(big, block=64)
    q2, d2 = roundtrip(big, block=64, double_quant=True)
    e1, r1 = bnb_errors(big, d1)
    e2, r2 = bnb_errors(big, d2)
    assert e2 < 0.11 and r2 < 0.28
    assert abs(e2 - e1) < 1e-3 and abs(r2 - r1) < 2e-3
    assert q2.scale is None and q2.qscale.dtype == jnp.uint8 and q2.scale2.shape == (64,)
    assert q2.offset.shape == () and q2.offset.dtype == jnp.float32
    assert q2.bits_per_param <= 4.13 and q1.bits_per_param <= 4.51
    # every array field counted: data 4 b/param, 8-bit codes per block, fp32 per 256 blocks, offset
    assert q2.nbytes == 1024 * 1024 // 2 + 16384 + 64 * 4 + 4
    assert q1.nbytes == 1024 * 1024 // 2 + 16384 * 4


def test_int_schemes_errors(big):
    errs = {}
    for s in ("int4", "int4_asym", "int8"):
        q, deq = roundtrip(big, scheme=s, block=64)
        errs[s] = bnb_errors(big, deq)[0]
        assert q.data.dtype == jnp.uint8
    assert 0.06 < errs["int4"] < 0.1 and 0.06 < errs["int4_asym"] < 0.1
    assert errs["int8"] < 0.1 * errs["int4"]
    q, _ = roundtrip(big, scheme="int4", block=64, double_quant=True)
    e = bnb_errors(big, np.asarray(dequantize(q)).T)[0]
    assert abs(e - errs["int4"]) < 2e-3
    assert quantize(big.T, scheme="int8").bits_per_param == pytest.approx(8.5)
    assert quantize(big.T, scheme="int4_asym").bits_per_param == pytest.approx(5.0)


def test_int_schemes_exact_on_grid():
    """Rounding bounds (int8), exact grids (asymmetric int4) and clipping (symmetric int4)."""
    k8 = np.arange(-127, 128, dtype=np.float32)[:, None] * np.float32(0.5)  # one block, absmax 63.5
    q = quantize(k8, scheme="int8", block=255)
    # scale = 63.5/127.5: the grid is not hit, but every error is within half a step (the absmax
    # element lands on -128 * scale: round(-127.5) is -128, half to even)
    scale = float(np.asarray(q.scale)[0])
    assert np.abs(np.asarray(dequantize(q)) - k8).max() <= scale / 2 * (1 + 1e-4)
    assert int(np.asarray(q.data)[0]) == 0 and int(np.asarray(q.data)[-1]) == 255
    g = np.array([-8, -3, 0, 5, 7, -1, 2, 4], np.float32)[:, None]
    qa = quantize(g, scheme="int4_asym", block=8)
    assert float(np.asarray(qa.scale)[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(dequantize(qa)), g)
    qs = quantize(np.float32(7.5 / 7.5 * 1.0) * np.array([[7.5], [-7.5], [1.0], [0.0]], np.float32),
                  scheme="int4", block=4)
    np.testing.assert_allclose(np.asarray(dequantize(qs))[:, 0], [7, -8, 1, 0])  # clip to [-8, 7]


def test_int4_asym_shifted_block():
    x = np.linspace(0.5, 2.0, 64, dtype=np.float32)[:, None]  # all positive: min clipped to 0
    q = quantize(x, scheme="int4_asym", block=64)
    assert float(np.asarray(q.zero)[0]) == -8.0
    assert np.abs(np.asarray(dequantize(q)) - x).max() <= 2.0 / 15 / 2 + 1e-6


# --------------------------------------------------------------------------------------------
# exact semantics
# --------------------------------------------------------------------------------------------

def test_ties_go_to_the_lower_code():
    bounds = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
    above = np.nextafter(bounds, np.float32(2))
    x = np.concatenate([[1.0], bounds, above]).astype(np.float32)  # absmax 1: x/absmax == x
    q = quantize(x[:, None], block=x.size)
    codes = unpack(q.data, x.size)
    np.testing.assert_array_equal(codes[1:16], np.arange(15))       # on a midpoint: lower code
    np.testing.assert_array_equal(codes[16:], np.arange(1, 16))     # one ulp above: upper code
    assert codes[0] == 15


def test_nibble_order_and_torch_layout():
    k = np.array([[-1.0], [1.0], [0.0], [0.5]], np.float32)  # Flax (in=4, out=1)
    q = quantize(k, block=4)
    np.testing.assert_array_equal(np.asarray(q.data), [0x0F, 0x7C])  # first code in the high nibble
    # Flax (in, out) -> torch (out, in): blocks run along the input dim
    k2 = np.array([[1.0, 0.0], [-1.0, 0.5]], np.float32)  # torch W = [[1, -1], [0, .5]]
    q2 = quantize(k2, block=2)
    np.testing.assert_array_equal(unpack(q2.data, 4), [15, 0, 7, 15])
    np.testing.assert_array_equal(np.asarray(q2.scale), [1.0, 0.5])


@pytest.mark.parametrize("shape,block", [((37, 7), 64), ((64, 3), 64), ((100, 5), 32), ((9, 9), 16)])
def test_partial_trailing_block_matches_reference(shape, block):
    rng = np.random.default_rng(1)
    k = rng.standard_normal(shape).astype(np.float32)
    k[-1, -1] = 50.0  # last element of the torch (out, in) order: the tail block's absmax
    q = quantize(k, block=block)
    flat = np.ascontiguousarray(k.T).reshape(-1)
    codes, absmax = nf4_reference(flat, block)
    n = flat.size
    assert q.data.shape == (-(-n // 2),) and q.scale.shape == (-(-n // block),)
    np.testing.assert_array_equal(unpack(q.data, n), codes)
    np.testing.assert_array_equal(np.asarray(q.scale), absmax)
    assert float(np.asarray(q.scale)[-1]) == 50.0
    if n % 2:
        assert (int(np.asarray(q.data)[-1]) & 15) == 7  # odd tail padded with code of 0 (as bnb)
    deq = np.asarray(dequantize(q))
    np.testing.assert_array_equal(deq, (NF4_CODE[codes] * np.repeat(absmax, block)[:n]).reshape(k.T.shape).T)


def test_zero_block_and_dtype():
    k = np.zeros((128, 2), np.float32)
    k[:, 1] = 1.0
    q = quantize(k, block=64)
    np.testing.assert_array_equal(np.asarray(q.scale), [0, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(dequantize(q)), k)
    qb = quantize(jnp.asarray(k, jnp.bfloat16), block=64)
    assert qb.dtype == np.dtype(jnp.bfloat16) and dequantize(qb).dtype == jnp.bfloat16
    assert dequantize(qb, jnp.float32).dtype == jnp.float32
    assert quantize(k, dtype=jnp.bfloat16).dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------------
# stacks, multi-axis kernels, pytree, jit
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,dq", [("nf4", False), ("nf4", True), ("int4", True), ("int4_asym", False),
                                       ("int8", False)])
def test_stacked_equals_per_layer_and_slices(scheme, dq):
    x = np.random.default_rng(2).standard_normal((3, 64, 32)).astype(np.float32)
    q = quantize(x, scheme=scheme, block=64, double_quant=dq, stack=1)
    assert q.stack_shape == (3,) and q.shape == (3, 64, 32) and q.matrix_shape == (64, 32)
    deq = np.asarray(dequantize(q))
    for i in range(3):
        qi = quantize(x[i], scheme=scheme, block=64, double_quant=dq)
        sl = jax.tree_util.tree_map(lambda leaf: leaf[i], q)
        assert isinstance(sl, QuantizedArray) and sl.shape == (64, 32) and sl.stack_shape == ()
        for a, b in zip(jax.tree_util.tree_leaves(sl), jax.tree_util.tree_leaves(qi)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(dequantize(sl)), np.asarray(dequantize(qi)))
        np.testing.assert_array_equal(deq[i], np.asarray(dequantize(qi)))
    # lax.scan slices the leaves the same way
    _, ys = jax.lax.scan(lambda c, ql: (c, dequantize(ql)), 0, q)
    np.testing.assert_array_equal(np.asarray(ys), deq)


def test_deep_stack():
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 8)).astype(np.float32)
    q = quantize(x, stack=2, block=32, double_quant=True)
    assert q.stack_shape == (2, 3) and q.offset.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(dequantize(q))[1, 2],
                                  np.asarray(dequantize(quantize(x[1, 2], block=32, double_quant=True))))


@pytest.mark.parametrize("shape,inputs", [((64, 4, 8), 1), ((4, 8, 64), 2)])
def test_multi_axis_kernels(shape, inputs):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    q = quantize(x, inputs=inputs, block=64)
    assert q.shape == shape and q.inputs == inputs and q.ndim == 3 and q.size == x.size
    deq = np.asarray(dequantize(q))
    assert deq.shape == shape
    n_in = int(np.prod(shape[:inputs]))
    q2 = quantize(x.reshape(n_in, -1), block=64)  # same as the 2-D (n_in, n_out) kernel
    np.testing.assert_array_equal(np.asarray(q.data), np.asarray(q2.data))
    np.testing.assert_array_equal(deq.reshape(n_in, -1), np.asarray(dequantize(q2)))
    assert np.abs(deq - x).mean() < 0.1


def test_pytree_structure():
    q = quantize(np.ones((64, 4), np.float32), double_quant=True)
    leaves = jax.tree_util.tree_leaves(q)
    assert len(leaves) == 4  # data, qscale, scale2, offset (scale/zero are None)
    q2 = jax.tree_util.tree_map(lambda a: a, q)
    assert q2.scheme == q.scheme and q2.matrix_shape == q.matrix_shape and q2.dtype == q.dtype
    assert "nf4" in repr(q)
    assert set(SCHEMES) == {"nf4", "int4", "int4_asym", "int8"}


def test_jit():
    x = np.random.default_rng(5).standard_normal((2, 96, 40)).astype(np.float32)
    jq = jax.jit(quantize, static_argnames=("scheme", "block", "double_quant", "stack", "inputs", "dtype"))
    for scheme, dq in (("nf4", True), ("int4_asym", False)):
        a = jq(x, scheme=scheme, block=64, double_quant=dq, stack=1)
        b = quantize(x, scheme=scheme, block=64, double_quant=dq, stack=1)
        for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
        np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(a)), np.asarray(dequantize(b)))
    # a QuantizedArray passes through jit boundaries as a pytree argument
    out = jax.jit(lambda q, v: v @ dequantize(q)[0])(a, jnp.ones((96,)))
    assert out.shape == (40,)


@pytest.mark.parametrize("dq", [False, True])
def test_requantize_like_is_idempotent_for_nf4(dq):
    x = np.random.default_rng(6).standard_normal((2, 128, 48)).astype(np.float32)
    q = quantize(x, block=64, double_quant=dq, stack=1, dtype=jnp.bfloat16)
    r = requantize_like(dequantize(q, jnp.float32), q)
    assert (r.scheme, r.block, r.double_quant, r.stack_shape, r.inputs, r.dtype) == \
           (q.scheme, q.block, q.double_quant, q.stack_shape, q.inputs, q.dtype)
    np.testing.assert_array_equal(np.asarray(r.data), np.asarray(q.data))
    if not dq:
        np.testing.assert_array_equal(np.asarray(r.scale), np.asarray(q.scale))
    with pytest.raises(ValueError):
        requantize_like(x[0], q)


def test_validation():
    x = np.ones((8, 8), np.float32)
    with pytest.raises(ValueError):
        quantize(x, scheme="fp4")
    with pytest.raises(ValueError):
        quantize(x, scheme="int8", double_quant=True)
    with pytest.raises(ValueError):
        quantize(x, inputs=2)
    with pytest.raises(ValueError):
        quantize(x, block=0)


# --------------------------------------------------------------------------------------------
# bitsandbytes parity (CPU)
# --------------------------------------------------------------------------------------------

def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    import torch

    return bnb.functional, torch


@pytest.fixture(autouse=True)
def _no_torch_compile(request):
    """bnb's CPU dequantize_4bit falls back to a torch.compile'd kernel for odd shapes (~10 s to
    compile per shape); eager gives the same numbers."""
    if not request.node.name.startswith("test_bnb_"):
        yield
        return
    pytest.importorskip("bitsandbytes")
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def test_bnb_dynamic_map():
    F, _ = _bnb()
    np.testing.assert_array_equal(dynamic_map(True), F.create_dynamic_map(signed=True).numpy())
    np.testing.assert_array_equal(dynamic_map(False), F.create_dynamic_map(signed=False).numpy())


def _weight(torch, grid):
    torch.manual_seed(0)
    w = torch.randn(128, 256)
    if grid:  # multiples of 2^-8: every fp32 sum of the absmaxes is exact, in any order
        w = torch.round(w * 256) / 256
    return w


@pytest.mark.parametrize("grid", [True, False], ids=["grid", "randn"])
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double_quant"])
def test_bnb_quantize_4bit_parity(grid, dq):
    F, torch = _bnb()
    w = _weight(torch, grid)
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
    q = quantize(w.numpy().T, block=64, double_quant=dq)
    np.testing.assert_array_equal(packed.numpy().reshape(-1), np.asarray(q.data))
    ref = F.dequantize_4bit(packed, st).numpy()
    ours = np.asarray(dequantize(q)).T
    if not dq:
        np.testing.assert_array_equal(st.absmax.numpy(), np.asarray(q.scale))
        np.testing.assert_array_equal(ours, ref)
        return
    off_ref, off = np.float32(st.offset.item()), np.float32(np.asarray(q.offset))
    if grid:
        assert off == off_ref
        np.testing.assert_array_equal(st.absmax.numpy(), np.asarray(q.qscale))
        np.testing.assert_array_equal(st.state2.absmax.numpy(), np.asarray(q.scale2))
        # code * scale2 + offset: XLA may fuse it into one FMA where bnb rounds twice (last bit)
        np.testing.assert_allclose(ours, ref, rtol=2.5e-7, atol=0)
    else:
        # torch's fp32 mean sums in another order: the offset may differ in the last ulp
        assert abs(off - off_ref) <= 2 * np.spacing(off_ref)
        assert (st.absmax.numpy() == np.asarray(q.qscale)).mean() > 0.99
        np.testing.assert_allclose(np.asarray(q.scale2), st.state2.absmax.numpy(), rtol=1e-6)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,block", [((7, 37), 32), ((33, 65), 64), ((5, 300), 128), ((3, 171), 256)])
def test_bnb_parity_odd_shapes(shape, block):
    F, torch = _bnb()
    torch.manual_seed(1)
    w = torch.randn(*shape) * 3
    packed, st = F.quantize_4bit(w, blocksize=block, quant_type="nf4")
    q = quantize(w.numpy().T, block=block)
    np.testing.assert_array_equal(packed.numpy().reshape(-1), np.asarray(q.data))
    np.testing.assert_array_equal(st.absmax.numpy(), np.asarray(q.scale))
    np.testing.assert_array_equal(np.asarray(dequantize(q)).T, F.dequantize_4bit(packed, st).numpy())


def test_bnb_double_quant_degenerate_stats():
    """Every block has the same absmax: absmax - offset == 0, bnb's zero 256-block (codes 0)."""
    F, torch = _bnb()
    w = torch.where(torch.randn(64, 256) > 0, 1.0, -1.0)
    packed, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize(w.numpy().T, block=64, double_quant=True)
    np.testing.assert_array_equal(st.absmax.numpy(), np.asarray(q.qscale))
    np.testing.assert_array_equal(st.state2.absmax.numpy(), np.asarray(q.scale2))
    assert float(np.asarray(q.offset)) == st.offset.item() == 1.0
    np.testing.assert_array_equal(np.asarray(dequantize(q)).T, F.dequantize_4bit(packed, st).numpy())
