"""What a lent GPU should measure, in one run: start it with ``benchmarks/gpu_check.sh``
(which picks the interpreter: .venv's, or on a lent machine without network its own python3
with a CUDA torch and zotune from src/), not with this file.

    benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run]

1. tests: the test files with CUDA cases (marked gpu, skipped without CUDA, or the Triton
   kernels' own), on the GPU: TRITON_INTERPRET unset, the slow marker's exclusion lifted for gpu.
2. kernels: benchmarks/kernel_bandwidth.py, the Triton kernels' bytes/s against a device copy.
3. bench: ``zotune bench`` on random-init OPT-1.3B and OPT-13B, fp16, batch 16 × 128.
4. offload: ``zotune bench`` of mezo-offload and hzo-offload on random-init OPT-13B and
   OPT-30B, fp16, batch 1 × 2048: GPU peak, host memory, bytes moved, the link's rates.

Each stage runs in its own process under its own time limit, cut to what is left of
--budget, so that a stage that hangs costs its limit and the run still ends in time; a
failed stage is recorded and the next one runs. Writes three files, again after every
stage (a run cut short still leaves what it measured): DIR/gpu_check.md, DIR/gpu_check.json
(the same, and the end of each failed stage's log) and DIR/gpu_check.log (every stage's
output), where DIR is --out, else $OUT, else ./gpu_check. The stages' own files go to a
scratch folder. Exit status 0 when every stage passed, 1 otherwise.

--dry-run prints every command, checks that each tool accepts --help and knows every option
(and model and method) the commands give it, and runs nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 420  # seconds for the facts and the stages: with a last stop (30 s at most) and the report, under 8 min
REPEATS = {3: 3, 4: 2}  # timed steps per method in the bench and offload stages (median reported)
BENCH_METHODS = "forward,mezo,mezo-rademacher,mezo-lowrank,mezo-reference,lora-ft,lmao,hzo"
OFFLOAD_METHODS = "mezo-offload,hzo-offload"
# A test file has CUDA cases when it uses the gpu marker, skips without CUDA, or runs the Triton backend
# on the GPU unless interpreting.
CUDA_CASES = re.compile(r"mark\.gpu|cuda\.is_available\(\)|cuda\._INTERPRET")
LEAST = 20  # seconds a stage needs to be worth starting
# Every stage runs the Triton kernels on the GPU, never in Triton's interpreter (the CPU tests' setting).
ON_GPU = {"TRITON_INTERPRET": None}
PYTHON = "<python>"  # in a stage's argv: the interpreter gpu_check.sh chose


@dataclasses.dataclass
class Stage:
    section: int
    name: str
    title: str
    argv: list[str]
    tool: int  # how many of argv's first words name the tool (what --dry-run asks for --help)
    limit: int  # seconds: about twice the estimate for an H100
    output: str  # its result file, in the scratch folder
    env: dict  # a value of None: unset

    def command(self, python: str, scratch: Path) -> str:
        """The command as a shell line, its files named without the scratch folder."""
        prefix = [f"{k}={shlex.quote(v)}" for k, v in self.env.items() if v is not None]
        unset = [f"-u {k}" for k, v in self.env.items() if v is None]
        env = ["env", *unset, *prefix] if prefix or unset else []
        argv = [python if a == PYTHON else a.replace(f"{scratch}/", "") for a in self.argv]
        return " ".join([*env, shlex.join(argv)])


def cuda_test_files() -> list[str]:
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                  if CUDA_CASES.search(path.read_text()))


def stages(raw: Path) -> list[Stage]:
    def out(name):
        return str(raw / name)

    bench = [PYTHON, "-m", "zotune", "bench", "--dtype", "fp16", "--device", "cuda"]
    found = [
        Stage(1, "tests", "CUDA tests",
              [PYTHON, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", "-o", "addopts=",
               "-m", "gpu or not slow", f"--junit-xml={out('tests.xml')}", *cuda_test_files()],
              3, 150, "tests.xml", ON_GPU),
        Stage(2, "kernels", "Triton kernels against a device copy",
              [PYTHON, "benchmarks/kernel_bandwidth.py", "--dtype", "fp16", "--json", out("kernels.json")],
              2, 60, "kernels.json", ON_GPU),
    ]
    # (stage, name, title, model, batch, length, methods, limit in seconds)
    runs = [(3, "bench", "zotune bench", "opt-1.3b", 16, 128, BENCH_METHODS, 60),
            (3, "bench", "zotune bench", "opt-13b", 16, 128, BENCH_METHODS, 100),
            (4, "offload", "--offload cpu", "opt-13b", 1, 2048, OFFLOAD_METHODS, 90),
            (4, "offload", "--offload cpu", "opt-30b", 1, 2048, OFFLOAD_METHODS, 150)]
    for stage, name, title, model, batch, length, methods, limit in runs:
        found.append(Stage(stage, f"{name}-{model}", f"{title}, {model}",
                           [*bench, "--model", model, "--batch-size", str(batch), "--length", str(length),
                            "--repeats", str(REPEATS[stage]), "--methods", methods,
                            "--json", out(f"{name}-{model}.json")],
                           4, limit, f"{name}-{model}.json", ON_GPU))
    return found


# -- machine facts (in a child process: this one must not hold a CUDA context) --------------

def facts() -> dict:
    import importlib.metadata
    import platform

    import torch

    found = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
             "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpus": os.cpu_count()}
    for package in ("triton", "transformers", "zotune"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    try:
        with open("/proc/meminfo") as meminfo:
            found["host_memory_gib"] = int(meminfo.readline().split()[1]) / 2**20
    except OSError:
        found["host_memory_gib"] = None
    if found["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        found.update(gpu=properties.name, gpu_memory_gib=properties.total_memory / 2**30,
                     capability=f"{properties.major}.{properties.minor}", gpus=torch.cuda.device_count())
    return found


def driver_gpus() -> list[str]:
    """The GPUs the driver sees, whatever torch was built for: "name, driver, memory" each."""
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                     "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            return ["nvidia-smi did not answer"]
        if listed.returncode == 0:
            return [line.strip() for line in listed.stdout.splitlines() if line.strip()]
    gpus = Path("/proc/driver/nvidia/gpus")
    return [f"device {p.name}" for p in sorted(gpus.iterdir())] if gpus.is_dir() else []


def machine(python: str) -> dict:
    try:
        child = subprocess.run([python, __file__, "--facts"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    except subprocess.TimeoutExpired:
        raise SystemExit("gpu_check: error: python took over 2 minutes to start torch") from None
    if child.returncode != 0:
        raise SystemExit(f"gpu_check: error: {python} cannot report the machine:\n{child.stderr[-2000:]}")
    return {**json.loads(child.stdout.splitlines()[-1]), "driver_gpus": driver_gpus(), "commit": _commit()}


def _commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() or None


# -- running the stages ------------------------------------------------------------------------

def run_stage(stage: Stage, python: str, raw: Path, seconds: float, command: str) -> dict:
    """Runs ``stage`` for at most ``seconds``; its output, after ``command``, goes to raw/NAME.log."""
    env = dict(os.environ)
    for key, value in stage.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    argv = [python if a == PYTHON else a for a in stage.argv]
    log = raw / f"{stage.name}.log"
    begin = time.monotonic()
    with open(log, "w") as out:
        out.write(f"{command}\n\n")
        out.flush()
        # Its own process group, so that a stop reaches what it started; not its own session, which
        # would outlive this one.
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                 preexec_fn=os.setpgrp)
        try:
            code = child.wait(timeout=seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            code = _stop(child)
        except KeyboardInterrupt:  # Ctrl-C reaches this group only
            _stop(child)
            raise
    elapsed = time.monotonic() - begin
    status = "timed out" if timed_out else "ok" if code == 0 else "failed"
    return {"status": status, "exit_code": code, "seconds": round(elapsed, 1), "limit_seconds": round(seconds)}


def _stop(child: subprocess.Popen) -> int:
    """SIGTERM to the stage's process group, SIGKILL if it is still there 10 s later."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 20)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            return child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    return child.wait()


def results(stage: Stage, raw: Path):
    """What the stage's output file says (None when it wrote none)."""
    path = raw / stage.output
    try:
        return _junit(path) if stage.section == 1 else json.loads(path.read_text())
    except (OSError, ValueError, ElementTree.ParseError):  # none, or cut short by the time limit
        return None


def _junit(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append(name)
    return {**counts, "total": sum(counts.values()), "failures": failures}


# -- the report --------------------------------------------------------------------------------

def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def markdown(report: dict) -> str:
    import kernel_bandwidth  # beside this file, which is on sys.path when it runs as a script

    from zotune.tools import bench
    m = report["machine"]
    gpu = (f"{m['gpu']} ({m['gpu_memory_gib']:.0f} GiB, compute capability {m['capability']})"
           if m["cuda_available"] else "no CUDA device in torch")
    lines = [f"# GPU check: {m.get('gpu', 'no GPU')}, {m['date']}", "",
             f"`{report['invocation']}` ({report['seconds']:.0f} s in all, stages within {report['budget_seconds']} s)",
             "",
             f"- machine: {m['host']}, {gpu}; driver sees: {'; '.join(m['driver_gpus']) or 'no GPU'}",
             f"- host: {m['cpus']} CPUs, {m['host_memory_gib']:.0f} GiB memory" if m["host_memory_gib"] else
             f"- host: {m['cpus']} CPUs",
             f"- software: torch {m['torch']} (CUDA {m['torch_cuda']}), triton {m['triton']}, transformers "
             f"{m['transformers']}, zotune {m['zotune']} at {m['commit'] or 'unknown commit'}, Python {m['python']}"]
    if report.get("problem"):
        lines += ["", f"**{report['problem']}**"]
    lines += ["", "| stage | what | status | time (s) | limit (s) |", "|---|---|---|---:|---:|"]
    for s in report["stages"]:
        status = s["status"] + (f" (exit {s['exit_code']})" if s["status"] == "failed" else "")
        lines.append(f"| {s['section']} | {s['title']} | {status}{': ' + s['note'] if s.get('note') else ''} | "
                     f"{s.get('seconds', '')} | {s.get('limit_seconds', '')} |")
    sections = {1: "1. CUDA tests", 2: "2. Triton kernels against a plain device copy",
                3: "3. `zotune bench`: OPT-1.3B and OPT-13B, fp16, batch 16 × 128",
                4: "4. `--offload cpu`: OPT-13B and OPT-30B, fp16, batch 1 × 2048"}
    for section, heading in sections.items():
        entries = [s for s in report["stages"] if s["section"] == section]
        lines += ["", f"## {heading}", ""]
        lines += [f"`{s['command']}`" + ("" if s["status"] == "ok" else f": **{s['status']}**") + "  "
                  for s in entries]
        rows = [row for s in entries for row in (s.get("results") or [])] if section > 1 else None
        if section == 1 and entries[0].get("results"):
            t = entries[0]["results"]
            lines += ["", "| passed | failed | errors | skipped | total |", "|---:|---:|---:|---:|---:|",
                      f"| {t['passed']} | {t['failed']} | {t['errors']} | {t['skipped']} | {t['total']} |"]
            lines += [f"- failed: `{name}`" for name in t["failures"]]
        elif section == 2 and rows:
            lines += ["", kernel_bandwidth.table(rows), "",
                      "Bytes read plus written over the kernel's time (CUDA events, median after two warm-ups); "
                      "the copy is `target.copy_(source)` of the kernel's output from a tensor like its input."]
        elif section == 3 and rows:
            lines += ["", bench.table(rows), "",
                      f"Random-init weights, full LM loss; median of {REPEATS[3]} steps after a warm-up; peak: "
                      "`torch.cuda.max_memory_allocated` over the timed steps."]
        elif section == 4 and rows:
            lines += ["", bench.offload_table(rows), "",
                      "The weights are built in host memory, where the engine keeps the blocks (host buffers, "
                      "page-locked) and streams them through the GPU. Bytes per step are counted where the "
                      f"engine starts a copy, over the {REPEATS[4]} steps after the warm-up; the floor is "
                      "max(up ÷ H2D, written back ÷ D2H), since the two directions run at once on their own "
                      "streams; H2D / D2H: a pinned 1 GiB copy, best of three. hzo-offload keeps its low-rank "
                      "updates as factors on the GPU (merge=resample): its blocks go back to the host only when V "
                      "is redrawn (every --resample-every steps), not within these."]
        for s in entries:
            if "log_tail" in s:
                lines += ["", f"The end of {s['name']}'s output (all of it: gpu_check.log):", "", "```",
                          s["log_tail"], "```"]
            failed_rows = [r for r in (s.get("results") or []) if section > 1 and r.get("error")]
            lines += [f"- {r['model']} {r['method']}: {r['error']}" for r in failed_rows]
    return "\n".join(lines) + "\n"


# -- the command -------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"gpu_check: error: {message}\n")


def parse(argv):
    parser = Parser(prog="benchmarks/gpu_check.sh", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", metavar="DIR", default=os.environ.get("OUT") or "gpu_check",
                        help="where gpu_check.md, .json and .log go (default: $OUT, else gpu_check)")
    parser.add_argument("--budget", type=int, default=BUDGET, metavar="SECONDS",
                        help=f"time for all the stages together (default: {BUDGET})")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and check their --help only")
    parser.add_argument("--facts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def dry_run(plan: list[Stage], python: str, show) -> int:
    """Every command (``show(stage)``), and whether its tool takes --help and knows what the command gives it."""
    tools = {}
    for stage in plan:
        print(f"[{stage.section}] {stage.name} (limit {stage.limit} s): {show(stage)}")
        tools.setdefault(tuple(stage.argv[: stage.tool]), []).append(stage)
    problems = [] if cuda_test_files() else ["tests: no test file with CUDA cases found"]
    # pytest's --help would import tests/conftest.py (and transformers with it): 7 s for nothing it checks
    asked = {tool: subprocess.Popen([python if a == PYTHON else a for a in tool]
                                    + ["--noconftest"] * (tool[-1] == "pytest") + ["--help"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for tool in tools}
    for tool, users in tools.items():
        shown = shlex.join([_shown(python) if a == PYTHON else a for a in tool])
        stdout, stderr = asked[tool].communicate(timeout=300)
        if asked[tool].returncode != 0:
            problems.append(f"`{shown} --help` exited {asked[tool].returncode}: {stderr.strip()[-300:]}")
            continue
        text = "".join(stdout.split())  # argparse wraps lines, at hyphens too
        for stage in users:
            given = stage.argv[stage.tool :]
            wanted = {a.split("=")[0] for a in given if a.startswith("--")}
            if "bench" in tool:  # its --help lists the built-in models and the methods
                wanted |= {given[given.index("--model") + 1], *given[given.index("--methods") + 1].split(",")}
            missing = sorted(w for w in wanted if w not in text)
            if missing:
                problems.append(f"{stage.name}: `{shown} --help` does not mention {', '.join(missing)}")
        print(f"checked: {shown} --help")
    for problem in problems:
        print(f"gpu_check: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _shown(python: str) -> str:
    return os.path.relpath(python, ROOT) if python.startswith(str(ROOT)) else python


def main(argv=None) -> int:
    args = parse(argv)
    if args.facts:
        print(json.dumps(facts()))
        return 0
    begin = time.monotonic()
    python = sys.executable
    out = Path(args.out).resolve()
    known = machine(python)
    problem = None
    if not known["cuda_available"]:
        problem = (f"the driver sees {'; '.join(known['driver_gpus'])}, but no python here has a torch with CUDA "
                   f"({python}: torch {known['torch']}): install a CUDA build of torch; every stage needs it"
                   if known["driver_gpus"] else "no GPU on this machine: every stage needs one")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        raw = Path(scratch)
        plan = stages(raw)
        if args.dry_run:
            print(f"machine: {known.get('gpu') or problem}")
            print(f"would write {', '.join(str(out / f'gpu_check.{x}') for x in ('md', 'json', 'log'))}")
            return dry_run(plan, python, lambda stage: stage.command(_shown(python), raw))
        if problem:
            print(f"gpu_check: {problem}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        log = out / "gpu_check.log"
        log.write_text("")
        invocation = shlex.join(["benchmarks/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])])
        # Every stage is listed from the start: a report written before the run ends shows what did not run.
        entries = [{"section": stage.section, "name": stage.name, "title": stage.title,
                    "command": stage.command(_shown(python), raw), "status": "not run"} for stage in plan]
        report = {"invocation": invocation, "machine": known, "problem": problem, "budget_seconds": args.budget,
                  "seconds": None, "stages": entries}
        deadline = begin + args.budget
        for number, (stage, entry) in enumerate(zip(plan, entries), 1):
            left = deadline - time.monotonic()
            if problem:
                entry.update(status="skipped", note="no CUDA")
            elif left < LEAST:
                entry.update(status="skipped", note=f"{left:.0f} s of the budget left")
            else:
                print(f"[{number}/{len(plan)}] {stage.name} (at most {min(stage.limit, left):.0f} s) ...", flush=True)
                entry.update(run_stage(stage, python, raw, min(stage.limit, left), entry["command"]))
                entry["results"] = results(stage, raw)
                if stage.section > 1 and entry["status"] == "ok" and not entry["results"]:
                    entry.update(status="failed", note="wrote no results")
                output = (raw / f"{stage.name}.log").read_text(errors="replace")
                with open(log, "a") as whole:
                    whole.write(f"==== {stage.name}: {entry['status']} ====\n{output}\n")
                # What went wrong, unless the results say it (a failed bench row names its error):
                if not entry["results"] or (stage.section == 1 and entry["status"] != "ok"):
                    entry["log_tail"] = _tail(output)
            print(f"[{number}/{len(plan)}] {stage.name}: {entry['status']}"
                  + (f" in {entry['seconds']} s" if "seconds" in entry else f" ({entry.get('note')})"), flush=True)
            report["seconds"] = round(time.monotonic() - begin, 1)
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
            (out / "gpu_check.md").write_text(markdown(report))
    print(f"wrote {out}/gpu_check.md, gpu_check.json and gpu_check.log")
    return 0 if not problem and all(e["status"] == "ok" for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
