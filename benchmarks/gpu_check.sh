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
# Only when .venv was never made: a stamp older than pyproject.toml would make `make` reinstall,
# which a lent machine without network cannot do.
if [ ! -e "$stamp" ]; then
    if [ "$dry" = 1 ]; then
        echo "would run: make -C $root .venv/.zotune-installed" >&2
        echo "gpu_check: error: .venv is not made yet, and the --help checks need it" >&2
        exit 1
    fi
    make -C "$root" .venv/.zotune-installed
fi
exec "$root/.venv/bin/python" "$root/benchmarks/gpu_check.py" "$@"
