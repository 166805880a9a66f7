"""The ``zotune`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import zotune


def _tiny_llama(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):  # a fixed init without touching the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def demo(args) -> int:
    """Placeholder until the end-to-end task lands: MeZO fits a tiny model to a fixed batch."""
    import torch
    from tqdm import tqdm

    model = _tiny_llama(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, model.config.vocab_size, (8, 16), generator=generator)

    def closure():
        return model(input_ids=batch, labels=batch).loss

    optimizer = zotune.MeZO(model.named_parameters(), lr=args.lr, eps=1e-3, seed=args.seed)
    with torch.no_grad():
        before = closure().item()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="MeZO", unit="step")
    for _ in bar:
        bar.set_postfix(loss=f"{optimizer.step(closure):.4f}")
    with torch.no_grad():
        after = closure().item()
    seconds = time.perf_counter() - start
    print(
        f"zotune demo (placeholder: tiny random-init Llama, one fixed batch): loss {before:.4f} -> "
        f"{after:.4f} after {args.steps} MeZO steps in {seconds:.1f}s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zotune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"zotune {zotune.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="a short MeZO run that needs no downloads")
    demo_parser.add_argument("--steps", type=int, default=500, help="MeZO steps (default: 500)")
    demo_parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    demo_parser.add_argument("--seed", type=int, default=0, help="seed of model, data and directions")
    demo_parser.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) <= 0:
        print("zotune: error: --steps must be > 0", file=sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
