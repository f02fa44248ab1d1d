"""The one-shot GPU validation (`scripts/gpu_check.sh`, `flowpo doctor --gpu-check`): every
GPU-only path of flowpo checked in one command and one JSON report, at most 8 minutes on one GPU
by design (tiny models, small shapes, one epoch each, per-part time limits).

Parts (docs/gpu.md):
- kernels:         the Triton kernels against the float64 torch reference, values and
                   gradients, every SDE type and reduce mode, fp32/bf16/fp16 velocities (compiled
                   on a GPU; on CPU in Triton's interpreter on small shapes);
- bench_kernels:   benchmarks/bench_kernels.py, achieved GB/s beside a device copy and the spec
                   sheet's peak (GPU);
- epoch_torch:     one tiny-SD3 epoch with kernels=torch: first ratio 1 (|dev| <= 1e-6; CPU too);
- epoch_triton, epoch_bf16, epoch_flash, epoch_compile: the same with kernels=triton (with
                   GRPO-Guard: the rollout's log-prob kernel and the Guard loss kernel, forward
                   and backward, in training), bf16, model.attn_backend=flash (bf16),
                   engine.compile (GPU);
- fp16:            tiny SD3 in float16: velocities vs float32, a finite ODE sample (fp16
                   training is refused by design: no loss scaling) (GPU);
- flash_vs_sdpa:   velocities of tiny SD3, FLUX and Bagel with flash-attn vs torch SDPA (GPU);
- zero3_2gpu:      one epoch on 2 GPUs over NCCL, ZeRO-3 == ZeRO-2 (with >= 2 GPUs).
A part that cannot run here is recorded as "skipped: <why>" (no GPU, a package missing); the
exit status is 1 when a part failed. The kernel, fp16 and velocity parts run in their own process
(`python -m flowpo.gpu_check --part NAME --json FILE`), the epochs as `python -m flowpo train`,
so a crash or a hang of one part is one failed line of the report.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480.0  # the whole check; later parts are skipped once it is spent
RATIO_DEV = {"epoch_bf16": 1e-3, "epoch_flash": 1e-3}  # bf16 rounding; else 1e-6 (docs/kernels.md)
# Memory bandwidth of the vendors' spec sheets, GB/s (name substring -> peak), for the report
SPEC_PEAK_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "RTX 4090": 1008,
}
EPOCH_ARGS = [
    "-c",
    "configs/tiny_sd3_jpeg.yaml",
    "--rollout.batch_size=4",
    "--rollout.num_batches=1",
    "--rollout.group_size=4",
    "--sampling.num_steps=3",
    "--train.epochs=1",
    "--eval.at_start=false",
    "--eval.at_end=false",
    "--logging.wandb=off",
    "--logging.progress=false",
]
BF16 = ["--model.dtype=bfloat16", "--engine.precision=bf16"]
# GRPO-Guard: with kernels=triton its loss runs in the fused guard_clipped_loss kernel
GUARD = ["--train.ratio_norm=true", "--train.gradient_reweight=true"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:].strip()


# -- parts that run flowpo's own commands ---------------------------------------------------------
def epoch(name: str, overrides: list[str], timeout: float, launcher: list[str] | None = None):
    """One tiny-SD3 epoch; pass when it exits 0 with the first ratio within RATIO_DEV."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*(launcher or [sys.executable, "-m", "flowpo"]), "train", *EPOCH_ARGS]
        cmd += [f"--logging.run_dir={tmp}", "--logging.run_name=run", *overrides]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode:
            return "fail", {"cmd": " ".join(cmd), "stderr": _tail(proc.stderr)}
        rows = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        row = next(json.loads(r) for r in rows if "train/loss" in r)
        ckpts = Path(tmp) / "run" / "checkpoints"
        weights = None
        if launcher:  # the 2-rank runs: their trained weights are compared
            latest = (ckpts / "latest").read_text().strip()
            weights = _load(ckpts / latest / "trainable.safetensors")
    dev = row["train/first_ratio_max_dev"]
    bound = RATIO_DEV.get(name, 1e-6)
    details = {"first_ratio_max_dev": dev, "bound": bound, "loss": row["train/loss"]}
    details["epoch_s"] = row["time/epoch_s"]
    if weights is not None:
        details["_weights"] = weights
    return ("pass" if dev <= bound else "fail"), details


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def zero3_2gpu(timeout: float):
    """2 ranks over NCCL: ZeRO-3 and ZeRO-2 train the same epoch to the same LoRA weights."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    launcher = [*run, "-m", "flowpo"]
    out = {}
    for stage in (2, 3):
        status, det = epoch(f"zero{stage}", [f"--engine.zero_stage={stage}"], timeout / 2, launcher)
        if status != "pass":
            return "fail", {f"zero{stage}": det}
        out[stage] = det
    w2, w3 = out[2].pop("_weights"), out[3].pop("_weights")
    diff = max(float((w3[k].float() - v.float()).abs().max()) for k, v in w2.items())
    details = {"zero2": out[2], "zero3": out[3], "max_weight_diff": diff, "bound": 1e-5}
    return ("pass" if diff <= 1e-5 and w2.keys() == w3.keys() else "fail"), details


def bench_kernels(timeout: float):
    import torch

    cmd = [sys.executable, "benchmarks/bench_kernels.py", "--shapes", "sd35m-1024,flux-1024"]
    cmd += ["--impls", "torch,triton", "--reps", "20", "--csv", ""]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in SPEC_PEAK_GBPS.items() if k in name), None)
    details = {"device": name, "spec_peak_GBps": peak, "table": proc.stdout.strip()}
    if proc.returncode:
        details["stderr"] = _tail(proc.stderr)
    return ("pass" if proc.returncode == 0 else "fail"), details


def in_process(part: str, timeout: float, **env: str):
    """Run `part` in its own `python -m flowpo.gpu_check --part` process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, "-m", "flowpo.gpu_check", "--part", part, "--json", str(out)]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout
        )
        if not out.is_file():
            return "fail", {"cmd": " ".join(cmd), "stderr": _tail(proc.stderr)}
        res = json.loads(out.read_text())
    return res["status"], res["details"]


# -- parts run inside `--part` processes ----------------------------------------------------------
def check_kernels() -> tuple[str, dict]:
    """Kernels vs the float64 reference on the same (rounded) inputs: log_prob and mean within
    1e-5, d/dv within 1e-5 (fp32) or 1e-2 (bf16/fp16) relative to its largest element; the
    Guard loss likewise. CPU: the interpreter (set by the caller), small shapes."""
    import torch

    from flowpo.kernels import guard_clipped_loss, sde_step_logprob
    from flowpo.kernels import reference as ref
    from flowpo.sde import sde_step_with_logprob

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    shapes = [(4, (16, 64, 64)), (3, (1024, 64))] if cuda else [(3, (4, 5, 7))]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    worst: dict[str, float] = {}
    failures = []

    def rel(a, b) -> float:
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    def note(key: str, err: float, bound: float) -> None:
        worst[key] = max(worst.get(key, 0.0), err)
        if not err <= bound:  # NaN fails too
            failures.append(f"{key}: {err:.2e} > {bound:.0e}")

    g = torch.Generator(device="cpu").manual_seed(0)
    for b, shape in shapes:
        for sde in ("flow", "cps", "dance"):
            x = torch.randn((b, *shape), generator=g)
            v = torch.randn((b, *shape), generator=g)
            s = torch.linspace(1.0, 0.4, b)
            sn = s - 0.1
            a = torch.full((b,), 0.7)
            xn = sde_step_with_logprob(x, v, s, sn, a, sde_type=sde, generator=g, sigma_max=0.94)
            xn = xn.prev_sample
            x, v, xn, s, sn, a = (t.to(dev) for t in (x, v, xn, s, sn, a))
            for dname, dtype in dtypes.items():
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                for reduce in ("mean", "sum"):
                    kw = dict(sde_type=sde, reduce=reduce, sigma_max=0.94)
                    vl = v.to(dtype).requires_grad_()
                    lp, mean = sde_step_logprob(x, vl, xn, s, sn, a, mean_out=True, **kw)
                    (gv,) = torch.autograd.grad(lp.sum() + mean.float().sum(), vl)
                    v64 = vl.detach().double().requires_grad_()
                    x64, xn64 = x.double(), xn.double()
                    lp64, m64 = ref.sde_step_logprob_ref(
                        x64, v64, xn64, s, sn, a, mean_out=True, **kw
                    )
                    (g64,) = torch.autograd.grad(lp64.sum() + m64.sum(), v64)
                    key = f"sde_logprob/{sde}/{reduce}/{dname}"
                    note(key + "/log_prob", rel(lp, lp64), 1e-5)
                    note(key + "/mean", rel(mean, m64), 1e-5)
                    note(key + "/grad", rel(gv, g64), tol)
                # GRPO-Guard's RatioNorm loss against its reference
                v_old = v + 0.01 * torch.randn(v.shape, generator=g).to(dev)
                _, m_old = ref.sde_step_logprob_ref(
                    x, v_old, xn, s, sn, a, sde_type=sde, sigma_max=0.94, mean_out=True
                )
                adv = torch.linspace(-0.5, 1.5, b, device=dev)  # mean != 0: loss != 0
                kw = dict(sde_type=sde, gradient_reweight=True, sigma_max=0.94)
                vl = v.to(dtype).requires_grad_()
                loss, st = guard_clipped_loss(vl, x, xn, m_old, s, sn, a, adv, 1e-4, 2e-4, **kw)
                (gv,) = torch.autograd.grad(loss, vl)
                v64 = vl.detach().double().requires_grad_()
                loss64, st64 = ref.guard_clipped_loss_ref(
                    v64, x.double(), xn.double(), m_old.double(), s, sn, a, adv.double(),
                    1e-4, 2e-4, **kw,
                )  # fmt: skip
                (g64,) = torch.autograd.grad(loss64, v64)
                key = f"guard/{sde}/{dname}"
                # z = mean_D(eps * dmu) cancels O(1) numbers in float32: an absolute floor
                z_err = float((st["log_ratio"].double() - st64["log_ratio"]).abs().max().cpu())
                note(key + "/log_ratio_abs", z_err, 1e-7)
                note(key + "/loss", rel(loss, loss64), 1e-5)
                note(key + "/grad", rel(gv, g64), tol)
    details = {
        "mode": "compiled" if cuda else "interpreter (TRITON_INTERPRET=1)",
        "shapes": [[b, list(s)] for b, s in shapes],
        "cases": len(worst),
        "worst": {k: worst[k] for k in sorted(worst)},
        "failures": failures[:20],
    }
    return ("fail" if failures else "pass"), details


def check_flash_vs_sdpa() -> tuple[str, dict]:
    """Tiny SD3, FLUX and Bagel in bf16 on the GPU: the velocity with flash-attn against the
    same model on torch SDPA (max |dv| relative to max |v|, within 2e-2: bf16 attention)."""
    import torch

    from flowpo.models.base import load_adapter
    from flowpo.models.resolve import resolve_model_path

    out, failed = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd3", "flux", "bagel"):
            path = resolve_model_path(f"tiny:{family}", Path(tmp) / family)
            kw = {"resolution": 48} if family == "bagel" else {}
            adapter = load_adapter(
                family, path, device="cuda", dtype=torch.bfloat16, guidance_scale=4.0, **kw
            )
            g = torch.Generator(device="cuda").manual_seed(0)
            x = adapter.initial_noise(3, g)
            emb = adapter.encode_prompts(["a red circle", "two blue squares next to a dog", "a"])
            t = torch.tensor([0.9, 0.5, 0.2], device="cuda")
            with torch.no_grad():
                v_sdpa = adapter.velocity(x, t, emb)
                adapter.set_attention_backend("flash")
                v_flash = adapter.velocity(x, t, emb)
            err = float((v_flash - v_sdpa).abs().max() / v_sdpa.abs().max())
            out[family] = {"max_rel_dv": err}
            failed |= not err <= 2e-2
    return ("fail" if failed else "pass"), out


def check_fp16() -> tuple[str, dict]:
    """Tiny SD3 on the GPU in float16 (what `flowpo eval --model.dtype=float16` runs; fp16
    training is refused: no loss scaling): velocities against float32 within 1e-2 relative, and
    a 10-step ODE sample that stays finite."""
    import torch

    from flowpo.models.base import load_adapter
    from flowpo.models.resolve import resolve_model_path
    from flowpo.trainer.rollout import sample_ode

    with tempfile.TemporaryDirectory() as tmp:
        path = resolve_model_path("tiny:sd3", Path(tmp))
        out = {}
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            adapter = load_adapter("sd3", path, device="cuda", dtype=dtype, guidance_scale=4.5)
            emb = adapter.encode_prompts(["a red circle", "two blue squares"])
            x = adapter.initial_noise(2, torch.Generator(device="cuda").manual_seed(0))
            with torch.no_grad():
                v = adapter.velocity(x, torch.tensor([0.8, 0.3], device="cuda"), emb)
            with torch.no_grad():
                images = sample_ode(adapter, emb, 10, [0, 1])
            out[name] = (v, images)
    err = float((out["fp16"][0] - out["fp32"][0]).abs().max() / out["fp32"][0].abs().max())
    finite = bool(torch.isfinite(out["fp16"][1]).all())
    ok = err <= 1e-2 and finite
    return ("pass" if ok else "fail"), {"max_rel_dv_fp16_vs_fp32": err, "images_finite": finite}


PART_FUNCS: dict[str, Callable[[], tuple[str, dict]]] = {
    "fp16": check_fp16,
    "kernels": check_kernels,
    "flash_vs_sdpa": check_flash_vs_sdpa,
}


# -- the whole check ------------------------------------------------------------------------------
def plan() -> list[tuple[str, Callable[[float], tuple[str, dict]], str | None, float]]:
    """(name, run(timeout), why it is skipped here or None, time limit s), in order."""
    import importlib.util

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    no_gpu = None if gpus else "skipped: no GPU"
    flash = importlib.util.find_spec("flash_attn") is not None
    no_flash = no_gpu or (
        None if flash else "skipped: flash-attn not installed (pip install '.[gpu]')"
    )
    cpu = {} if gpus else {"TRITON_INTERPRET": "1"}
    return [
        ("kernels", lambda t: in_process("kernels", t, **cpu), None, 150),
        ("bench_kernels", bench_kernels, no_gpu, 90),
        ("epoch_torch", lambda t: epoch("epoch_torch", ["--train.kernels=torch"], t), None, 150),
        (
            "epoch_triton",
            lambda t: epoch("epoch_triton", ["--train.kernels=triton", *GUARD], t),
            no_gpu,
            60,
        ),
        ("epoch_bf16", lambda t: epoch("epoch_bf16", BF16, t), no_gpu, 60),
        (
            "epoch_flash",
            lambda t: epoch("epoch_flash", [*BF16, "--model.attn_backend=flash"], t),
            no_flash,
            60,
        ),
        (
            "epoch_compile",
            lambda t: epoch("epoch_compile", ["--engine.compile=true"], t),
            no_gpu,
            120,
        ),
        ("fp16", lambda t: in_process("fp16", t), no_gpu, 45),
        ("flash_vs_sdpa", lambda t: in_process("flash_vs_sdpa", t), no_flash, 60),
        ("zero3_2gpu", zero3_2gpu, no_gpu or (None if gpus >= 2 else "skipped: needs 2 GPUs"), 120),
    ]


def run_gpu_check(out_path: str, log: Callable[[str], None] = print) -> int:
    """Run every part, write the JSON report to `out_path`; 0 when no part failed."""
    import torch

    from flowpo.doctor import devices, versions

    t0 = time.monotonic()
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "devices": devices(),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "parts": [],
    }
    for name, run, skip, limit in plan():
        left = BUDGET_S - (time.monotonic() - t0)
        if skip is None and left < 10:
            skip = "skipped: the 8-minute budget is spent"
        start = time.monotonic()
        if skip is not None:
            status, details = skip, {}
        else:
            try:
                status, details = run(min(limit, left))
            except subprocess.TimeoutExpired:
                status, details = "fail", {"error": f"timed out after {min(limit, left):.0f} s"}
            except Exception as e:  # one part's crash is one failed line of the report
                status, details = "fail", {"error": f"{type(e).__name__}: {e}"}
        part = {"name": name, "status": status, "seconds": round(time.monotonic() - start, 1)}
        part["details"] = details
        report["parts"].append(part)
        log(f"{name:<14s} {status} ({part['seconds']:.0f} s)")
    counts = {k: 0 for k in ("pass", "fail", "skipped")}
    for p in report["parts"]:
        counts[p["status"].split(":")[0]] += 1
    report["summary"] = counts
    report["seconds"] = round(time.monotonic() - t0, 1)
    Path(out_path).write_text(json.dumps(report, indent=1) + "\n")
    log(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped in "
        f"{report['seconds']:.0f} s; report: {out_path}"
    )
    return 1 if counts["fail"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one part of the GPU check, in its own process")
    p.add_argument("--part", required=True, choices=sorted(PART_FUNCS))
    p.add_argument("--json", required=True, help="where the part's result goes")
    a = p.parse_args(argv)
    try:
        status, details = PART_FUNCS[a.part]()
    except Exception as e:
        status, details = "fail", {"error": f"{type(e).__name__}: {e}"}
    Path(a.json).write_text(json.dumps({"status": status, "details": details}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
