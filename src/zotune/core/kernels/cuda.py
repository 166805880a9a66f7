"""Triton kernels for the contract of :mod:`zotune.core.kernels.reference`.

One fused kernel per call: a program owns ``BLOCK`` consecutive elements of the
parameter's flat index range, starting at a multiple of 128 so that the Gaussian
(4 values per Philox block), Rademacher (128) and rounding (8) streams all begin on a
block boundary. Each Philox block is computed once per program and expanded to its
values with interleave / broadcast shifts; the weight is read once and written once.

Per-call scalars (seeds, key, start, lr, ...) travel as a tuple of packed 32-bit words
(see :func:`_pack`), so one compiled kernel per (operation, dtype, distribution, number
of draws) serves every seed and step; ``update`` loops over its draws at run time. Under
``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (that is how the tests run
without a GPU); without the interpreter, CPU tensors are staged through the GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import struct

import torch
import triton  # ImportError here makes kernels.load("cuda") fail and callers fall back to the reference
import triton.language as tl

from zotune.core.kernels.reference import DISTRIBUTIONS, compute_dtype
from zotune.core.rng import MASK32, MASK64, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1

_INTERPRET = bool(triton.knobs.runtime.interpret)
# Large tiles cut the interpreter's per-program Python overhead; on GPUs 2048 is 16 per thread.
BLOCK = 8192 if _INTERPRET else 2048
_M0, _M1, _W0, _W1 = tl.constexpr(PHILOX_M0), tl.constexpr(PHILOX_M1), tl.constexpr(PHILOX_W0), tl.constexpr(PHILOX_W1)
_FILL, _PERTURB, _UPDATE, _ROUND = 0, 1, 2, 3
_INT32_LIMIT = 2**31  # element offsets go int64 from here (a module attribute so that tests can lower it)
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _word(p, i: tl.constexpr):
    """Word i of the scalars packed by :func:`_pack`, as uint32."""
    return ((p[i] >> 4) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _u64(p, i: tl.constexpr):
    return (_word(p, i + 1).to(tl.uint64) << 32) | _word(p, i).to(tl.uint64)


@triton.jit
def _f64(p, i: tl.constexpr):
    return _u64(p, i).to(tl.float64, bitcast=True)


@triton.jit
def _pick(p, j, first: tl.constexpr, N: tl.constexpr):
    """Word ``first + 4 j`` of p for a run-time j: tuples take only static indices, so a select chain."""
    v = p[first]
    for i in tl.static_range(1, N):
        v = tl.where(j == i, p[first + 4 * i], v)
    return ((v >> 4) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _philox(first, M: tl.constexpr, k0, k1, key_lo, key_hi):
    """Words of blocks ``first ... first + M - 1`` of stream (seed = (k0, k1), key)."""
    block = first + tl.arange(0, M).to(tl.int64)
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = c0 * 0 + key_lo
    c3 = c0 * 0 + key_hi
    for _ in tl.static_range(10):
        a, b = c0, c2
        c0 = tl.umulhi(b, _M1) ^ c1 ^ k0
        c2 = tl.umulhi(a, _M0) ^ c3 ^ k1
        c1 = tl.mul(b, _M1, sanitize_overflow=False)
        c3 = tl.mul(a, _M0, sanitize_overflow=False)
        k0 = tl.add(k0, _W0, sanitize_overflow=False)
        k1 = tl.add(k1, _W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _interleave(a, b):
    # not tl.interleave: a @jit function of triton's, compiled-only if triton was imported before
    # TRITON_INTERPRET was set (tests/conftest.py imports it through transformers)
    c = tl.join(a, b)
    return tl.reshape(c, [2 * c.shape[0]])


@triton.jit
def _in_order(w0, w1, w2, w3):
    # (M,) x 4 -> (4M,): w0[0], w1[0], w2[0], w3[0], w0[1], ...
    return _interleave(_interleave(w0, w2), _interleave(w1, w3))


@triton.jit
def _uniform(w):
    return ((w >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07


if _INTERPRET:
    # The contract test wants float32/float64 Gaussian updates all but bit-identical to the
    # reference, i.e. to torch's CPU log/cos/sin/sqrt (MKL; not even its sqrt is correctly
    # rounded): numpy's or correctly rounded results differ on 5-20% of values. The interpreter
    # runs these as Python on numpy arrays, so it calls torch's; everything else (Philox,
    # layout, fusion, rounding) is the GPU code path.
    def _torch(fn, x):
        return tl.tensor(dataclasses.replace(x.handle, data=fn(torch.from_numpy(x.handle.data)).numpy()), x.type)

    def _radius(u):
        return _torch(lambda t: torch.sqrt(-2.0 * torch.log(t)), u)

    def _cos_sin(x):
        return _torch(torch.cos, x), _torch(torch.sin, x)

else:
    from triton.language.extra import libdevice

    # not tl.log/cos/sin: on GPUs they are the approximate lg2.approx ..., whose absolute error
    # near u = 1 is far outside GAUSSIAN_RTOL; libdevice's are within 2 ulp
    @triton.jit
    def _radius(u):
        return tl.sqrt_rn(-2.0 * libdevice.log(u))

    @triton.jit
    def _cos_sin(x):
        return libdevice.cos(x), libdevice.sin(x)


@triton.jit
def _z(g0, k0, k1, key_lo, key_hi, DIST: tl.constexpr, BLOCK: tl.constexpr):
    """Elements ``g0 ... g0 + BLOCK - 1`` (``g0`` a multiple of 128) of a direction, float32."""
    if DIST == 1:
        w = _in_order(*_philox(g0 // 128, BLOCK // 128, k0, k1, key_lo, key_hi))
        signs = (w[:, None] >> tl.arange(0, 32)[None, :]) << 31  # bit j of word w -> sign of 32 w + j
        z = tl.reshape(signs | 0x3F800000, [BLOCK]).to(tl.float32, bitcast=True)
    else:
        w0, w1, w2, w3 = _philox(g0 // 4, BLOCK // 4, k0, k1, key_lo, key_hi)
        if DIST == 0:
            r0, r1 = _radius(_uniform(w0)), _radius(_uniform(w2))
            cos0, sin0 = _cos_sin(6.283185307179586 * _uniform(w1))
            cos1, sin1 = _cos_sin(6.283185307179586 * _uniform(w3))
            z = _interleave(_interleave(r0 * cos0, r1 * cos1), _interleave(r0 * sin0, r1 * sin1))
        else:
            z = ((_in_order(w0, w1, w2, w3) >> 31 << 31) | 0x3F800000).to(tl.float32, bitcast=True)
    return z


@triton.jit
def _narrow(x, OUT: tl.constexpr):
    """``x`` to nearest in dtype OUT, NaNs written as torch's CPU kernels (the reference) write them."""
    if OUT == tl.bfloat16:
        # by hand: the interpreter's float32 -> bfloat16 truncates
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        h = tl.where(x != x, 0xFFFF, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
        y = h.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif OUT == tl.float16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        nan = (((b >> 16) & 0x8000) | 0x7E00 | ((b >> 13) & 0x3FF)).to(tl.uint16).to(tl.float16, bitcast=True)
        y = tl.where(x != x, nan, x.to(tl.float32).to(tl.float16))
    else:
        y = x.to(OUT)
    return y


@triton.jit
def _round(x, g0, k0, k1, key_lo, key_hi, ROUND: tl.constexpr, OUT: tl.constexpr, BLOCK: tl.constexpr):
    """``x`` in dtype OUT: nearest (ROUND 0), stochastic to bfloat16 (1) or float16 (2)."""
    if ROUND == 0:
        y = _narrow(x, OUT)
    else:
        x = x.to(tl.float32)
        b = x.to(tl.uint32, bitcast=True)
        w = _in_order(*_philox(g0 // 8, BLOCK // 8, k0, k1, key_lo, key_hi))
        r = _interleave(w & 0xFFFF, w >> 16)
        if ROUND == 1:
            y = ((b + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            normal = ((b + (r >> 3)) & 0xFFFFE000).to(tl.float32, bitcast=True)
            k = tl.minimum(tl.abs(x), 6.103515625e-05) * 16777216.0  # min: no inf - inf below
            whole = tl.floor(k)
            up = r.to(tl.float32) < (k - whole) * 65536.0
            tiny = ((whole + up.to(tl.float32)) * 5.960464477539063e-08).to(tl.uint32, bitcast=True)
            tiny = (tiny | (b & 0x80000000)).to(tl.float32, bitcast=True)  # copysign
            y = tl.where(tl.abs(x) >= 6.103515625e-05, normal, tiny)
        y = _narrow(tl.where((b & 0x7F800000) != 0x7F800000, y, x), OUT)
    return y


@triton.jit
def _kernel(out_ptr, in_ptr, n, shift, p, MODE: tl.constexpr, N: tl.constexpr, DIST: tl.constexpr,
            ROUND: tl.constexpr, WD: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr, BIG: tl.constexpr):
    """p: start - shift, key, rounding seed, a, b, then (seed, coeff) x N, each 64-bit as two words."""
    pid = tl.program_id(0)
    if BIG:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK - shift + tl.arange(0, BLOCK)
    mask = (offs >= 0) & (offs < n)
    g0 = _u64(p, 0).to(tl.int64, bitcast=True) + pid.to(tl.int64) * BLOCK
    key_lo, key_hi = _word(p, 2), _word(p, 3)
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    if MODE == 0:
        tl.store(out_ptr + offs, _z(g0, _word(p, 10), _word(p, 11), key_lo, key_hi, DIST, BLOCK), mask=mask)
    elif MODE == 1:
        w = tl.load(in_ptr + offs, mask=mask).to(CDT)
        z = _z(g0, _word(p, 10), _word(p, 11), key_lo, key_hi, DIST, BLOCK).to(CDT)
        # fp fusion is off for this kernel: the reference rounds z * eps before adding w
        tl.store(out_ptr + offs, _narrow(z * _f64(p, 6).to(CDT) + w, OUT), mask=mask)
    else:
        if MODE == 2:
            # explicit fma, as torch's add_(alpha=) does
            w = tl.load(out_ptr + offs, mask=mask).to(CDT)
            step = tl.full([BLOCK], 0.0, CDT)  # not tl.zeros: see _interleave
            if N > 0:  # the loop body is compiled even when it never runs, and p has no draws to index
                for j in range(N):  # a run-time loop: unrolled, 16 draws took 40 s to compile and spilled
                    z = _z(g0, _pick(p, j, 10, N), _pick(p, j, 11, N), key_lo, key_hi, DIST, BLOCK)
                    coeff = (_pick(p, j, 13, N).to(tl.uint64) << 32) | _pick(p, j, 12, N).to(tl.uint64)
                    step = tl.fma(z.to(CDT), coeff.to(tl.float64, bitcast=True).to(CDT), step)
            if WD:
                step = tl.fma(w, _f64(p, 8).to(CDT), step)
            x = tl.fma(step, -(_f64(p, 6).to(CDT)), w)
        else:
            x = tl.load(in_ptr + offs, mask=mask)
        y = _round(x, g0, _word(p, 4), _word(p, 5), key_lo, key_hi, ROUND, OUT, BLOCK)
        tl.store(out_ptr + offs, y, mask=mask)


def _pack(*values) -> tuple:
    """64-bit values (ints, or floats as their IEEE bits) as a tuple of packed 32-bit words.

    Triton specialises every tuple element on its value (== 1, divisible by 16, i32 or
    i64), which would compile a new kernel for most seeds; ``2**40 | word << 4 | 3`` is
    always an i64, never 1 and never a multiple of 16, so every call shares one kernel.
    """
    words = []
    for value in values:
        if isinstance(value, float):
            value = struct.unpack("<Q", struct.pack("<d", value))[0]
        value = int(value) & MASK64
        words += [(1 << 40) | ((value & MASK32) << 4) | 3, (1 << 40) | ((value >> 32) << 4) | 3]
    return tuple(words)


def _launch(out, inp, start: int, scalars: tuple, mode: int, distribution: str = "gaussian", n_seeds: int = 0,
            rounding: int = 0, weight_decay: bool = False, dtype=torch.float32) -> None:
    n = out.numel()
    if n == 0:
        return
    if not (out.is_contiguous() and inp.is_contiguous()):
        raise ValueError("kernels take contiguous tensors")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    shift = start % 128
    p = _pack(start - shift, *scalars)
    grid = (triton.cdiv(n + shift, BLOCK),)
    with _device_of(out):
        _kernel[grid](out, inp, n, shift, p, MODE=mode, N=n_seeds, DIST=DISTRIBUTIONS.index(distribution),
                      ROUND=rounding, WD=weight_decay, CDT=_TL_DTYPES[compute_dtype(dtype)], BLOCK=BLOCK,
                      BIG=n + shift + BLOCK >= _INT32_LIMIT, num_warps=4, enable_fp_fusion=False)


def _device_of(tensor):
    """Where to launch: Triton launches on the current CUDA device, whatever device the tensors are on."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _rounding(dtype, rounding_seed) -> int:
    if rounding_seed is None:
        return 0
    return {torch.bfloat16: 1, torch.float16: 2}.get(dtype, 0)


def _staged(fn):
    """Run on CUDA copies of CPU tensors (tests, odd callers) unless interpreting; writes back arg 0."""

    @functools.wraps(fn)
    def run(target, *args, **kwargs):
        if _INTERPRET or target.is_cuda:
            return fn(target, *args, **kwargs)
        moved = [a.cuda() if isinstance(a, torch.Tensor) else a for a in (target, *args)]
        fn(*moved, **kwargs)
        target.copy_(moved[0])

    return run


@_staged
def fill(out: torch.Tensor, start: int, seed: int, key: int, distribution: str) -> None:
    _launch(out, out, start, (key, 0, 0.0, 0.0, seed), _FILL, distribution)


@_staged
def perturb(out, weight, start: int, seed: int, key: int, distribution: str, eps: float) -> None:
    _launch(out, weight, start, (key, 0, float(eps), 0.0, seed), _PERTURB, distribution, dtype=weight.dtype)


@_staged
def update(weight, start: int, seeds, coeffs, key: int, distribution: str, lr: float, weight_decay: float,
           rounding_seed: int | None) -> None:
    pairs = [v for seed, coeff in zip(seeds, coeffs) for v in (seed, float(coeff))]
    _launch(weight, weight, start, (key, rounding_seed or 0, float(lr), float(weight_decay), *pairs), _UPDATE,
            distribution, len(pairs) // 2, _rounding(weight.dtype, rounding_seed), bool(weight_decay), weight.dtype)


@_staged
def round_into(weight, values, start: int, key: int, rounding_seed: int | None) -> None:
    _launch(weight, values, start, (key, rounding_seed or 0, 0.0, 0.0), _ROUND,
            rounding=_rounding(weight.dtype, rounding_seed), dtype=weight.dtype)
