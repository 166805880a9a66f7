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
