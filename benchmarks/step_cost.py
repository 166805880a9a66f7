"""Cost of one MeZO step versus two plain inference forwards (CPU or CUDA).

    python benchmarks/step_cost.py [--device cpu] [--repeats 20]

Random-init Llama models from configs: time does not depend on the weights.
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zotune

def reference_step(model, closure, seed, lr=1e-6, eps=1e-3):
    """The reference MeZO step: torch.randn per tensor, four in-place passes."""
    params = [p for p in model.parameters() if p.requires_grad]

    def perturb(scale):
        generator = torch.Generator(params[0].device).manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype), alpha=scale)

    with torch.no_grad():
        perturb(eps)
        plus = closure().item()
        perturb(-2 * eps)
        minus = closure().item()
        perturb(eps)
        perturb(-lr * (plus - minus) / (2 * eps))


SIZES = {
    "llama-tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "llama-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8),
    "llama-medium": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
}


def timed(fn, repeats, device):
    fn()  # warm-up (numba compile, allocator)
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    print("| model | params | 2 forwards (ms) | zotune MeZO step (ms) | ratio | reference-style step (ms) | ratio | device |")
    print("|---|---|---|---|---|---|---|---|")
    for name, extra in SIZES.items():
        config = LlamaConfig(vocab_size=1024, num_key_value_heads=extra["num_attention_heads"], **extra)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).to(args.device).eval()
        ids = torch.randint(0, 1024, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
        ids = ids.to(args.device)

        def closure():
            return model(input_ids=ids, labels=ids).loss

        def two_forwards():
            with torch.no_grad():
                closure()
                closure()

        optimizer = zotune.MeZO(model.parameters(), lr=1e-6)
        forwards = timed(two_forwards, args.repeats, args.device)
        step = timed(lambda: optimizer.step(closure), args.repeats, args.device)
        reference = timed(lambda: reference_step(model, closure, seed=0), args.repeats, args.device)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"| {name} | {n_params / 1e6:.2f}M | {forwards * 1e3:.1f} | {step * 1e3:.1f} | {step / forwards:.2f} "
            f"| {reference * 1e3:.1f} | {reference / forwards:.2f} | {args.device}, {torch.get_num_threads()} threads |"
        )


if __name__ == "__main__":
    main()
