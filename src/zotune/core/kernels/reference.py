"""The kernel contract, defined in torch (any device). The other backends must match it.

Every function takes 1-D contiguous tensors that hold elements ``[start, start + n)``
of a parameter's flat index range; ``seed`` and ``key`` are 64-bit integers naming a
stream (see :mod:`zotune.core.rng`); ``distribution`` is one of :data:`DISTRIBUTIONS`.
Arithmetic runs in float32, or float64 for float64 weights ("compute dtype").

* ``fill(out, start, seed, key, distribution)``: ``out[i] = z[start + i]`` (float32 ``out``).
* ``perturb(out, weight, start, seed, key, distribution, eps)``:
  ``out = round_nearest((z * eps) + weight)`` in ``weight``'s dtype.
* ``update(weight, start, seeds, coeffs, key, distribution, lr, weight_decay, rounding_seed)``,
  in place: ``d = sum_j coeffs[j] * z_j`` (``z_j`` from stream ``(seeds[j], key)``, summed
  in order from 0), ``d += weight_decay * w`` when ``weight_decay`` is non-zero,
  ``new = w - lr * d``, then ``weight = round(new)``.
* ``round_into(weight, values, start, key, rounding_seed)``: ``weight = round(values)``.

``round`` is round-to-nearest-even, except for bfloat16/float16 weights when
``rounding_seed`` is not None: stochastic rounding, whose 16 random bits for element
``i`` come from stream ``(rounding_seed, key)``: block ``i // 8``, word ``(i % 8) // 2``,
bits ``16 * (i % 2)`` upwards. With ``b`` the float32 bit pattern of the value and ``r``
those bits:

* bfloat16: ``(b + r) & 0xFFFF0000`` (the 16 dropped bits are covered: unbiased);
* float16, ``|x| >= 2**-14``: ``(b + (r >> 3)) & 0xFFFFE000`` (13 dropped bits: unbiased);
* float16, ``|x| < 2**-14`` (subnormal, spacing ``2**-24``): ``k = |x| * 2**24``,
  ``up = r < (k - floor(k)) * 65536``, value ``sign(x) * (floor(k) + up) * 2**-24``
  (biased by at most ``2**-16`` of a spacing).

Non-finite values round to nearest. Directions:

* ``"gaussian"``: block ``i // 4``, Box-Muller on words (0, 1) and (2, 3) in float32 on
  23-bit uniforms ``((w >> 9) + 0.5) * 2**-23``: ``sqrt(-2 log u0) * (cos, sin)(2 pi u1)``.
  The integers are exact everywhere; log/sin/cos may differ by a few ulps between math
  libraries, so backends agree to ``GAUSSIAN_RTOL * (1 + |z|)``.
* ``"rademacher"``: every bit is one value: block ``i // 128``, word ``(i % 128) // 32``,
  bit ``i % 32``; bit 0 gives +1, bit 1 gives -1. Bit-identical everywhere.
* ``"rademacher-v1"``: zotune 0.1's stream (top bit of each word, block ``i // 4``), kept
  here only so that trajectories recorded with it still replay.
"""

from __future__ import annotations

import math

import torch

from zotune.core.rng import MASK32, philox4x32, split64

DISTRIBUTIONS = ("gaussian", "rademacher", "rademacher-v1")
GAUSSIAN_RTOL = 2e-6
# Elements per piece of work: bounds temporaries (a few tens of MiB of int64) for any tensor size.
CHUNK = 1 << 20
# The dtypes whose updates are rounded stochastically (when a rounding seed is given).
HALF = (torch.bfloat16, torch.float16)
_PER_BLOCK = {"gaussian": 4, "rademacher": 128, "rademacher-v1": 4}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _pieces(n: int):
    for begin in range(0, n, CHUNK):
        yield begin, min(begin + CHUNK, n)


def _words(first_block: int, n_blocks: int, seed: int, key: int, device) -> torch.Tensor:
    """Philox words of blocks ``first_block ...``: an int64 tensor (n_blocks, 4) of 32-bit values."""
    blocks = torch.arange(first_block, first_block + n_blocks, device=device, dtype=torch.int64)
    key_lo, key_hi = split64(key)
    seed_lo, seed_hi = split64(seed)
    words = philox4x32(blocks & MASK32, blocks >> 32, torch.full_like(blocks, key_lo),
                       torch.full_like(blocks, key_hi), seed_lo, seed_hi)
    return torch.stack(words, dim=-1)


def _uniform(words: torch.Tensor) -> torch.Tensor:
    return ((words >> 9).to(torch.float32) + 0.5) * 2.0**-23


def _stream(start: int, n: int, seed: int, key: int, per_block: int, device) -> tuple[torch.Tensor, int]:
    first = start // per_block
    count = (start + n - 1) // per_block - first + 1
    return _words(first, count, seed, key, device), start - first * per_block


def _z(start: int, n: int, seed: int, key: int, distribution: str, device) -> torch.Tensor:
    words, offset = _stream(start, n, seed, key, _PER_BLOCK[distribution], device)
    if distribution == "gaussian":
        radius = torch.sqrt(-2.0 * torch.log(_uniform(words[:, 0::2])))
        theta = (2.0 * math.pi) * _uniform(words[:, 1::2])
        # (r cos, r sin) of pair (0, 1) then of pair (2, 3)
        values = torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=-1)
    elif distribution == "rademacher":
        bits = (words.unsqueeze(-1) >> torch.arange(32, device=device)) & 1
        values = 1.0 - 2.0 * bits.to(torch.float32)
    elif distribution == "rademacher-v1":
        values = 1.0 - 2.0 * (words >> 31).to(torch.float32)
    else:
        raise ValueError(f"unknown distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    return values.flatten()[offset : offset + n]


def _random16(start: int, n: int, seed: int, key: int, device) -> torch.Tensor:
    words, offset = _stream(start, n, seed, key, 8, device)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1)
    return halves.flatten()[offset : offset + n]


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def _stochastic(values: torch.Tensor, dtype: torch.dtype, random16: torch.Tensor) -> torch.Tensor:
    x = values.to(torch.float32)
    bits = x.view(torch.int32).to(torch.int64) & MASK32
    if dtype == torch.bfloat16:
        rounded = _from_bits((bits + random16) & 0xFFFF0000)
    else:
        normal = _from_bits((bits + (random16 >> 3)) & 0xFFFFE000)
        k = x.abs() * 2.0**24
        whole = torch.floor(k)
        up = random16.to(torch.float32) < (k - whole) * 65536.0
        subnormal = torch.copysign((whole + up.to(torch.float32)) * 2.0**-24, x)
        rounded = torch.where(x.abs() >= 2.0**-14, normal, subnormal)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


def _round(values, dtype, start, key, rounding_seed) -> torch.Tensor:
    if rounding_seed is None or dtype not in HALF:
        return values.to(dtype)
    return _stochastic(values, dtype, _random16(start, values.numel(), rounding_seed, key, values.device))


def fill(out: torch.Tensor, start: int, seed: int, key: int, distribution: str) -> None:
    for begin, end in _pieces(out.numel()):
        out[begin:end].copy_(_z(start + begin, end - begin, seed, key, distribution, out.device))


def perturb(out, weight, start: int, seed: int, key: int, distribution: str, eps: float) -> None:
    dtype = compute_dtype(weight.dtype)
    for begin, end in _pieces(out.numel()):
        z = _z(start + begin, end - begin, seed, key, distribution, out.device).to(dtype)
        out[begin:end].copy_(z.mul_(eps).add_(weight[begin:end]))


def update(weight, start: int, seeds, coeffs, key: int, distribution: str, lr: float, weight_decay: float,
           rounding_seed: int | None) -> None:
    dtype = compute_dtype(weight.dtype)
    for begin, end in _pieces(weight.numel()):
        w = weight[begin:end].to(dtype, copy=True)
        step = torch.zeros_like(w)
        for seed, coeff in zip(seeds, coeffs):
            step.add_(_z(start + begin, end - begin, seed, key, distribution, w.device).to(dtype), alpha=coeff)
        if weight_decay:
            step.add_(w, alpha=weight_decay)
        w.add_(step, alpha=-lr)
        weight[begin:end].copy_(_round(w, weight.dtype, start + begin, key, rounding_seed))


def round_into(weight, values, start: int, key: int, rounding_seed: int | None) -> None:
    for begin, end in _pieces(weight.numel()):
        weight[begin:end].copy_(_round(values[begin:end], weight.dtype, start + begin, key, rounding_seed))
