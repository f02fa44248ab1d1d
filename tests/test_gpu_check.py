"""scripts/gpu_check.sh in CPU mode, so that it never rots: the parts that can run here pass (the
Triton kernels in the interpreter against the float64 reference, a kernels=torch tiny-SD3 epoch
with ratio 1), every GPU-only part is in the report as "skipped: no GPU", and the report is
one JSON file."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.conftest import ENV, ROOT

GPU_PARTS = [
    "bench_kernels",
    "epoch_triton",
    "epoch_bf16",
    "epoch_flash",
    "epoch_compile",
    "fp16",
    "flash_vs_sdpa",
    "zero3_2gpu",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode")
def test_plan_skips_every_gpu_part_without_a_gpu():
    from flowpo.gpu_check import BUDGET_S, plan

    skips = {name: skip for name, _, skip, _ in plan()}
    assert skips["kernels"] is None and skips["epoch_torch"] is None
    assert all(skips[name] == "skipped: no GPU" for name in GPU_PARTS), skips
    assert BUDGET_S <= 8 * 60  # later parts are skipped once it is spent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode")
def test_gpu_check_script_in_cpu_mode(tmp_path):
    import sys

    report = tmp_path / "report.json"
    env = {**ENV, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    parts = {p["name"]: p for p in data["parts"]}
    assert parts["kernels"]["status"] == "pass", parts["kernels"]
    kern = parts["kernels"]["details"]
    assert kern["mode"].startswith("interpreter") and kern["cases"] >= 72 and not kern["failures"]
    epoch = parts["epoch_torch"]
    assert epoch["status"] == "pass" and epoch["details"]["first_ratio_max_dev"] == 0.0
    assert all(parts[name]["status"] == "skipped: no GPU" for name in GPU_PARTS)
    assert data["summary"] == {"pass": 2, "fail": 0, "skipped": len(GPU_PARTS)}
    assert data["versions"]["torch"] == torch.__version__ and data["gpus"] == 0
    assert "2 passed, 0 failed, 8 skipped" in proc.stdout
