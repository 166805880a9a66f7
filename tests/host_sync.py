"""Counts, on any device, what would make a GPU step wait for the host or the host for the GPU.

* reads: a tensor's value brought to Python (``item``, ``tolist``, ``float(t)``, ``bool(t)``,
  ``numpy``): on a GPU each one waits for every queued kernel;
* host copies: tensors made from Python data (``torch.tensor``, ``as_tensor``, ``from_numpy``),
  which on a GPU become a blocking copy from pageable memory, and ``.to``/``.cuda`` calls
  that name a device.

Only calls made by zotune's own code count (``by_zotune``); the others (transformers reads a
padded batch's attention mask once per forward, torch's AdamW its host-side step count) are
in ``elsewhere``, by name.

Functions are seen through a ``TorchFunctionMode`` and scalar reads a second time through a
``TorchDispatchMode`` (``_local_scalar_dense``), so that none hides behind a C++ call.
"""

from __future__ import annotations

from collections import Counter

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ZOTUNE = str(Path(__file__).resolve().parents[1] / "src" / "zotune")
READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy"}
FROM_HOST = {"tensor", "as_tensor", "from_numpy"}


def _names_device(args, kwargs) -> bool:
    values = list(args[1:]) + [kwargs.get("device")]
    return any(isinstance(v, (torch.device, str)) or (isinstance(v, int) and not isinstance(v, bool))
               for v in values if v is not None and not isinstance(v, torch.dtype))


class HostSync:
    """``with HostSync() as sync: ...``; then ``sync.reads`` and ``sync.copies`` made by zotune,
    ``sync.seen`` (where: count) and ``sync.elsewhere`` (name: count, made by other libraries)."""

    def __init__(self):
        self.seen: Counter = Counter()
        self.elsewhere: Counter = Counter()
        self.reads = self.copies = self.scalar_reads = 0

    def note(self, kind: str, name: str) -> None:
        caller = _caller()
        if caller is None:
            self.elsewhere[name] += 1
            return
        setattr(self, kind, getattr(self, kind) + 1)
        self.seen[f"{name} at {caller}"] += 1

    def __enter__(self) -> HostSync:
        self._function, self._dispatch = _Functions(self), _Dispatch(self)
        self._function.__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._dispatch.__exit__(*exc_info)
        self._function.__exit__(*exc_info)


class _Functions(TorchFunctionMode):
    def __init__(self, counter: HostSync):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in READS:
            self.counter.note("reads", name)
        elif name in FROM_HOST or (name in ("to", "cuda") and _names_device(args, kwargs)):
            self.counter.note("copies", name)
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostSync):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counter.scalar_reads += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str | None:
    """``file:line`` of the call being handled when zotune made it; None when another library (or a test) did."""
    frame = sys._getframe(3)  # _caller, note, __torch_function__, then the call itself
    while frame is not None and frame.f_code.co_filename.endswith(("torch/overrides.py", "_python_dispatch.py")):
        frame = frame.f_back  # torch's dispatch to the mode, for functions written in Python
    if frame is None or not frame.f_code.co_filename.startswith(ZOTUNE):
        return None
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
