"""Fused Philox4x32-10 direction kernels for the CPU, compiled by numba.

This is the fast path of :mod:`zotune.directions`; it computes exactly the same
integers as the portable torch implementation there, so both give the same z.
"""

import math

import numpy as np
from numba import njit, prange

_MASK = np.uint64(0xFFFFFFFF)
_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_SH32 = np.uint64(32)
_TWO_PI = np.float32(2.0 * math.pi)
_INV_2_23 = np.float32(2.0**-23)
_HALF = np.float32(0.5)
_MINUS_TWO = np.float32(-2.0)
_SH9 = np.uint64(9)


@njit(inline="always")
def _philox_block(block, k0, k1, c2, c3):
    x0 = np.uint64(block) & _MASK
    x1 = np.uint64(block) >> _SH32
    x2 = c2
    x3 = c3
    a0 = k0
    a1 = k1
    for _ in range(10):
        p0 = x0 * _M0
        p2 = x2 * _M1
        x0 = (p2 >> _SH32) ^ x1 ^ a0
        x1 = p2 & _MASK
        x2 = (p0 >> _SH32) ^ x3 ^ a1
        x3 = p0 & _MASK
        a0 = (a0 + _W0) & _MASK
        a1 = (a1 + _W1) & _MASK
    return x0, x1, x2, x3


@njit(inline="always")
def _uniform(x):
    # 23 bits + 0.5 fit float32 exactly: u in (0, 1), the same on every backend.
    return (np.float32(x >> _SH9) + _HALF) * _INV_2_23


@njit(inline="always")
def _gaussian_pair(x, y):
    r = math.sqrt(_MINUS_TWO * math.log(_uniform(x)))
    theta = _TWO_PI * _uniform(y)
    return r * math.cos(theta), r * math.sin(theta)


@njit(inline="always")
def _fill_block(out, start, n, block, k0, k1, c2, c3, gaussian):
    x0, x1, x2, x3 = _philox_block(block, k0, k1, c2, c3)
    if gaussian:
        v0, v1 = _gaussian_pair(x0, x1)
        v2, v3 = _gaussian_pair(x2, x3)
    else:
        v0 = np.float32(1.0) - np.float32(2.0) * np.float32(x0 >> np.uint64(31))
        v1 = np.float32(1.0) - np.float32(2.0) * np.float32(x1 >> np.uint64(31))
        v2 = np.float32(1.0) - np.float32(2.0) * np.float32(x2 >> np.uint64(31))
        v3 = np.float32(1.0) - np.float32(2.0) * np.float32(x3 >> np.uint64(31))
    base = block * 4 - start
    if 0 <= base < n:
        out[base] = v0
    if 0 <= base + 1 < n:
        out[base + 1] = v1
    if 0 <= base + 2 < n:
        out[base + 2] = v2
    if 0 <= base + 3 < n:
        out[base + 3] = v3


@njit(inline="always")
def _blocks(start, n):
    first_block = start // 4
    return first_block, (start + n - 1) // 4 - first_block + 1


@njit(parallel=True, cache=True)
def fill_philox(out, start, k0, k1, c2, c3, gaussian):
    """Write z[start : start + len(out)] of the stream (k0, k1, c2, c3) into ``out``."""
    n = out.shape[0]
    if n == 0:
        return
    first_block, n_blocks = _blocks(start, n)
    for b in prange(n_blocks):
        _fill_block(out, start, n, first_block + b, np.uint64(k0), np.uint64(k1), np.uint64(c2), np.uint64(c3),
                    gaussian)


@njit(cache=True)
def fill_philox_serial(out, start, k0, k1, c2, c3, gaussian):
    """:func:`fill_philox` on one thread: for small tensors, where waking the thread pool costs more."""
    n = out.shape[0]
    if n == 0:
        return
    first_block, n_blocks = _blocks(start, n)
    for b in range(n_blocks):
        _fill_block(out, start, n, first_block + b, np.uint64(k0), np.uint64(k1), np.uint64(c2), np.uint64(c3),
                    gaussian)


@njit(cache=True)
def philox_raw(blocks, k0, k1, c2, c3):
    """The four raw 32-bit outputs for each counter in ``blocks`` (for known-answer tests)."""
    out = np.empty((blocks.shape[0], 4), np.uint64)
    for i in range(blocks.shape[0]):
        x0, x1, x2, x3 = _philox_block(
            blocks[i], np.uint64(k0), np.uint64(k1), np.uint64(c2), np.uint64(c3)
        )
        out[i, 0] = x0
        out[i, 1] = x1
        out[i, 2] = x2
        out[i, 3] = x3
    return out
