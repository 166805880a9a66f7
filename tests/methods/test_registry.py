"""The registry is the only place a method is named: a method registered here, in a
test, trains, resumes, evaluates and shows up in --help without any other module changing."""

from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from zotune import cli, methods
from zotune.recipe import config as cfg
from zotune.errors import UserError
from zotune.methods import Method, MethodConfig, option
from zotune.recipe.train import Interrupted, Run, resume_config, train

from ..conftest import stop_after
from ..test_cli import CSV_TASK


@dataclass
class ToyConfig(MethodConfig):
    lr: float = option(1e-2, "learning rate")
    toy_scale: float = option(1.0, "multiplies the loss")

    def __post_init__(self):
        super().__post_init__()
        if self.toy_scale == 0:
            raise UserError("--toy-scale must not be 0")


class Toy(Method):
    """Plain SGD on every weight (a test method)."""

    def __init__(self, model, config, seed=0, steps=1):
        super().__init__(model, config, seed, steps)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)

    def step(self, loss_fn):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn() * self.config.toy_scale
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "lr": self.config.lr}


@pytest.fixture
def toy():
    entry = methods.register("toy", ToyConfig, Toy)
    yield entry
    del methods.METHODS["toy"]


def train_args(model_dir, out, *extra):
    return ["train", "--model", str(model_dir), *CSV_TASK, "--steps", "3", "--batch-size", "2", "--output", str(out),
            "--no-progress", "--no-zero-shot", *extra]


def test_a_registered_method_is_in_the_cli_help(toy, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--toy-scale TOY_SCALE multiplies the loss [toy; default: 1.0]" in text
    assert "toy: Plain SGD on every weight (a test method)" in text and "{mezo,es,lmao,hzo,lora-ft,ft,toy}" in text


def test_a_registered_method_trains_resumes_and_evaluates(toy, tiny_model_dir, tmp_path, capsys, monkeypatch):
    straight = tmp_path / "straight"
    assert cli.main(train_args(tiny_model_dir, straight, "--method", "toy", "--toy-scale", "2")) == 0
    saved = cfg.load_yaml(str(straight / "config.yaml"))
    assert saved["method"] == "toy" and saved["toy_scale"] == 2.0 and "eps" not in saved
    assert cli.main(["eval", "--run", str(straight), "--no-progress"]) == 0

    interrupted = tmp_path / "interrupted"
    original = stop_after(monkeypatch, {0})
    with pytest.raises(Interrupted):
        train(cfg.from_mapping({**saved, "output": str(interrupted)}))
    monkeypatch.setattr(Run, "train_step", original)
    train(resume_config(str(interrupted), {}), resume=True)
    a, b = (load_file(run / "model" / "model.safetensors") for run in (straight, interrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_registered_method_validates_its_options(toy, tiny_model_dir, tmp_path, capsys):
    assert cli.main(train_args(tiny_model_dir, tmp_path / "run", "--method", "toy", "--toy-scale", "0")) == 2
    assert capsys.readouterr().err.strip() == "zotune: error: --toy-scale must not be 0"


def test_register_checks_configs():
    @dataclass
    class NoHelp:
        size: int = 1

    @dataclass
    class NoDefault:
        size: int = field(metadata={"help": "a size"})

    for bad in (NoHelp, NoDefault):
        with pytest.raises(TypeError, match="needs a default"):
            methods.register("bad", bad, Toy)
    with pytest.raises(ValueError, match="already registered"):
        methods.register("mezo", ToyConfig, Toy)
    assert "bad" not in methods.METHODS


def test_options_of_one_name_must_agree_on_type(monkeypatch):
    @dataclass
    class Clash(MethodConfig):
        eps: int = option(1, "an integer eps")

    monkeypatch.setitem(methods.METHODS, "clash", methods.Entry(Clash, Toy))
    with pytest.raises(TypeError, match="option eps"):
        cfg.method_fields()


def test_unknown_method_in_a_config_file_is_a_user_error():
    with pytest.raises(UserError, match="unknown method 'adam': choose one of mezo, es, lmao, hzo, lora-ft, ft"):
        cfg.from_mapping({"method": "adam"})


def test_flat_options_split_into_run_fields_and_the_methods_own():
    config = cfg.from_mapping({"method": "lora-ft", "steps": "7", "lr_fo": "1e-3", "lora_r": 4, "eps": 5e-3})
    assert config.steps == 7 and isinstance(config.options, methods.LoRAFTConfig)
    assert (config.options.lr_fo, config.options.lora_r, config.options.lora_modules) == (1e-3, 4, ["q_proj", "v_proj"])
    flat = config.to_dict()
    assert "eps" not in flat and flat["lora_r"] == 4 and flat["method"] == "lora-ft"  # eps: not lora-ft's
    assert cfg.from_mapping(flat) == config
    defaults = {name: {rate: getattr(entry.config(), rate) for rate in methods.RATES if hasattr(entry.config(), rate)}
                for name, entry in methods.METHODS.items()}
    assert defaults == {"mezo": {"lr_zo": 1e-6}, "es": {"lr_zo": 1e-5}, "ft": {"lr_fo": 1e-5}, "lora-ft": {"lr_fo": 1e-4},
                        "lmao": {"lr_zo": 1e-6, "lr_fo": 1e-4}, "hzo": {"lr_zo": 1e-6, "lr_fo": 1e-4}}
