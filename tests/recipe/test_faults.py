"""Fault injection: a run killed with SIGKILL anywhere, then resumed, ends with the
weights of a run that was never interrupted, bit for bit; SIGTERM loses no step."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zotune import cli
from zotune.recipe.train import train

from .test_train import DATA, LRS, config, final_weights

CHILD = Path(__file__).parents[1] / "kill_child.py"
# name: (method, options); all save every 2 of 6 steps.
RUNS = {
    "mezo": ("mezo", {}),
    "mezo-offload": ("mezo", {"offload": "cpu"}),
    "lmao": ("lmao", {}),
    "hzo": ("hzo", {"lr_zo": 1e-2}),
    "hzo-offload": ("hzo", {"offload": "cpu", "lr_zo": 1e-2}),
    "mezo-trajectory": ("mezo", {"checkpoint": "trajectory", "snapshot_every": 4}),
    "hzo-offload-trajectory": ("hzo", {"offload": "cpu", "lr_zo": 1e-2, "checkpoint": "trajectory"}),
}
POINTS = ("step", "update", "fill", "swap", "log")
# make test: each run meets one kill point (all five over the runs); make test-slow: every pair.
# The step of a kill is drawn at random (seeded by the case).
FAST = [(name, POINTS[i % len(POINTS)]) for i, name in enumerate(RUNS)]
CASES = FAST + [pytest.param(name, point, marks=pytest.mark.slow) for name in RUNS for point in POINTS
                if (name, point) not in FAST]


def _args(model_dir, out, method, options):
    args = ["--model", str(model_dir), "--task", "csv", "--data", str(DATA / "reviews.csv"), "--template",
            "{text} It was", "--candidates", "neg=terrible,pos=great", "--n-train", "16", "--n-dev", "4",
            "--n-test", "8", "--steps", "6", "--batch-size", "2", "--eval-every", "2", "--save-every", "2",
            "--method", method, "--lr", str(LRS[method]), "--no-zero-shot", "--no-progress", "--output", str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, tmp_path_factory):
    """The uninterrupted runs, one per configuration, made when first asked for."""
    made = {}

    def get(name):
        if name not in made:
            method, options = RUNS[name]
            out = tmp_path_factory.mktemp(f"straight-{name}")
            options = {k: v for k, v in options.items() if k not in ("checkpoint", "snapshot_every")}
            train(config(tiny_model_dir, out, method=method, steps=6, zero_shot=False, lr=LRS[method], **options))
            made[name] = final_weights(out, method)
        return made[name]

    return get


@pytest.mark.parametrize("name,point", CASES)
def test_a_kill_anywhere_then_resume_gives_the_uninterrupted_weights(tiny_model_dir, tmp_path, straight_runs,
                                                                      name, point):
    method, options = RUNS[name]
    out = tmp_path / "run"
    # step, update, log: the step (after the first checkpoint, at 2); fill, swap: the checkpoint write.
    first, last = {"step": (3, 6), "update": (3, 5), "fill": (2, 3), "swap": (2, 2), "log": (3, 6)}[point]
    n = random.Random(f"{name}/{point}").randint(first, last)
    child = subprocess.run([sys.executable, str(CHILD), point, str(n), "--", *_args(tiny_model_dir, out, method,
                                                                                  options)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    expected, resumed = straight_runs(name), final_weights(out, method)
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # each step logged once, the cut row dropped


def test_sigterm_from_outside_loses_no_step(tiny_model_dir, tmp_path, straight_runs):
    out = tmp_path / "run"
    args = _args(tiny_model_dir, out, "mezo", {})
    args[args.index("--steps") + 1] = "400"  # long enough to be mid-run when the signal comes
    args[args.index("--save-every") + 1] = "0"
    child = subprocess.Popen([sys.executable, "-m", "zotune", "train", *args], stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    logged = len(metrics.read_text().splitlines())
    saved = json.loads((out / "checkpoint" / "progress.json").read_text())["step"]
    assert saved == logged >= 3 and f"at step {saved}" in err and "Traceback" not in err


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbled": lambda data: data[: len(data) // 3] + b"\x00garbage\xff" * 4 + data[len(data) // 3 + 44:],
    "emptied": lambda data: b"",
    "deleted": None,
}


@pytest.mark.parametrize("mode", ["full", "trajectory"])
def test_every_file_of_an_interrupted_run_damaged_in_turn_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                                      mode):
    import shutil

    from .test_checkpoint import _interrupted_run

    pristine = tmp_path / "pristine"
    monkeypatch.setattr("tests.recipe.test_checkpoint.config",
                        lambda *a, **k: config(*a, **{**k, "checkpoint": mode, "snapshot_every": 1}))
    _interrupted_run(tiny_model_dir, pristine, monkeypatch)
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file())
    assert any(f.name.startswith("steps-") for f in files) == (mode == "trajectory")
    for name in files:
        for damage, spoil in DAMAGES.items():
            run = tmp_path / "run"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(pristine, run)
            path = run / name
            if spoil is None:
                path.unlink()
            else:
                path.write_bytes(spoil(path.read_bytes()))
            capsys.readouterr()
            try:
                code = cli.main(["train", "--resume", str(run), "--no-progress"])
            except BaseException as error:  # noqa: BLE001 - the assertion below names it
                code = f"{type(error).__name__}: {error}"
            err = capsys.readouterr().err.strip()
            assert code in (0, 2), f"{name} {damage}: {code}"
            if code == 0:  # only the metrics log may be cut or garbled: the run goes on and says what is lost
                assert name.name == "metrics.jsonl" and "lacks the rows" in err, f"{name} {damage}: {err}"
            if code == 2:
                assert len(err.splitlines()) == 1 and err.startswith("zotune: error:"), f"{name} {damage}: {err}"
                assert name.name in err or str(name.parent) in err, f"{name} {damage}: {err}"
