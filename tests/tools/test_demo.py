import json

from transformers import LlamaConfig

from zotune.tools import bench
from zotune.tools import demo


def test_the_side_by_side_has_a_measured_row_per_method(tmp_path, capsys):
    # llama-tiny with 4 blocks: the demo's HZO row trains the last 3 by first order.
    LlamaConfig(**{**bench.LLAMA["llama-tiny"], "num_hidden_layers": 4}).save_pretrained(tmp_path)
    table = demo.side_by_side(str(tmp_path)).splitlines()
    assert len(table) == 2 + len(demo.SIDE_BY_SIDE)
    for line, name in zip(table[2:], demo.SIDE_BY_SIDE):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == name
        seconds, ratio, peak_here, peak_gpu = map(float, cells[2:6])
        # A tiny model's peaks round to 0.00 GiB; tests/tools/test_bench.py checks the measured peak itself.
        assert seconds > 0 and peak_here >= 0 and peak_gpu >= 0
        assert ratio == 1.0 if name == "forward" else ratio > 0
    assert "side by side" in capsys.readouterr().out


def test_the_forward_only_row_reads_the_convergence_benchmark(tmp_path):
    point = lambda forwards, accuracy: {"example_forwards": forwards, "test_accuracy": accuracy, "train_seconds": 1}
    curves = [{"task": "rt-sst2", "label": "mezo,x", "seed": seed, "folder": f"seed{seed}", "finished": True,
               "points": [point(4000, 0.6 + seed / 10), point(8000, 0.7), point(32000, 0.8 + seed / 10)]}
              for seed in (0, 1)]
    curves.append({**curves[0], "folder": "seed0.125-steps", "points": [point(4000, 0.1)]})  # an older run kept aside
    results = tmp_path / "convergence.json"
    results.write_text(json.dumps(curves))
    assert demo.measured_curve("mezo,x", results=results) == \
        "65.0 % after 4,000, 85.0 % after 32,000 example-forwards (2 seeds, convergence.json)"
    assert demo.measured_curve("mezo,y", results=results).startswith("not measured yet")
    assert demo.measured_curve("mezo,x", results=tmp_path / "absent.json").startswith("see BENCHMARKS.md")
