"""`zotune memory`'s estimates against measured peaks on the CPU: each method in its own
process (random-init model from a built-in config, 3 steps through `zotune bench`). The
measured peak is the most bytes malloc had handed out at once (glibc's mallinfo2, sampled
every 0.5 ms, minus what was allocated after the imports): the CPU's analogue of a GPU's
max_memory_allocated. Peak RSS is shown beside it (it also counts freed memory malloc keeps).
On the CPU an offloaded run's host and device memory are one: its estimate is the row's peak plus its CPU RAM.

    .venv/bin/python benchmarks/memory_check.py [--model smollm2] [--batch-size 8] [--length 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

# zotune bench row -> zotune memory row
ROWS = {"forward": "inference", "mezo": "mezo", "mezo-offload": "mezo-offload", "lora-ft": "lora-ft", "ft": "ft",
        "lmao": "lmao", "hzo": "hzo", "hzo-offload": "hzo-offload"}


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def child(method: str, model: str, batch: int, length: int) -> None:
    from zotune.tools import bench
    from zotune.tools import meters
    baseline = meters.host_allocated_bytes()
    rss_before = rss_bytes()
    with meters.host_peak() as peak:
        bench.bench(model, batch, length, "fp32", "cpu", [method], 2)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"allocated": peak[0] - baseline, "rss": rss_peak - rss_before}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    from zotune.tools import bench
    from zotune.tools import memory
    estimates = memory.estimate(memory.shape_of(bench.build_config(args.model)), args.batch_size, args.length, "fp32")
    print("| row | estimate (MB) | peak allocated (MB) | estimate / allocated | peak RSS − RSS after imports (MB) |")
    print("|---|---|---|---|---|")
    for method, row in ROWS.items():
        out = subprocess.run([sys.executable, __file__, "--child", method, args.model, str(args.batch_size),
                              str(args.length)], capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        allocated, rss = result["allocated"], result["rss"]
        estimated = estimates[row] + estimates.host.get(row, 0)
        print(f"| {row} | {estimated / 2**20:.0f} | {allocated / 2**20:.0f} | {estimated / allocated:.2f} | "
              f"{rss / 2**20:.0f} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
