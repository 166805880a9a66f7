import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from zotune import bench, cli
from zotune.errors import UserError


def test_bench_smoke_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "llama-tiny", "--batch-size", "2", "--length", "8", "--dtype", "fp32",
            "--device", "cpu", "--repeats", "1", "--json", str(out)]
    before = torch.random.get_rng_state()
    assert cli.main(args) == 0
    assert torch.equal(torch.random.get_rng_state(), before)
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == list(bench.DEFAULT_METHODS)
    assert all(r["seconds"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| llama-tiny |" in printed and "| × 2 forwards | × lora-ft |" in printed
    assert all(r["peak_gib"] >= r["params"] * 4 / 2**30 for r in rows)  # on the CPU too: malloc's peak


def test_the_cpu_peak_counts_ft_s_gradients_and_moments(tmp_path):
    # Wide enough (7 MB of weights) that the rest of the process (~1 MB of first-use allocations) is noise.
    LlamaConfig(**{**bench.LLAMA["llama-tiny"], "hidden_size": 256, "intermediate_size": 512}).save_pretrained(tmp_path)
    rows = bench.bench(str(tmp_path), batch_size=2, length=8, dtype="fp32", device="cpu", repeats=1,
                       methods=["forward", "ft"])
    weights = rows[0]["params"] * 4 / 2**30
    peak = {r["method"]: r["peak_gib"] for r in rows}
    assert weights <= peak["forward"] < 2 * weights
    assert peak["ft"] - peak["forward"] >= 2 * weights  # a gradient and two AdamW moments per weight


def test_the_host_peak_sees_a_transient_allocation():
    with bench.host_peak() as peak:
        before = bench.host_allocated_bytes()
        block = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)  # a sample falls inside, even on a busy machine
        del block
    assert peak[0] - before >= 60 * 2**20 > bench.host_allocated_bytes() - before


def test_every_registered_method_and_variant_is_a_bench_row():
    from zotune import methods

    names = bench.all_methods()
    assert set(methods.names()) | {"forward", "mezo-reference", "mezo-rademacher", "mezo-lowrank", "mezo-offload",
                                   "hzo-offload", "hzo-k3"} == set(names)
    assert names.index("mezo") < names.index("mezo-rademacher") < names.index("mezo-lowrank")


def test_rademacher_variant_and_order_asked_for():
    rows = bench.bench("llama-tiny", batch_size=1, length=4, dtype="fp32", device="cpu", repeats=1,
                       methods=["mezo-rademacher", "forward"])
    assert [r["method"] for r in rows] == ["mezo-rademacher", "forward"]
    table = bench.table(rows)
    assert "× lora-ft" not in table and "| mezo-rademacher |" in table


@pytest.mark.parametrize("name, millions", [("opt-125m", 125), ("opt-1.3b", 1300), ("opt-13b", 12900),
                                            ("smollm2", 134.5), ("large-vocab", 268)])
def test_built_in_configs_have_the_published_sizes(name, millions):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.build_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.03)


def test_built_in_llama_shapes():
    smollm2, large = bench.build_config("smollm2"), bench.build_config("large-vocab")
    assert smollm2.tie_word_embeddings and smollm2.rope_parameters["rope_theta"] == 100000
    assert (smollm2.num_attention_heads, smollm2.num_key_value_heads, smollm2.max_position_embeddings) == (9, 3, 8192)
    assert large.tie_word_embeddings
    assert (large.vocab_size, large.head_dim, large.num_key_value_heads) == (262144, 256, 1)


def test_bad_bench_arguments():
    with pytest.raises(UserError, match="unknown methods"):
        bench.bench("llama-tiny", methods=["sgd"], device="cpu")
    with pytest.raises(UserError, match="must be positive"):
        bench.bench("llama-tiny", batch_size=0, device="cpu")


def test_offload_rows_run_and_give_the_next_row_a_whole_model():
    rows = bench.bench("llama-tiny", batch_size=1, length=4, dtype="fp32", device="cpu", repeats=1,
                       methods=["mezo-offload", "hzo-offload", "hzo", "mezo"])
    assert [r["method"] for r in rows] == ["mezo-offload", "hzo-offload", "hzo", "mezo"]
    assert all(r["seconds"] > 0 for r in rows)
