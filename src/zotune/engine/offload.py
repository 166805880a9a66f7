"""Block-wise offload: a model's blocks live in host memory and stream through the device.

Each offloaded block keeps its weights in its part of one host buffer per dtype (page-locked
when the device is a GPU; :mod:`zotune.engine.host_memory`). The device holds a few *slots*, flat buffers the size of the
largest block; a block is bound to a slot (its parameters become views of the slot)
only while it computes. Three streams overlap the work of consecutive blocks:

* upload: block i+1 is copied into a free slot while block i computes;
* compute: the model's own stream; it waits for block i's upload event, no more;
* write-back: after block i computes, its slot is copied back to host memory, if the
  block changed, while block i+1 computes.

Streams are ordered by events alone: nothing inside a step waits on the host. On a CPU
"device" the same code runs with plain copies, which is how CI proves that an
offloaded run equals an in-memory one bit for bit.

Only a block's matrices are offloaded: its vectors (norms, biases: a few d per block)
stay on the device, so that updating them needs no write-back.

Zeroth-order updates reach an offloaded block lazily: :class:`zotune.MeZO` hands each
step's record to :meth:`Offload.receive`, and the update is applied on the device when
the block is next bound, regenerated from the seeds (so a block crosses the bus once
per step: up, updated, used, down). With factored low-rank updates
(``MeZO(merge="resample")``) the update of a matrix is an m×r factor kept on the device
until V is redrawn: the block is written back only then. :meth:`Offload.flush` applies
what is still pending and waits for the write-backs: call it before the host reads the
weights (checkpoints); ``flush(merge=True)`` also writes the factors into the weights
(export).
"""

from __future__ import annotations

import weakref
from collections import deque
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from zotune.engine.host_memory import HostArena

# Device slots: one block uploading, one computing, one writing back. zotune memory reads it too.
SLOTS = 3


def device_of(model: nn.Module) -> torch.device:
    """The device ``model`` computes on: that of its first parameter that an engine does not
    stream (a streamed one lives in host memory between its forwards)."""
    for p in model.parameters():
        if not getattr(p, "_zotune_streamed", False):
            return p.device
    return next((b.device for b in model.buffers()), torch.device("cpu"))


class _Block:
    """One offloaded module: its matrices, their place in the host arena, and where it is now."""

    def __init__(self, index: int, module: nn.Module):
        self.index, self.module = index, module
        self.params = [p for p in module.parameters() if p.ndim >= 2]
        for p in self.params:
            p._zotune_streamed = True  # lives in host memory between forwards: see device_of
        self.ids = {id(p) for p in self.params}
        self.sizes: dict[torch.dtype, int] = {}
        self.offsets: list[tuple[torch.dtype, int]] = []
        for p in self.params:
            self.offsets.append((p.dtype, self.sizes.get(p.dtype, 0)))
            self.sizes[p.dtype] = self.sizes.get(p.dtype, 0) + p.numel()
        self.host: dict = {}
        self.slot: _Slot | None = None
        self.uploaded = self.written_back = None  # events; None: nothing in flight
        self.pending: list = []
        self.dirty = False
        self.depth = 0  # calls of the module in progress: a stacked evaluation re-runs leaf modules

    def move_to(self, host: dict) -> None:
        """Copies the weights into ``host`` (this block's part of the arena) and binds them there:
        the memory they held is freed now, before the next block is copied."""
        self.host = host
        for view, p in zip(self._views(host), self.params):
            view.copy_(p.detach().reshape(-1))
        self.bind(host)

    def _views(self, flats: dict):
        return [flats[dtype][offset : offset + p.numel()] for (dtype, offset), p in zip(self.offsets, self.params)]

    def bind(self, flats: dict) -> None:
        for view, p in zip(self._views(flats), self.params):
            p.data = view.view(p.shape)


class _Slot:
    def __init__(self, sizes: dict, device):
        self.flats = {dtype: torch.empty(size, dtype=dtype, device=device) for dtype, size in sizes.items()}
        self.free_after = None  # event after which the slot may be overwritten


class Offload:
    """Streams ``blocks`` (modules of ``model``, in forward order) through ``device``.

    Everything of ``model`` outside the blocks (embeddings, head, the first-order blocks
    of HZO) moves to ``device`` for good; the blocks' buffers and vectors too (they are small).

    Args:
        model: the model; its parameters may start anywhere.
        blocks: the modules to offload, in the order the forward runs them.
        device: where the model computes.
        slots: device buffers for blocks (3: upload, compute and write-back in flight).
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], device, slots: int = SLOTS):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        owned = [id(p) for block in blocks for p in block.parameters() if p.ndim >= 2]
        offloaded = set(owned)
        if len(owned) != len(offloaded):
            raise ValueError("a parameter belongs to two of the offloaded modules (tied weights)")
        inside = {id(m) for block in blocks for m in block.modules()}
        shared = [name for name, m in model.named_modules() if id(m) not in inside
                  for leaf, p in m._parameters.items() if p is not None and id(p) in offloaded]
        if shared:  # a tied weight would be read by a module that does not stream it in
            raise ValueError(f"offloaded parameters are also used outside the blocks: {shared[:3]}")
        with torch.no_grad():
            for p in model.parameters():
                if id(p) not in offloaded:
                    p.data = p.data.to(self.device)
            for name, buffer in model.named_buffers():  # buffers are small: they stay on the device
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = buffer.to(self.device)
        self.blocks = [_Block(i, module) for i, module in enumerate(blocks)]
        totals: dict[torch.dtype, int] = {}
        for block in self.blocks:
            for dtype, size in block.sizes.items():
                totals[dtype] = totals.get(dtype, 0) + size
        self.arena = HostArena(totals)
        used = dict.fromkeys(totals, 0)
        for block in self.blocks:
            block.move_to({dtype: self.arena.flats[dtype][used[dtype] : used[dtype] + size]
                           for dtype, size in block.sizes.items()})
            for dtype, size in block.sizes.items():
                used[dtype] += size
        if self.gpu:
            self.arena.pin()
        largest: dict[torch.dtype, int] = {}
        for block in self.blocks:
            for dtype, size in block.sizes.items():
                largest[dtype] = max(largest.get(dtype, 0), size)
        self._all_slots = [_Slot(largest, self.device) for _ in range(slots)]
        self.slots = deque(self._all_slots)  # the free ones
        if self.gpu:
            self.upload_stream, self.write_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self._optimizers: list = []
        # Binding is a *global* pre-hook, registered before any Perturbation's (global hooks run first, in order of
        # registration): a streamed leaf module (embedding, head) must be bound before its weights are perturbed,
        # or the perturbed copy is made of the host buffer and dropped by the binding. Release is a module hook,
        # which runs after the global ones, so after a perturbation has handed the weights back.
        self._by_module = {id(block.module): block for block in self.blocks}
        engine = weakref.ref(self)  # the process-wide hook must not keep the engine alive

        def before(module, args):
            alive = engine()
            block = alive and alive._by_module.get(id(module))
            if block is not None and block.module is module:
                alive._enter(block)

        bind_hook = register_module_forward_pre_hook(before)
        weakref.finalize(self, bind_hook.remove)
        self._handles = [bind_hook]
        for block in self.blocks:
            self._handles.append(block.module.register_forward_hook(self._hook_after(block), always_call=True))

    # -- streams and events (no-ops on a CPU device, where copies are synchronous) --

    def _stream(self, stream):
        return torch.cuda.stream(stream) if self.gpu else nullcontext()

    def _record(self, stream=None):
        if not self.gpu:
            return None
        event = torch.cuda.Event()
        event.record(stream or torch.cuda.current_stream(self.device))
        return event

    def _wait(self, event, stream=None) -> None:
        if event is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(event)

    # -- the pipeline ------------------------------------------------------------

    def _upload(self, block: _Block) -> bool:
        """Starts copying ``block`` into a free slot; False when every slot is busy."""
        if block.slot is not None:
            return True
        if not self.slots:
            return False
        slot = self.slots.popleft()
        stream = self.upload_stream if self.gpu else None
        self._wait(slot.free_after, stream)  # its previous block has been read and written back
        self._wait(block.written_back, stream)  # the host copy is final
        with self._stream(stream):
            for dtype, host in block.host.items():
                slot.flats[dtype][: host.numel()].copy_(host, non_blocking=True)
        block.uploaded = self._record(stream)
        block.slot = slot
        return True

    def _enter(self, block: _Block) -> None:
        block.depth += 1
        if block.depth == 1:  # deeper: a stacked evaluation re-running a bound leaf module
            self._bind(block, prefetch=True)

    def _bind(self, block: _Block, prefetch: bool = False) -> None:
        """Makes the block's parameters views of its slot (uploading it first if it was not
        prefetched), with its pending updates applied."""
        if not self._upload(block):
            raise RuntimeError("offload: no free slot for a block; is a block running inside another?")
        self._wait(block.uploaded)
        block.bind(block.slot.flats)
        if prefetch and block.index + 1 < len(self.blocks):
            self._upload(self.blocks[block.index + 1])  # overlaps this block's compute
        self._apply_pending(block)

    def _hook_after(self, block: _Block):
        def after(module, args, output):
            block.depth -= 1
            if block.depth:
                return
            self._release(block)
            if block.index == len(self.blocks) - 1:
                self._upload(self.blocks[0])  # the next pass (step) starts with block 0
        return after

    def _release(self, block: _Block) -> None:
        slot = block.slot
        if slot is None:  # its forward failed before it was bound
            return
        if block.dirty:
            done = self._record()
            stream = self.write_stream if self.gpu else None
            self._wait(done, stream)
            with self._stream(stream):
                for dtype, host in block.host.items():
                    host.copy_(slot.flats[dtype][: host.numel()], non_blocking=True)
            block.written_back = slot.free_after = self._record(stream)
            block.dirty = False
        else:
            slot.free_after = self._record()
        block.bind(block.host)
        block.slot = None
        self.slots.append(slot)

    # -- pending updates ------------------------------------------------------------

    def attach(self, optimizer) -> None:
        """Let ``optimizer`` (a :class:`zotune.MeZO`) hand over the updates of the offloaded parameters."""
        optimizer.defer_updates([p for block in self.blocks for p in block.params], self.receive, self.device)
        self._optimizers.append(optimizer)

    def receive(self, optimizer, record) -> None:
        for block in self.blocks:
            block.pending.append((optimizer, record))

    def _apply_pending(self, block: _Block) -> None:
        for optimizer, record in block.pending:
            if optimizer.apply_step(record, only=block.ids):
                block.dirty = True
        block.pending.clear()

    def flush(self, merge: bool = False) -> None:
        """Applies every pending update (with ``merge``, also the factored low-rank updates),
        writes the blocks back and drops prefetched copies: afterwards the host buffers hold
        the weights and the host may read or write them."""
        for block in self.blocks:
            if block.pending or merge:
                self._bind(block)
                if merge and any(optimizer.merge_factors(only=block.ids) for optimizer in self._optimizers):
                    block.dirty = True
            if block.slot is not None:
                self._release(block)
        if self.gpu:
            torch.cuda.synchronize(self.device)
        for block in self.blocks:
            block.uploaded = block.written_back = None
        for slot in self._all_slots:
            slot.free_after = None

    def close(self) -> None:
        """Flushes and removes the hooks; the blocks stay in host memory."""
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def device_bytes(self) -> int:
        """Bytes of the device slots (what the offloaded blocks cost on the device)."""
        return sum(f.numel() * f.element_size() for slot in self._all_slots for f in slot.flats.values())

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory holding the offloaded blocks (exactly their weights: no rounding)."""
        return self.arena.nbytes
