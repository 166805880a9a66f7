"""Older option names: ``--lr`` (mezo's zeroth-order rate, the first-order rate of the others) and
``--lr-base`` (lmao's zeroth-order rate) became ``--lr-zo`` and ``--lr-fo``. Config files and run
folders that use them still load; the command line and the Trainer point to the new names."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from zotune import cli, methods
from zotune.recipe import config as cfg
from zotune.recipe.train import Interrupted, Run, train

from ..conftest import stop_after
from ..test_cli import CSV_TASK
from .test_train import config


@pytest.mark.parametrize("method, old, new", [
    ("mezo", {"lr": 1e-3}, {"lr_zo": 1e-3}),
    ("lmao", {"lr": 1e-3, "lr_base": 1e-5}, {"lr_fo": 1e-3, "lr_zo": 1e-5}),
    ("hzo", {"lr": 1e-3}, {"lr_fo": 1e-3}),
    ("ft", {"lr": 1e-3}, {"lr_fo": 1e-3}),
    ("lora-ft", {"lr": 1e-3}, {"lr_fo": 1e-3}),
])
def test_an_old_rate_name_means_what_it_meant_for_its_method(method, old, new):
    options = cfg.from_mapping({"method": method, **old}).options
    assert {name: getattr(options, name) for name in new} == new
    assert cfg.from_mapping({"method": method, **old, **dict.fromkeys(new, 0.5)}).options == \
        cfg.from_mapping({"method": method, **dict.fromkeys(new, 0.5)}).options  # the new name wins
    with pytest.warns(FutureWarning, match=f"{method}'s option 'lr' is now '{next(iter(new))}'"):
        assert methods.make_config(method, old) == options  # the Trainer's method_config


def test_the_command_line_reads_an_old_spelling_and_names_the_new_one(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), *CSV_TASK, "--steps", "1", "--batch-size", "2", "--no-zero-shot",
            "--n-test", "2", "--no-progress", "--output", str(out), "--method", "lmao", "--lr", "1e-3",
            "--lr-base", "1e-5"]
    assert cli.main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "is now" in line]
    assert notes == ["zotune: note: --lr is now --lr-fo for lmao; --lr-base is now --lr-zo for lmao (the old "
                     "spelling still works)"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["lr_fo"], saved["lr_zo"], saved[cfg.FORMAT_KEY]) == (1e-3, 1e-5, cfg.FORMAT)
    assert "lr" not in saved and "lr_base" not in saved
    # --lr-base names lmao's rate: to mezo it is another method's option, which changes nothing.
    args = [*args[:-8], "--output", str(tmp_path / "mezo"), "--lr-base", "1e-5"]
    assert cli.main(args) == 0
    assert "zotune: note: mezo does not use --lr-base" in capsys.readouterr().err


def test_a_run_folder_of_the_previous_format_resumes_evaluates_and_replays(tiny_model_dir, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "run"
    stop_after(monkeypatch, {0})
    with pytest.raises(Interrupted, match="--resume"):
        train(config(tiny_model_dir, out, method="lmao", lr_fo=1e-2, lr_zo=1e-2, zero_shot=False, steps=2,
                     eval_every=0))
    # What the previous release wrote: format 3, the rates under their old names, no sparse directions yet.
    values = yaml.safe_load((out / "config.yaml").read_text())
    assert values.pop(cfg.FORMAT_KEY) == cfg.FORMAT
    values["lr"], values["lr_base"] = values.pop("lr_fo"), values.pop("lr_zo")
    del values["sparse_fraction"]  # newer than format 3
    (out / "config.yaml").write_text(yaml.safe_dump({cfg.FORMAT_KEY: 3, **values}, sort_keys=False))
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert cli.main(["eval", "--run", str(out), "--no-progress"]) == 0
    assert cli.main(["replay", "--run", str(out), "--output", str(tmp_path / "replayed")]) == 0
    assert "zotune: error" not in capsys.readouterr().err


def test_a_format_8_mezo_run_without_the_head_options_resumes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    stop_after(monkeypatch, {0})
    with pytest.raises(Interrupted, match="--resume"):
        train(config(tiny_model_dir, out, zero_shot=False, steps=2, eval_every=0))
    values = yaml.safe_load((out / "config.yaml").read_text())
    assert values.pop(cfg.FORMAT_KEY) == cfg.FORMAT
    del values["head_cache"], values["head_layer"]  # newer than format 8
    (out / "config.yaml").write_text(yaml.safe_dump({cfg.FORMAT_KEY: 8, **values}, sort_keys=False))
    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "zotune: error" not in capsys.readouterr().err


def test_a_format_9_head_run_resumes_with_the_scale_of_random_tokens(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    stop_after(monkeypatch, {0})
    with pytest.raises(Interrupted, match="--resume"):
        train(config(tiny_model_dir, out, zero_shot=False, steps=2, eval_every=0, peft="head", n_samples=2))
    values = yaml.safe_load((out / "config.yaml").read_text())
    assert values.pop(cfg.FORMAT_KEY) == cfg.FORMAT
    assert values.pop("head_scale") == "prompts"  # newer than format 9, which measured on random tokens
    (out / "config.yaml").write_text(yaml.safe_dump({cfg.FORMAT_KEY: 9, **values}, sort_keys=False))
    monkeypatch.undo()
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "zotune: error" not in capsys.readouterr().err
    fresh = Run(config(tiny_model_dir, tmp_path / "fresh", peft="head", head_scale="random"), False)
    saved = load_file(out / "head" / "head.safetensors")["scale"]
    assert torch.equal(saved, fresh.scorer.head.scale)
