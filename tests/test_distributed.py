"""Multi-process runs: 2 processes started by torchrun, gloo backend (forced, so that a
machine with one GPU runs them too).

Every process is pinned to one thread (torchrun's default for several processes), and so
is each one-process reference, so that both run the same kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.engine import distributed
from zotune.errors import UserError

from .recipe.test_train import DATA

CHILD = Path(__file__).with_name("distributed_child.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
GLOO = {**ONE_THREAD, distributed.BACKEND_VARIABLE: "gloo"}


def torchrun(*args, env=GLOO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(CHILD), *map(str, args)], env=env, capture_output=True, text=True, timeout=600)


def one_process(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zotune", *map(str, args)], env=ONE_THREAD, capture_output=True,
                          text=True, timeout=600)


def train_args(model_dir, out, method="mezo", *extra):
    lr = {"mezo": "1e-2", "lmao": "1e-2", "hzo": "1e-2", "lora-ft": "1e-2"}[method]
    return ["train", "--model", model_dir, "--task", "csv", "--data", DATA / "reviews.csv", "--template",
            "{text} It was", "--candidates", "neg=terrible,pos=great", "--n-train", "16", "--n-dev", "0", "--n-test",
            "8", "--steps", "4", "--batch-size", "4", "--method", method, "--lr", lr, "--no-progress", "--output",
            out, *extra]


def ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def trajectory_grads(run: Path) -> list[list[float]]:
    return [step["grads"] for step in json.loads((run / "trajectory.json").read_text())["steps"]]


@pytest.fixture
def two_processes(monkeypatch):
    """Two torchrun processes on this machine, whose number of GPUs the test sets."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.BACKEND_VARIABLE, raising=False)

    def gpus(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    return gpus


@pytest.mark.parametrize(("gpus", "forced", "backend"), [(0, None, "gloo"), (1, None, "gloo"), (2, None, "nccl"),
                                                         (2, "gloo", "gloo"), (2, " NCCL ", "nccl")])
def test_nccl_only_when_every_process_has_a_gpu_of_its_own(two_processes, monkeypatch, gpus, forced, backend):
    two_processes(gpus)
    if forced is not None:
        monkeypatch.setenv(distributed.BACKEND_VARIABLE, forced)
    assert distributed.choose_backend(distributed.gpu_per_process()) == backend


@pytest.mark.parametrize(("forced", "message"), [("nccl", "at most one process per GPU"),
                                                 ("glo", "did you mean 'gloo'")])
def test_a_backend_that_cannot_be_forced_is_a_one_line_error(two_processes, monkeypatch, forced, message):
    two_processes(1)
    monkeypatch.setenv(distributed.BACKEND_VARIABLE, forced)
    with pytest.raises(UserError, match=message) as error:
        distributed.choose_backend(distributed.gpu_per_process())
    assert "\n" not in str(error.value)


def test_ranks_agree_on_gloo_when_one_machine_lacks_gpus(tmp_path):
    child = torchrun("backend", tmp_path, env={**ONE_THREAD, distributed.BACKEND_VARIABLE: ""})  # not forced
    assert child.returncode == 0, child.stderr[-3000:]
    assert [json.loads((tmp_path / f"backend-{rank}.json").read_text()) for rank in (0, 1)] == ["gloo", "gloo"]


def test_the_python_api_shares_losses_and_gradients_exactly(tmp_path):
    child = torchrun("api", tmp_path)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads((tmp_path / "api.json").read_text())
    # Data parallel: the mean of the two slices' losses, bit for bit.
    assert result["data_grads"] == result["data_reference_grads"]
    assert result["data_same_weights"]
    # Against one process on the whole batch the loss is summed in another order (float32):
    # the projected gradients agree to about 1e-4 relative, the weights closely.
    for mine, whole in zip(result["data_grads"], result["whole_batch_grads"]):
        assert mine[0] == pytest.approx(whole[0], rel=1e-3, abs=1e-3)
    assert result["whole_batch_max_weight_difference"] < 1e-4
    assert result["bytes_per_step_n4"] == [64]  # one all-reduce of 8 float64 losses
    # Perturbation parallel: the 1-process n-SPSA run, bit for bit.
    assert result["spread_grads"] == result["spread_reference_grads"]
    assert result["spread_same_weights"]
    # Sharded: the data-parallel run's steps and weights, bit for bit, from half the weights per rank.
    assert result["sharded_grads"] == result["data_grads"]
    assert result["sharded_same_weights"] and result["sharded_holds_half"]
    # First order: the mean of the slices' gradients is the whole batch's gradient.
    assert result["fo_loss"] == pytest.approx(result["fo_reference_loss"], rel=1e-6)
    assert result["fo_max_grad_difference"] <= 1e-5 * result["fo_max_grad"]


def test_perturbation_parallel_run_equals_the_one_process_run(tiny_model_dir, tmp_path):
    extra = ("--n-samples", "2")
    child = torchrun("train", tmp_path, "--", *train_args(tiny_model_dir, tmp_path / "two", "mezo", "--parallel",
                                                            "perturbations", *extra))
    assert child.returncode == 0, child.stderr[-3000:]
    single = one_process(*train_args(tiny_model_dir, tmp_path / "one", "mezo", *extra))
    assert single.returncode == 0, single.stderr[-3000:]
    assert trajectory_grads(tmp_path / "two") == trajectory_grads(tmp_path / "one")
    two, one = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("two", "one"))
    assert all((two[k] == one[k]).all() for k in one)
    assert [r["written"] for r in ranks(tmp_path)][1] == []


def test_data_parallel_run_writes_on_rank_zero_and_tracks_the_one_process_run(tiny_model_dir, tmp_path):
    child = torchrun("train", tmp_path, "--", *train_args(tiny_model_dir, tmp_path / "two"))
    assert child.returncode == 0, child.stderr[-3000:]
    assert [r["code"] for r in ranks(tmp_path)] == [0, 0]
    assert ranks(tmp_path)[1]["written"] == []  # rank 1 wrote nothing in the run folder
    assert child.stdout.count("zotune: mezo on csv") == 1  # one summary, from rank 0
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    single = one_process(*train_args(tiny_model_dir, tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    for mine, whole in zip(trajectory_grads(tmp_path / "two"), trajectory_grads(tmp_path / "one")):
        assert mine[0] == pytest.approx(whole[0], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("method", ["lmao", "hzo"])
def test_a_stopped_data_parallel_run_resumes_bit_identically(tiny_model_dir, tmp_path, method):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    child = torchrun("train", tmp_path / "whole-ranks", "--", *train_args(tiny_model_dir, whole, method))
    assert child.returncode == 0, child.stderr[-3000:]
    child = torchrun("train", tmp_path / "stop-ranks", "2", "--", *train_args(tiny_model_dir, stopped, method))
    assert [r["code"] for r in ranks(tmp_path / "stop-ranks")] == [138, 138]  # both stop at step 2 (SIGUSR1)
    assert json.loads((stopped / "checkpoint" / "progress.json").read_text())["step"] == 2
    child = torchrun("train", tmp_path / "resume-ranks", "--", "train", "--resume", stopped)
    assert child.returncode == 0, child.stderr[-3000:]
    for r in ranks(tmp_path / "stop-ranks")[1:] + ranks(tmp_path / "resume-ranks")[1:]:
        assert r["written"] == []
    a, b = (load_file(run / "model" / "model.safetensors") for run in (whole, stopped))
    assert all((a[k] == b[k]).all() for k in a)


def test_a_sharded_run_equals_the_unsharded_run_and_resumes(tiny_model_dir, tmp_path):
    extra = ("--checkpoint", "trajectory")
    child = torchrun("train", tmp_path / "plain-ranks", "--", *train_args(tiny_model_dir, tmp_path / "plain", "mezo",
                                                                           *extra))
    assert child.returncode == 0, child.stderr[-3000:]
    child = torchrun("train", tmp_path / "stop-ranks", "2", "--", *train_args(tiny_model_dir, tmp_path / "sharded",
                                                                                "mezo", "--shard", *extra))
    assert [r["code"] for r in ranks(tmp_path / "stop-ranks")] == [138, 138], child.stderr[-3000:]
    child = torchrun("train", tmp_path / "resume-ranks", "--", "train", "--resume", tmp_path / "sharded")
    assert child.returncode == 0, child.stderr[-3000:]
    assert ranks(tmp_path / "resume-ranks")[1]["written"] == []
    assert trajectory_grads(tmp_path / "sharded") == trajectory_grads(tmp_path / "plain")
    plain, sharded = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("plain", "sharded"))
    assert all((plain[k] == sharded[k]).all() for k in plain)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "model")  # the gathered export is a model folder
    results = [json.loads((tmp_path / name / "result.json").read_text()) for name in ("plain", "sharded")]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
