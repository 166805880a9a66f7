"""Several processes, one run: data-parallel and perturbation-parallel zeroth order on torch.distributed.

Between ranks a zeroth-order step needs only the losses of its perturbed points: every
rank draws the same seeds, so once all ranks hold the same 2n losses they compute the same
projected gradients and write the same update, with no weights or gradients exchanged.

* ``data``: each rank evaluates every perturbed point on its own slice of the batch
  (equal slices, in rank order). One all-reduce of the 2n float64 losses (sum, then divided
  by the world size) gives every rank the batch's losses: the mean of the slices' mean
  losses. Parts that train by first order (LMAO's adapters, HZO's deep blocks, FT) average
  their gradients in one all-reduce of the flattened gradients, before clipping.
* ``perturbations`` (DistZO2): each rank evaluates the points of its own samples (sample j
  on rank j mod world size; the unperturbed point, when the estimator has one, on rank 0)
  on the whole batch and puts 0 for the others, so the same all-reduce (a sum) gives every
  rank all the losses exactly (x + 0 = x): the 1-process n-SPSA run, bit for bit.

Only rank 0 writes files, logs and progress bars (:attr:`Parallel.main`).

Under torchrun the ranks use NCCL when every one of them has a GPU of its own, gloo on CPU
tensors otherwise (more processes than GPUs on a machine, or none); ``ZOTUNE_DIST_BACKEND``
(``gloo`` or ``nccl``) forces one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zotune.errors import UserError, unknown

MODES = ("data", "perturbations")
BACKENDS = ("gloo", "nccl")
BACKEND_VARIABLE = "ZOTUNE_DIST_BACKEND"


@dataclass(frozen=True)
class Parallel:
    """How this process takes part in a multi-process run."""

    mode: str
    rank: int
    world: int
    group: object = None  # the process group; None is the default group

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where the backend's collectives take their tensors."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")

    # -- who does what -------------------------------------------------------

    def check_batch(self, batch_size: int) -> None:
        if self.mode == "data" and batch_size % self.world:
            raise UserError(f"--batch-size {batch_size} does not split into {self.world} equal slices (one per "
                            f"process): use a multiple of {self.world}, or --parallel perturbations")

    def batch_slice(self, items: list) -> list:
        """This rank's share of a training batch (data mode; the whole batch otherwise)."""
        if self.mode != "data":
            return list(items)
        self.check_batch(len(items))
        size = len(items) // self.world
        return list(items[self.rank * size:(self.rank + 1) * size])

    def evaluates(self, sample: int | None) -> bool:
        """Whether this rank evaluates the points of ``sample``. Every rank evaluates the
        unperturbed point (None), since a first-order phase may need its loss's graph."""
        return self.mode != "perturbations" or sample is None or sample % self.world == self.rank

    def contributes(self, sample: int | None) -> bool:
        """Whether this rank's loss of ``sample`` enters the sum (perturbation mode: its owner's alone)."""
        return self.mode != "perturbations" or (sample or 0) % self.world == self.rank

    # -- collectives -------------------------------------------------------------

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        moved = tensor.to(self.device)
        dist.all_reduce(moved, op=op, group=self.group)
        return moved.to(tensor.device)

    def combine_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The step's float64 losses on every rank, from each rank's own (see the module docstring)."""
        total = self._all_reduce(losses.to(torch.float64))
        return total / self.world if self.mode == "data" else total

    @torch.no_grad()
    def average_gradients(self, params, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """Data mode: every rank's gradients of ``params`` become their mean over the ranks, in
        one all-reduce per gradient dtype (``loss``, the rank's loss, rides along in float32
        and comes back averaged, still a tensor: nothing here waits for the device). In
        perturbation mode every rank saw the whole batch already: nothing to do."""
        if self.mode != "data":
            return loss
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in params:
            if param.grad is not None:
                buckets.setdefault(param.grad.dtype, []).append(param.grad)
        if loss is not None and torch.float32 not in buckets:
            buckets[torch.float32] = []
        for dtype, grads in buckets.items():
            device = grads[0].device if grads else self.device
            riders = [loss.detach().reshape(1).to(device, torch.float32)] if loss is not None and dtype == torch.float32 \
                else []
            flat = torch.cat([g.reshape(-1) for g in grads] + riders)
            flat = self._all_reduce(flat) / self.world
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()
            if riders:
                loss = flat[-1]
        return loss

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (evaluation counts)."""
        return self._all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def agree(self, value: int) -> int:
        """The largest of the ranks' ``value`` (a stop request seen by any rank stops them all at the same step)."""
        return int(self._all_reduce(torch.tensor([int(value)], dtype=torch.int64), dist.ReduceOp.MAX))

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def rank() -> int:
    """This process's rank in an initialised process group; 0 otherwise."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def average_gradients(parallel: Parallel | None, params, loss: torch.Tensor) -> torch.Tensor:
    """The detached ``loss``; in a data-parallel run, the ranks' mean loss, and the gradients
    of ``params`` replaced by their mean (call it between backward and clipping). It stays
    on the device: the caller reads it with the step's other values."""
    loss = loss.detach()
    return loss if parallel is None else parallel.average_gradients(list(params), loss)


def gpu_per_process() -> bool:
    """Whether this machine has a GPU for each process torchrun started on it."""
    # Without torchrun's LOCAL_WORLD_SIZE, assume every rank shares this machine: gloo is slower, NCCL would fail.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return torch.cuda.is_available() and local_world <= torch.cuda.device_count()


def choose_backend(every_rank_has_gpu: bool) -> str:
    """The process group's backend, given whether every rank has a GPU of its own."""
    forced = os.environ.get(BACKEND_VARIABLE, "").strip().lower()
    if not forced:
        return "nccl" if every_rank_has_gpu else "gloo"
    if forced not in BACKENDS:
        raise UserError(f"{BACKEND_VARIABLE}: {unknown('backend', forced, BACKENDS)}")
    if forced == "nccl" and not every_rank_has_gpu:
        raise UserError(f"{BACKEND_VARIABLE}=nccl needs a GPU for every process, and a machine has more processes "
                        f"than GPUs: start at most one process per GPU, or unset {BACKEND_VARIABLE} to use gloo")
    return forced


def _init_from_torchrun() -> None:
    store, rank, world = next(dist.rendezvous("env://"))
    # Every rank must pick the same backend, and machines may differ: each publishes its own
    # verdict through torchrun's store, and all decide on all of them.
    votes = dist.PrefixStore("zotune/gpu-per-process", store)
    votes.set(str(rank), "1" if gpu_per_process() else "0")
    keys = [str(other) for other in range(world)]
    votes.wait(keys)
    backend = choose_backend(all(votes.get(key) == b"1" for key in keys))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # The prefix init_process_group gives the store of its own rendezvous: the group's keys stay apart from torchrun's.
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)


def setup(mode: str = "data") -> Parallel | None:
    """The Parallel of this process: from an initialised process group, or from torchrun's
    environment (initialising the group, see the module docstring); None for one process."""
    if mode not in MODES:
        raise UserError(f"--parallel {mode!r} is not one of {', '.join(MODES)}")
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        _init_from_torchrun()
    if dist.get_world_size() <= 1:
        return None
    return Parallel(mode, dist.get_rank(), dist.get_world_size())
