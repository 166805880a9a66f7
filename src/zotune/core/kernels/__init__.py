"""One kernel contract (:mod:`.reference`), a backend per device.

* ``reference``: torch, any device; the definition the others are tested against.
* ``cpu``: numba, fused and parallel.
* ``cuda``: Triton; on a machine without CUDA it runs under ``TRITON_INTERPRET=1`` (tests).

``get(device)`` picks the fastest backend installed for a device, and falls back to the
reference (one warning) when that backend fails to import or fails a call the reference can
do; the environment variable ``ZOTUNE_KERNELS`` (``reference``, ``cpu``, ``cuda``) forces one.
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
    """The backend module ``name``; ImportError when its compiler (numba, triton) is missing or unusable."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: use one of {', '.join(BACKENDS)}")
    try:
        return importlib.import_module(f"zotune.core.kernels.{name}")
    except ImportError:
        raise
    except Exception as error:
        # A compiler too old or too new for the backend fails at import with anything (triton < 3.4:
        # AttributeError on triton.knobs); callers only need to know the backend cannot be used.
        raise ImportError(f"kernel backend {name!r} does not import: {_one_line(error)}") from error


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
        backend = load(preferred)
    except ImportError as error:
        if preferred == "cuda":
            warnings.warn(f"triton is not importable ({_one_line(error)}); directions on CUDA use the slow torch "
                          "reference kernels: pip install 'triton>=3.9'", stacklevel=3)
        return load("reference")
    return backend if preferred == "reference" else _Fallback(backend)


_OPERATIONS = ("fill", "perturb", "update", "round_into")


class _Fallback:
    """``backend`` until one of its calls fails where the reference's succeeds; from then on the reference.

    A backend that imports can still fail to compile a kernel at its first launch: a Triton whose
    language lacks what the kernels use, a GPU its compiler does not support (each dtype and
    operation compiles on its own). Those failures come before the kernel writes anything, so
    the reference can redo the call. ValueError is the contract's
    answer to a wrong call and passes through, as does an error the reference raises as well.
    """

    def __init__(self, backend):
        self._backend = backend

    @property
    def __name__(self) -> str:
        return self._backend.__name__

    def __getattr__(self, name: str):
        if name in _OPERATIONS:
            return functools.partial(self._call, name)
        return getattr(self._backend, name)

    def _call(self, operation: str, *args, **kwargs):
        backend = self._backend
        try:
            return getattr(backend, operation)(*args, **kwargs)
        except ValueError:
            raise
        except Exception as error:
            reference = load("reference")
            if backend is reference:
                raise
            result = getattr(reference, operation)(*args, **kwargs)
            self._backend = reference
            warnings.warn(f"{backend.__name__} kernels failed ({_one_line(error)}); from now on directions use "
                          "the slow torch reference kernels", RuntimeWarning, stacklevel=2)
            return result


def _one_line(error: BaseException) -> str:
    # the innermost cause: Triton's CompilationError wraps the AttributeError that names what is missing
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
