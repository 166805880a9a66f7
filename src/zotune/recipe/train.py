"""The training recipe: load → set up → loop (step, log, evaluate, checkpoint) → save.

The method comes from the registry (``zotune.methods``): this loop knows nothing about
any particular one. A run folder holds ``config.yaml``, ``samples.json`` (the sampled
example ids), ``metrics.jsonl``, ``checkpoint/`` while a run is unfinished, then what
the method exports (``model/``, the peft ``adapter/``, ``trajectory.json``) and
``result.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zotune import methods
from zotune.recipe import checkpoint_modes
from zotune.recipe import report
from zotune import tasks
from zotune.recipe.checkpoint import find_checkpoint, write_checkpoint
from zotune.recipe.config import TrainConfig, from_mapping, load_run, upgrade
from zotune.recipe.evaluation import load_base
from zotune.tasks.features import SCALE_PROMPTS, HeadFeatures
from zotune.core.rng import hash64
from zotune.engine import distributed
from zotune.errors import UserError
from zotune.methods.registry import flag
from zotune.tasks.objectives import evaluate, loss_function, metric_of
from zotune.tasks.scoring import Scorer

RUN_FILES = ("config.yaml", "samples.json", "metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.partial",
             "model", "adapter", "first_order.safetensors",
             "trajectory.json", "result.json", "curves.png")
# Options that may change when a run is resumed; everything else must match the saved config.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "snapshot_every", "progress", "output", "parallel")


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGUSR1 during training: a resumable checkpoint was written.
    ``signal`` is the signal's number (the CLI exits with 128 + it)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signal = int(signum)


# What a scheduler sends before it preempts a job (SLURM: --signal=USR1@120, then TERM).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def prepare_output(config: TrainConfig, overwrite: bool, parallel=None) -> Path:
    out = Path(config.output)
    if (out / "config.yaml").exists() and not overwrite:
        raise UserError(f"{out} holds another run: pass --resume {out} to continue it, "
                        "--overwrite to replace it, or another --output")
    if parallel is not None:  # every rank has checked before rank 0 changes anything; then only rank 0 does
        parallel.barrier()
        if not parallel.main:
            parallel.barrier()
            return out
    if (out / "config.yaml").exists():
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".zotune-write-test").touch()
        (out / ".zotune-write-test").unlink()
    except OSError as error:
        raise UserError(f"cannot write the run folder {out} ({error.strerror or error}): choose another --output") \
            from None
    if parallel is not None:
        parallel.barrier()
    return out


def resume_config(run_dir: str, overrides: dict) -> TrainConfig:
    if not (Path(run_dir) / "config.yaml").is_file():
        raise UserError(f"--resume {run_dir}: no run there (no config.yaml)")
    values = load_run(Path(run_dir))
    saved = from_mapping(values).to_dict()
    overrides = upgrade(overrides, saved["method"])  # --lr and the like, read as the run's method reads them
    resumed = from_mapping({**values, **overrides, "output": run_dir})
    # Compared after parsing: an option the run's method does not use, or one given at its saved value, is no change.
    now = resumed.to_dict()
    changed = sorted(k for k in overrides if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        raise UserError(f"--resume keeps the run's settings; these cannot change: {', '.join(changed)}")
    return resumed


class Run:
    def __init__(self, config: TrainConfig, resume: bool, parallel: distributed.Parallel | None = None):
        self.config, self.resume, self.parallel = config, resume, parallel
        self.main = parallel is None or parallel.main  # the rank that writes files, logs and progress bars
        self.progress = config.progress and self.main
        if parallel is not None:
            parallel.check_batch(config.batch_size)
        self.out = Path(config.output)
        config.check_trainable()
        # The data first: its mistakes should not wait for a model to load.
        self.task = tasks.build_task(config)
        self.split = tasks.sample(self.task, config.n_train, config.n_dev, config.n_test, config.seed)
        # An offloaded model stays in host memory: the method moves what stays resident to the device. Processes
        # that share a GPU talk through gloo and compute on the CPU (FSDP2 cannot shard CUDA tensors over gloo).
        device = "cpu" if config.options.streams_blocks else (parallel.device.type if parallel is not None else None)
        model, self.tokenizer, self.kind = load_base(config, device, self.task)
        # The method wraps the model if it needs to (LoRA): score what it trains.
        self.method = methods.build(config.method, model, config.options, seed=config.seed, steps=config.steps)
        self.model = self.method.model
        self.method.distribute(parallel)
        # A sharded model's forwards are collectives: every rank scores every example, in step.
        self.eval_parallel = None if config.options.shards_weights else parallel
        self.checkpoints = checkpoint_modes.make(config.checkpoint, self.method, self.progress,
                                                 config.snapshot_every)
        self.scorer = Scorer(self.model, self.tokenizer, self.task.candidates, self.kind, config.max_length,
                             config.max_new_tokens, self.task.separator)
        self.metric = metric_of(self.task)  # accuracy, or token F1 for generation tasks
        # The configured rates, which --lr-schedule scales each step (a checkpoint holds the scaled ones).
        self.base_lrs = [group["lr"] for group in self.method.scheduled_groups]
        loss_function(self.scorer, self.task, [], config.objective)  # its refusals come before any training
        self.state = {"step": 0, "zero_shot": None, "dev": None, "train_seconds": 0.0}
        self._orders: dict[int, list[int]] = {}
        self._stop = False

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

    def check_samples(self):
        """A resumed run must see the examples it started with (a data file may have changed)."""
        path = self.out / "samples.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{path} is missing or damaged; restart the run with --overwrite") from None
        if saved != json.loads(json.dumps(self.split.ids())):
            raise UserError(f"the examples drawn now differ from {path}: the data changed since the run started; "
                            "restore it, or restart the run with --overwrite")

    # -- checkpoints ---------------------------------------------------------

    def save_checkpoint(self):
        self.method.flush()

        def fill(folder):
            (folder / "progress.json").write_text(json.dumps(self.state))
            return self.checkpoints.fill(folder, self.state["step"])

        if self.main:  # every rank holds the same weights and optimizer state
            write_checkpoint(self.out, fill)
        self._barrier()

    def _barrier(self):
        if self.parallel is not None:
            self.parallel.barrier()

    def load_checkpoint(self):
        if (self.out / "result.json").exists():
            raise UserError(f"the run in {self.out} has finished; start a new one with another --output")
        folder = find_checkpoint(self.out)
        if folder is None:
            raise UserError(f"the run in {self.out} has no checkpoint to resume from; use --overwrite to restart it")
        self.checkpoints.restore(folder)
        self.state = json.loads((folder / "progress.json").read_text())
        if not self.main:
            self._barrier()  # rank 0 tidies metrics.jsonl meanwhile
            return
        # A hard kill after a periodic checkpoint leaves rows of steps that will run again.
        metrics = self.out / "metrics.jsonl"
        rows = metrics.read_bytes().decode(errors="replace").splitlines(keepends=True) if metrics.is_file() else []
        kept, logged = [], set()
        for number, row in enumerate(rows, 1):
            try:
                step = json.loads(row)["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(rows):  # cut short by a kill while it was written: that step runs again
                    break
                raise UserError(f"{metrics} line {number} is damaged; repair or delete that line, then resume") \
                    from None
            if step <= self.state["step"]:
                kept.append(row if row.endswith("\n") else row + "\n")
                logged.add(step)
        metrics.write_text("".join(kept))
        lost = self.state["step"] - len(logged - {0})
        if lost:  # a log cut shorter than any kill leaves it: the weights are safe, the history is not
            print(f"zotune: warning: {metrics} lacks the rows of {lost} steps before the checkpoint (the file was "
                  "cut or emptied); the run goes on", file=sys.stderr)
        self._barrier()

    # -- the loop --------------------------------------------------------------

    def log(self, record: dict):
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def train_step(self, step: int) -> dict:
        batch = self.batch(step)
        if self.parallel is not None:
            batch = self.parallel.batch_slice(batch)
        loss_fn = loss_function(self.scorer, self.task, batch, self.config.objective, self.config.temperature,
                                seed=hash64("zotune-sampling", self.config.seed, step))
        factor = lr_factor(self.config.lr_schedule, step, self.config.steps, self.config.warmup_steps)
        for group, base in zip(self.method.scheduled_groups, self.base_lrs):
            group["lr"] = base * factor
        try:
            record = self.method.step(loss_fn)
        except FloatingPointError as error:  # a diverged run is the user's settings, not a bug
            raise UserError(str(error)) from None
        if not math.isfinite(record["loss"]):
            rates = " or ".join(flag(rate) for rate in self.config.options.rates())
            raise UserError(f"the training loss became {record['loss']} at step {step + 1}: lower {rates}")
        return {"step": step + 1, **record}

    def run(self) -> dict:
        config = self.config
        if self.resume:
            self.check_samples()
            self.load_checkpoint()
        else:
            self.checkpoints.start()
            if self.main:
                config.save(self.out / "config.yaml")
                (self.out / "samples.json").write_text(json.dumps(self.split.ids()))
            if config.zero_shot:
                self.state["zero_shot"] = self.evaluate(self.split.test, "zero-shot test")["score"]
                self.log({"step": 0, f"test_{self.metric}": self.state["zero_shot"]})
        self._prepare_head()
        previous = {signum: signal.signal(signum, self._request_stop) for signum in STOP_SIGNALS}
        try:
            self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self.finish()

    def _prepare_head(self):
        """--peft head: the frozen model reads the training prompts now, before the first step (again after a
        resume: the same numbers). The head measures its feature scale on the first 512 of them, and with
        --head-cache the steps reuse what it read of all of them. The time counts as training."""
        options = self.config.options
        if getattr(options, "peft", None) != "head":
            return
        measure = options.head_scale == "prompts"
        keep = options.head_cache and self.state["step"] < self.config.steps
        if not (measure or keep):
            return
        begin = time.perf_counter()
        prompts = list(dict.fromkeys(self.task.prompt(e) for e in self.split.train))
        features = HeadFeatures(self.scorer, self.scorer.head)
        # A task whose scoring reads the head at several positions (multi-token candidates) keeps neither: its
        # head keeps the scale it measured on random tokens, and its steps run a forward each.
        if features.fill(prompts if keep else prompts[:SCALE_PROMPTS], self.config.eval_batch_size, self.progress):
            if measure:
                self.scorer.head.measure(features.hidden_states(SCALE_PROMPTS))
            if keep:
                self.scorer.features = features
        self.state["train_seconds"] += time.perf_counter() - begin

    def _request_stop(self, signum, frame):
        if self._stop:  # a second signal: the user (or the scheduler) wants out now
            raise KeyboardInterrupt
        self._stop = signum

    def _loop(self):
        config = self.config
        bar = tqdm(total=config.steps, initial=self.state["step"], desc=f"{config.method}", disable=not self.progress,
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
                    self.state["dev"] = record[f"dev_{self.metric}"] = self.evaluate(self.split.dev, "dev")["score"]
                self.log(record)
                postfix = {"loss": f"{record['loss']:.4f}"}
                if self.state["dev"] is not None:
                    postfix["dev"] = f"{self.state['dev']:.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
                if self.parallel is not None:  # a signal seen by any rank stops every rank after this step
                    self._stop = self.parallel.agree(int(self._stop))
                if self._stop or (config.save_every and step % config.save_every == 0):
                    self.save_checkpoint()
                if self._stop:
                    signum = signal.SIGINT if self._stop is True else self._stop
                    name = signal.Signals(signum).name
                    raise Interrupted(f"stopped by {name} at step {step}, checkpoint saved; continue with: "
                                      f"zotune train --resume {self.out}", signum)

    def evaluate(self, examples, desc) -> dict:
        return evaluate(self.scorer, self.task, examples, self.config.eval_batch_size, desc, self.progress,
                        self.eval_parallel)

    def finish(self) -> dict:
        test = self.evaluate(self.split.test, "test")["score"]
        self.method.flush()
        self.method.prepare_export()
        if self.main:
            self.method.export(self.out, self.model, self.tokenizer)
        steps = self.state["step"]
        result = {
            "model": self.config.model, "task": self.config.task, "method": self.config.method, "steps": steps,
            "metric": self.metric, f"zero_shot_{self.metric}": self.state["zero_shot"], f"test_{self.metric}": test,
            f"dev_{self.metric}": self.state["dev"],
            "n_test": len(self.split.test), "train_seconds": round(self.state["train_seconds"], 2),
            "examples_per_s": round(steps * self.config.batch_size / max(self.state["train_seconds"], 1e-9), 2),
            "peak_memory_mb": peak_memory_mb(),
        }
        if self.main:
            (self.out / "result.json").write_text(json.dumps(result, indent=2))
            for name in ("checkpoint", "checkpoint.old", "checkpoint.partial"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            report.curves(self.out)  # curves.png, when matplotlib is installed (zotune[plot])
        self._barrier()
        return result


def lr_factor(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """The multiple of the configured learning rates at ``step`` (0-based) of ``steps``. After the warm-up,
    transformers' schedules of the same names, so that a run reads like a Trainer run; the warm-up starts
    above 0, so that no step is wasted."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    remaining = (steps - step) / max(1, steps - warmup)  # in (0, 1]: the loop runs step < steps
    if schedule == "linear":
        return remaining
    return 0.5 * (1 + math.cos(math.pi * (1 - remaining)))


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux: process peak RSS


def train(config: TrainConfig, resume: bool = False) -> dict:
    """Runs (or resumes) a fine-tuning run described by ``config``; returns ``result.json``'s content.

    Under torchrun (or an initialised process group) every process runs it: see
    :mod:`zotune.engine.distributed`; only rank 0 writes the run folder."""
    parallel = distributed.setup(config.parallel)
    if not resume:
        prepare_output(config, config.overwrite, parallel)
    devices = list(range(torch.cuda.device_count()))
    # The run owns its RNG stream (dropout, LoRA init) without disturbing the caller's.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        return Run(config, resume, parallel).run()
