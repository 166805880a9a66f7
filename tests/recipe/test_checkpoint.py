import json
import os
import pickle
import signal

import pytest
import torch

from zotune import cli
from zotune.recipe.checkpoint import load_state, save_state
from zotune.recipe.train import Run, train

from ..conftest import stop_after
from .test_train import config, final_weights


def assert_one_line_error(capsys, args, *expected):
    """The command fails with exit 2 and a line that says what is wrong, never a traceback."""
    capsys.readouterr()
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert all(text in error for text in expected) and "Traceback" not in error, error


def test_state_round_trips_without_pickle(tmp_path):
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 2)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "name": None}]},
             "rng": torch.get_rng_state(), "half": torch.ones(3, dtype=torch.bfloat16), "nan": float("inf")}
    save_state(tmp_path, "state", state)
    assert {p.name for p in tmp_path.iterdir()} == {"state.json", "state.safetensors"}
    loaded = load_state(tmp_path, "state")
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert list(loaded["optimizer"]["state"]) == [0] and loaded["nan"] == float("inf")
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(loaded["rng"], state["rng"]) and loaded["half"].dtype == torch.bfloat16


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickled_checkpoint_is_never_unpickled(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    stop_after(monkeypatch, {0})
    with pytest.raises(Exception, match="--resume"):
        train(config(tiny_model_dir, out, method="mezo", lr=1e-2, zero_shot=False))
    checkpoint = out / "checkpoint"
    assert (checkpoint / "state.json").is_file() and not (checkpoint / "state.pt").exists()
    # A run folder from an older zotune, or from someone else, with code in its pickle:
    (checkpoint / "state.json").unlink()
    (checkpoint / "manifest.json").unlink()  # older zotune wrote none
    with open(checkpoint / "state.pt", "wb") as handle:
        pickle.dump({"optimizer": _Boom()}, handle)
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(capsys, ["train", "--resume", str(out), "--no-progress"], "cannot be read safely")
    assert not (tmp_path / "pwned").exists()


def test_sigterm_finishes_the_step_saves_and_exits_143(tiny_model_dir, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    train(config(tiny_model_dir, straight, method="hzo", lr=1e-2, zero_shot=False))
    out = tmp_path / "preempted"
    original = Run.train_step

    def preempt_at_two(self, step):
        record = original(self, step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before it kills the job
        return record

    monkeypatch.setattr(Run, "train_step", preempt_at_two)
    args = ["train", "--model", str(tiny_model_dir), "--task", "csv", "--data", str(config(tiny_model_dir, out).data),
            "--template", "{text} It was", "--candidates", "neg=terrible,pos=great", "--n-train", "16",
            "--n-dev", "4", "--n-test", "8", "--steps", "4", "--batch-size", "2", "--eval-every", "2",
            "--method", "hzo", "--lr", "1e-2", "--no-zero-shot", "--no-progress", "--output", str(out)]
    assert cli.main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().err and (out / "checkpoint").is_dir()
    monkeypatch.setattr(Run, "train_step", original)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    a, b = final_weights(straight, "hzo"), final_weights(out, "hzo")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _interrupted_run(tiny_model_dir, out, monkeypatch, method="mezo"):
    original = stop_after(monkeypatch, {1})
    with pytest.raises(Exception, match="--resume"):
        train(config(tiny_model_dir, out, method=method, lr=1e-2, zero_shot=False))
    monkeypatch.setattr(Run, "train_step", original)


def test_a_damaged_checkpoint_file_is_one_line_and_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_run(tiny_model_dir, out, monkeypatch)
    manifest = (out / "checkpoint" / "manifest.json").read_text()
    assert "weights.safetensors" in manifest and "state.json" in manifest
    for name in ("weights.safetensors", "state.safetensors", "state.json", "progress.json"):
        path = out / "checkpoint" / name
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])  # truncated, as by a full disk or a bad copy
        assert_one_line_error(capsys, ["train", "--resume", str(out), "--no-progress"], name, "damaged")
        path.write_bytes(content)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0


def test_a_kill_during_the_swap_leaves_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(config(tiny_model_dir, straight, method="mezo", lr=1e-2, zero_shot=False))
    out = tmp_path / "run"
    _interrupted_run(tiny_model_dir, out, monkeypatch)
    # Killed between the two renames of the next checkpoint: only checkpoint.old/ is complete.
    (out / "checkpoint").rename(out / "checkpoint.old")
    (out / "checkpoint.partial").mkdir()
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    a, b = final_weights(straight, "mezo"), final_weights(out, "mezo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any((out / name).exists() for name in ("checkpoint", "checkpoint.old", "checkpoint.partial"))


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import errno

    from zotune.recipe import checkpoint
    from zotune.errors import UserError

    out = tmp_path / "run"
    _interrupted_run(tiny_model_dir, out, monkeypatch)
    before = (out / "checkpoint" / "manifest.json").read_text()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        checkpoint.write_checkpoint(out, lambda folder: full())
    assert (out / "checkpoint" / "manifest.json").read_text() == before
    assert not (out / "checkpoint.partial").exists()


def test_a_truncated_trajectory_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(tiny_model_dir, out, method="mezo", lr=1e-2, zero_shot=False, steps=2))
    path = out / "trajectory.json"
    path.write_text(path.read_text()[:100])
    assert_one_line_error(capsys, ["replay", "--run", str(out)], "trajectory.json is damaged")


def test_metrics_cut_by_a_kill_resume_and_a_garbled_row_is_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_run(tiny_model_dir, out, monkeypatch)
    metrics = out / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([*rows, "{\"step\": 3, \"lo"]))  # a later process killed while writing step 3
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert [json.loads(row)["step"] for row in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    out2 = tmp_path / "run2"
    _interrupted_run(tiny_model_dir, out2, monkeypatch)
    metrics = out2 / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([rows[0][:5], *rows[1:]]) + "\n")
    assert_one_line_error(capsys, ["train", "--resume", str(out2), "--no-progress"], "metrics.jsonl line 1 is damaged")


def test_a_damaged_final_model_is_one_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(tiny_model_dir, out, method="mezo", lr=1e-2, zero_shot=False, steps=1))
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    assert_one_line_error(capsys, ["eval", "--run", str(out), "--no-progress"], "could not load model")


def test_resume_checks_that_the_data_is_the_same(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_run(tiny_model_dir, out, monkeypatch)
    samples = out / "samples.json"
    original = samples.read_text()
    samples.write_text(original[: len(original) // 2])
    resume = ["train", "--resume", str(out), "--no-progress"]
    assert_one_line_error(capsys, resume, "samples.json is missing or damaged")
    changed = json.loads(original)
    changed["train"] = changed["train"][::-1]
    samples.write_text(json.dumps(changed))
    assert_one_line_error(capsys, resume, "the data changed")
    samples.write_text(original)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
