"""Memory and PCIe model of block-wise CPU<->GPU offload (`--offload cpu`) for OPT, as Markdown.

    .venv/bin/python benchmarks/offload_memory.py [--check] [--bandwidth 25] [--rank 2] [--interval 50]

A model, not a measurement: fp16 weights, allocator bytes only (no CUDA context, no fragmentation).
GB = 1e9 bytes, MB = 1e6 bytes. --check verifies the parameter formulas on a tiny OPTForCausalLM.
"""

from __future__ import annotations

import argparse

VOCAB, POSITIONS, FP16, FP32 = 50272, 2050, 2, 4  # OPT's learned positions: 2048 + an offset of 2
MODELS = {"1.3B": (2048, 24, 32), "2.7B": (2560, 32, 32), "6.7B": (4096, 32, 32), "13B": (5120, 40, 40),
          "30B": (7168, 48, 56), "66B": (9216, 64, 72), "175B": (12288, 96, 96)}  # hidden, layers, heads
ZO2_PEAK_GB = {"1.3B": 3.75, "6.7B": 4.99, "13B": 6.18, "30B": 8.86, "66B": 12.07, "175B": 18.04}  # b1 s2048
WORKLOADS = [(1, 2048), (16, 128)]


def block_params(d: int) -> int:
    attention = 4 * (d * d + d)  # q, k, v, out projections with biases
    ffn = (d * 4 * d + 4 * d) + (4 * d * d + d)  # fc1, fc2 with biases
    return attention + ffn + 2 * 2 * d  # two LayerNorms (weight, bias)


def vector_params(d: int) -> int:
    return 4 * d + 4 * d + d + 2 * 2 * d  # the 1-D tensors of a block: low-rank leaves them dense


def matrix_shapes(d: int) -> list[tuple[int, int]]:
    return [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]  # (out, in) of the block's Linear weights


def factor_bytes(shapes, rank: int) -> int:
    # U accumulated between resamples (m x r) plus the cached V (n x r), both fp32 and resident.
    return sum((m + n) * rank * FP32 for m, n in shapes)


def check() -> str:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    d, layers, heads, vocab, positions = 16, 2, 4, 97, 30
    config = OPTConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, ffn_dim=4 * d,
                       num_attention_heads=heads, max_position_embeddings=positions, word_embed_proj_dim=d)
    model = OPTForCausalLM(config)
    block = model.model.decoder.layers[0]
    assert sum(p.numel() for p in block.parameters()) == block_params(d)
    assert sum(p.numel() for p in block.parameters() if p.ndim == 1) == vector_params(d)
    got = sorted(tuple(p.shape) for p in block.parameters() if p.ndim == 2)
    assert got == sorted(matrix_shapes(d)), got
    decoder = model.model.decoder
    assert decoder.embed_positions.weight.shape[0] == positions + 2  # why POSITIONS is 2050
    assert model.lm_head.weight.data_ptr() == decoder.embed_tokens.weight.data_ptr()  # tied: counted once
    unique = sum(p.numel() for p in model.parameters())  # parameters() deduplicates the tied weight
    assert unique == layers * block_params(d) + (vocab + positions + 2) * d + 2 * d
    assert total_params(2048, 24) == 1_315_758_080  # facebook/opt-1.3b's published count
    return f"self-check passed (torch {torch.__version__}): per block 12d^2 + 13d, e.g. d={d}: {block_params(d)}"


def total_params(d: int, layers: int) -> int:
    return layers * block_params(d) + (VOCAB + POSITIONS) * d + 2 * d


def memory_row(name, d, layers, heads, batch, seq, rank) -> dict:
    block = block_params(d) * FP16
    embed = ((VOCAB + POSITIONS) * d + 2 * d) * FP16  # token + positions + final norm; head tied
    tokens = 2 * batch * seq  # the +eps and -eps copies stacked along the batch
    # SDPA/flash: no S x S matrix. Live at once: residual stream d + the widest intermediate 4d + q,k,v 3d.
    act = tokens * (d + 4 * d + 3 * d) * FP16
    eager = 2 * batch * heads * seq * seq * FP16  # one fp16 score matrix per copy (HF's softmax adds more)
    logits = {"cand": 2 * batch * 1 * VOCAB * FP32, "lm": 2 * batch * seq * VOCAB * FP32}
    # Dense z: zotune substitutes W + eps*z for the module running; the largest is the tied head.
    scratch = max(VOCAB * d, 4 * d * d) * FP16
    zo_blocks = layers - 1
    deep_state = (block_params(d) + 2 * d) * (FP32 + 2 * FP32)  # fp32 grad + AdamW m, v; block + final norm
    deep_act = batch * seq * 34 * d  # Korthikanti et al. 34 s b h, already bytes at 16 bits; flash: no 5as^2
    head_state = VOCAB * d * (FP32 + 2 * FP32)  # the tied head/embedding is first order in HZO
    positions_factor = factor_bytes([(POSITIONS, d)], rank)  # the one ZO 2-D tensor outside the blocks
    factors = zo_blocks * factor_bytes(matrix_shapes(d), rank) + positions_factor
    base = 3 * block + embed + act
    mezo = {k: base + scratch + v for k, v in logits.items()}
    # HZO: the deep block stays resident (its Adam lives on the GPU); one copy's logit gradient in fp32.
    hzo = {k: base + block + deep_state + deep_act + head_state + factors + v * 3 // 2 for k, v in logits.items()}
    zo2 = ZO2_PEAK_GB.get(name) if (batch, seq) == (1, 2048) else None
    return dict(name=name, params=total_params(d, layers), block=block, embed=embed, act=act, eager=eager,
                logits=logits, scratch=scratch, deep=deep_state + deep_act, head=head_state, factors=factors,
                mezo=mezo, hzo=hzo, zo2=zo2)


def gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def memory_table(batch, seq, rank) -> list[str]:
    lines = [f"### batch {batch} x seq {seq} (GB)", "",
             "| model | params | block | 3 slots | emb+head | dense z scratch | act SDPA | +S×S eager | "
             "logits cand / LM | HZO deep grads+Adam+act | HZO head grads+Adam | HZO LR factors | "
             "**MeZO peak** cand / LM | **HZO peak** cand / LM | ZO2 | 0.75×ZO2 | MeZO / ZO2 cand / LM |",
             "|---|---:|" + "---:|" * 15]
    for name, (d, layers, heads) in MODELS.items():
        r = memory_row(name, d, layers, heads, batch, seq, rank)
        zo2 = r["zo2"]
        compare = ("–", "–", "–") if zo2 is None else (
            f"{zo2:.2f}", f"{0.75 * zo2:.3f}",
            f"{r['mezo']['cand'] / 1e9 / zo2:.2f} / {r['mezo']['lm'] / 1e9 / zo2:.2f}")
        lines.append(
            f"| {name} | {r['params'] / 1e9:.2f} B | {gb(r['block'])} | {gb(3 * r['block'])} | {gb(r['embed'])} | "
            f"{gb(r['scratch'])} | {gb(r['act'])} | {gb(r['eager'])} | "
            f"{gb(r['logits']['cand'])} / {gb(r['logits']['lm'])} | {gb(r['deep'])} | {gb(r['head'])} | "
            f"{gb(r['factors'])} | **{gb(r['mezo']['cand'])} / {gb(r['mezo']['lm'])}** | "
            f"**{gb(r['hzo']['cand'])} / {gb(r['hzo']['lm'])}** | {' | '.join(compare)} |")
    return lines + [""]


def _ms(nbytes: float, bandwidth: float) -> str:
    return f"{nbytes / bandwidth * 1e3:,.0f}"


def transfer_table(bandwidth_gbs, rank, interval) -> list[str]:
    bw = bandwidth_gbs * 1e9
    lines = [f"### PCIe traffic per step ({bandwidth_gbs:g} GB/s each way; rank {rank}, resample every {interval})",
             "", "| model | MeZO up MB | MeZO-dense down MB | MeZO-LR down MB between / avg | "
             "MeZO-dense floor ms duplex / one engine | MeZO-LR floor ms | HZO up MB | HZO-LR down MB between / avg | "
             "HZO-LR floor ms |", "|---|" + "---:|" * 8]
    for name, (d, layers, _) in MODELS.items():
        block, vectors = block_params(d) * FP16, vector_params(d) * FP16
        # Low-rank: W's update stays as U V^T on the GPU; the dense-direction 1-D tensors go down every step.
        up, hzo_up = layers * block, (layers - 1) * block
        between, hzo_between = layers * vectors, (layers - 1) * vectors
        average, hzo_average = [n * (block + (interval - 1) * vectors) / interval for n in (layers, layers - 1)]
        lines.append(
            f"| {name} | {up / 1e6:,.0f} | {up / 1e6:,.0f} | {between / 1e6:.1f} / {average / 1e6:,.0f} | "
            f"{_ms(up, bw)} / {_ms(2 * up, bw)} | {_ms(max(up, average), bw)} | {hzo_up / 1e6:,.0f} | "
            f"{hzo_between / 1e6:.1f} / {hzo_average / 1e6:,.0f} | {_ms(max(hzo_up, hzo_average), bw)} |")
    return lines + [""]


NOTES = """Assumptions:
- GPU holds 3 block slots (upload i+1, compute i, write-back i-1 on 3 streams), embeddings and final norm
  permanently; the head is tied to the token embedding. One forward per step with the +eps and -eps copies
  stacked along the batch, so every offloaded block goes up once and (dense) down once per step.
- MeZO = dense directions: the update is applied on upload, so blocks are written back every step.
  "dense z scratch": zotune substitutes W + eps*z for the module running; the largest such tensor is the tied
  head (V x d fp16). Chunking the head's vocabulary would shrink it to a block's fc1 (4d^2 fp16).
- Activations (ZO, no autograd): 2 copies x batch x seq x (d residual + 4d FFN + 3d q,k,v) x 2 bytes,
  attention by SDPA/flash (no S x S matrix); the eager column adds one fp16 S x S per head per copy
  (HF's eager path also holds an fp32 softmax transiently: up to ~4x that column).
- Logits only at the positions the loss keeps, fp32 for log-softmax: candidate scoring keeps 1, the full LM
  loss keeps seq: 2 copies x batch x keep x 50272 x 4 bytes (an unfused log_softmax holds a second copy).
- HZO = last block + final norm + tied head first order with AdamW (fp32 grad + m + v = 12 B/param, no fp32
  master), the rest low-rank ZO. The deep block stays resident (one extra block, not in the 3 slots; an upper
  bound by at most a block). Its autograd activations: Korthikanti et al. per layer s*b*h*(34 + 5*a*s/h)
  bytes for 16-bit activations (already bytes: multiplying by 2 again would double count), flash drops the
  5as^2 term; one copy's fp32 logit gradient is added. If the first-order part needs a third, unperturbed
  copy through the ZO blocks, activations and logits grow by 3/2.
- Low-rank factors: per ZO 2-D weight m x n, U (m x r) accumulated between resamples plus cached V (n x r),
  fp32, resident (blocks and position embedding). Low-rank down traffic: the 1-D tensors (biases, norms;
  13d per block) every step, the whole block at resample steps; "avg" spreads that over the interval.
- Floors: bytes / bandwidth; duplex = up and down overlap on separate copy engines (max of the two),
  one engine = up + down serialised.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth", type=float, default=25.0, help="host<->device GB/s (PCIe 4 x16 pinned)")
    parser.add_argument("--rank", type=int, default=2, help="low-rank direction rank r")
    parser.add_argument("--interval", type=int, default=50, help="steps between V resamples (nu)")
    parser.add_argument("--check", action="store_true", help="verify the formulas on a tiny OPTForCausalLM")
    args = parser.parse_args()
    command = "benchmarks/offload_memory.py" + "".join(
        f" --{k} {v}" for k, v in (("bandwidth", f"{args.bandwidth:g}"), ("rank", args.rank),
                                   ("interval", args.interval))) + (" --check" if args.check else "")
    print(f"Generated by `.venv/bin/python {command}`.  ")
    print("**A model, not a measurement**: OPT fp16, GPU allocator bytes only; GB = 1e9 bytes, MB = 1e6 bytes.\n")
    if args.check:
        print(check() + "\n")
    for batch, seq in WORKLOADS:
        print("\n".join(memory_table(batch, seq, args.rank)))
    print("\n".join(transfer_table(args.bandwidth, args.rank, args.interval)))
    print(NOTES)


if __name__ == "__main__":
    main()
