"""The bench row of ``--peft head`` (``--preset mezo-head``): a zeroth-order step on what the head reads, kept from
one forward of the batch, as a run with its kept features takes it (``zotune.tasks.features``). The forward that
reads each training prompt once per run is the ``forward`` row's half, not the step's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zotune.core.head import add_head, remove_head
from zotune.methods.mezo import MeZOConfig, MeZOMethod

HEAD = "mezo-head"
DIRECTIONS = 64  # the preset's


def head_step(model, ids: torch.Tensor, meter, lr: float) -> dict:
    head = add_head(model, [0, 1])  # two candidate words
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    try:
        trainer = MeZOMethod(model, MeZOConfig(peft="head", n_samples=DIRECTIONS, lr_zo=lr), seed=0,
                             steps=meter.repeats + 1)
        with torch.no_grad(), head.capturing() as record:
            model(input_ids=ids, logits_to_keep=1)
        hidden, logits = (t[:, -1] for t in record[0])
        kept = logits[:, head.token_ids].double()
        labels = torch.arange(len(ids), device=ids.device) % 2

        def loss(copies=None):
            return F.cross_entropy(head(hidden, kept, compact=True).float(), labels)

        result = meter(lambda: trainer.step(loss))
        result["note"] = f"{DIRECTIONS} directions on kept features; the run reads each training prompt once"
        return result
    finally:
        remove_head(model)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), True))
