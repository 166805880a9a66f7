"""Population decoding throughput (issue 26): N perturbed copies of the model decoding B prompts in one batch,
against plain batched greedy decoding of the same N x B rows.

Each setting decodes exactly ``--new-tokens`` tokens a row (no early stop), so all do the same number of forwards;
tokens/s counts every generated token of every row. Settings: ``plain`` (no perturbation, zotune's decode loop),
``generate`` (Hugging Face ``model.generate``, the same rows), ``lowrank-rR`` (each copy's rows carry their own
rank-R output deltas, the ES default), ``dense`` (each copy's weights substituted per layer and token inside the
one batch), ``dense-materialized`` (the copies one after another, each copy's whole weights built once: ES's
``--no-stacked --materialize``).

    python benchmarks/population_decoding.py --model smollm2 --copies 8 --prompts 4 --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from zotune.assets import models
from zotune.core.directions import Dense, Draw, LowRank
from zotune.core.perturb import Perturbation, PerturbedParam, StackedPerturbation
from zotune.core.rng import derive_seed
from zotune.tasks import decoding
from zotune.tasks.scoring import Scorer
from zotune.tasks.verifiable import ARITH_TEMPLATE, arithmetic_problems


def population(model, direction, copies: int, sigma: float = 1e-3):
    params = [PerturbedParam(p, name, direction) for name, p in model.named_parameters()]
    plan = [(Draw(0, 0, derive_seed(0, 0, k // 2)), sigma * (1 if k % 2 == 0 else -1)) for k in range(copies)]
    return StackedPerturbation(params, plan)


def timed(function, repeats: int) -> float:
    function()  # warm-up: the KV cache's allocations, the stop table, the kernels
    begin = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - begin) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ranks", default="1,4")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dense", action="store_true", help="also the dense population (slow: a weight per copy)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model, tokenizer, kind = models.load(args.model, "fp32", "auto", device="cuda" if torch.cuda.is_available()
                                         else "cpu")
    scorer = Scorer(model, tokenizer, [], kind, max_length=256, max_new_tokens=args.new_tokens)
    texts = [ARITH_TEMPLATE.format(text=e.text) for e in arithmetic_problems(1, "+-*")[: args.prompts]]
    prompts = decoding.prepare(scorer, texts, chat=True)
    all_rows = decoding.prepare(scorer, texts * args.copies, chat=True)
    rows = args.copies * args.prompts
    tokens = rows * args.new_tokens

    def plain():
        decoding.decode(scorer, all_rows, stop=False)

    def generate():
        model.generate(input_ids=all_rows.ids, attention_mask=all_rows.attention, do_sample=False,
                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=scorer.pad_id)

    def perturbed(direction):
        def run():
            with torch.no_grad(), population(model, direction, args.copies):
                decoding.decode(scorer, prompts, args.copies, stop=False)
        return run

    settings = {"plain": plain, "generate": generate}
    settings.update({f"lowrank-r{r}": perturbed(LowRank(rank=int(r), interval=1)) for r in args.ranks.split(",")})
    def materialized():
        params = [PerturbedParam(p, name, Dense("gaussian")) for name, p in model.named_parameters()]
        every = {id(p) for p in model.parameters()}
        for k in range(args.copies):
            draw = Draw(0, 0, derive_seed(0, 0, k // 2))
            with torch.no_grad(), Perturbation(params, draw, 1e-3 * (1 if k % 2 == 0 else -1), whole=every):
                decoding.decode(scorer, prompts, stop=False)

    if args.dense:
        settings["dense"] = perturbed(Dense("gaussian"))
        settings["dense-materialized"] = materialized
    results = {}
    with torch.no_grad():
        for name, function in settings.items():
            seconds = timed(function, args.repeats)
            results[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    base = results["plain"]["tokens_per_s"]
    print(f"{args.model}: {args.copies} copies x {args.prompts} prompts = {rows} rows, {args.new_tokens} new tokens "
          f"each, on {'cuda' if torch.cuda.is_available() else platform.processor() or 'cpu'} "
          f"({torch.get_num_threads()} threads)")
    print("| setting | s per decode | tokens/s | vs plain |\n|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / base:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
