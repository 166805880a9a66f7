"""``zotune bench``: time per step and peak memory of every registered method (and some
variants), against two inference forwards and a reference-style MeZO, on random-init
models built from configs (memory and speed do not depend on the weights)."""

from __future__ import annotations

import gc
import json
import traceback
from pathlib import Path

import torch

from zotune.assets import convert
from zotune.tools.meters import Meter, Traffic, host_allocated_bytes, link_bandwidth, link_columns, offload_columns
from zotune import methods as registry
from zotune.errors import UserError, reason
from zotune.assets.models import DTYPES
from zotune.core.quant import quantize_model, quantized_weights
from zotune.tools.bench_head import HEAD, head_step

# Bench-only rows besides the registered methods: a baseline and the research code's MeZO step.
FORWARD, REFERENCE = "forward", "mezo-reference"
# Variants of registered methods, as each declares them: row name -> (method, config overrides).
VARIANTS = {variant: (name, overrides) for name in registry.names()
            for variant, overrides in registry.get(name).method.bench_variants.items()}
# Rows that stream the blocks from host memory.
OFFLOADED = {name for name, (method, overrides) in VARIANTS.items()
             if registry.get(method).config(**overrides).streams_blocks}
# The registry's order: from the least memory to the most (a method that runs out of it comes last).
DEFAULT_METHODS = (FORWARD, REFERENCE, *registry.names())
OUT_OF_MEMORY = "out of memory"
ON_QUANTIZED = (FORWARD, "mezo", "lora-ft", "lmao")  # the rows a --quantize base runs (mezo: on its scales)
BENCH_LR = 1e-7  # small enough that a few steps leave the random weights what they were
# (hidden, layers, heads, ffn) of the OPT family; vocab 50272 and 2048 positions throughout.
OPT_SIZES = {
    "opt-125m": (768, 12, 12, 3072), "opt-350m": (1024, 24, 16, 4096), "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240), "opt-6.7b": (4096, 32, 32, 16384), "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672), "opt-66b": (9216, 64, 72, 36864), "opt-175b": (12288, 96, 96, 49152),
}
LLAMA = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1024),
    # SmolLM2-135M's shape: the default model of zotune train.
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # Llama-2's shapes (vocabulary 32000).
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000),
    "llama2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=32000),
    # A small model whose embedding dominates (Gemma-3-270M-like shapes): where the largest tensor sets the memory.
    "large-vocab": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, vocab_size=262144, tie_word_embeddings=True),
}
MODELS = (*OPT_SIZES, *LLAMA)


def all_methods() -> list[str]:
    """Every bench row name: the baseline, the registered methods with their variants, the reference MeZO."""
    names = [FORWARD]
    for name in registry.names():
        names += [name, *(v for v, (base, _) in VARIANTS.items() if base == name)]
        names += [HEAD] if name == "mezo" else []
    return [*names, REFERENCE]


def build_config(name: str):
    from transformers import AutoConfig, LlamaConfig, OPTConfig

    if name in OPT_SIZES:
        hidden, layers, heads, ffn = OPT_SIZES[name]
        return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
                         word_embed_proj_dim=512 if name == "opt-350m" else hidden, vocab_size=50272,
                         max_position_embeddings=2048, do_layer_norm_before=name != "opt-350m")
    if name in LLAMA:
        return LlamaConfig(**LLAMA[name])
    if convert.is_gguf(name):
        return convert.config_of(Path(name).expanduser())
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        why = reason(error)
        raise UserError(f"unknown model {name!r} ({why}); built in: {', '.join(MODELS)}") from None


# Length of the random sequence the weights repeat: a prime, so that no row of a matrix repeats another.
PATTERN = 2**22 - 3


def random_model(config, dtype: torch.dtype, device: str):
    """A model of ``config`` with random weights in ``dtype`` on ``device``, in seconds at any size:
    transformers' initialisation (minutes at 1.3B on a CPU, longer than the benchmark at 30B) is
    skipped and every matrix is tiled with one seeded N(0, initializer range) sequence; norms get 1,
    biases 0. The values are finite, and speed and memory do not depend on them."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # transformers ties inside the initialisation that was skipped
    randomize(model, config)
    return model.eval()


def randomize(model, config) -> None:
    """Gives ``model`` the weights :func:`random_model` gives it, wherever they are."""
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02
    sequence = torch.randn(PATTERN, generator=torch.Generator().manual_seed(0)).mul_(std)
    patterns = {}
    with torch.no_grad():
        for index, (name, p) in enumerate(model.named_parameters()):
            if p.ndim < 2:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
                continue
            if (p.dtype, p.device) not in patterns:
                patterns[p.dtype, p.device] = sequence.to(device=p.device, dtype=p.dtype)
            _tile(p.view(-1), patterns[p.dtype, p.device], index * 1_000_003 % PATTERN)


def _tile(flat: torch.Tensor, pattern: torch.Tensor, offset: int) -> None:
    """``flat[i] = pattern[(offset + i) % len(pattern)]``, in copies of the pattern's size."""
    head = min(flat.numel(), pattern.numel() - offset)
    flat[:head].copy_(pattern[offset : offset + head])
    for begin in range(head, flat.numel(), pattern.numel()):
        end = min(begin + pattern.numel(), flat.numel())
        flat[begin:end].copy_(pattern[: end - begin])


def reference_mezo_step(params, closure, seed: int, lr: float = 1e-7, eps: float = 1e-3):
    """The MeZO reference code's step: torch.randn per tensor, four in-place passes (it reseeds the
    global RNG; a private generator costs the same)."""

    def perturb(scale):
        generator = torch.Generator(params[0].device).manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn(p.shape, device=p.device, dtype=p.dtype, generator=generator), alpha=scale)

    with torch.no_grad():
        perturb(eps)
        plus = closure().item()
        perturb(-2 * eps)
        minus = closure().item()
        perturb(eps)
        perturb(-lr * (plus - minus) / (2 * eps))


def bench(model_name: str, batch_size: int = 16, length: int = 128, dtype: str = "fp16", device: str | None = None,
          methods=DEFAULT_METHODS, repeats: int = 5, quantize: str = "none") -> list[dict]:
    """Time and peak memory of a step of each of ``methods`` on a random-init ``model_name``; with ``quantize``
    (int8 or int4), on that quantized base: mezo trains its scales, lora-ft and lmao their adapters on top."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quantize != "none":
        if methods == DEFAULT_METHODS:
            methods = ON_QUANTIZED
        refused = sorted(set(methods) - set(ON_QUANTIZED))
        if refused:
            raise UserError(f"--quantize {quantize}: {', '.join(refused)} cannot run on a quantized base in zotune "
                            f"bench; choose from {', '.join(ON_QUANTIZED)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if min(batch_size, length, repeats) <= 0:
        raise UserError("--batch-size, --length and --repeats must be positive")
    known = all_methods()
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise UserError(f"unknown methods {unknown}: choose from {', '.join(known)}")
    config = build_config(model_name)
    # Offloaded rows stream the blocks from host memory: there a model larger than the GPU fits.
    home = "cpu" if all(m in OFFLOADED for m in methods) else device
    # The random weights and dropout draw from the global RNG: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[torch.device(device)] if device.startswith("cuda") else []):
        torch.manual_seed(0)
        model = random_model(config, DTYPES[dtype], home)
        if quantize != "none":
            quantize_model(model, quantize)
        meter = Meter(device, repeats)
        return _bench_model(model, model_name, config, batch_size, length, dtype, device, home, methods, meter)


def _bench_model(model, model_name, config, batch_size, length, dtype, device, home, methods, meter) -> list[dict]:
    ids = torch.randint(0, config.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def loss(copies=None):  # with copies: one loss per copy of the batch (stacked evaluation)
        if copies is None:
            return model(input_ids=ids, labels=ids).loss
        repeated = ids.repeat(copies, 1)
        logits = model(input_ids=repeated).logits[:, :-1]
        each = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 repeated[:, 1:].reshape(-1), reduction="none")
        return each.view(copies, -1).mean(1)

    kept = quantized_weights(model)
    quantized = kept[0].layout.name if kept else None
    n_params = sum(p.numel() for name, p in model.named_parameters() if not name.endswith((".scales", ".offsets")))
    n_params += sum(w.shape[0] * w.shape[1] for w in kept)  # the base's weights, in codes
    largest = max(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    rows = []
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for method in dict.fromkeys(methods):  # in the order asked for
        if not meter.cuda:  # whatever else the process holds, or frees meanwhile, is not the method's
            gc.collect()
            allocated = host_allocated_bytes()
            meter.host_baseline = None if allocated is None else allocated - model_bytes
        try:
            result = head_step(model, ids, meter, BENCH_LR) if method == HEAD else \
                _run_method(method, model, loss, meter, home)
        except torch.OutOfMemoryError:
            result = {"seconds": None, "peak_gib": None, "error": OUT_OF_MEMORY}
        except UserError:
            raise
        except Exception as error:  # one method's failure must not cost the other rows (a lent GPU's minutes)
            traceback.print_exc()
            result = {"seconds": None, "peak_gib": None, "error": f"{type(error).__name__}: {error}"}
            randomize(model, config)  # it may have left non-finite weights behind
        rows.append({"model": model_name, "params": n_params, "largest_tensor_gib": largest, "method": method,
                     "batch_size": batch_size, "length": length,
                     "dtype": dtype if quantized is None else f"{dtype}, {quantized} base",
                     "device": _device_name(device),
                     **result})
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    streamed = [r for r in rows if "upload_gb" in r]
    # Measured last: the pinned buffer stays in torch's cache, and would be in the rows' resident memory.
    link = link_bandwidth(device) if streamed and meter.cuda else None
    for row in streamed:
        row.update(link_columns(row, link))
    return rows


def _run_method(name, model, loss, meter, home) -> dict:
    if name == FORWARD:
        def two_forwards():
            with torch.no_grad():
                loss()
                loss()
        result = meter(two_forwards)
        result["note"] = "two inference forwards"
        return result
    if name == REFERENCE:
        params = list(model.parameters())
        return meter(lambda: reference_mezo_step(params, loss, seed=0))
    method, overrides = VARIANTS.get(name, (name, {}))
    entry = registry.get(method)
    overrides = {**dict.fromkeys(entry.config.rates(), BENCH_LR), **overrides}
    if method == "mezo" and quantized_weights(model):
        overrides["peft"] = "scales"
    # The meter runs a warm-up step and then `repeats` steps: a schedule over exactly those.
    trainer = entry.method(model, entry.config(**overrides), seed=0, steps=meter.repeats + 1)
    try:
        if trainer.engine is None:
            return meter(lambda: trainer.step(loss))
        traffic = Traffic(trainer.engine)

        def step():
            traffic.steps.append([0, 0])
            trainer.step(loss)

        return {**meter(step), **offload_columns(trainer.engine, traffic)}
    finally:
        if trainer.engine is not None:  # give the next method a model in one place again
            trainer.engine.close()
            model.to(home)
        if trainer.model is not model:  # a LoRA method wrapped it: give the next method the plain model
            trainer.model.unload()
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def table(rows: list[dict]) -> str:
    """A markdown table; time is also given relative to two forwards, and to the methods that declare themselves
    a yardstick (:attr:`zotune.methods.Method.bench_yardstick`) when they ran."""
    ran = {r["method"] for r in rows}
    columns = [("× 2 forwards", FORWARD)] + [(f"× {name}", name) for name in registry.names()
                                             if registry.get(name).method.bench_yardstick and name in ran]
    header = ["model", "params", "method", "batch × length", "dtype", "time/step (ms)", *(c for c, _ in columns),
              "peak (GiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    times = {(r["model"], r["batch_size"], r["length"], r["method"]): r["seconds"] for r in rows}
    for r in rows:
        ratios = []
        for _, baseline in columns:
            base = times.get((r["model"], r["batch_size"], r["length"], baseline))
            ratios.append(f"{r['seconds'] / base:.2f}" if r["seconds"] and base else "")
        ms = f"{r['seconds'] * 1e3:.1f}" if r["seconds"] is not None else _failure(r)
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        cells = [r["model"], f"{r['params'] / 1e6:.1f}M", r["method"], f"{r['batch_size']} × {r['length']}",
                 r["dtype"], ms, *ratios, peak]
        lines.append("| " + " | ".join(cells) + " |")
    offloaded = [r for r in rows if r["method"] in OFFLOADED]
    return "\n".join(lines) + ("\n\n" + offload_table(offloaded) if offloaded else "")


def _failure(row: dict) -> str:
    return "OOM" if row["error"] == OUT_OF_MEMORY else "failed"


def failed(rows: list[dict]) -> list[dict]:
    """The rows whose method raised (running out of memory is a result, not a failure)."""
    return [r for r in rows if r.get("error") not in (None, OUT_OF_MEMORY)]


def offload_table(rows: list[dict]) -> str:
    """The offload rows' traffic: per step, the bytes each way, the link's measured pinned rates, and
    the floor they set (both ways at once) next to the step's time; empty cells where a row failed."""
    header = ["model", "method", "batch × length", "time/step (ms)", "GPU peak (GiB)", "host buffers (GiB)",
              "process RSS (GiB)", "up / written back per step (GB)", "H2D / D2H (GB/s)", "floor (ms)",
              "step ÷ floor"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def pair(r, a, b, form):
        return "" if r.get(a) is None else f"{format(r[a], form)} / {format(r[b], form)}"

    def number(value, form):
        return "" if value is None else format(value, form)

    for r in rows:
        floor, seconds = r.get("floor_seconds"), r["seconds"]
        cells = [r["model"], r["method"], f"{r['batch_size']} × {r['length']}",
                 _failure(r) if seconds is None else f"{seconds * 1e3:.1f}", number(r["peak_gib"], ".2f"),
                 number(r.get("host_gib"), ".2f"), number(r.get("rss_gib"), ".2f"),
                 pair(r, "upload_gb", "writeback_gb", ".2f"), pair(r, "h2d_gb_per_s", "d2h_gb_per_s", ".1f"),
                 number(floor and floor * 1e3, ".1f"), f"{seconds / floor:.2f}" if seconds and floor else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size(params: float) -> str:
    return f"{params / 1e9:.3g}B" if params >= 1e9 else f"{params / 1e6:.3g}M"


def plot(rows: list[dict], path: str) -> None:
    """Time per step and peak memory against model size, one line per method, log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'zotune[plot]'") from None
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["params"], r["seconds"], r["peak_gib"]) for r in rows if r["method"] == method)
        for axis, column in ((time_axis, 1), (memory_axis, 2)):
            drawn = [(p[0], p[column]) for p in points if p[column] is not None]  # OOM rows have no value
            if drawn:
                axis.plot(*zip(*drawn), marker="o", label=method)
    sizes = []
    for params in sorted({r["params"] for r in rows}):
        if not sizes or params > 1.25 * sizes[-1]:  # closer labels would overprint each other
            sizes.append(params)
    for axis, label in ((time_axis, "seconds per step"), (memory_axis, "peak memory (GiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_major_locator(FixedLocator(sizes))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticklabels([_size(p) for p in sizes])
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_xlabel("parameters")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=8)
    settings = sorted({f"{r['device']}, {r['dtype']}, batch {r['batch_size']} × {r['length']}" for r in rows})
    figure.suptitle("; ".join(settings), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_json(rows: list[dict], path: str) -> None:
    Path(path).write_text(json.dumps(rows, indent=2))
