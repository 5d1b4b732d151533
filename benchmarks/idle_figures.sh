#!/usr/bin/env bash
# Every speed figure the README quotes as idle, one benchmark at a time (about 20 minutes on 2 cores).
# Run it with nothing else on the machine: `bash benchmarks/idle_figures.sh 2>&1 | tee idle.log`.
# Each section starts with `uptime`, so the log shows the load each figure was taken at.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD WANDB_MODE=offline WANDB_ERROR_REPORTING=false
PY=${PY:-.venv/bin/python}
DATA=${DATA:-/tmp/pipeline_bench}
section() { echo "=== $1 $(date -u +%FT%TZ) $(uptime)"; }

for r in 1 2; do
  section "make test's pytest, round $r"
  /usr/bin/time -f "suite wall %e s, user %U s, sys %S s" \
    $PY -m pytest -q -m "not slow and not processes" -p no:cacheprovider -n logical --maxprocesses=4 --dist loadscope 2>&1 | tail -2
done
section "training loop, defaults (9 rounds)";  $PY benchmarks/train_throughput.py 2>&1 | tail -8
section "training loop, 1 thread";            $PY benchmarks/train_throughput.py --threads 1 2>&1 | tail -8
section "training loop, 1 worker";            $PY benchmarks/train_throughput.py --num-workers 1 2>&1 | tail -8
section "training loop, per-part breakdown";  $PY benchmarks/train_throughput.py --breakdown --rounds 3 2>&1 | tail -11
section "loader at 224 px";                   $PY benchmarks/loader_throughput.py --n 512 --rounds 5 --data "$DATA/loader" 2>&1 | grep -v "it/s" | tail -32
section "box ops, 1 thread";                  $PY benchmarks/detect_ops.py --rounds 5 --threads 1 2>&1 | tail -12
section "box ops, 2 threads";                 $PY benchmarks/detect_ops.py --rounds 5 --threads 2 2>&1 | tail -12
section "default vs auto anchors (2 x 4 min)"; $PY benchmarks/detect_anchors.py --budget 4m --threads 2 --work "$DATA/anchors" 2>&1 | grep -v "it/s" | tail -8
section "end"
