"""A ``zotune train`` process that kills itself with SIGKILL at a chosen point.

    python tests/kill_child.py POINT N -- <zotune train arguments>

POINT and N say where: ``step`` after the N-th training step's update (not yet logged or
checkpointed), ``update`` in the middle of the N-th step's zeroth-order update (some
weights written), ``fill`` inside the N-th checkpoint write (the new folder half written),
``swap`` between the two renames of the N-th checkpoint swap, ``log`` halfway through
writing the N-th metrics row. SIGKILL cannot be caught: nothing of zotune runs after it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from zotune import cli, core
from zotune.recipe import train as recipe
def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    calls = {"count": 0}

    def due() -> bool:
        calls["count"] += 1
        return calls["count"] == n

    if point == "step":
        original_step = recipe.Run.train_step

        def step(self, index):
            record = original_step(self, index)
            if due():
                die()
            return record

        recipe.Run.train_step = step
    elif point == "update":
        original_apply = core.optim.MeZO.apply_step

        def apply_step(self, record, only=None, skip=frozenset()):
            if record.step + 1 == n:  # half the parameters updated, then the kill
                keys = [id(p) for g in self.param_groups for p in g["params"]]
                original_apply(self, record, only=set(keys[: len(keys) // 2]) & (only or set(keys)), skip=skip)
                die()
            return original_apply(self, record, only, skip)

        core.optim.MeZO.apply_step = apply_step
    elif point == "fill":
        original_write = recipe.write_checkpoint

        def write(out, fill):
            def half(folder):
                known = fill(folder)
                if due():
                    largest = max(folder.iterdir(), key=lambda p: p.stat().st_size)
                    with open(largest, "r+b") as handle:  # as if the kill came mid-write
                        handle.truncate(largest.stat().st_size // 2)
                    die()
                return known
            return original_write(out, half)

        recipe.write_checkpoint = write
    elif point == "swap":
        original_rename = Path.rename

        def rename(self, target):
            result = original_rename(self, target)
            if Path(target).name == "checkpoint.old" and due():
                die()
            return result

        Path.rename = rename
    elif point == "log":
        original_log = recipe.Run.log

        def log(self, record):
            if due():
                import json

                line = json.dumps(record) + "\n"
                with open(self.out / "metrics.jsonl", "a") as handle:
                    handle.write(line[: len(line) // 2])
                die()
            original_log(self, record)

        recipe.Run.log = log
    else:
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    point, n, separator, *args = sys.argv[1:]
    assert separator == "--"
    arm(point, int(n))
    sys.exit(cli.main(["train", *args]))
