import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig

from zotune import cli
from zotune.tools import bench
from zotune.tools import meters
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
    with meters.host_peak() as peak:
        before = meters.host_allocated_bytes()
        block = torch.ones(64 * 2**20 // 4)
        time.sleep(0.05)  # a sample falls inside, even on a busy machine
        del block
    assert peak[0] - before >= 60 * 2**20 > meters.host_allocated_bytes() - before


def test_every_registered_method_and_variant_is_a_bench_row():
    from zotune import methods
    names = bench.all_methods()
    assert set(methods.names()) | {"forward", "mezo-reference", "mezo-rademacher", "mezo-lowrank", "mezo-offload",
                                   "mezo-head", "hzo-offload", "hzo-k3"} == set(names)
    assert names.index("mezo") < names.index("mezo-rademacher") < names.index("mezo-lowrank")


def test_the_head_row_trains_the_head_alone_and_gives_the_next_row_the_model_it_had():
    rows = bench.bench("llama-tiny", batch_size=2, length=4, dtype="fp32", device="cpu", repeats=1,
                       methods=["mezo-head", "mezo"])
    assert [r["method"] for r in rows] == ["mezo-head", "mezo"] and all(r["seconds"] > 0 for r in rows)
    assert "kept features" in rows[0]["note"] and rows[1].get("error") is None


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


def test_offload_rows_report_their_traffic_and_give_the_next_row_a_whole_model():
    rows = bench.bench("llama-tiny", batch_size=1, length=4, dtype="fp32", device="cpu", repeats=1,
                       methods=["mezo-offload", "hzo-offload", "hzo", "mezo"])
    assert [r["method"] for r in rows] == ["mezo-offload", "hzo-offload", "hzo", "mezo"]
    assert all(r["seconds"] > 0 for r in rows)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.build_config("llama-tiny"))
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters() if p.ndim >= 2)
    layers = len(model.model.layers)
    mezo, hzo = rows[:2]
    assert mezo["host_gib"] * 2**30 == layers * block
    # every block goes up once a step, and back with the previous step's update
    assert mezo["upload_gb"] * 1e9 == pytest.approx(layers * block)
    assert mezo["writeback_gb"] * 1e9 == pytest.approx(layers * block)
    assert hzo["host_gib"] * 2**30 == (layers - 1) * block  # its deep block stays on the device
    assert hzo["upload_gb"] * 1e9 == pytest.approx((layers - 1) * block)
    assert hzo["writeback_gb"] == 0  # low-rank factors stay on the device until V is redrawn
    assert mezo["floor_seconds"] is None and mezo["h2d_gb_per_s"] is None  # no link to measure on a CPU
    assert mezo["rss_gib"] > 0
    assert "host_gib" not in rows[2] and "| up / written back per step (GB) |" in bench.table(rows)


def test_random_models_are_finite_tied_and_leave_the_global_rng_alone():
    before = torch.random.get_rng_state()
    opt = bench.random_model(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=32), torch.float16, "cpu")
    llama = bench.random_model(bench.build_config("llama-tiny"), torch.float32, "cpu")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert opt.get_output_embeddings().weight is opt.get_input_embeddings().weight
    for model in (opt, llama):
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), name
            if p.ndim < 2:
                assert torch.equal(p, torch.full_like(p, 0.0 if name.endswith("bias") else 1.0)), name
            else:
                assert 0.015 < p.float().std() < 0.025, name
    fc1, fc2 = opt.model.decoder.layers[0].fc1.weight, opt.model.decoder.layers[0].fc2.weight
    assert not torch.equal(fc1[0], fc1[1]) and not torch.equal(fc1[0, :32], fc2[0, :32])
    reference = LlamaForCausalLM(bench.build_config("llama-tiny"))
    assert torch.equal(llama.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)


def test_a_method_that_fails_gets_a_row_and_the_others_a_sound_model(monkeypatch, tmp_path, capsys):
    def broken(params, closure, seed):
        params[0].data.fill_(float("nan"))
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(bench, "reference_mezo_step", broken)
    out = tmp_path / "rows.json"
    code = cli.main(["bench", "--model", "llama-tiny", "--batch-size", "1", "--length", "4", "--dtype", "fp32",
                     "--device", "cpu", "--repeats", "1", "--methods", "mezo-reference,mezo", "--json", str(out)])
    assert code == 1
    rows = json.loads(out.read_text())
    assert rows[0]["error"] == "RuntimeError: no kernel image" and rows[0]["seconds"] is None
    assert rows[1]["seconds"] > 0 and "error" not in rows[1]  # MeZO refuses a non-finite loss: the NaN is gone
    captured = capsys.readouterr()
    assert "| mezo-reference | 1 × 4 | fp32 | failed |" in captured.out
    assert "zotune: llama-tiny mezo-reference failed: RuntimeError: no kernel image" in captured.err


def test_the_transfer_floor_is_the_slower_way_of_the_link():
    from zotune.engine.offload import Offload

    model = bench.random_model(bench.build_config("llama-tiny"), torch.float32, "cpu")
    engine = Offload(model, list(model.model.layers), "cpu")
    traffic = meters.Traffic(engine)
    traffic.steps += [[1, 0], [4e9, 2e9], [4e9, 4e9]]  # the warm-up, then two steps
    columns = meters.offload_columns(engine, traffic)
    engine.close()
    assert (columns["upload_gb"], columns["writeback_gb"]) == (4.0, 3.0)
    columns.update(meters.link_columns(columns, {"h2d": 2e9, "d2h": 1e9}))
    assert (columns["h2d_gb_per_s"], columns["d2h_gb_per_s"], columns["floor_seconds"]) == (2.0, 1.0, 3.0)
    row = {"model": "llama-tiny", "method": "mezo-offload", "batch_size": 1, "length": 4, "seconds": 6.0,
           "peak_gib": 1.0, **columns}
    assert "| 4.00 / 3.00 | 2.0 / 1.0 | 3000.0 | 2.00 |" in bench.offload_table([row])


def test_bench_runs_on_a_quantized_base_and_refuses_what_cannot():
    rows = bench.bench("llama-tiny", batch_size=2, length=8, dtype="fp32", device="cpu", repeats=1, quantize="int4")
    assert [r["method"] for r in rows] == list(bench.ON_QUANTIZED)
    assert all(r["seconds"] and r["dtype"] == "fp32, int4 base" for r in rows)
    with pytest.raises(UserError, match="hzo cannot run on a quantized base"):
        bench.bench("llama-tiny", methods=["hzo"], device="cpu", quantize="int8")
