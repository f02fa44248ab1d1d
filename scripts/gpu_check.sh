#!/usr/bin/env bash
# One-shot validation of flowpo's GPU paths, one JSON report (docs/gpu.md):
#   bash scripts/gpu_check.sh [REPORT.json]        (default gpu_check.json)
# Triton kernels vs the torch reference (values, gradients, every SDE type, fp32/bf16/fp16),
# bench_kernels.py, one tiny-SD3 epoch each with kernels=torch/triton, bf16, flash attention and
# engine.compile (first ratio == 1), an fp16 evaluation, flash vs SDPA velocities, and with two
# GPUs ZeRO-3 == ZeRO-2 over NCCL. At most 8 minutes on one GPU. Without a GPU it runs what can
# run (the kernels in Triton's interpreter, a kernels=torch epoch) and marks the rest
# "skipped: no GPU". Exit status 1 when a part failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
exec "$PYTHON" -m flowpo doctor --gpu-check --out "${1:-gpu_check.json}"
