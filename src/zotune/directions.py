"""Counter-based random directions.

Element ``i`` of the direction for parameter ``key`` at seed ``seed`` is a pure
function of ``(seed, key, i)``: Philox4x32-10 (Salmon et al., SC'11) with

* key     = the 64-bit step seed, split into two 32-bit words,
* counter = (i // 4 as 64 bits, 64-bit hash of the parameter key),

and lane ``i % 4`` of the four outputs. So z does not depend on iteration order,
chunking, the device, or how the tensor is sharded: a shard holding elements
``[start, start + n)`` generates exactly those elements.

Distributions:

* ``"rademacher"``: the top bit of each 32-bit output gives ±1. Bit-identical on
  every device and backend.
* ``"gaussian"``: Box-Muller in float32 on pairs of outputs (lanes 0/1 and
  2/3), from 23-bit uniforms ``(k + 0.5) / 2**23`` that float32 holds exactly
  (so |z| < 5.8). The integer stream and the uniforms are identical on every
  backend; ``log``/``sin``/``cos`` may differ by an ulp or two between math
  libraries (numba's LLVM, torch's Sleef, CUDA's libdevice), so Gaussian values
  agree to about 1e-6 * (1 + |z|) across backends, and bit-for-bit within one.

The torch integer implementation runs on any device; on the CPU a fused numba
kernel computes the same integers about 25x faster.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch

DISTRIBUTIONS = ("gaussian", "rademacher")
# Elements per generated chunk: bounds the temporary memory of direction
# generation (a few MiB) whatever the size of the parameter.
CHUNK = 1 << 20
# Below this many elements one thread is faster than waking numba's thread pool.
PARALLEL_MIN = 1 << 16

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85

try:
    from zotune import _philox_numba
except ImportError:  # numba is optional: the portable path gives the same z.
    _philox_numba = None


def hash64(*parts: object) -> int:
    """A stable 64-bit hash (Python's ``hash`` is salted per process)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return struct.unpack("<Q", hashlib.blake2b(data, digest_size=8).digest())[0]


def derive_seed(base_seed: int, step: int, sample: int) -> int:
    """The seed of perturbation ``sample`` at optimizer step ``step``."""
    return hash64("zotune-seed", base_seed, step, sample)


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}"
        )
    return distribution


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding 32-bit words (any device).

    Products of two 32-bit words wrap modulo 2**64 in int64, which keeps their
    low 64 bits exact; the masks recover the two 32-bit halves.
    """
    for _ in range(10):
        p0 = c0 * _M0
        p2 = c2 * _M1
        c0, c1, c2, c3 = (
            ((p2 >> 32) & _MASK) ^ c1 ^ k0,
            p2 & _MASK,
            ((p0 >> 32) & _MASK) ^ c3 ^ k1,
            p0 & _MASK,
        )
        k0 = (k0 + _W0) & _MASK
        k1 = (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def _uniform(x):
    # 23 bits + 0.5 fit float32 exactly: u in (0, 1), the same on every backend.
    return ((x >> 9).to(torch.float32) + 0.5) * 2.0**-23


def _gaussian_pairs(x, y):
    r = torch.sqrt(-2.0 * torch.log(_uniform(x)))
    theta = (2.0 * math.pi) * _uniform(y)
    return r * torch.cos(theta), r * torch.sin(theta)


def _fill_torch(out: torch.Tensor, start: int, seed: int, key_hash: int, gaussian: bool):
    n = out.numel()
    first_block = start // 4
    n_blocks = (start + n - 1) // 4 - first_block + 1
    blocks = torch.arange(first_block, first_block + n_blocks, device=out.device)
    c0 = blocks & _MASK
    c1 = blocks >> 32
    c2 = torch.full_like(blocks, key_hash & _MASK)
    c3 = torch.full_like(blocks, key_hash >> 32)
    x = philox4x32(c0, c1, c2, c3, seed & _MASK, seed >> 32)
    if gaussian:
        v0, v1 = _gaussian_pairs(x[0], x[1])
        v2, v3 = _gaussian_pairs(x[2], x[3])
        values = torch.stack((v0, v1, v2, v3), dim=-1)
    else:
        values = 1.0 - 2.0 * (torch.stack(x, dim=-1) >> 31).to(torch.float32)
    offset = start - first_block * 4
    out.copy_(values.flatten()[offset : offset + n])


def fill(
    out: torch.Tensor,
    seed: int,
    key_hash: int,
    start: int = 0,
    distribution: str = "gaussian",
    backend: str = "auto",
) -> torch.Tensor:
    """Write elements ``[start, start + out.numel())`` of a direction into ``out``.

    ``out`` must be a contiguous float32 tensor; it is returned. ``backend`` is
    ``"auto"`` (numba on the CPU when installed, else torch), ``"torch"`` or
    ``"numba"``.
    """
    check_distribution(distribution)
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("fill() needs a contiguous float32 output tensor")
    if out.numel() == 0:
        return out
    gaussian = distribution == "gaussian"
    seed &= (1 << 64) - 1
    key_hash &= (1 << 64) - 1
    use_numba = backend == "numba" or (
        backend == "auto" and out.device.type == "cpu" and _philox_numba is not None
    )
    if use_numba:
        if _philox_numba is None:
            raise RuntimeError("backend='numba' needs numba: pip install numba")
        if out.device.type != "cpu":
            raise ValueError("backend='numba' runs on the CPU only")
        kernel = _philox_numba.fill_philox if out.numel() >= PARALLEL_MIN else _philox_numba.fill_philox_serial
        kernel(
            out.view(-1).numpy(), start, seed & _MASK, seed >> 32,
            key_hash & _MASK, key_hash >> 32, gaussian,
        )
    elif backend in ("auto", "torch"):
        _fill_torch(out.view(-1), start, seed, key_hash, gaussian)
    else:
        raise ValueError(f"unknown backend {backend!r}: use 'auto', 'torch' or 'numba'")
    return out


def direction(
    seed: int,
    key_hash: int,
    numel: int,
    start: int = 0,
    distribution: str = "gaussian",
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> torch.Tensor:
    """Elements ``[start, start + numel)`` of a direction, as a new float32 tensor."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    return fill(out, seed, key_hash, start, distribution, backend)


def chunks(numel: int, chunk: int = CHUNK):
    """``(start, stop)`` ranges that cover ``numel`` elements in pieces of ``chunk``."""
    for begin in range(0, numel, chunk):
        yield begin, min(begin + chunk, numel)
