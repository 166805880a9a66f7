"""The ``zotune`` command line: train, eval, replay, demo."""

from __future__ import annotations

import argparse
import json
import sys

import zotune
from zotune import config as cfg, methods
from zotune.engine import distributed
from zotune.errors import UserError
from zotune.train import Interrupted, resume_config, train

EVAL_FIELDS = ("model", "model_kind", "dtype", "task", "data", "test_data", "text_column", "label_column", "template",
               "candidates", "n_train", "n_dev", "n_test", "seed", "eval_batch_size", "max_length", "max_new_tokens",
               "progress")
# The demo: LoRA fine-tuning is what shows a clear gain within a few CPU minutes on a
# 135M model; MeZO needs thousands of steps (see README).
DEMO = dict(model="smollm2", task="rt-sst2", method="lora-ft", steps=120, batch_size=8, lr=5e-4, n_train=1000,
            n_dev=0, n_test=300, eval_batch_size=32, output="runs/demo", overwrite=True)


def cmd_train(args) -> int:
    given = {k: v for k, v in vars(args).items() if k in cfg.flat_names()}
    if args.resume:
        if args.config:
            raise UserError("--resume takes the run's own config.yaml; leave out --config")
        config = resume_config(args.resume, given)
    else:
        base = cfg.load_yaml(args.config) if args.config else {}
        config = cfg.from_args(args, base)
    unused = cfg.unused_options(config, given)
    if unused:  # accepted (one flat namespace for all methods), but the user should know they change nothing
        print(f"zotune: note: {config.method} does not use {', '.join(unused)}", file=sys.stderr)
    result = train(config, resume=bool(args.resume))
    if distributed.rank() == 0:
        print(summary(result, config.output))
    return 0


def summary(result: dict, output) -> str:
    metric = result.get("metric", "accuracy")
    zero = result[f"zero_shot_{metric}"]
    before = f"zero-shot {zero:.1%} -> " if zero is not None else ""
    return (f"zotune: {result['method']} on {result['task']}: test {metric} {before}{result[f'test_{metric}']:.1%} "
            f"(n={result['n_test']}) after {result['steps']} steps in {result['train_seconds']:.0f}s; "
            f"run folder {output}")


def cmd_eval(args) -> int:
    from zotune.evaluation import evaluate_run, evaluate_model

    if args.run:
        result = evaluate_run(args.run, progress=getattr(args, "progress", True))
    else:
        result = evaluate_model(cfg.from_args(args), adapter=args.adapter, icl=args.icl)
    print(json.dumps(result))
    return 0


def cmd_replay(args) -> int:
    from zotune.evaluation import replay_run

    print(replay_run(args.run, args.output))
    return 0


def cmd_demo(args) -> int:
    config = cfg.from_mapping({**DEMO, "progress": not args.no_progress})
    print(f"zotune demo: {config.method} on {config.model} / {config.task}, {config.steps} steps of "
          f"{config.batch_size}, lr {config.options.lr}; zero-shot and final accuracy on {config.n_test} test "
          "sentences",
          flush=True)
    result = train(config)
    print(f"zero-shot accuracy: {result['zero_shot_accuracy']:.1%}")
    print(f"fine-tuned accuracy: {result['test_accuracy']:.1%}")
    print(summary(result, config.output))
    return 0


def cmd_bench(args) -> int:
    from zotune import bench

    rows = []
    for name in args.model:
        rows += bench.bench(name, args.batch_size, args.length, args.dtype, args.device,
                            [m.strip() for m in args.methods.split(",") if m.strip()], args.repeats)
    print(bench.table(rows))
    if args.json:
        bench.save_json(rows, args.json)
    if args.plot:
        bench.plot(rows, args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from zotune import bench as bench_module

    parser = argparse.ArgumentParser(prog="zotune", description="Fine-tune language models when memory is the limit.")
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

    bench = commands.add_parser("bench", help="time per step and peak memory of each method on random-init models")
    bench.add_argument("--model", nargs="+", default=["opt-125m"],
                       help=f"built in: {', '.join(bench_module.MODELS)}; or a hub id / folder whose config is used")
    bench.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: 16)")
    bench.add_argument("--length", type=int, default=128, help="tokens per sequence (default: 128)")
    bench.add_argument("--dtype", default="fp16", choices=("fp32", "bf16", "fp16"), help="weights dtype")
    bench.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    bench.add_argument("--methods", default=",".join(bench_module.DEFAULT_METHODS),
                       help=f"comma-separated, run in this order, from {', '.join(bench_module.all_methods())} "
                            "(default: %(default)s)")
    bench.add_argument("--repeats", type=int, default=5, help="timed steps per method (median reported)")
    bench.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    bench.add_argument("--plot", metavar="PNG", help="save time/step and memory vs model size (needs matplotlib)")
    bench.set_defaults(handler=cmd_bench)

    demo = commands.add_parser("demo", help="fine-tune the default model on the default task (offline)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars from loading and saving: ours say more
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
