"""The compiled half of the numba CPU backend (:mod:`.cpu`): fused, tiled kernels and the
per-element code they inline.

Work is cut into tiles of ``TILE`` elements aligned on the global element index, so that a tile
holds whole Philox blocks of every stream (Gaussian: 256, Rademacher: 8, rounding bits: 128):
the inner loops have no edge cases and LLVM vectorizes them. A tile at either end of a range is
generated whole and only its overlap used. Threads take chunks of ``CHUNK_TILES`` tiles one at a
time (the two vCPUs of the development machine differ by up to 25%, and a core shared with another
process slows one thread only).

Gaussians: branch-free float32 polynomials (Cephes' logf, sinf, cosf) that vectorize 8 wide,
within about a tenth of ``GAUSSIAN_RTOL`` of the reference (which uses torch's log/sin/cos).

numpy has no bfloat16: bfloat16 tensors travel as uint16 bit views and float16 ones as int16
bit views, and the array type picks the conversion (:func:`_load`, :func:`_encode`).

Everything numba compiles lives in this one file: numba's on-disk cache (``cache=True``) is
invalidated by changes to the file of the cached function only, not to the files it calls into.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from zotune.core.rng import PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

TILE = 1024
CHUNK_TILES = 64
# the kernels take the distribution as an integer they branch on: one compiled kernel serves all three
CODES = {"gaussian": 0, "rademacher": 1, "rademacher-v1": 2}

_F, _U = np.float32, np.uint32
_M0, _M1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
_W0, _W1 = _U(PHILOX_W0), _U(PHILOX_W1)
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8 = (_F(c) for c in (
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
    2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)
_S0, _S1, _S2 = _F(-1.9515295891e-4), _F(8.3321608736e-3), _F(-1.6666654611e-1)
_C0, _C1, _C2 = _F(2.443315711809948e-5), _F(-1.388731625493765e-3), _F(4.166664568298827e-2)
_TWO_PI, _TWO_OVER_PI = _F(2.0 * math.pi), _F(2.0 / math.pi)
# pi/2 = _P1 + _P2 + _P3; k * _P1 and k * _P2 (k <= 4) are exact and so is theta - k * _P1
# (Sterbenz): the reduced angle keeps float32 accuracy.
_P1, _P2, _P3 = _F(1.5703125), _F(4.837512969970703125e-4), _F(7.54978995489188216e-8)


@intrinsic
def _bits(typingctx, x):
    return types.int32(types.float32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@intrinsic
def _float(typingctx, x):
    return types.float32(types.int32), lambda context, builder, sig, args: builder.bitcast(args[0], ir.FloatType())


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once, in a's type: torch's vectorized ``add(x, y, alpha=a)`` is an fmadd."""
    def codegen(context, builder, sig, args):
        ty = context.get_value_type(sig.return_type)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty] * 3),
                                            "llvm.fma.f64" if sig.return_type == types.float64 else "llvm.fma.f32")
        return builder.call(fn, [context.cast(builder, v, t, sig.return_type) for v, t in zip(args, sig.args)])
    return a(a, b, c), codegen


@njit(inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    for _ in range(10):
        p0 = np.uint64(c0) * _M0
        p2 = np.uint64(c2) * _M1
        c0, c1, c2, c3 = _U(_U(p2 >> 32) ^ c1 ^ k0), _U(p2), _U(_U(p0 >> 32) ^ c3 ^ k1), _U(p0)
        k0, k1 = _U(k0 + _W0), _U(k1 + _W1)
    return c0, c1, c2, c3


@njit(inline="always")
def _counter(block, stream):
    seed_lo, seed_hi, key_lo, key_hi = stream
    return _U(block & 0xFFFFFFFF), _U(block >> 32), _U(key_lo), _U(key_hi), _U(seed_lo), _U(seed_hi)


@njit
def _words(out, n_blocks, block, stream):
    """Words of blocks ``block ...`` in stream order; the blocks never carry into the high counter word."""
    lo, hi, k0, k1, s0, s1 = _counter(block, stream)
    for b in range(n_blocks):
        out[4 * b], out[4 * b + 1], out[4 * b + 2], out[4 * b + 3] = _philox(_U(lo + b), hi, k0, k1, s0, s1)


@njit
def _word_columns(out, n_blocks, block, stream):
    """Word j of block b at ``out[j * n_blocks + b]``: contiguous stores, a quarter less time than :func:`_words`."""
    lo, hi, k0, k1, s0, s1 = _counter(block, stream)
    for b in range(n_blocks):
        x0, x1, x2, x3 = _philox(_U(lo + b), hi, k0, k1, s0, s1)
        out[b], out[n_blocks + b], out[2 * n_blocks + b], out[3 * n_blocks + b] = x0, x1, x2, x3


@njit(inline="always")
def _uniform(word):
    return (_F(np.int32(word >> _U(9))) + _F(0.5)) * _F(2.0**-23)


@njit(inline="always", fastmath={"contract"})
def _log(u):
    # u = 2**k * (1 + x) with 1 + x in [sqrt(1/2), sqrt(2)), taken from the bits
    ix = _bits(u)
    t = ix - np.int32(0x3F3504F3)
    k = _F(t >> np.int32(23))
    x = _float(np.int32(ix - (t & np.int32(-8388608)))) - _F(1.0)
    z = x * x
    y = ((((((((_L0 * x + _L1) * x + _L2) * x + _L3) * x + _L4) * x + _L5) * x + _L6) * x + _L7) * x + _L8) * x * z
    return (x + (y + k * _LN2_LO - _F(0.5) * z)) + k * _LN2_HI


@njit(inline="always", fastmath={"contract"})
def _pair(word0, word1):
    r = np.sqrt(_F(-2.0) * _log(_uniform(word0)))
    theta = _TWO_PI * _uniform(word1)  # the reference's float32 angle
    k = np.int32(theta * _TWO_OVER_PI + _F(0.5))
    fk = _F(k)
    x = ((theta - fk * _P1) - fk * _P2) - fk * _P3
    z = x * x
    s = ((_S0 * z + _S1) * z + _S2) * z * x + x
    c = ((_C0 * z + _C1) * z + _C2) * z * z - _F(0.5) * z + _F(1.0)
    cos, sin = (-s, c) if k & 1 else (c, s)
    sign = _F(-1.0) if k & 2 else _F(1.0)
    return r * (sign * cos), r * (sign * sin)


@njit(fastmath={"contract"})
def _box_muller(columns, out):
    q = out.shape[0] // 4
    for b in range(q):
        out[4 * b], out[4 * b + 1] = _pair(columns[b], columns[q + b])
        out[4 * b + 2], out[4 * b + 3] = _pair(columns[2 * q + b], columns[3 * q + b])


@njit
def _tile(out, work, first, stream, code):
    """The TILE values of a distribution from element ``first`` (a multiple of TILE) on."""
    words = work[1]
    if code == 1:
        _words(words, TILE // 128, first >> 7, stream)
        for q in range(TILE // 32):
            for j in range(32):
                out[32 * q + j] = _F(1.0) - _F(2.0) * _F(np.int32((words[q] >> _U(j)) & _U(1)))
    elif code == 2:
        _words(words, TILE // 4, first >> 2, stream)
        for i in range(TILE):
            out[i] = _F(1.0) - _F(2.0) * _F(np.int32(words[i] >> _U(31)))
    else:
        _word_columns(words, TILE // 4, first >> 2, stream)
        _box_muller(words, out)


# Bit code: numba widens integer operations to 64 bits; cutting each result back to uint32 (_U)
# lets LLVM vectorize on 8 lanes instead of 4. Selects, not early returns, for the same reason.
@njit(inline="always")
def _f16_to_f32(h):
    """Exact, as F16C: exponent and mantissa move up 13 bits and the exponent is rebiased; subnormals
    are their integer times 2**-24 (no float32 subnormal arises); infinities and NaNs (made quiet) apart."""
    x = _U(_U(_U(h) & _U(0x7FFF)) << _U(13))
    bits = _U(x + _U((127 - 15) << 23))
    if x < _U(0x00800000):
        bits = _U(_bits(_F(np.int32(_U(_U(h) & _U(0x3FF)))) * _F(2.0**-24)))
    if x >= _U(0x0F800000):
        bits = _U(_U(x | _U(0x7F800000)) | (_U(0x400000) if x > _U(0x0F800000) else _U(0)))
    return _float(np.int32(_U(bits | _U(_U(_U(h) & _U(0x8000)) << _U(16)))))


@njit(inline="always")
def _to_bf16(v, nan):
    """Round to nearest even, as torch: add 0x7FFF plus the lowest kept bit, truncate."""
    u = _U(_bits(v))
    rounded = np.uint16(_U(_U(u + _U(0x7FFF)) + _U(_U(u >> _U(16)) & _U(1))) >> _U(16))
    return nan if _U(u & _U(0x7FFFFFFF)) > _U(0x7F800000) else rounded


@njit(inline="always")
def _to_f16(v):
    """Round to nearest even, as F16C."""
    u = _U(_bits(v))
    a = _U(u & _U(0x7FFFFFFF))
    h = _U(_U(_U(_U(a + _U(0xFFF)) + _U(_U(a >> _U(13)) & _U(1))) >> _U(13)) - _U((127 - 15) << 10))
    if a < _U(0x38800000):  # subnormal: the float add rounds |v| to a multiple of 2**-24, 0.5's spacing
        h = _U(_U(_bits(_float(np.int32(a)) + _F(0.5))) - _U(0x3F000000))
    if a >= _U(0x477FF000):  # from half way between 65504 and 65536 (a tie, to even: up)
        h = _U(0x7C00)
    if a > _U(0x7F800000):
        h = _U(_U(0x7E00) | _U(_U(a >> _U(13)) & _U(0x3FF)))
    return np.uint16(_U(h | _U(_U(u >> _U(16)) & _U(0x8000))))


@njit(inline="always")
def _stochastic_bf16(v, r, nan):
    u = _U(_bits(v))
    rounded = np.uint16(_U(_U(u + _U(r)) >> _U(16)))  # (b + r) & 0xFFFF0000 is exact in bfloat16
    return rounded if _U(u & _U(0x7FFFFFFF)) < _U(0x7F800000) else _to_bf16(v, nan)


@njit(inline="always")
def _stochastic_f16(v, r):
    u = _U(_bits(v))
    a = _U(u & _U(0x7FFFFFFF))
    out = _float(np.int32(_U(_U(u + _U(_U(r) >> _U(3))) & _U(0xFFFFE000))))
    if a < _U(0x38800000):
        k = _float(np.int32(a)) * _F(2.0**24)
        whole = np.floor(k)
        q = (whole + (_F(1.0) if _F(np.int32(r)) < (k - whole) * _F(65536.0) else _F(0.0))) * _F(2.0**-24)
        out = -q if u >> _U(31) else q
    return _to_f16(v if a >= _U(0x7F800000) else out)


def _load(a, i):
    """``a[i]`` in the compute dtype."""


def _encode(a, v, r, nan):
    """``v`` rounded to ``a``'s dtype: to nearest, or stochastically with bits ``r`` unless r is None."""


@overload(_load)
def _load_impl(a, i):
    if a.dtype == types.uint16:  # bfloat16
        return lambda a, i: _float(np.int32(_U(_U(a[i]) << _U(16))))
    if a.dtype == types.int16:  # float16
        return lambda a, i: _f16_to_f32(a[i])
    return lambda a, i: a[i]


@overload(_encode)
def _encode_impl(a, v, r, nan):
    nearest = r is None or isinstance(r, types.NoneType)
    if a.dtype == types.uint16:  # bfloat16
        if nearest:
            return lambda a, v, r, nan: _to_bf16(v, nan)
        return lambda a, v, r, nan: _stochastic_bf16(v, r, nan)
    if a.dtype == types.int16:  # float16
        return (lambda a, v, r, nan: _to_f16(v)) if nearest else (lambda a, v, r, nan: _stochastic_f16(v, r))
    return lambda a, v, r, nan: v


def _part(source, otherwise, lo, hi):
    """``source[lo:hi]``, or ``otherwise`` when source is None."""


@overload(_part)
def _part_impl(source, otherwise, lo, hi):
    # the very array, not a second one over the same memory: LLVM then vectorizes without overlap checks
    if isinstance(source, types.NoneType):
        return lambda source, otherwise, lo, hi: otherwise
    return lambda source, otherwise, lo, hi: source[lo:hi]


@njit
def _workspace():
    """Per chunk: z and Philox words."""
    return np.empty(TILE, np.float32), np.empty(TILE, np.uint32)


@njit(inline="always")
def _tiles(start, n, c0, c1):
    """Index of the first tile, and the tiles of chunks [c0, c1)."""
    first = start // TILE
    return first, range(c0 * CHUNK_TILES, min(c1 * CHUNK_TILES, (start + n - 1) // TILE - first + 1))


@njit(cache=True)
def perturb_chunks(out, weight, start, stream, code, eps, nan, c0, c1):
    """``out = z * eps + weight`` rounded to nearest; ``out = z`` when weight is None (fill)."""
    n, work = out.shape[0], _workspace()
    first, tiles = _tiles(start, n, c0, c1)
    for t in tiles:
        off = (first + t) * TILE - start
        lo, hi = max(off, 0), min(off + TILE, n)
        if weight is None and hi - lo == TILE:
            _tile(out[lo:hi], work, off + start, stream, code)
            continue
        _tile(work[0], work, off + start, stream, code)
        # indices from 0: numba's wrap-around of negative indices would keep LLVM from vectorizing
        zt, ot = work[0][lo - off:hi - off], out[lo:hi]
        if weight is None:
            ot[:] = zt
        else:
            wt = weight[lo:hi]
            for i in range(hi - lo):
                ot[i] = _encode(ot, zt[i] * eps + _load(wt, i), None, nan)


@njit(inline="always")
def _step(w, d, neg_lr, weight_decay, decay):
    return _fma(neg_lr, _fma(weight_decay, w, d) if decay else d, w)


@njit(cache=True)
def update_chunks(weight, source, start, seeds, coeffs, key, code, neg_lr, weight_decay, decay, rounding, nan,
                  c0, c1):
    """``weight = round(source - lr * (sum_j coeffs[j] * z_j + weight_decay * source))``, stochastically
    unless rounding is None; source is the weight (None) for update, the values for round_into."""
    n, work = weight.shape[0], _workspace()
    z, d, bits = work[0], np.empty(TILE, coeffs.dtype), np.empty(TILE // 2, np.uint32)
    random16 = bits.view(np.uint16)  # little endian: element i's bits are half i % 2 of word i // 2
    first, tiles = _tiles(start, n, c0, c1)
    for t in tiles:
        off = (first + t) * TILE - start
        d[:] = 0
        for j in range(seeds.shape[0]):
            _tile(z, work, off + start, (seeds[j, 0], seeds[j, 1], key[0], key[1]), code)
            for e in range(TILE):
                d[e] = _fma(coeffs[j], z[e], d[e])
        lo, hi = max(off, 0), min(off + TILE, n)
        dt, wt = d[lo - off:hi - off], weight[lo:hi]
        st = _part(source, wt, lo, hi)
        if rounding is None:
            for i in range(hi - lo):
                wt[i] = _encode(wt, _step(_load(st, i), dt[i], neg_lr, weight_decay, decay), None, nan)
        else:
            _words(bits, TILE // 8, (off + start) >> 3, rounding)
            rt = random16[lo - off:hi - off]
            for i in range(hi - lo):
                wt[i] = _encode(wt, _step(_load(st, i), dt[i], neg_lr, weight_decay, decay), rt[i], nan)


@intrinsic
def _take(typingctx, counter):
    """The next chunk: ``counter[0]``, incremented atomically."""
    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(counter), codegen


@njit(parallel=True, cache=True)
def perturb_parallel(out, weight, start, stream, code, eps, nan, chunks, threads):
    counter = np.zeros(1, np.int64)
    for _ in prange(threads):
        c = _take(counter)
        while c < chunks:
            perturb_chunks(out, weight, start, stream, code, eps, nan, c, c + 1)
            c = _take(counter)


@njit(parallel=True, cache=True)
def update_parallel(weight, source, start, seeds, coeffs, key, code, neg_lr, weight_decay, decay, rounding, nan,
                    chunks, threads):
    counter = np.zeros(1, np.int64)
    for _ in prange(threads):
        c = _take(counter)
        while c < chunks:
            update_chunks(weight, source, start, seeds, coeffs, key, code, neg_lr, weight_decay, decay, rounding,
                          nan, c, c + 1)
            c = _take(counter)
