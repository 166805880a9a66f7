"""The training recipe: load → set up → loop (step, log, evaluate, checkpoint) → save.

A run folder holds ``config.yaml``, ``samples.json`` (the sampled example ids),
``metrics.jsonl``, ``checkpoint/`` while a run is unfinished, then the final weights
(``model/`` or the peft ``adapter/``), ``trajectory.json`` (MeZO) and ``result.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import zotune
from zotune import models, tasks
from zotune.config import TrainConfig
from zotune.errors import UserError
from zotune.mezo import decay_groups
from zotune.scoring import Scorer, evaluate

RUN_FILES = ("config.yaml", "samples.json", "metrics.jsonl", "checkpoint", "model", "adapter",
             "trajectory.json", "result.json")
# Options that may change when a run is resumed; everything else must match the saved config.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "progress", "output")


class Interrupted(Exception):
    """Ctrl-C during training: a resumable checkpoint was written."""


def prepare_output(config: TrainConfig, overwrite: bool) -> Path:
    out = Path(config.output)
    if (out / "config.yaml").exists():
        if not overwrite:
            raise UserError(f"{out} holds another run: pass --resume {out} to continue it, "
                            "--overwrite to replace it, or another --output")
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_config(run_dir: str, overrides: dict) -> TrainConfig:
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: no run there (no config.yaml)")
    from zotune.config import from_mapping, load_yaml

    values = load_yaml(str(saved))
    changed = sorted(k for k, v in overrides.items() if k not in RESUMABLE_CHANGES and values.get(k) != v)
    if changed:
        raise UserError(f"--resume keeps the run's settings; these cannot change: {', '.join(changed)}")
    values.update(overrides)
    values["output"] = run_dir
    return from_mapping(values)


class Run:
    def __init__(self, config: TrainConfig, resume: bool):
        self.config, self.resume = config, resume
        self.out = Path(config.output)
        # The data first: its mistakes should not wait for a model to load.
        self.task = tasks.build_task(config)
        self.split = tasks.sample(self.task, config.n_train, config.n_dev, config.n_test, config.seed)
        self.model, self.tokenizer, self.kind = models.load(config.model, config.dtype, config.model_kind)
        if config.method in ("lora-ft", "lmao"):
            self._wrap_lora()
        self.scorer = Scorer(self.model, self.tokenizer, self.task.candidates, self.kind, config.max_length)
        if config.method == "lmao":
            self.optimizer = zotune.LMAO(self.model, lr_lora=config.lr, lr_base=config.lr_base, eps=config.eps,
                                         weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
                                         distribution=config.distribution, n_samples=config.n_samples,
                                         seed=config.seed)
        elif config.method == "mezo":
            self.optimizer = zotune.MeZO(decay_groups(self.model.named_parameters(), config.weight_decay), lr=config.lr,
                                         eps=config.eps, n_samples=config.n_samples,
                                         distribution=config.distribution, seed=config.seed)
        else:
            self.optimizer = torch.optim.AdamW(decay_groups(self.model.named_parameters(), config.weight_decay), lr=config.lr)
        self.state = {"step": 0, "zero_shot": None, "dev": None, "train_seconds": 0.0}
        self._orders: dict[int, list[int]] = {}
        self._stop = False

    def _wrap_lora(self):
        self.model = models.add_lora(self.model, self.config.lora_r, self.config.lora_alpha, self.config.lora_modules)

    # -- data --------------------------------------------------------------

    def batch(self, step: int) -> list[tasks.Example]:
        """The examples of a step: a pure function of (seed, step), so resume replays the same order."""
        n, size = len(self.split.train), self.config.batch_size
        picked = []
        for i in range(step * size, (step + 1) * size):
            epoch = i // n
            if epoch not in self._orders:
                generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
                self._orders = {epoch: torch.randperm(n, generator=generator).tolist()}
            picked.append(self.split.train[self._orders[epoch][i % n]])
        return picked

    # -- checkpoints ---------------------------------------------------------

    def _changing(self) -> dict[str, torch.Tensor]:
        """The parameters the method updates: LMAO updates all of them, in two phases."""
        everything = self.config.method == "lmao"
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if everything or p.requires_grad}

    def save_checkpoint(self):
        final, partial = self.out / "checkpoint", self.out / "checkpoint.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        save_file(self._changing(), partial / "weights.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state()}, partial / "state.pt")
        (partial / "progress.json").write_text(json.dumps(self.state))
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)

    def load_checkpoint(self):
        folder = self.out / "checkpoint"
        if (self.out / "result.json").exists():
            raise UserError(f"the run in {self.out} has finished; start a new one with another --output")
        if not folder.is_dir():
            raise UserError(f"the run in {self.out} has no checkpoint to resume from; use --overwrite to restart it")
        weights = load_file(folder / "weights.safetensors")
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        saved = torch.load(folder / "state.pt", weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])  # inside the run's forked RNG: dropout resumes where it was
        self.state = json.loads((folder / "progress.json").read_text())
        # A hard kill after a periodic checkpoint leaves rows of steps that will run again.
        rows = (self.out / "metrics.jsonl").read_text().splitlines(keepends=True)
        kept = [row for row in rows if json.loads(row)["step"] <= self.state["step"]]
        (self.out / "metrics.jsonl").write_text("".join(kept))

    # -- the loop --------------------------------------------------------------

    def log(self, record: dict):
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def train_step(self, step: int) -> dict:
        examples = self.batch(step)
        prompts = [self.task.prompt(e) for e in examples]
        labels = [e.label for e in examples]
        record = {"step": step + 1}
        if self.config.method in ("mezo", "lmao"):
            if self.config.method == "lmao":  # the paper decays the adapters' rate linearly; resume-safe
                for group in self.optimizer.fo.param_groups:
                    group["lr"] = self.config.lr * (1 - step / self.config.steps)
            self.model.eval()  # dropout would make the two perturbed losses differ (LMAO's FO phase trains)
            try:
                loss = self.optimizer.step(lambda: self.scorer.loss(prompts, labels))
            except FloatingPointError as error:  # a diverged run is the user's settings, not a bug
                raise UserError(str(error)) from None
            record["projected_grad"] = sum(self.optimizer.last_step.grads) / self.config.n_samples
        else:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            value = self.scorer.loss(prompts, labels)
            value.backward()
            self.optimizer.step()
            loss = float(value.detach())
        if not math.isfinite(loss):
            raise UserError(f"the training loss became {loss} at step {step + 1}: lower --lr")
        record["loss"] = loss
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        return record

    def run(self) -> dict:
        config = self.config
        if self.resume:
            self.load_checkpoint()
        else:
            config.save(self.out / "config.yaml")
            (self.out / "samples.json").write_text(json.dumps(self.split.ids()))
            if config.zero_shot:
                self.state["zero_shot"] = self.evaluate(self.split.test, "zero-shot test")["accuracy"]
                self.log({"step": 0, "test_accuracy": self.state["zero_shot"]})
        previous = signal.signal(signal.SIGINT, self._request_stop)
        try:
            self._loop()
        finally:
            signal.signal(signal.SIGINT, previous)
        return self.finish()

    def _request_stop(self, signum, frame):
        if self._stop:  # a second Ctrl-C: the user wants out now
            raise KeyboardInterrupt
        self._stop = True

    def _loop(self):
        config = self.config
        bar = tqdm(total=config.steps, initial=self.state["step"], desc=f"{config.method}", disable=not config.progress,
                   dynamic_ncols=True)
        with bar:
            while self.state["step"] < config.steps:
                begin = time.perf_counter()
                record = self.train_step(self.state["step"])
                elapsed = time.perf_counter() - begin
                self.state["step"] += 1
                self.state["train_seconds"] += elapsed
                record["examples_per_s"] = config.batch_size / elapsed
                record["peak_memory_mb"] = peak_memory_mb()
                step = self.state["step"]
                if config.eval_every and step % config.eval_every == 0 and self.split.dev:
                    self.state["dev"] = record["dev_accuracy"] = self.evaluate(self.split.dev, "dev")["accuracy"]
                self.log(record)
                postfix = {"loss": f"{record['loss']:.4f}"}
                if self.state["dev"] is not None:
                    postfix["dev"] = f"{self.state['dev']:.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if self._stop or (config.save_every and step % config.save_every == 0):
                    self.save_checkpoint()
                if self._stop:
                    raise Interrupted(f"interrupted at step {step}; continue with: zotune train --resume {self.out}")

    def evaluate(self, examples, desc) -> dict:
        return evaluate(self.scorer, self.task, examples, self.config.eval_batch_size, desc, self.config.progress)

    def finish(self) -> dict:
        test = self.evaluate(self.split.test, "test")["accuracy"]
        method = self.config.method
        if method in ("lora-ft", "lmao"):
            self.model.save_pretrained(self.out / "adapter")
        if method in ("mezo", "lmao"):
            # LMAO's base weights alone: the initial model + this trajectory (zotune replay).
            self.optimizer.trajectory.save(self.out / "trajectory.json")
        if method != "lora-ft":
            merged = self.model.merge_and_unload() if method == "lmao" else self.model
            merged.save_pretrained(self.out / "model")
            self.tokenizer.save_pretrained(self.out / "model")
        steps = self.state["step"]
        result = {
            "model": self.config.model, "task": self.config.task, "method": self.config.method, "steps": steps,
            "zero_shot_accuracy": self.state["zero_shot"], "test_accuracy": test, "dev_accuracy": self.state["dev"],
            "n_test": len(self.split.test), "train_seconds": round(self.state["train_seconds"], 2),
            "examples_per_s": round(steps * self.config.batch_size / max(self.state["train_seconds"], 1e-9), 2),
            "peak_memory_mb": peak_memory_mb(),
        }
        (self.out / "result.json").write_text(json.dumps(result, indent=2))
        shutil.rmtree(self.out / "checkpoint", ignore_errors=True)
        return result


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux: process peak RSS


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Runs (or resumes) a fine-tuning run described by ``config``; returns ``result.json``'s content."""
    if not resume:
        prepare_output(config, config.overwrite)
    devices = list(range(torch.cuda.device_count()))
    # The run owns its RNG stream (dropout, LoRA init) without disturbing the caller's.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return Run(config, resume).run()
