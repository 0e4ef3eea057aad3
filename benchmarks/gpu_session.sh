#!/usr/bin/env bash
# One GPU session (issue 9): the CUDA tests, then the benchmarks at the presets' full sizes.
# Usage on the device machine:  bash benchmarks/gpu_session.sh   (results under $OUT, default ./gpu-out)
# Ordered by value: if time runs out, the first results are already under $OUT.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/session.log"; }
run() { log "$*"; timeout "${STEP_TIMEOUT:-240}" "$@" >>"$OUT/bench.jsonl" 2>>"$OUT/stderr.log"; log "rc=$?"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
pip install -q -e ".[dev]" >"$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"

log "pytest -m gpu"
timeout 300 python -m pytest -m gpu -q -x -p no:cacheprovider >"$OUT/pytest_gpu.txt" 2>&1; log "rc=$?"
tail -5 "$OUT/pytest_gpu.txt"

# Throughput and peak memory at full preset sizes (second epoch, synthetic data).
run carso bench train  --preset cifar10 --batch-size 512  --batches 4 --device cuda --json
run carso bench attack --preset cifar10 --batch-size 128  --batches 10 --device cuda --json --bf16
run carso bench attack --preset cifar10 --batch-size 128  --batches 10 --device cuda --json
run carso bench train  --preset cifar10 --batch-size 512  --batches 4 --device cuda --json --compile inductor
# The paper's global batch on one GPU, memory-bounded.
run carso bench train  --preset cifar10 --batch-size 5120 --batches 2 --device cuda --json --attack-chunk auto --micro-batch 1024
run carso bench train  --preset tinyimagenet --batch-size 256 --batches 4 --device cuda --json
run carso bench attack --preset tinyimagenet --batch-size 64 --batches 10 --device cuda --json --bf16
log "done"
