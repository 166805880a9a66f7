"""Evaluating a model or a finished run, and rebuilding a zeroth-order run's weights from its trajectory."""

from __future__ import annotations

from pathlib import Path

import torch

from zotune import methods
from zotune.assets import models
from zotune import tasks
from zotune.recipe.config import TrainConfig, from_mapping, load_run
from zotune.core.trajectory import Trajectory
from zotune.errors import UserError
from zotune.core.head import add_head
from zotune.engine.blocks import find_blocks
from zotune.methods.adapters import (HEAD_FILE, SCALES_FILE, load_head, load_scales, quiet_prefix_forward, save_head,
                                     save_scales)
from zotune.tasks.objectives import evaluate
from zotune.tasks.scoring import Scorer, continuation_ids

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft saves, newer and older


def evaluate_model(config: TrainConfig, adapter: str | None = None, icl: int = 0, scales: Path | None = None,
                   head: Path | None = None) -> dict:
    """The task's metric for ``config.model`` (plus an optional peft adapter, trained scales of its quantized
    matrices, or a trained candidate head) on the test sample of a run with this config; with ``icl`` K, each
    prompt follows K demonstrations drawn from that run's training sample."""
    task = tasks.build_task(config)
    model, tokenizer, kind = load_base(config, task=task)
    if scales is not None:
        load_scales(scales, model)
    if head is not None:
        load_head(head, model)
    if adapter:
        model = _with_adapter(model, adapter)
    split = tasks.sample(task, config.n_train, config.n_dev, config.n_test, config.seed)
    if icl:
        if icl < 0 or icl > len(split.train):
            raise UserError(f"--icl {icl}: choose 1 to --n-train ({len(split.train)}) demonstrations")
        task = task.with_demonstrations(split.train[:icl])  # the training sample is already shuffled by the seed
    scorer = Scorer(model, tokenizer, task.candidates, kind, config.max_length, config.max_new_tokens, task.separator)
    result = evaluate(scorer, task, split.test, config.eval_batch_size, "test", config.progress)
    metric = result["metric"]
    return {"model": config.model, "adapter": adapter, "task": config.task, "icl": icl, "metric": metric,
            f"test_{metric}": result["score"], **({"test_em": result["em"]} if "em" in result else {}),
            "n_test": result["n"]}


def evaluate_run(run_dir: str, progress: bool = True) -> dict:
    config, folder = _run_config(run_dir)
    config.progress = progress
    if (folder / "model").is_dir():  # LMAO runs have an adapter too, but the merged model is the result
        config.model = str(folder / "model")
        return evaluate_model(config)
    scales = folder / "scales" if (folder / "scales").is_dir() else None  # a quantized base's trained tensors
    if (folder / "head").is_dir():
        return evaluate_model(config, head=folder / "head")
    if (folder / "adapter").is_dir():
        return evaluate_model(config, adapter=str(folder / "adapter"), scales=scales)
    if scales is not None:
        return evaluate_model(config, scales=scales)
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
    model, tokenizer, _ = load_base(config)
    try:
        with models.quiet_peft():  # methods with adapters wrap the model
            model = method.replay(model, config.options, trajectory)
    except ValueError as error:  # the steps do not fit the model (config.yaml names another one?)
        raise UserError(f"{trajectory} does not fit the model {config.model} ({models.reason(error)}): check the "
                        "model in config.yaml, or restore the run folder from a copy") from None
    target = Path(output) if output else folder / "replayed"
    if (folder / "head").is_dir():  # the trajectory rebuilds Δ and b; the scale was measured, not trained
        load_head(folder / "head", model, scale_only=True)
        save_head(target, model)
        return (f"replayed {trajectory} onto {config.model}: the candidate head saved to {target}"
                + _compare_files(target / HEAD_FILE, folder / "head" / HEAD_FILE, "head", ""))
    if (folder / "scales").is_dir():  # a quantized base: the trained scales are the result
        save_scales(target, model)
        return (f"replayed {trajectory} onto {config.model} ({config.quantize}): the scales saved to {target}"
                + _compare_scales(target, folder / "scales"))
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
    elif all((place / ADAPTER_WEIGHTS[0]).is_file() for place in (folder / "adapter", target)):
        message += _compare_adapters(target, folder / "adapter")  # an adapter trained alone (--peft)
    return message


def load_base(config: TrainConfig, device: str | None = None, task=None):
    """The run's initial model (quantized as --quantize asks, but for what its method keeps in float; with --peft
    head, with a zero candidate head on ``task``'s words, default the config's task), tokenizer and kind."""
    method = methods.get(config.method).method
    model, tokenizer, kind = models.load(
        config.model, config.dtype, config.model_kind, device=device, quantize=config.quantize,
        group_size=config.group_size, keep_float=lambda model: method.float_modules(model, config.options),
        keep_quantized=config.keep_quantized)
    if getattr(config.options, "peft", None) == "head":
        add_candidate_head(model, tokenizer, task if task is not None else tasks.build_task(config),
                           config.options.head_layer, config.options.blocks)
    return model, tokenizer, kind


def add_candidate_head(model, tokenizer, task, layer: float = 0, blocks: str = "auto") -> None:
    if not task.candidates:
        raise UserError(f"--peft head corrects the output layer on the task's candidate words; {task.name} has none "
                        f"(a {task.format.replace('_', ' ')} task): use --peft lora or prefix")
    token_ids = [t for word in task.candidates for t in continuation_ids(tokenizer, word, task.separator)]
    source = None
    if layer:
        found = find_blocks(model, blocks).blocks
        if not -len(found) <= layer <= len(found):
            raise UserError(f"--head-layer {layer:g}: {type(model).__name__} has {len(found)} blocks; choose 1 to "
                            f"{len(found)} (or -1 to -{len(found)}, counted from the last), or 0 for the last layer")
        if 0 < layer < 1:  # a fraction of the depth
            layer = max(1, round(layer * len(found)))
        source = found[int(layer) - 1 if layer > 0 else int(layer)][1]
    try:
        add_head(model, token_ids, source)
    except ValueError as error:
        raise UserError(f"--peft head: {models.reason(error)}") from None


def _compare_adapters(replayed: Path, exported: Path) -> str:
    return _compare_files(replayed / ADAPTER_WEIGHTS[0], exported / ADAPTER_WEIGHTS[0], "adapter",
                          " (another peft version wrote it?)")


def _compare_scales(replayed: Path, exported: Path) -> str:
    if not (exported / SCALES_FILE).is_file():
        raise UserError(f"{exported} holds no {SCALES_FILE}: restore it from a copy of the run folder")
    return _compare_files(replayed / SCALES_FILE, exported / SCALES_FILE, "scales", "")


def _compare_files(replayed: Path, exported: Path, what: str, why: str) -> str:
    from safetensors.torch import load_file

    a, b = load_file(replayed), load_file(exported)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return f"; its tensors differ from the run's {what}{why}"
    if all(torch.equal(a[k], b[k]) for k in a):
        return f"; bit-identical to the run's {what}"
    return f"; max difference {max((a[k] - b[k]).abs().max().item() for k in a):.3g} from the run's {what}"


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
    from peft import PeftConfig, PeftModel

    _check_adapter(Path(adapter))
    try:
        with models.quiet_peft():
            config = models.on_quantized_layers(PeftConfig.from_pretrained(adapter))
            return quiet_prefix_forward(PeftModel.from_pretrained(model, adapter, config=config).eval())
    except models.LOAD_ERRORS as error:  # what _check_adapter cannot see, such as a wrong value
        raise UserError(f"could not load the adapter {adapter}: {models.reason(error)}") from None
