"""What a resumable checkpoint holds, and how a run is rebuilt from it.

* ``full``: every weight the method trains, and its optimizer state.
* ``trajectory`` (zeroth-order methods): the weights the zeroth-order optimizer trains are
  a function of the initial weights and the recorded steps (seeds, coefficients, learning
  rates), a few hundred bytes each. The checkpoint keeps those steps, as append-only
  segments shared with the previous checkpoint through hard links, plus the weights that
  train by gradients (LMAO's adapters, HZO's deep blocks) and every optimizer state.
  Resume starts from the initial model (checked against its sha256) or from the latest
  snapshot of the zeroth-order weights (``--snapshot-every``), then replays the steps
  since through the optimizer's own update code: bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from zotune.recipe.checkpoint import current_checkpoint, link_or_copy, load_state, manifest_digests, save_state
from zotune.core.trajectory import TrajectoryStep
from zotune.engine.sharding import full
from zotune.errors import UserError, reason
from zotune import methods

MODES = ("full", "trajectory")
BASE_FORMAT = "zotune-trajectory-checkpoint/1"


def load_method_state(folder: Path) -> dict:
    if (folder / "state.json").is_file():
        return load_state(folder, "state")
    # Written by zotune before 0.2: read without unpickling code (tensors, numbers, containers only).
    try:
        return torch.load(folder / "state.pt", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any refusal or corruption: one line for the user
        why = reason(error)
        raise UserError(f"{folder / 'state.pt'} cannot be read safely ({why}); restart the run with "
                        "--overwrite") from None


def _copy_into(params: dict, tensors: dict, path: Path) -> None:
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UserError(f"{path} lacks {len(missing)} of the run's weights ({missing[0]}, ...); restart the run "
                        "with --overwrite")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


class FullCheckpoints:
    """Every trained weight and the optimizer state, at every checkpoint."""

    def __init__(self, method):
        self.method = method

    def start(self) -> None:
        pass

    def fill(self, folder: Path, step: int) -> dict:
        save_file(self.method.checkpoint_tensors(), folder / "weights.safetensors")
        save_state(folder, "state", {"optimizer": self.method.state_dict(), "rng": torch.get_rng_state()})
        return {}

    def _copy_weights(self, folder: Path) -> None:
        weights = load_file(folder / "weights.safetensors")
        with torch.no_grad():
            for name, param in self.method.model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])

    def restore(self, folder: Path) -> None:
        self._copy_weights(folder)
        saved = load_method_state(folder)
        self.method.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])  # inside the run's forked RNG: dropout resumes where it was


class TrajectoryCheckpoints(FullCheckpoints):
    """The zeroth-order weights as (initial model or snapshot) + recorded steps."""

    def __init__(self, method, progress: bool = True, snapshot_every: int = 0):
        super().__init__(method)
        self.zo = method.zo
        if self.zo is None:
            replaying = [name for name, entry in methods.METHODS.items() if entry.method.replays]
            raise UserError(f"--checkpoint trajectory needs a zeroth-order method ({', '.join(replaying)}): the "
                            "other methods train by gradients, which no seed rebuilds; use --checkpoint full")
        self.progress, self.snapshot_every = progress, snapshot_every
        self.keyed = {key: p for group in self.zo.param_groups for key, p in zip(group["keys"], group["params"])}
        owned = {id(p) for p in self.keyed.values()}
        self.others = {n for n, p in method.model.named_parameters() if id(p) not in owned}
        self.initial: str | None = None  # sha256 of the initial zeroth-order weights
        self.base = 0  # the step the snapshot (or the initial model, at 0) holds
        self.segments: list[list] = []  # [file name, first step, end step]
        self.replayed: tuple[int, float] | None = None  # steps replayed by restore() and the seconds it took

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for key, param in self.keyed.items():  # a sharded weight is gathered: a collective, on every rank
            digest.update(key.encode())
            digest.update(full(param).detach().reshape(-1).cpu().view(torch.uint8).numpy())
        return digest.hexdigest()

    def start(self) -> None:
        self.initial = self._fingerprint()

    def fill(self, folder: Path, step: int) -> dict:
        previous = current_checkpoint(folder.parent)
        known = manifest_digests(previous) if previous is not None and self.segments else {}
        linked = {}

        def share(name: str) -> None:
            link_or_copy(previous / name, folder / name)
            linked[name] = known[name]

        weights = {n: t for n, t in self.method.checkpoint_tensors().items() if n in self.others}
        save_file(weights, folder / "weights.safetensors")
        with self.zo.history_apart():
            state = self.method.state_dict()
        save_state(folder, "state", {"optimizer": state, "rng": torch.get_rng_state()})
        if self.snapshot_every and step - self.base >= self.snapshot_every:
            save_file({k: p.detach().contiguous() for k, p in self.keyed.items()}, folder / "snapshot.safetensors")
            self.base = step
        elif self.base:
            share("snapshot.safetensors")
        for name, _, _ in self.segments:
            share(name)
        history = self.zo.trajectory.steps
        end = self.segments[-1][2] if self.segments else 0
        if len(history) > end:
            name = f"steps-{end:09d}-{len(history):09d}.json"
            (folder / name).write_text(json.dumps([asdict(record) for record in history[end:]]))
            self.segments.append([name, end, len(history)])
        (folder / "base.json").write_text(json.dumps({"format": BASE_FORMAT, "base_step": self.base,
                                                      "initial_sha256": self.initial, "segments": self.segments}))
        return linked

    def restore(self, folder: Path) -> None:
        path = folder / "base.json"
        if not path.is_file():
            raise UserError(f"{folder} is a full checkpoint, but the run's config says --checkpoint trajectory; "
                            "restart the run with --overwrite")
        try:
            base = json.loads(path.read_text())
            assert base["format"] == BASE_FORMAT
            self.base, self.initial, self.segments = base["base_step"], base["initial_sha256"], base["segments"]
            history = [TrajectoryStep(**record) for name, _, _ in self.segments
                       for record in json.loads((folder / name).read_text())]
        except Exception:  # noqa: BLE001 - checksums passed, so the version is what differs
            raise UserError(f"{folder} was written by another zotune version; restart the run with "
                            "--overwrite") from None
        self._copy_weights(folder)
        if self.base:
            _copy_into(self.keyed, load_file(folder / "snapshot.safetensors"), folder / "snapshot.safetensors")
        elif self._fingerprint() != self.initial:
            raise UserError("the model's weights differ from those the run started from (sha256), so its steps "
                            "cannot be replayed: resume with the same --model files, or restart with --overwrite")
        saved = load_method_state(folder)
        self.method.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        begin = time.perf_counter()
        self.zo.catch_up(history, self.base, wrap=lambda records: tqdm(
            records, desc="replaying steps", disable=not self.progress, leave=False))
        self.method.flush()  # offloaded blocks take the steps now, not inside the next forward's probe
        self.replayed = (len(history) - self.base, time.perf_counter() - begin)


def make(mode: str, method, progress: bool = True, snapshot_every: int = 0):
    if mode == "trajectory":
        return TrajectoryCheckpoints(method, progress, snapshot_every)
    return FullCheckpoints(method)
