"""Host memory for offloaded weights: one buffer per dtype, pinned by registering its pages.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which
rounds every allocation up to a power of two: one pinned buffer per OPT-30B block (1.23 GB)
would take 2 GiB, 63 % more host memory than the weights. An arena is a plain (pageable)
allocation of exactly the weights' size, filled first and then registered with
``cudaHostRegister``, so that the device copies it asynchronously as if it were pinned.

Filling before registering keeps the host peak near one copy of the model: the kernel maps
an arena's pages only as they are written, while the weights they replace are freed block
by block; registering would map (and lock) them all at once.
"""

from __future__ import annotations

import warnings
import weakref

import torch


class HostArena:
    """Flat host buffers, one per dtype, of ``sizes`` elements; :meth:`pin` registers them."""

    def __init__(self, sizes: dict[torch.dtype, int]):
        self.flats = {dtype: torch.empty(size, dtype=dtype) for dtype, size in sizes.items() if size}
        self.pinned = False

    @property
    def nbytes(self) -> int:
        return sum(flat.numel() * flat.element_size() for flat in self.flats.values())

    def pin(self) -> bool:
        """Registers the buffers with CUDA (page-locked: asynchronous copies); False, with one
        warning, when the driver refuses (the copies then wait for the host)."""
        cudart = torch.cuda.cudart()
        registered = []
        for flat in self.flats.values():
            pointer, size = flat.data_ptr(), flat.numel() * flat.element_size()
            error = int(cudart.cudaHostRegister(pointer, size, 0))
            if error:
                for done in registered:
                    cudart.cudaHostUnregister(done)
                warnings.warn(f"offload: could not page-lock {size / 2**30:.2f} GiB of host memory (CUDA error "
                              f"{error}); blocks stream from pageable memory, more slowly. Raise the locked-memory "
                              "limit (ulimit -l) or free host memory", stacklevel=3)
                return False
            registered.append(pointer)
        # Unregistered when the arena goes; the memory itself stays valid (pageable) while views of it live.
        weakref.finalize(self, _unregister, cudart, registered)
        self.pinned = True
        return True


def _unregister(cudart, pointers) -> None:
    for pointer in pointers:
        cudart.cudaHostUnregister(pointer)
