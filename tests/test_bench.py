import json

import pytest
import torch
from transformers import AutoModelForCausalLM

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
    assert [r["method"] for r in rows] == list(bench.METHODS)
    assert all(r["seconds"] > 0 for r in rows)
    assert "| llama-tiny |" in capsys.readouterr().out


@pytest.mark.parametrize("name, billions", [("opt-125m", 0.125), ("opt-1.3b", 1.3), ("opt-13b", 12.9)])
def test_opt_configs_have_the_published_sizes(name, billions):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.build_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.03)


def test_bad_bench_arguments():
    with pytest.raises(UserError, match="unknown methods"):
        bench.bench("llama-tiny", methods=["sgd"], device="cpu")
    with pytest.raises(UserError, match="must be positive"):
        bench.bench("llama-tiny", batch_size=0, device="cpu")
