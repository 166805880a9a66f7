"""zotune methods inside transformers.Trainer (zotune.integrations.trainer.ZOTrainer), on a tiny random llama, CPU."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from transformers import TrainingArguments, get_scheduler

from tests.conftest import VOCAB, WORDS, save_tiny_model, snapshot, tiny_model
from zotune.integrations.trainer import MethodOptimizer, ZOTrainer
from zotune.methods import MeZOConfig, MeZOMethod

STEPS, BATCH = 4, 4
FAST = {  # configs with rates large enough that a few steps visibly change the weights
    "mezo": {"lr_zo": 1e-3},
    "lmao": {"lr_fo": 1e-2, "lr_zo": 1e-3},
    "hzo": {"lr_fo": 1e-2, "lr_zo": 1e-3, "resample_every": 2},  # default stacked, joint, low-rank factors
    "ft": {"lr_fo": 1e-3},
    "lora-ft": {"lr_fo": 1e-2},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A tiny model gains nothing from intra-op threads, and on a busy 2-core machine they spin (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dataset(n: int = 16, length: int = 10):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def arguments(folder, **overrides):
    values = dict(output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=BATCH, use_cpu=True,
                  report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                  lr_scheduler_type="constant")
    return TrainingArguments(**{**values, **overrides})


class Recording(ZOTrainer):
    """Keeps the batches the Trainer fed, to drive the same steps directly."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return super().training_step(model, inputs, num_items_in_batch)


def merged(trainer):
    """Every weight, with pending low-rank factors written in (HZO's default merge='resample')."""
    if trainer.method.zo is not None:
        trainer.method.zo.merge_factors()
    return snapshot(trainer.model)


def check_trained(name, trainer, before):
    """The weights each method trains have changed (``before``: the method's model before training)."""
    assert trainer.state.global_step == STEPS
    after = merged(trainer)
    changed = {n for n, p in after.items() if not torch.equal(p, before[n])}
    if name in ("mezo", "ft", "lmao"):  # every weight (LMAO: the base by ZO, the adapters by AdamW)
        assert any("embed_tokens" in n for n in changed) and any("layers.1.mlp" in n for n in changed)
    if name in ("lmao", "lora-ft"):
        assert any("lora_B" in n for n in changed)
    if name == "hzo":  # shallow blocks by zeroth order, the last block by AdamW
        assert any("layers.0." in n for n in changed) and any("layers.1." in n for n in changed)
    if trainer.method.zo is not None:
        assert trainer.method.zo.steps_done == STEPS
        assert "projected_grad" in trainer.state.log_history[0]


@pytest.mark.parametrize("name", ["ft", "lora-ft"])  # mezo, lmao and hzo: in the resume test below
def test_first_order_methods_train_inside_the_trainer(name, tmp_path):
    trainer = ZOTrainer(tiny_model("llama"), arguments(tmp_path), method=name, method_config=FAST[name],
                        train_dataset=dataset())
    before = snapshot(trainer.model)  # the method's model: LoRA methods wrap it
    trainer.train()
    check_trained(name, trainer, before)


def test_mezo_in_the_trainer_is_the_direct_run_and_the_trainer_adds_no_update(tmp_path):
    model = tiny_model("llama")
    trainer = Recording(model, arguments(tmp_path, lr_scheduler_type="linear"), method="mezo",
                        method_config={"lr_zo": 1e-3}, seed=3, train_dataset=dataset())
    trainer.train()
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)  # accelerate wrapped the method's optimizer
    assert isinstance(trainer.optimizer.optimizer, MethodOptimizer)
    after = snapshot(trainer.model)
    trainer.optimizer.step()  # what the Trainer calls after each training_step: no second update
    trainer.optimizer.zero_grad()
    assert all(torch.equal(p, after[n]) for n, p in trainer.model.named_parameters())

    direct = tiny_model("llama")
    method = MeZOMethod(direct, MeZOConfig(lr_zo=1e-3), seed=3, steps=STEPS)
    schedule = get_scheduler("linear", method.optimizer, num_warmup_steps=0, num_training_steps=STEPS)
    for batch in trainer.batches:
        method.step(lambda copies=None, batch=batch: direct(**batch).loss)
        schedule.step()
    for name, param in direct.named_parameters():
        assert torch.equal(param, after[name]), name
    lrs = [record.lrs[0] for record in trainer.method.zo.trajectory.steps]
    assert lrs == [record.lrs[0] for record in method.optimizer.trajectory.steps]
    assert lrs == [1e-3 * (1 - t / STEPS) for t in range(STEPS)]  # the Trainer's scheduler set MeZO's lr


@pytest.mark.parametrize("name", ["mezo", "lmao", "hzo"])
def test_resume_from_a_trainer_checkpoint_is_bit_identical(name, tmp_path):
    config = {**FAST[name], **({"direction": "lowrank", "merge": "resample", "resample_every": 3}
                               if name == "mezo" else {})}
    args = arguments(tmp_path / "a", save_strategy="steps", save_steps=2, lr_scheduler_type="linear")
    whole = ZOTrainer(tiny_model("llama"), args, method=name, method_config=config, train_dataset=dataset())
    before = snapshot(whole.model)
    whole.train()
    args = arguments(tmp_path / "b", save_strategy="no", lr_scheduler_type="linear")
    resumed = Recording(tiny_model("llama"), args, method=name, method_config=config, train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert len(resumed.batches) == STEPS - 2 and resumed.method.zo.steps_done == STEPS
    assert resumed.method.zo.trajectory.steps == whole.method.zo.trajectory.steps
    a, b = merged(whole), merged(resumed)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    check_trained(name, whole, before)


def test_stacked_mezo_and_save_model_writes_a_replayable_trajectory(tmp_path):
    trainer = ZOTrainer(tiny_model("llama"), arguments(tmp_path), method="mezo",
                        method_config={"lr_zo": 1e-3, "stacked": True}, train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "trajectory.json").is_file()
    config = trainer.method.config
    replayed = MeZOMethod.replay(tiny_model("llama"), config, tmp_path / "final" / "trajectory.json")
    initial = snapshot(tiny_model("llama"))
    for name, param in replayed.named_parameters():
        assert torch.equal(param, dict(trainer.model.named_parameters())[name]), name
        assert not torch.equal(param, initial[name]) or param.ndim < 2, name


def test_the_readme_example_runs(tmp_path):
    """The README's example, on the tiny model folder instead of SmolLM2 and with 3 steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    name = save_tiny_model(tmp_path / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name)
    texts = [" ".join(WORDS[i:i + 3 + i % 4]) for i in range(12)]
    train = [tokenizer(text) for text in texts]
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                             lr_scheduler_type="constant", logging_steps=1, save_steps=2, use_cpu=True)
    trainer = ZOTrainer(model, args, method="mezo", method_config={"lr_zo": 1e-3, "eps": 1e-3}, train_dataset=train,
                        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "run" / "checkpoint-2" / "optimizer.pt").is_file()
    assert (tmp_path / "run" / "trajectory.json").is_file() and (tmp_path / "run" / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict().keys() == model.state_dict().keys()


def test_settings_the_trainer_cannot_honour_are_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        ZOTrainer(model, arguments(tmp_path, gradient_accumulation_steps=2), method="mezo")
    with pytest.raises(ValueError, match="optimizers"):
        ZOTrainer(model, arguments(tmp_path), method="mezo", optimizers=(torch.optim.SGD(model.parameters(), 0.1),
                                                                         None))


def ddp_worker(out: str) -> None:
    """One process of the test below (torchrun): writes what it trained to rank<R>.json."""
    torch.set_num_threads(1)
    result = {}
    for name in ("mezo", "hzo"):  # hzo: stacked copies, and first-order gradients that DDP does not see
        trainer = ZOTrainer(tiny_model("llama"), arguments(Path(out) / name), method=name,
                            method_config=FAST[name], train_dataset=dataset())
        before = snapshot(trainer.model)
        trainer.train()
        after = merged(trainer)
        result[name] = {"processes": trainer.accelerator.num_processes,
                        "grads": [record.grads for record in trainer.method.zo.trajectory.steps],
                        "changed": sum(not torch.equal(after[n], before[n]) for n in after),
                        "sha256": hashlib.sha256(b"".join(t.numpy().tobytes() for t in after.values())).hexdigest()}
    (Path(out) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_ddp_processes_take_the_same_steps(tmp_path):
    """Two CPU processes (gloo), each with its half of the batches: one loss value for all, so one update."""
    root = str(Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__, str(tmp_path)], env={**os.environ, "PYTHONPATH": root}, check=True, timeout=600,
                   capture_output=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    for name, result in ranks[0].items():
        assert result["processes"] == 2 and result["changed"] > 0, name


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
