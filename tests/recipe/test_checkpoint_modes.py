import os

import pytest
import torch
from safetensors.torch import load_file

from zotune.recipe.train import Run, train

from ..conftest import stop_after
from .test_checkpoint import assert_one_line_error
from .test_train import LRS, VARIANTS, config, final_weights

# Factored low-rank updates merged every 2 steps: resume must rebuild the factors of the snapshot's interval.
# Sparse directions with momentum: the mask comes from the weights, the echoes (and the normalising window) reach
# back before a snapshot.
LOW_RANK = {"mezo-lowrank": ("mezo", {"direction": "lowrank", "merge": "resample", "resample_every": 2}),
            "mezo-sparse-momentum": ("mezo", {"direction": "sparse", "momentum": 0.9, "momentum_window": 3,
                                              "n_samples_final": 3, "normalize_window": 4})}


@pytest.mark.parametrize("snapshot_every", [0, 3])
@pytest.mark.parametrize("variant", ["mezo", "lmao", "hzo", "mezo-offload", "hzo-offload", "mezo-lowrank",
                                     "mezo-sparse-momentum"])
def test_trajectory_checkpoints_resume_bit_identically(tiny_model_dir, tmp_path, monkeypatch, variant, snapshot_every):
    method, options = {**VARIANTS, **LOW_RANK}.get(variant, (variant, {}))
    options = {"lr": LRS[method], "steps": 7, "zero_shot": False, **options}
    straight = tmp_path / "straight"
    train(config(tiny_model_dir, straight, method=method, **options))
    out = tmp_path / "run"
    settings = dict(method=method, checkpoint="trajectory", snapshot_every=snapshot_every, save_every=1, **options)
    original = stop_after(monkeypatch, {1, 4})
    with pytest.raises(Exception, match="--resume"):
        train(config(tiny_model_dir, out, **settings))
    checkpoint = out / "checkpoint"
    segments = sorted(p.name for p in checkpoint.glob("steps-*.json"))
    assert segments == ["steps-000000000-000000001.json", "steps-000000001-000000002.json"]
    if method == "mezo":  # every weight comes from the trajectory
        assert load_file(checkpoint / "weights.safetensors") == {}
    first = os.stat(checkpoint / segments[0]).st_ino
    with pytest.raises(Exception, match="--resume"):
        train(config(tiny_model_dir, out, **settings), resume=True)
    assert os.stat(checkpoint / segments[0]).st_ino == first  # linked, not written again
    assert (checkpoint / "snapshot.safetensors").is_file() == bool(snapshot_every)
    monkeypatch.setattr(Run, "train_step", original)
    train(config(tiny_model_dir, out, **settings), resume=True)
    a, b = final_weights(straight, method), final_weights(out, method)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_resume_refuses_a_changed_model(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "run"
    stop_after(monkeypatch, {1})
    with pytest.raises(Exception, match="--resume"):
        train(config(model, out, method="mezo", lr=1e-2, checkpoint="trajectory", zero_shot=False))
    weights = load_file(model / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    from safetensors.torch import save_file
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(capsys, ["train", "--resume", str(out), "--no-progress"], "differ from those the run")


def test_trajectory_checkpoints_need_a_zeroth_order_method(tiny_model_dir, tmp_path, capsys):
    assert_one_line_error(capsys, ["train", "--model", str(tiny_model_dir), "--method", "lora-ft", "--checkpoint",
                                   "trajectory", "--output", str(tmp_path / "r")], "--checkpoint full")
