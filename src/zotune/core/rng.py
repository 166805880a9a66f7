"""Counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11) and seed derivation.

Every random number zotune uses is a pure function of (seed, key, index), so that any
process can regenerate any slice of any past direction: replay, resume, offload and
sharding need nothing stored. For stream ``(seed, key)``, counter block ``b`` is
Philox4x32-10 with

* key     = the 64-bit seed as two 32-bit words (low, high),
* counter = (b low, b high, key low, key high),

giving four 32-bit words. What each kernel makes of the words is fixed in
:mod:`zotune.core.kernels.reference`.
"""

from __future__ import annotations

import hashlib
import struct

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def hash64(*parts: object) -> int:
    """A stable 64-bit hash (Python's ``hash`` is salted per process)."""
    data = "\x1f".join(str(p) for p in parts).encode()
    return struct.unpack("<Q", hashlib.blake2b(data, digest_size=8).digest())[0]


def derive_seed(base_seed: int, step: int, sample: int) -> int:
    """The seed of perturbation ``sample`` at optimizer step ``step``."""
    return hash64("zotune-seed", base_seed, step, sample)


def rounding_seed(base_seed: int, step: int) -> int:
    """The seed of the stochastic-rounding bits of step ``step``'s update."""
    return hash64("zotune-round", base_seed, step)


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on 32-bit words held in wider integers (Python ints or int64 tensors).

    Products of two 32-bit words fit 64 bits; in int64 tensors they wrap modulo
    2**64, which keeps the low 64 bits exact, and the masks recover the halves.
    """
    for _ in range(10):
        p0 = c0 * PHILOX_M0
        p2 = c2 * PHILOX_M1
        c0, c1, c2, c3 = (
            ((p2 >> 32) & MASK32) ^ c1 ^ k0,
            p2 & MASK32,
            ((p0 >> 32) & MASK32) ^ c3 ^ k1,
            p0 & MASK32,
        )
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def split64(value: int) -> tuple[int, int]:
    """(low, high) 32-bit words of a 64-bit value."""
    value &= MASK64
    return value & MASK32, value >> 32
