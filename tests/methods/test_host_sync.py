"""A training step waits for the device once: the closures read only device tensors made
before the step, and the methods read their losses in one transfer (tests/host_sync.py)."""

import pytest

from zotune import methods
from zotune.assets import models
from zotune import tasks
from zotune.tasks.objectives import loss_function
from zotune.tasks.scoring import Scorer

from ..host_sync import HostSync


WORDS = ["the film is good", "a dull story", "lovely actors"]
TASK = tasks.Task("toy", "{text} It was", ["terrible", "great"],
                  [tasks.Example(f"e{i}", WORDS[i % 3], i % 2) for i in range(8)], [], "classification")
# (method, options, the step's reads): zo-first reads the first-order loss after the zeroth-order update.
STEPS = {
    "mezo": ("mezo", {}, 1),
    "mezo-stacked": ("mezo", {"stacked": True}, 1),
    "mezo-offload": ("mezo", {"offload": "cpu", "offload_embeddings": True}, 1),
    "mezo-lowrank-factored": ("mezo", {"direction": "lowrank", "merge": "resample"}, 1),
    "lmao": ("lmao", {}, 1),
    "hzo": ("hzo", {}, 1),
    "hzo-separate": ("hzo", {"stacked": False}, 1),
    "hzo-fo-first": ("hzo", {"order": "fo-first"}, 1),
    "hzo-zo-first": ("hzo", {"order": "zo-first", "estimator": "spsa"}, 2),
    "hzo-offload": ("hzo", {"offload": "cpu"}, 1),
    "ft": ("ft", {}, 1),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ..conftest import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("host-sync")))


@pytest.mark.parametrize("variant", STEPS)
def test_a_step_reads_the_device_once_and_copies_nothing_from_the_host(tiny, variant):
    name, options, reads = STEPS[variant]
    model, tokenizer, kind = models.load(tiny, device="cpu")
    entry = methods.get(name)
    method = entry.method(model, entry.config(**dict.fromkeys(entry.config.rates(), 1e-3), **options), seed=0, steps=10)
    scorer = Scorer(method.model, tokenizer, TASK.candidates, kind)
    for step in range(2):  # the first zeroth-order step also probes for weights read outside their modules
        closure = loss_function(scorer, TASK, TASK.train_pool[4 * step: 4 * step + 4])
        with HostSync() as sync:
            method.step(closure)
    assert sync.reads == reads, sync.seen
    assert sync.copies == 0, sync.seen


def test_the_counter_sees_a_batch_copied_inside_the_step(tiny):
    # The one-call form tokenizes and copies its batch when called: inside a step, that is what the closures avoid.
    model, tokenizer, kind = models.load(tiny, device="cpu")
    scorer = Scorer(model, tokenizer, TASK.candidates, kind)
    with HostSync() as sync:
        scorer.loss(["a dull story It was"], [0]).item()
    assert sync.copies >= 3 and sync.reads == 0  # ids, mask, labels; the item() is the test's, not zotune's
