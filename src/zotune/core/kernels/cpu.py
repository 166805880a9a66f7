"""The kernel contract (:mod:`.reference`) on the CPU, with numba: the entry points.

They hand the compiled kernels of :mod:`.cpu_jit` numpy views of the tensors' memory and the
call's scalars in the compute dtype, and pick the serial kernel or the parallel one (ranges
under ``SERIAL`` elements, a single chunk or a single torch thread stay on the calling thread).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from numba import get_num_threads

from zotune.core.kernels.cpu_jit import (CHUNK_TILES, CODES, TILE, perturb_chunks, perturb_parallel, update_chunks,
                                         update_parallel)
from zotune.core.kernels.reference import DISTRIBUTIONS, compute_dtype
from zotune.core.rng import split64

SERIAL = 1 << 16

# torch writes a NaN as bfloat16 0xFFFF from its vectorized code, 0x7FC0 from its scalar code
# (ATEN_CPU_CAPABILITY=default): do as this process's torch does.
_BF16_NAN = np.uint16(torch.tensor([float("nan")]).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF)


def _threads() -> int:
    """As many threads as torch uses. Several processes on one machine (torchrun sets
    OMP_NUM_THREADS=1 in each) must not oversubscribe the cores: numba's pool is one thread
    per core, and launching its OpenMP layer resets the OpenMP thread count that torch's
    kernels read, so torch's is put back."""
    wanted = torch.get_num_threads()
    if wanted == 1:
        return 1  # serial kernels; numba's pool is never launched
    available = get_num_threads()  # launches the pool on the first call
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return min(available, wanted)


def _run(serial, parallel, start: int, n: int, *args) -> None:
    if n == 0:
        return
    chunks = -(-((start + n - 1) // TILE - start // TILE + 1) // CHUNK_TILES)
    threads = _threads()
    if n < SERIAL or chunks == 1 or threads == 1:
        serial(*args, 0, chunks)
    else:
        parallel(*args, chunks, threads)


_AS_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.uint16, torch.float16: np.int16}


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a 1-D contiguous tensor's memory, made from its address: ``Tensor.numpy()``
    would mark the storage as not resizable, and FSDP2 frees gathered weights by resizing."""
    if t.dtype not in _AS_NUMPY or (t.ndim != 1 and t.numel() > 1) or not t.is_contiguous():
        raise TypeError(f"the CPU kernels take 1-D contiguous float tensors, not {t.dtype} {tuple(t.shape)}")
    if t.numel() == 0:
        return np.empty(0, _AS_NUMPY[t.dtype])
    memory = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    return np.frombuffer(memory, dtype=_AS_NUMPY[t.dtype])


def _code(distribution: str) -> int:
    if distribution not in CODES:
        raise ValueError(f"unknown distribution {distribution!r}: use one of {', '.join(DISTRIBUTIONS)}")
    return CODES[distribution]


def _scalar(dtype: torch.dtype, value: float):
    """``value`` in the compute dtype, as torch casts a Python scalar operand."""
    return float(value) if compute_dtype(dtype) == torch.float64 else np.float32(value)


def _stream(seed: int, key: int) -> tuple[int, int, int, int]:
    return (*split64(seed), *split64(key))


def fill(out: torch.Tensor, start: int, seed: int, key: int, distribution: str) -> None:
    if out.dtype != torch.float32:
        raise TypeError(f"fill writes float32, not {out.dtype}")
    _run(perturb_chunks, perturb_parallel, start, out.numel(), _array(out), None, start, _stream(seed, key),
         _code(distribution), np.float32(0), _BF16_NAN)


def perturb(out, weight, start: int, seed: int, key: int, distribution: str, eps: float) -> None:
    _run(perturb_chunks, perturb_parallel, start, out.numel(), _array(out), _array(weight), start,
         _stream(seed, key), _code(distribution), _scalar(weight.dtype, eps), _BF16_NAN)


def _update(weight, source, start, seeds, coeffs, key, code, lr, weight_decay, rounding_seed) -> None:
    dtype = weight.dtype
    seed_words = np.array([split64(s) for s in seeds], dtype=np.int64).reshape(-1, 2)
    coeffs = np.asarray(coeffs, dtype=np.float64 if compute_dtype(dtype) == torch.float64 else np.float32)
    stochastic = rounding_seed is not None and dtype in (torch.bfloat16, torch.float16)
    _run(update_chunks, update_parallel, start, weight.numel(), _array(weight),
         None if source is None else _array(source), start, seed_words, coeffs, split64(key), code,
         _scalar(dtype, -lr), _scalar(dtype, weight_decay), bool(weight_decay),
         _stream(rounding_seed, key) if stochastic else None, _BF16_NAN)


def update(weight, start: int, seeds, coeffs, key: int, distribution: str, lr: float, weight_decay: float,
           rounding_seed: int | None) -> None:
    _update(weight, None, start, seeds, coeffs, key, _code(distribution), lr, weight_decay, rounding_seed)


def round_into(weight, values, start: int, key: int, rounding_seed: int | None) -> None:
    if rounding_seed is None or weight.dtype not in (torch.bfloat16, torch.float16):
        weight.copy_(values)  # the reference's values.to(dtype)
        return
    # fma(-0, 0, x) is x: no seeds and lr 0 leave the values to the rounding
    _update(weight, values.detach().to(torch.float32).contiguous(), start, [], [], key, 0, 0.0, 0.0, rounding_seed)
