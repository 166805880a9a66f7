#!/usr/bin/env bash
# One command for a lent GPU: the CUDA tests, the Triton kernels' bandwidth, zotune bench and the
# offload rows, in under 8 minutes on an H100/H200; see benchmarks/gpu_check.py for the stages.
#
#   benchmarks/gpu_check.sh [--out DIR] [--budget SECONDS] [--dry-run]
#
# Writes DIR/gpu_check.md and DIR/gpu_check.json (DIR: --out, else $OUT, else ./gpu_check).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
stamp="$root/.venv/.zotune-installed"
dry=0
for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then dry=1; fi
done
cuda_python() {  # whether python $1 has a torch that sees a GPU
    "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
}
# The interpreter: .venv's when its torch sees the GPU; else, on a lent machine (no network, so no
# venv can be made there), the machine's own python3 with its CUDA torch, running zotune from src/;
# else (CI's --dry-run, a machine without a GPU) .venv, made if it never was.
python="$root/.venv/bin/python"
if [ -x "$python" ] && cuda_python "$python"; then
    :
elif command -v python3 >/dev/null && cuda_python python3; then
    python="$(command -v python3)"
    export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: using $python (its CUDA torch) with zotune from src/" >&2
elif [ ! -e "$stamp" ]; then
    # Only when .venv was never made: a stamp older than pyproject.toml would make `make` reinstall,
    # which a machine without network cannot do.
    if [ "$dry" = 1 ]; then
        echo "would run: make -C $root .venv/.zotune-installed" >&2
        echo "gpu_check: error: .venv is not made yet, and the --help checks need it" >&2
        exit 1
    fi
    make -C "$root" .venv/.zotune-installed
fi
exec "$python" "$root/benchmarks/gpu_check.py" "$@"
