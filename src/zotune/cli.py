"""The ``zotune`` command line: train, eval, replay, demo."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings

import zotune
from zotune import methods
from zotune.recipe import config as cfg
from zotune.engine import distributed
from zotune.errors import UserError, unknown
from zotune.recipe.train import Interrupted, resume_config, train
from zotune.tasks.metrics import shown

EVAL_FIELDS = ("model", "model_kind", "dtype", "quantize", "group_size", "keep_quantized", "task", "data", "test_data",
               "text_column", "label_column", "template", "candidates", "n_train", "n_dev", "n_test", "seed",
               "eval_batch_size", "max_length", "max_new_tokens", "progress")


def cmd_train(args) -> int:
    given = {k: v for k, v in vars(args).items() if k in cfg.flat_names()}
    base = cfg.load_yaml(args.config) if args.config else {}
    if args.resume:
        if args.config:
            raise UserError("--resume takes the run's own config.yaml; leave out --config")
        config = resume_config(args.resume, given)
    else:
        config = cfg.from_args(args, base)
    unused = cfg.unused_options(config, given)
    if unused:  # accepted (one flat namespace for all methods), but the user should know they change nothing
        print(f"zotune: note: {config.method} does not use {', '.join(unused)}", file=sys.stderr)
    renamed = cfg.renamed_options(config, {**base, **given})
    if renamed:  # still read, so that scripts keep working; the hint is for the next edit
        print(f"zotune: note: {'; '.join(renamed)} (the old spelling still works)", file=sys.stderr)
    result = train(config, resume=bool(args.resume))
    if distributed.rank() == 0:
        print(summary(result, config.output))
    return 0


def summary(result: dict, output) -> str:
    metric = result.get("metric", "accuracy")
    zero = result[f"zero_shot_{metric}"]
    before = f"zero-shot {shown(metric, zero)} -> " if zero is not None else ""
    return (f"zotune: {result['method']} on {result['task']}: test {metric} {before}"
            f"{shown(metric, result[f'test_{metric}'])} "
            f"(n={result['n_test']}) after {result['steps']} steps in {result['train_seconds']:.0f}s; "
            f"run folder {output}")


def cmd_eval(args) -> int:
    from zotune.recipe.evaluation import evaluate_run, evaluate_model

    if args.run:
        result = evaluate_run(args.run, progress=getattr(args, "progress", True))
    else:
        result = evaluate_model(cfg.from_args(args), adapter=args.adapter, icl=args.icl)
    print(json.dumps(result))
    return 0


def cmd_replay(args) -> int:
    from zotune.recipe.evaluation import replay_run

    print(replay_run(args.run, args.output))
    return 0


def cmd_demo(args) -> int:
    from zotune.tools import demo
    demo.run(progress=not args.no_progress)
    return 0


def cmd_bench(args) -> int:
    from zotune.tools import bench
    rows = []
    for name in args.model:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else bench.DEFAULT_METHODS
        rows += bench.bench(name, args.batch_size, args.length, args.dtype, args.device, methods, args.repeats,
                            args.quantize)
    print(bench.table(rows))
    if args.json:
        bench.save_json(rows, args.json)
    if args.plot:
        bench.plot(rows, args.plot)
    broken = bench.failed(rows)
    for row in broken:
        print(f"zotune: {row['model']} {row['method']} failed: {row['error']}", file=sys.stderr)
    return 1 if broken else 0


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line; a mistyped choice or option names the closest one."""

    def error(self, message):
        self.exit(2, f"zotune: error: {_explain(message, self)}\n")


_INVALID_CHOICE = re.compile(r"argument (?P<arg>[^:]+): invalid choice: '?(?P<value>[^']*?)'? \(choose from "
                             r"(?P<choices>.*)\)$")


def _explain(message: str, parser: argparse.ArgumentParser) -> str:
    match = _INVALID_CHOICE.match(message)
    if match:
        arg = match["arg"].split("/")[0].strip()
        kind = arg.lstrip("-").replace("-", " ") if arg.startswith("-") else "command"
        choices = re.findall(r"'([^']*)'", match["choices"]) or [c.strip() for c in match["choices"].split(",")]
        return unknown(kind, match["value"], choices)
    if message.startswith("unrecognized arguments: "):
        given = message.split(": ", 1)[1].split()
        option = next((word.split("=")[0] for word in given if word.startswith("-")), None)
        if option is not None:
            return unknown("option", option, sorted(_option_strings(parser)))
        return f"unexpected argument {given[0]!r} (options start with --)"
    return message


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = {s for action in parser._actions if action.help is not argparse.SUPPRESS  # older names: not suggested
             for s in action.option_strings if s.startswith("--")}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def cmd_memory(args) -> int:
    from zotune.tools import bench
    from zotune.tools import memory
    gpu = memory.parse_size(args.gpu) if args.gpu else None
    for number, name in enumerate(args.model):
        shape = memory.shape_of(bench.build_config(name))
        estimates = memory.estimate(shape, args.batch_size, args.length, args.dtype, args.deep_blocks,
                                    args.quantize, args.group_size)
        print(("\n" if number else "") + memory.table(name, shape, estimates, gpu))
    return 0


def cmd_report(args) -> int:
    from zotune.recipe import report
    print(report.report(args.runs, args.output))
    figure = " and curves.png" if report.has_matplotlib() else " (pip install 'zotune[plot]' for curves.png)"
    print(f"wrote {args.output}/report.md{figure}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zotune.tools import bench as bench_module
    parser = Parser(prog="zotune", description="Fine-tune language models when memory is the limit.")
    parser.add_argument("--version", action="version", version=f"zotune {zotune.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model on a task")
    train.add_argument("--config", help="YAML file with options; options on the command line override it")
    train.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR")
    cfg.add_arguments(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("eval", help="test accuracy of a model (zero-shot) or of a finished run")
    evaluate.add_argument("--run", metavar="DIR", help="evaluate the final weights of the run in DIR")
    evaluate.add_argument("--adapter", metavar="DIR", help="a peft adapter folder to load on top of --model")
    evaluate.add_argument("--icl", type=int, default=0, metavar="K",
                          help="in-context learning: K demonstrations from the training sample before each prompt "
                               "(the MeZO paper uses 32; raise --max-length to fit them, or the oldest are cut)")
    cfg.add_arguments(evaluate, EVAL_FIELDS)
    evaluate.set_defaults(handler=cmd_eval)

    replay = commands.add_parser("replay", help="rebuild a zeroth-order run's weights from its trajectory")
    replayable = [name for name, entry in methods.METHODS.items() if entry.method.replays]
    replay.add_argument("--run", metavar="DIR", required=True, help=f"a finished run of {' or '.join(replayable)}")
    replay.add_argument("--output", metavar="DIR", help="where to save the rebuilt model (default: DIR/replayed)")
    replay.set_defaults(handler=cmd_replay)

    config_models = (f"built in: {', '.join(bench_module.MODELS)}; "
                     "or a hub id / folder / .gguf file whose config is used")
    bench = commands.add_parser("bench", help="time per step and peak memory of each method on random-init models")
    bench.add_argument("--model", nargs="+", default=["opt-125m"],
                       help=config_models)
    bench.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    bench.add_argument("--length", type=int, default=128, help="tokens per sequence (default: 128)")
    bench.add_argument("--dtype", default="fp16", choices=("fp32", "bf16", "fp16"), help="weights dtype")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--methods",
                       help=f"comma-separated, run in this order, from {', '.join(bench_module.all_methods())} "
                            f"(default: {','.join(bench_module.DEFAULT_METHODS)}; with --quantize: "
                            f"{','.join(bench_module.ON_QUANTIZED)})")
    bench.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                       help="bench on a quantized base (mezo then trains its scales)")
    bench.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    bench.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    bench.add_argument("--plot", metavar="PNG", help="save time/step and memory vs model size (needs matplotlib)")
    bench.set_defaults(handler=cmd_bench)

    memory = commands.add_parser("memory", help="will it fit? estimated peak GPU memory of each method, from the "
                                                "model's config alone (nothing downloaded or allocated)")
    memory.add_argument("--model", nargs="+", default=["opt-1.3b"],
                        help=config_models)
    memory.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    memory.add_argument("--length", type=int, default=128, help="tokens per sequence (default: 128)")
    memory.add_argument("--dtype", default="fp16", choices=tuple(("fp32", "bf16", "fp16")), help="weights dtype")
    memory.add_argument("--deep-blocks", type=int, default=1, help="HZO's first-order blocks (default: 1)")
    memory.add_argument("--quantize", default="none", choices=("none", "int8", "int4"),
                        help="add the rows of a base quantized this way: its inference, and zeroth order on its "
                             "scales (train --quantize ... --peft scales)")
    memory.add_argument("--group-size", type=int, default=32, help="--quantize: weights that share a scale")
    memory.add_argument("--gpu", metavar="SIZE", help="the card's memory, e.g. 24GB: says which methods fit")
    memory.set_defaults(handler=cmd_memory)

    report = commands.add_parser("report", help="compare runs: a Markdown table and one figure of their curves")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    report.add_argument("--output", default="runs/report", metavar="DIR",
                        help="where report.md and curves.png go (default: runs/report)")
    report.set_defaults(handler=cmd_report)

    demo = commands.add_parser("demo", help="fine-tune the default model on the default task with HZO (offline), then "
                                            "compare the methods side by side")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars from loading and saving: ours say more
    # Deprecation notices about the libraries' own internals give a user nothing to act on.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|accelerate|torch)(\.|$)")
    try:
        return args.handler(args)
    except UserError as error:
        rank = distributed.rank()
        print(f"zotune: error{f' (rank {rank})' if rank else ''}: {error}", file=sys.stderr)
        return 2
    except Interrupted as error:
        print(f"zotune: {error}", file=sys.stderr)
        return 128 + error.signal  # 130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1: the shell's convention
    except KeyboardInterrupt:
        print("zotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
