"""benchmarks/gpu_check.sh and benchmarks/kernel_bandwidth.py on a machine without a GPU."""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zotune.tools import bench
from zotune.core import kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def benchmarks(monkeypatch):
    """Imports a script of benchmarks/ as a module, with that folder on sys.path as when it runs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


def test_dry_run_lists_the_four_stages_and_checks_their_help(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    stages = {line.split(" (limit")[0]: line for line in lines if line.startswith("[")}
    assert list(stages) == ["[1] tests", "[2] kernels", "[3] bench-opt-1.3b", "[3] bench-opt-13b",
                            "[4] offload-opt-13b", "[4] offload-opt-30b"]
    assert "-m pytest" in stages["[1] tests"] and "tests/core/test_kernels_triton.py" in stages["[1] tests"]
    assert "env -u TRITON_INTERPRET" in stages["[1] tests"] and "'gpu or not slow'" in stages["[1] tests"]
    assert "benchmarks/kernel_bandwidth.py" in stages["[2] kernels"]
    for model in ("opt-1.3b", "opt-13b"):
        assert f"--model {model} --batch-size 16 --length 128" in stages[f"[3] bench-{model}"]
        assert "--methods forward,mezo,mezo-rademacher,mezo-lowrank,mezo-reference,lora-ft,lmao,hzo" \
               in stages[f"[3] bench-{model}"]
    for model in ("opt-13b", "opt-30b"):
        assert f"--model {model} --batch-size 1 --length 2048" in stages[f"[4] offload-{model}"]
        assert "--methods mezo-offload,hzo-offload" in stages[f"[4] offload-{model}"]
    assert all("--dtype fp16" in stages[name] for name in stages if "opt" in name)
    checked = [line for line in lines if line.startswith("checked: ")]
    assert len(checked) == 3 and any("-m zotune bench --help" in line for line in checked)
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_dry_run_fails_when_a_tool_does_not_know_an_option(benchmarks, capsys):
    gpu_check = benchmarks("gpu_check")
    stage = gpu_check.Stage(2, "kernels", "kernels", [gpu_check.PYTHON, "benchmarks/kernel_bandwidth.py",
                                                      "--no-such-option"], 2, 60, "kernels.json", {})
    assert gpu_check.dry_run([stage], sys.executable, lambda s: "the command") == 1
    assert "does not mention --no-such-option" in capsys.readouterr().err


def test_a_stage_past_its_limit_is_stopped_with_what_it_started(benchmarks, tmp_path):
    gpu_check = benchmarks("gpu_check")
    pid_file = tmp_path / "pid"
    hang = (f"import subprocess, time; open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '600']).pid));"
            " time.sleep(600)")
    stage = gpu_check.Stage(1, "hang", "hang", [gpu_check.PYTHON, "-c", hang], 3, 600, "none.xml", {})
    begin = time.monotonic()
    entry = gpu_check.run_stage(stage, sys.executable, tmp_path, 2.0, "the command")
    assert time.monotonic() - begin < 15
    assert entry["status"] == "timed out" and entry["limit_seconds"] == 2
    assert (tmp_path / "hang.log").read_text().startswith("the command\n")
    assert gpu_check.results(stage, tmp_path) is None
    status = Path(f"/proc/{pid_file.read_text()}/status")
    for _ in range(50):  # the grandchild went with its group (a zombie until its new parent reaps it)
        if not status.exists() or "zombie" in status.read_text():
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the stage's grandchild outlived the stop")


def test_bad_options_are_one_line_and_exit_2(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--budget", "0", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == "gpu_check: error: --budget must be positive\n"


def test_kernel_bandwidth_counts_the_bytes_each_kernel_moves(benchmarks):
    kernel_bandwidth = benchmarks("kernel_bandwidth")
    n = 1000
    rows = {r["kernel"]: r for r in kernel_bandwidth.measure(kernels.load("reference"), n, "fp16", 1, "cpu")}
    assert list(rows) == ["fill gaussian", "fill rademacher", "perturb gaussian",
                          "update gaussian, 1 seed, stochastic rounding",
                          "update rademacher, 1 seed, stochastic rounding", "stochastic rounding (round_into)"]
    # fills write float32; perturb and update read and write fp16; rounding reads float32, writes fp16
    assert [r["bytes"] for r in rows.values()] == [4 * n, 4 * n, 4 * n, 4 * n, 4 * n, 6 * n]
    assert [r["copy_bytes"] for r in rows.values()] == [8 * n, 8 * n, 4 * n, 4 * n, 4 * n, 6 * n]
    assert all(r["gb_per_s"] > 0 and r["copy_gb_per_s"] > 0 for r in rows.values())
    assert "| fill gaussian | float32 | 1,000 |" in kernel_bandwidth.table(list(rows.values()))


def test_the_report_has_the_machine_and_a_section_per_stage(benchmarks, tmp_path):
    gpu_check = benchmarks("gpu_check")
    kernel_bandwidth = benchmarks("kernel_bandwidth")
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.core.test_gpu" name="test_a"/>'
                     '<testcase classname="tests.core.test_gpu" name="test_b"><failure message="x"/></testcase>'
                     '<testcase classname="tests.core.test_gpu" name="test_c"><skipped/></testcase>'
                     '</testsuite></testsuites>')
    offload = bench.bench("llama-tiny", batch_size=1, length=4, dtype="fp32", device="cpu", repeats=1,
                          methods=["mezo-offload"])
    failed = {**offload[0], "method": "hzo-offload", "seconds": None, "peak_gib": None, "error": "FloatingPointError"}
    for key in ("host_gib", "rss_gib", "upload_gb", "writeback_gb", "h2d_gb_per_s", "d2h_gb_per_s", "floor_seconds"):
        del failed[key]
    machine = {"date": "2026-12-05 00:00 UTC", "host": "lent", "python": "3.11", "torch": "2.13.0+cu128",
               "torch_cuda": "12.8", "cuda_available": True, "cpus": 16, "triton": "3.9.0", "transformers": "5.25.0",
               "zotune": "0.1.0", "host_memory_gib": 128.0, "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gib": 79.2,
               "capability": "9.0", "gpus": 1, "driver_gpus": ["NVIDIA H100 80GB HBM3, 570.1, 81559 MiB"],
               "commit": "abc1234"}
    stages = [
        {"section": 1, "name": "tests", "title": "CUDA tests", "command": "pytest", "status": "failed", "exit_code": 1,
         "seconds": 50.0, "limit_seconds": 150, "results": gpu_check._junit(junit),
         "log_tail": "FAILED tests/core/test_gpu.py::test_b"},
        {"section": 2, "name": "kernels", "title": "kernels", "command": "kernels", "status": "ok", "exit_code": 0,
         "results": kernel_bandwidth.measure(kernels.load("reference"), 256, "fp16", 1, "cpu")},
        {"section": 3, "name": "bench-opt-13b", "title": "bench", "command": "bench", "status": "timed out",
         "exit_code": -15, "results": None, "log_tail": "hanging"},
        {"section": 4, "name": "offload-opt-13b", "title": "offload", "command": "offload", "status": "failed",
         "exit_code": 1, "results": [*offload, failed]},
    ]
    report = {"invocation": "benchmarks/gpu_check.sh", "machine": machine, "problem": None, "budget_seconds": 420,
              "seconds": 300.0, "stages": stages}
    text = gpu_check.markdown(report)
    assert text.startswith("# GPU check: NVIDIA H100 80GB HBM3, 2026-12-05 00:00 UTC\n")
    assert "torch 2.13.0+cu128 (CUDA 12.8), triton 3.9.0" in text
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## 1. CUDA tests", "## 2. Triton kernels against a plain device copy",
        "## 3. `zotune bench`: OPT-1.3B and OPT-13B, fp16, batch 16 × 128",
        "## 4. `--offload cpu`: OPT-13B and OPT-30B, fp16, batch 1 × 2048"]
    assert "| 1 | 1 | 0 | 1 | 3 |" in text and "- failed: `tests.core.test_gpu::test_b`" in text
    assert "| stochastic rounding (round_into) | float16 | 256 |" in text
    assert "`bench`: **timed out**" in text and "```\nhanging\n```" in text
    assert "| llama-tiny | mezo-offload | 1 × 4 |" in text and "| llama-tiny | hzo-offload | 1 × 4 | failed |" in text
    assert "- llama-tiny hzo-offload: FloatingPointError" in text
