"""Sharded zeroth order: each process keeps 1/N of every weight (FSDP2, torch's ``fully_shard``).

A zeroth-order step reads the weights only inside forwards, and FSDP2 already serves
those by all-gathering a block's shards just before the block runs. zotune perturbs the
gathered weights there, with each tensor's full z, so every loss is the unsharded run's.
The update ``W <- W - lr * sum_j c_j z_j`` is element-wise: each rank writes its own rows,
drawing z from the flat index of its shard's first element (counter-based directions),
which gives the numbers the unsharded run writes there. A sharded run therefore equals the
unsharded run bit for bit, and besides FSDP's all-gathers only the 2n losses cross ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from zotune.errors import UserError


def shard_model(model: nn.Module, blocks: list[nn.Module], parallel) -> dict[int, torch.Tensor]:
    """Shards ``model`` in place: each of ``blocks``, then the rest at the root. Returns, for
    each sharded parameter, the parameter object its module holds inside a forward (the
    gathered one, stable across forwards): what :class:`zotune.MeZO` must perturb."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(parallel.device.type, (parallel.world,))
    # The root too gives its weights back after a forward: FSDP2 would keep them gathered for a
    # backward, and a forward reading those stale copies would miss the updates of its shards.
    for module in [*blocks, model]:
        fully_shard(module, mesh=mesh, reshard_after_forward=True)
    sharded = dict(model.named_parameters())
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    gathered = {f"{prefix}.{name}" if prefix else name: param for prefix, module in model.named_modules()
                for name, param in module._parameters.items() if param is not None}
    for unit in reversed(units):
        unit.reshard()
    missing = [name for name in sharded if name not in gathered]
    if missing:
        raise UserError(f"--shard: FSDP2 does not expose the gathered weight of {missing[0]}")
    return {id(param): gathered[name] for name, param in sharded.items()}


def full_tensors(named) -> dict[str, torch.Tensor]:
    """The whole tensors of ``named`` (name, parameter) pairs, on the CPU: a collective (every rank calls it)."""
    return {name: full(param).detach().cpu().contiguous() for name, param in named}


def full(param: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's whole tensor (a collective); any other tensor as it is."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def save_gathered(folder, model, tensors: dict[str, torch.Tensor], tokenizer) -> None:
    """A Hugging Face model folder of a sharded model from its gathered ``tensors``
    (:func:`full_tensors`): what ``save_pretrained`` writes for the unsharded model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
