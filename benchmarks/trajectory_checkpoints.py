"""Bytes written by checkpoints, full against trajectory, and the resume (replay) time.

Runs MeZO on the default model and task with ``--save-every`` S, in each checkpoint mode,
counting the bytes each checkpoint writes (a hard-linked file writes none), then resumes
the trajectory run and times the replay. Bytes per hour use the step time given (the
MeZO table's 2.83 s at batch 16 on 2 CPU cores by default): the bytes a checkpoint holds do
not depend on the batch, so the runs here use a small one to finish quickly.

    .venv/bin/python benchmarks/trajectory_checkpoints.py --steps 300 --save-every 100
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

from zotune.recipe import train as recipe
from zotune.recipe.config import from_mapping


def written_bytes(folder: Path) -> int:
    """Bytes of the files a new checkpoint wrote itself: before the swap, those it linked from
    the previous checkpoint have a second name there."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.stat().st_nlink == 1)


def run(mode: str, out: Path, steps: int, save_every: int, snapshot_every: int, stop_at: int) -> dict:
    config = from_mapping(dict(method="mezo", lr=1e-6, steps=steps, batch_size=2, max_length=64, n_train=1000,
                               n_dev=0, n_test=1, zero_shot=False, save_every=save_every, checkpoint=mode,
                               snapshot_every=snapshot_every, output=str(out), overwrite=True, progress=False))
    sizes = []
    original_write, original_step = recipe.write_checkpoint, recipe.Run.train_step

    def measured(out, fill):
        def counted(folder):
            known = fill(folder)
            sizes.append(written_bytes(folder))
            return known
        original_write(out, counted)

    def stop(self, step):
        record = original_step(self, step)
        if step + 1 == stop_at:
            self._stop = signal.SIGINT
        return record

    recipe.write_checkpoint, recipe.Run.train_step = measured, stop
    begin = time.perf_counter()
    try:
        recipe.train(config)
    except recipe.Interrupted:
        pass
    finally:
        recipe.write_checkpoint, recipe.Run.train_step = original_write, original_step
    return {"mode": mode, "checkpoints": sizes, "seconds": time.perf_counter() - begin, "config": config}


def resume(config) -> dict:
    times = {}
    original = recipe.Run.load_checkpoint

    def timed(self):
        begin = time.perf_counter()
        original(self)
        times["load"] = time.perf_counter() - begin
        times["replayed"] = self.checkpoints.replayed

    recipe.Run.load_checkpoint = timed
    try:
        recipe.train(config, resume=True)
    finally:
        recipe.Run.load_checkpoint = original
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--snapshot-every", type=int, default=0)
    parser.add_argument("--step-seconds", type=float, default=2.83, help="training step time for the per-hour rate")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="zotune-ckpt-"))
    full = run("full", root / "full", args.steps, args.save_every, 0, stop_at=args.save_every)
    light = run("trajectory", root / "trajectory", args.steps + 1, args.save_every, args.snapshot_every,
                stop_at=args.steps)
    replay = resume(light["config"])
    per_hour = 3600 / args.step_seconds / args.save_every  # checkpoints per hour
    full_hour = full["checkpoints"][0] * per_hour
    # Trajectory checkpoints grow by one segment each; the hour's mean is that of its checkpoints.
    light_hour = sum(light["checkpoints"]) / len(light["checkpoints"]) * per_hour
    result = {
        "full_checkpoint_bytes": full["checkpoints"][0], "trajectory_checkpoint_bytes": light["checkpoints"],
        "checkpoints_per_hour": round(per_hour, 2), "full_bytes_per_hour": round(full_hour),
        "trajectory_bytes_per_hour": round(light_hour), "ratio": round(full_hour / light_hour),
        "replayed_steps": replay["replayed"][0], "replay_seconds": round(replay["replayed"][1], 2),
        "resume_load_seconds": round(replay["load"], 2), "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
