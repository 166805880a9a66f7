"""The rank side of the multi-process tests, started by torchrun (gloo, CPU):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_child.py api OUT
    python -m torch.distributed.run ... tests/distributed_child.py backend OUT
    python -m torch.distributed.run ... tests/distributed_child.py train OUT [STOP] -- <zotune train arguments>

``api``: MeZO and a first-order average through the Python API on a tiny model; rank 0
also runs the one-process references in its own process (same threads, same kernels)
and writes ``OUT/api.json`` with what the test compares. ``backend``: ``setup()`` where
rank 0 has a GPU per process and rank 1 does not; each rank writes the backend it got to
``OUT/backend-R.json``. ``train``: ``zotune train`` on every rank; each rank writes
``OUT/rank-R.json`` with its exit code and the paths it wrote under the run folder. With STOP, rank 0 sends itself SIGUSR1 after that many
steps (a scheduler's preemption notice) and every rank must stop at that step.
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package: its tiny models

from tests.conftest import VOCAB, restore, snapshot, tiny_model  # noqa: E402
from zotune import MeZO, cli  # noqa: E402
from zotune.recipe import train as recipe  # noqa: E402
from zotune.engine import distributed, sharding  # noqa: E402


def batch_losses(model, ids):
    return lambda rows: (lambda: model(input_ids=ids[rows], labels=ids[rows]).loss)


def run_mezo(model, closure, steps, **options):
    optimizer = MeZO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=3, **options)
    for _ in range(steps):
        optimizer.step(closure)
    return [record.grads for record in optimizer.trajectory.steps]


def api(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    model = tiny_model("llama")
    initial = snapshot(model)
    loss_of = batch_losses(model, ids)
    mine = slice(rank * 2, rank * 2 + 2)
    result = {}

    data = distributed.Parallel("data", rank, world)
    result["data_grads"] = run_mezo(model, loss_of(mine), 3, parallel=data)
    data_weights = snapshot(model)

    restore(model, initial)
    spread = distributed.Parallel("perturbations", rank, world)
    result["spread_grads"] = run_mezo(model, loss_of(slice(None)), 3, n_samples=3, parallel=spread)
    spread_weights = snapshot(model)

    restore(model, initial)  # first order: the mean gradient of the slices, and the mean loss
    model.zero_grad()
    loss = loss_of(mine)()
    loss.backward()
    result["fo_loss"] = float(distributed.average_gradients(data, model.parameters(), loss))
    averaged = {name: p.grad.clone() for name, p in model.named_parameters()}

    # What one step sends: the collectives' payloads during a step of 4 directions.
    restore(model, initial)
    sent, real_all_reduce = [], dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        run_mezo(model, loss_of(mine), 1, n_samples=4, parallel=data)
    finally:
        dist.all_reduce = real_all_reduce
    result["bytes_per_step_n4"] = sent

    # Sharded (FSDP2): each rank holds half the rows of every weight; the same steps as data parallel.
    sharded_model = tiny_model("llama")
    aliases = sharding.shard_model(sharded_model, list(sharded_model.model.layers), data)
    optimizer = MeZO(sharded_model.named_parameters(), lr=1e-2, eps=1e-3, seed=3, parallel=data)
    optimizer.forward_aliases = aliases
    sharded_loss = batch_losses(sharded_model, ids)(mine)
    for _ in range(3):
        optimizer.step(sharded_loss)
    result["sharded_grads"] = [record.grads for record in optimizer.trajectory.steps]
    gathered = sharding.full_tensors(sharded_model.named_parameters())
    result["sharded_same_weights"] = all(torch.equal(gathered[k], v) for k, v in data_weights.items())
    result["sharded_holds_half"] = sum(p.to_local().numel() for p in sharded_model.parameters()) < \
        0.6 * sum(p.numel() for p in sharded_model.parameters())

    if rank == 0:  # the one-process references, in this process
        restore(model, initial)
        halves = [loss_of(slice(0, 2)), loss_of(slice(2, 4))]
        mean_of_slices = lambda: (halves[0]().double() + halves[1]().double()) / 2  # noqa: E731
        result["data_reference_grads"] = run_mezo(model, mean_of_slices, 3)
        result["data_same_weights"] = all(torch.equal(data_weights[k], v) for k, v in snapshot(model).items())
        restore(model, initial)
        result["whole_batch_grads"] = run_mezo(model, loss_of(slice(None)), 3)
        result["whole_batch_max_weight_difference"] = max(
            float((data_weights[k] - v).abs().max()) for k, v in snapshot(model).items())
        restore(model, initial)
        result["spread_reference_grads"] = run_mezo(model, loss_of(slice(None)), 3, n_samples=3)
        result["spread_same_weights"] = all(torch.equal(spread_weights[k], v) for k, v in snapshot(model).items())
        restore(model, initial)
        model.zero_grad()
        whole = loss_of(slice(None))()
        whole.backward()
        result["fo_reference_loss"] = float(whole)
        result["fo_max_grad_difference"] = max(float((averaged[n] - p.grad).abs().max())
                                               for n, p in model.named_parameters())
        result["fo_max_grad"] = max(float(p.grad.abs().max()) for p in model.parameters())
        (out / "api.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def backend(out: Path) -> None:
    rank = int(os.environ["RANK"])
    distributed.gpu_per_process = lambda: rank == 0
    distributed.setup()
    (out / f"backend-{rank}.json").write_text(json.dumps(dist.get_backend()))
    dist.destroy_process_group()


def record_writes(run_dir: Path, written: list[str]) -> None:
    """Notes every path under ``run_dir`` that this process opens for writing, creates or moves."""
    run_dir = run_dir.resolve()

    def note(path) -> None:
        try:
            resolved = Path(path).resolve()
        except (TypeError, ValueError):
            return
        if resolved == run_dir or run_dir in resolved.parents:
            written.append(str(resolved.relative_to(run_dir)))

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_
    for name in ("mkdir", "write_text", "write_bytes", "touch", "unlink", "rename", "replace"):
        real = getattr(Path, name)

        def wrapper(self, *args, _real=real, **kwargs):
            note(self)
            return _real(self, *args, **kwargs)

        setattr(Path, name, wrapper)
    for name in ("replace", "rename", "mkdir", "makedirs", "unlink", "remove"):
        real = getattr(os, name)

        def os_wrapper(path, *args, _real=real, **kwargs):
            note(path)
            return _real(path, *args, **kwargs)

        setattr(os, name, os_wrapper)


def train(out: Path, stop: int | None, argv: list[str]) -> int:
    rank = int(os.environ["RANK"])
    run_dir = Path(argv[argv.index("--output") + 1] if "--output" in argv else argv[argv.index("--resume") + 1])
    written: list[str] = []
    if rank != 0:
        record_writes(run_dir, written)
    if stop is not None and rank == 0:
        original = recipe.Run.train_step

        def step(self, index):
            record = original(self, index)
            if index + 1 == stop:
                os.kill(os.getpid(), signal.SIGUSR1)  # handled like a scheduler's notice: the flag only
            return record

        recipe.Run.train_step = step
    code = cli.main(argv)
    (out / f"rank-{rank}.json").write_text(json.dumps({"code": code, "written": sorted(set(written))}))
    return code


if __name__ == "__main__":
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    if scenario == "api":
        api(out)
    elif scenario == "backend":
        backend(out)
    else:
        rest = sys.argv[3:]
        split = rest.index("--")
        stop = int(rest[0]) if split else None
        sys.exit(train(out, stop, rest[split + 1:]))
