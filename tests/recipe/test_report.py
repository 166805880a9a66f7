"""Run pictures and `zotune report`."""

import json

import pytest

from zotune import cli
from zotune.recipe import report
matplotlib = pytest.importorskip("matplotlib")


def fake_run(folder, method, steps, scores, projected=True):
    folder.mkdir(parents=True)
    rows = [{"step": 0, "test_accuracy": scores[0]}]
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 1.0 / step, "lr": 1e-3}
        if projected:
            row["projected_grad"] = (-1) ** step * 2.0
        rows.append(row)
    rows.append({"step": steps, "loss": 0.1, "lr": 1e-3, "dev_accuracy": 0.7})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "result.json").write_text(json.dumps({
        "method": method, "task": "rt-sst2", "steps": steps, "metric": "accuracy", "zero_shot_accuracy": scores[0],
        "test_accuracy": scores[1], "train_seconds": 2.0 * steps, "peak_memory_mb": 1234.5}))
    return folder


def test_curves_draws_every_panel_and_the_final_test_score(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", "mezo", 30, (0.5, 0.8))
    drawn = {}
    import matplotlib.axes

    real_plot = matplotlib.axes.Axes.plot

    def plot(self, x, y, *args, **kwargs):
        drawn[self.get_title()] = (list(x), list(y))
        return real_plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    path = report.curves(run)
    assert path == run / "curves.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(drawn) == {"training loss", "dev / test metric", "projected gradient", "learning rate"}
    steps, values = drawn["dev / test metric"]  # the last series drawn there: test, zero-shot to final
    assert (steps, values) == ([0, 30], [0.5, 0.8])


def test_report_compares_runs_in_markdown_and_one_figure(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "mezo", 10, (0.5, 0.6))
    b = fake_run(tmp_path / "b", "lora-ft", 20, (0.5, 0.9), projected=False)
    assert cli.main(["report", str(a), str(b), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| a | mezo | rt-sst2 | 10 | 50.0% | accuracy 60.0% | 2.00 | 1234 |" in out
    assert "| b | lora-ft | rt-sst2 | 20 | 50.0% | accuracy 90.0% | 2.00 | 1234 |" in out
    assert (tmp_path / "out" / "report.md").read_text().strip() == out.strip()
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000


def test_report_of_a_folder_that_is_no_run_is_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("is not a zotune run folder (no metrics.jsonl)")

