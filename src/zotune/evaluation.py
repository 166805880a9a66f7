"""Evaluating a model or a finished run, and rebuilding a zeroth-order run's weights from its trajectory."""

from __future__ import annotations

from pathlib import Path

import torch

from zotune import methods, models, tasks
from zotune.config import TrainConfig, from_mapping, load_run
from zotune.core.trajectory import Trajectory
from zotune.errors import UserError
from zotune.scoring import Scorer, evaluate

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves, newer and older


def evaluate_model(config: TrainConfig, adapter: str | None = None) -> dict:
    """Test accuracy of ``config.model`` (plus an optional peft adapter) on the test sample of a run with this config."""
    model, tokenizer, kind = models.load(config.model, config.dtype, config.model_kind)
    if adapter:
        model = _with_adapter(model, adapter)
    task = tasks.build_task(config)
    split = tasks.sample(task, config.n_train, config.n_dev, config.n_test, config.seed)
    scorer = Scorer(model, tokenizer, task.candidates, kind, config.max_length)
    result = evaluate(scorer, task, split.test, config.eval_batch_size, "test", config.progress)
    return {"model": config.model, "adapter": adapter, "task": config.task, "test_accuracy": result["accuracy"],
            "n_test": result["n"]}


def evaluate_run(run_dir: str, progress: bool = True) -> dict:
    config, folder = _run_config(run_dir)
    config.progress = progress
    if (folder / "model").is_dir():  # LMAO runs have an adapter too, but the merged model is the result
        config.model = str(folder / "model")
        return evaluate_model(config)
    if (folder / "adapter").is_dir():
        return evaluate_model(config, adapter=str(folder / "adapter"))
    raise UserError(f"{run_dir} has no final model yet (unfinished run?): resume it first")


def replay_run(run_dir: str, output: str | None = None) -> str:
    """Rebuild a run's weights from the initial model and ``trajectory.json``, as its method
    defines (MeZO: the final model; LMAO: the base weights without adapters), and compare
    them with the run's ``model/``."""
    config, folder = _run_config(run_dir)
    method = methods.get(config.method).method
    trajectory = folder / "trajectory.json"
    if method.replays is None or not trajectory.is_file():
        replayable = [name for name, entry in methods.METHODS.items() if entry.method.replays]
        raise UserError(f"{run_dir} is not a finished run of {' or '.join(replayable)} (no trajectory.json)")
    # Before the replay, which may take minutes: a damaged file is one line, not a traceback.
    try:
        Trajectory.load(trajectory)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{trajectory} is damaged or not a zotune trajectory ({models.reason(error)}): restore it "
                        "from a copy of the run folder, or upgrade zotune if a newer one wrote it") from None
    if (folder / "model").is_dir():
        models.check_files(folder / "model", f"could not load model {str(folder / 'model')!r}")
    if (folder / "adapter").is_dir():
        _check_adapter(folder / "adapter")
    model, tokenizer, _ = models.load(config.model, config.dtype, config.model_kind)
    try:
        with models.quiet_peft():  # methods with adapters wrap the model
            model = method.replay(model, config.options, trajectory)
    except ValueError as error:  # the steps do not fit the model (config.yaml names another one?)
        raise UserError(f"{trajectory} does not fit the model {config.model} ({models.reason(error)}): check the "
                        "model in config.yaml, or restore the run folder from a copy") from None
    target = Path(output) if output else folder / "replayed"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    message = f"replayed {trajectory} onto {config.model}: {method.replays} saved to {target}"
    if (folder / "model").is_dir():
        try:
            with models.quiet_peft():
                model, note = method.as_exported(model, folder)
        except models.LOAD_ERRORS as error:  # the run's adapter, read by peft
            raise UserError(f"could not load the adapter in {folder / 'adapter'} ({models.reason(error)}): restore "
                            "it from a copy of the run folder") from None
        final, _, _ = models.load(str(folder / "model"), config.dtype, config.model_kind, device=model.device.type)
        pairs = list(zip(model.parameters(), final.parameters()))
        if all(torch.equal(a, b) for a, b in pairs):
            message += "; bit-identical to the run's model" + note
        else:
            message += f"; max difference {max((a - b).abs().max().item() for a, b in pairs):.3g}"
    return message


def _run_config(run_dir: str) -> tuple[TrainConfig, Path]:
    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    return from_mapping(load_run(folder)), folder


def _check_adapter(folder: Path) -> None:
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"{folder} holds no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): restore them from a copy")
    models.check_files(folder, f"could not load the adapter {folder}")


def _with_adapter(model, adapter: str):
    from peft import PeftModel

    _check_adapter(Path(adapter))
    try:
        with models.quiet_peft():
            return PeftModel.from_pretrained(model, adapter).eval()
    except models.LOAD_ERRORS as error:  # what _check_adapter cannot see, such as a wrong value
        raise UserError(f"could not load the adapter {adapter}: {models.reason(error)}") from None
