"""The zeroth-order options (direction, rank, resample_every, estimator, stochastic_rounding)
travel from the command line and config.yaml to zotune.MeZO, for mezo and LMAO's ZO phase."""

import pytest
import yaml

import zotune
from zotune import cli, methods
from zotune.methods import lmao, mezo
from zotune.recipe import config as cfg
from zotune.errors import UserError
from zotune.recipe.train import resume_config

from ..conftest import lm_closure, tiny_model
from ..test_cli import CSV_TASK


@pytest.fixture
def mezo_calls(monkeypatch):
    """Records the keyword arguments of every zotune.MeZO built, and builds the real one."""
    calls, real = [], zotune.MeZO

    def spy(params, **kwargs):
        calls.append(kwargs)
        return real(params, **kwargs)

    patch_mezo(monkeypatch, spy)
    return calls


def patch_mezo(monkeypatch, build):
    """Makes the methods that build a zotune.MeZO call ``build`` instead."""
    for module in (mezo, lmao):
        monkeypatch.setattr(module, "MeZO", build)


@pytest.mark.parametrize("method", ["mezo", "lmao"])
def test_zo_options_reach_the_optimizer_and_the_run_folder(tiny_model_dir, tmp_path, mezo_calls, method, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), *CSV_TASK, "--steps", "1", "--batch-size", "2",
            "--output", str(out), "--no-progress", "--no-zero-shot", "--method", method, "--seed", "3",
            "--direction", "rademacher", "--estimator", "one-sided", "--no-stochastic-rounding", "--n-samples", "2",
            "--eps", "0.01"]
    assert cli.main(args) == 0
    own = dict(momentum=0.0, momentum_window=8, normalize_window=0) if method == "mezo" else {}  # mezo's alone
    assert mezo_calls[0] == dict(lr=mezo_calls[0]["lr"], eps=0.01, n_samples=2, seed=3, direction="rademacher",
                                 estimator="one-sided", stochastic_rounding=False, stacked=False,
                                 merge="step", **own)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["direction"], saved["estimator"], saved["stochastic_rounding"]) == ("rademacher", "one-sided", False)


def test_defaults():
    options = methods.MeZOConfig()
    assert (options.direction, options.rank, options.resample_every, options.estimator,
            options.stochastic_rounding) == ("gaussian", 2, 50, "spsa", True)


def test_lowrank_builds_the_cores_low_rank_direction(monkeypatch, mezo_calls):
    patch_mezo(monkeypatch, lambda params, **kwargs: mezo_calls.append(kwargs))
    config = cfg.from_mapping({"direction": "lowrank", "rank": 3, "resample_every": 7})
    methods.MeZOMethod(tiny_model("llama"), config.options)
    direction = mezo_calls[-1]["direction"]
    assert direction == zotune.LowRank(rank=3, interval=7)


def test_old_distribution_key_and_flag_mean_direction(tmp_path):
    assert cfg.from_args(cli.build_parser().parse_args(["train", "--distribution", "rademacher"])).options.direction \
        == "rademacher"
    assert cfg.from_mapping({"distribution": "rademacher"}).options.direction == "rademacher"
    assert cfg.from_mapping({"distribution": "rademacher", "direction": "gaussian"}).options.direction == "gaussian"
    # A run folder from before: every option of every method in one table, and no stochastic rounding yet.
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(dict(
        task="rt-sst2", method="mezo", steps=10, lr=1e-6, lr_base=1e-6, max_grad_norm=1.0, eps=1e-3, n_samples=1,
        distribution="rademacher", weight_decay=0.0, lora_r=8, lora_alpha=16, lora_targets="q_proj,v_proj",
        output=str(run))))
    config = cfg.from_mapping(cfg.load_run(run))
    assert (config.options.direction, config.options.stochastic_rounding) == ("rademacher", False)
    resumed = resume_config(str(run), {"steps": 20, "lr_base": 1e-3, "eps": 1e-3})  # lr_base: lmao's; eps: unchanged
    assert resumed.steps == 20 and resumed.options == config.options
    with pytest.raises(UserError, match="cannot change: direction, eps"):
        resume_config(str(run), {"direction": "gaussian", "eps": 1e-2})


@pytest.mark.parametrize("values, message", [
    ({"direction": "sphere"}, "direction 'sphere' is not one of gaussian, rademacher, lowrank"),
    ({"estimator": "two-point"}, "estimator 'two-point' is not one of spsa, one-sided, fzoo"),
    ({"rank": 0}, "--rank must be positive"),
    ({"sparse_fraction": 1.5}, "--sparse-fraction is a fraction"),
    ({"momentum": 1.0}, "--momentum must be in"),
    ({"direction": "lowrank", "momentum": 0.5}, "--momentum adds earlier directions"),
    ({"estimator": "fzoo", "n_samples": 2, "n_samples_final": 1}, "--estimator fzoo needs at least 2"),
    ({"method": "lmao", "resample_every": 0}, "--resample-every must be positive"),
    ({"method": "lmao", "max_grad_norm": 0}, "--max-grad-norm must be positive"),
    ({"method": "lora-ft", "lora_r": 0}, "--lora-r must be positive"),
    ({"method": "ft", "lr_fo": -1}, "--lr-fo must be 0 or more"),
    ({"method": "ft", "lr": -1}, "--lr-fo must be 0 or more"),  # the old name: the same check, under the new one
])
def test_invalid_options_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        cfg.from_mapping(values)


def test_settings_the_optimizer_rejects_are_user_errors(monkeypatch):
    def reject(params, **kwargs):
        raise ValueError("estimator 'fzoo' needs n_samples >= 2")

    patch_mezo(monkeypatch, reject)
    with pytest.raises(UserError, match="needs n_samples >= 2"):
        methods.MeZOMethod(tiny_model("llama"), methods.MeZOConfig(estimator="fzoo"))


def test_an_option_the_method_does_not_use_is_noted(tiny_model_dir, tmp_path, capsys):
    args = ["train", "--model", str(tiny_model_dir), *CSV_TASK, "--steps", "1", "--batch-size", "2", "--method", "ft",
            "--eps", "0.01", "--output", str(tmp_path / "run"), "--no-progress", "--no-zero-shot"]
    assert cli.main(args) == 0
    assert "zotune: note: ft does not use --eps" in capsys.readouterr().err


def test_the_directions_per_step_grow_as_scheduled():
    config = methods.MeZOConfig(lr_zo=1e-3, n_samples=1, n_samples_final=3)
    assert [config.n_samples_at(step, 5) for step in range(5)] == [1, 2, 2, 2, 3]  # round half to even at 1.5
    method = methods.MeZOMethod(tiny_model("llama"), config, seed=0, steps=3)
    for _ in range(3):
        method.step(lm_closure(method.model))
    assert [len(step.seeds) for step in method.zo.trajectory.steps] == [1, 2, 3]
