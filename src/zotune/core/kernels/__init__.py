"""One kernel contract (:mod:`.reference`), a backend per device.

* ``reference``: torch, any device; the definition the others are tested against.
* ``cpu``: numba, fused and parallel.
* ``cuda``: Triton; on a machine without CUDA it runs under ``TRITON_INTERPRET=1`` (tests).

``get(device)`` picks the fastest backend installed for a device; the environment
variable ``ZOTUNE_KERNELS`` (``reference``, ``cpu``, ``cuda``) forces one.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from zotune.core.kernels.reference import CHUNK, DISTRIBUTIONS, GAUSSIAN_RTOL, HALF, compute_dtype

BACKENDS = ("reference", "cpu", "cuda")
__all__ = ["BACKENDS", "CHUNK", "DISTRIBUTIONS", "GAUSSIAN_RTOL", "HALF", "available", "compute_dtype", "get", "load"]


@functools.cache
def load(name: str):
    """The backend module ``name``; ImportError when its compiler (numba, triton) is missing."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: use one of {', '.join(BACKENDS)}")
    return importlib.import_module(f"zotune.core.kernels.{name}")


def available() -> list[str]:
    names = []
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def get(device: torch.device | str, name: str | None = None):
    """The backend for tensors on ``device``: ``name``, ``$ZOTUNE_KERNELS``, or the best installed."""
    device = torch.device(device)
    name = name or os.environ.get("ZOTUNE_KERNELS") or "auto"
    if name != "auto":
        return load(name)
    preferred = {"cpu": "cpu", "cuda": "cuda"}.get(device.type, "reference")
    return _best(preferred)


@functools.cache
def _best(preferred: str):
    try:
        return load(preferred)
    except ImportError as error:
        if preferred == "cuda":
            warnings.warn(f"triton is not importable ({error}); directions on CUDA use the slow torch "
                          "reference kernels: pip install triton", stacklevel=3)
        return load("reference")
