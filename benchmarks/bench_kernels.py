"""Micro-benchmarks of the fused kernels (flowpo.kernels) against eager torch and torch.compile.

    python benchmarks/bench_kernels.py              # every shape; CUDA when present
    python benchmarks/bench_kernels.py --quick      # CI smoke: one small shape, few repeats
    python benchmarks/bench_kernels.py --impls torch,triton --shapes sd35m-1024

Ops: `sde_logprob` (re-scoring one stored SDE step: log_prob from x, v, x') and `guard`
(GRPO-Guard's RatioNorm clipped loss from x, v, x', mu_old). Modes: `fwd` (no grad: the
reference policy, old log-probs), `bwd` (the backward alone, graph kept), `fwd+bwd` (training).
Implementations, all from `flowpo.kernels.reference` (the one place baselines come from):
- torch:   the eager path the trainer runs today (`flowpo.sde.sde_step_with_logprob`, the
           Guard reference), argument checks and host syncs included, as the trainer pays them;
- compile: `torch.compile` of the check-free reference math (`sde_logprob_math`, `guard_math`);
- triton:  the fused kernels, CUDA only (the CPU interpreter is for correctness, not timing).

Shapes (latent D per image; B = the published per-GPU train batch: Flow-GRPO's recipes in
yifan123/flow_grpo config/grpo.py use 9 for SD3.5-M, 3 for FLUX.1-dev, 4 for Qwen-Image; those
recipes train at 512 px, and the 1024/1328 px rows keep their batch):
    sd35m-512   (9, 16, 64, 64)     D = 65,536
    sd35m-1024  (9, 16, 128, 128)   D = 262,144
    flux-1024   (3, 4096, 64)       D = 262,144   (packed 2x2 tokens)
    qwen-1328   (4, 6889, 64)       D = 440,896   (166x166 latent, packed 2x2)
Latents x, x' and mu_old are float32 (as the rollout stores them), velocity in --vdtype (bf16).

Bytes moved, minimum (e(t) = element size; S = B rows of x here):
    sde_logprob fwd      D (S e(x) + B e(v) + B e(x'))           read x, v, x' once
    sde_logprob fwd+bwd  fwd + B D e(v)                          and write grad_v once
    guard fwd            D (S e(x) + B e(v) + B e(x') + B e(mu_old))
    guard fwd+bwd        guard fwd + B D e(v)
    bwd (either op)      2 B D e(v)                              read one saved (B, D), write grad_v
The triton column `bytes_impl` is what the kernels move: sde_logprob fwd with grad adds one B D
e(v) write (the gradient, emitted before the upstream gradient is known) and its bwd reads it back
(fwd+bwd = minimum + 2 B D e(v)); guard's bwd re-reads x' and mu_old instead of a saved buffer
(fwd+bwd = minimum + B D (e(x') + e(mu_old))). `eff_GBps` = minimum bytes / median time for every
implementation (comparable across them); on CUDA `%copy` relates it to a measured device copy
bandwidth (read + write of 1 GiB).

Timers: CUDA — triton.testing.do_bench (device events, L2 flushed between runs), quantiles
0.5/0.2/0.8; CPU — time.perf_counter around synchronous calls. Rows append to
benchmarks/results/kernels.csv with device, versions and commit.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowpo.kernels import reference as ref  # noqa: E402

CSV_PATH = ROOT / "benchmarks" / "results" / "kernels.csv"
SHAPES = {
    "sd35m-512": (9, (16, 64, 64)),
    "sd35m-1024": (9, (16, 128, 128)),
    "flux-1024": (3, (4096, 64)),
    "qwen-1328": (4, (6889, 64)),
}
QUICK_SHAPE = {"sd35m-512-b2": (2, (16, 64, 64))}
OPS = ("sde_logprob", "guard")
MODES = ("fwd", "bwd", "fwd+bwd")
FIELDS = [
    "date", "commit", "device", "torch", "triton", "python", "quick", "op", "shape", "B", "D",
    "x_dtype", "v_dtype", "impl", "mode", "median_ms", "p20_ms", "p80_ms", "bytes_min",
    "bytes_impl", "eff_GBps", "copy_GBps",
]  # fmt: skip
CLIP = 1e-4


@dataclass
class Case:
    x: torch.Tensor  # (B, ...) float32
    v: torch.Tensor  # (B, ...) vdtype
    xn: torch.Tensor  # (B, ...) float32
    mean_old: torch.Tensor  # (B, ...) float32
    sigma: torch.Tensor  # (B,)
    sigma_next: torch.Tensor
    noise: torch.Tensor
    adv: torch.Tensor  # (B,)


def make_case(b: int, shape: tuple[int, ...], vdtype: torch.dtype, device: torch.device) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn((b, *shape), generator=g)
    v = torch.randn((b, *shape), generator=g)
    sigma = torch.linspace(0.95, 0.6, b)
    sigma_next = sigma - 0.1
    noise = torch.full((b,), 0.7)
    step = ref.sde_step_with_logprob(x, v, sigma, sigma_next, noise, generator=g)
    v_new = (v + 0.01 * torch.randn(v.shape, generator=g)).to(vdtype)
    adv = torch.randn(b, generator=g)
    to = lambda t: t.to(device).contiguous()  # noqa: E731
    return Case(to(x), to(v_new), to(step.prev_sample), to(step.mean.detach()), to(sigma),
                to(sigma_next), to(noise), to(adv))  # fmt: skip


# --- implementations ---------------------------------------------------------------------------


def impl_fn(op: str, impl: str, c: Case):
    """run(v) -> the op's output ((B,) log_prob or the scalar loss) for velocity v."""
    b = c.v.shape[0]
    s, sn, a = c.sigma, c.sigma_next, c.noise
    if impl == "triton":
        import flowpo.kernels as k

        if op == "sde_logprob":
            return lambda v: k.sde_step_logprob(c.x, v, c.xn, s, sn, a)
        return lambda v: k.guard_clipped_loss(
            v, c.x, c.xn, c.mean_old, s, sn, a, c.adv, CLIP, CLIP
        )[0]
    if impl == "torch":  # what the trainer runs today, checks and syncs included
        if op == "sde_logprob":
            return lambda v: ref.sde_step_with_logprob(c.x, v, s, sn, a, prev_sample=c.xn).log_prob
        return lambda v: ref.guard_clipped_loss_ref(
            v, c.x, c.xn, c.mean_old, s, sn, a, c.adv, CLIP, CLIP
        )[0]
    # compile: the check-free math on flat (B, D) tensors, as fast as plain torch gets
    x, xn, mo = (t.reshape(b, -1) for t in (c.x, c.xn, c.mean_old))
    if op == "sde_logprob":

        def math_fn(v):
            return ref.sde_logprob_math(x, v.reshape(b, -1).float(), xn, s, sn, a)[0]

    else:

        def math_fn(v):
            return ref.guard_math(x, v.reshape(b, -1).float(), xn, mo, s, sn, a, c.adv, CLIP, CLIP)[
                0
            ]

    torch._dynamo.reset()  # a fresh compile per case: no recompile-limit fallback to eager
    return torch.compile(math_fn)


def timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        def bench(fn, reps):
            return do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(reps, 20))

        return bench

    def bench(fn, reps):
        fn()  # warm-up (compile happens before: see measure)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        return statistics.median(times), q[1], q[7]  # median, p20, p80

    return bench


def measure(op: str, impl: str, mode: str, c: Case, bench, reps: int) -> tuple[float, ...]:
    run = impl_fn(op, impl, c)
    v = c.v.detach().requires_grad_()
    g_out = None
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return run(c.v)

    elif mode == "bwd":
        out = run(v)
        g_out = torch.randn_like(out)

        def fn():
            return torch.autograd.grad(out, v, g_out, retain_graph=True)

    else:

        def fn():
            out = run(v)
            return torch.autograd.grad(out, v, torch.ones_like(out))

    for _ in range(2 if impl == "compile" else 1):  # compile: trace / autotune outside timing
        fn()
    return bench(fn, reps)


def bytes_moved(op: str, mode: str, c: Case) -> tuple[int, int]:
    """(minimum, what the fused kernels move); see the module docstring."""
    b, d = c.v.shape[0], c.v[0].numel()
    e = lambda t: t.element_size()  # noqa: E731
    reads = d * (c.x.shape[0] * e(c.x) + b * e(c.v) + b * e(c.xn))
    if op == "guard":
        reads += b * d * e(c.mean_old)
    grad_w = b * d * e(c.v)
    if mode == "fwd":
        return reads, reads
    if mode == "bwd":
        impl = 2 * grad_w if op == "sde_logprob" else b * d * (e(c.xn) + e(c.mean_old)) + grad_w
        return 2 * grad_w, impl
    extra = 2 * grad_w if op == "sde_logprob" else b * d * (e(c.xn) + e(c.mean_old))
    return reads + grad_w, reads + grad_w + extra


def copy_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from triton.testing import do_bench

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def commit() -> str:
    """HEAD's commit, read from .git (no git process)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        name = head[5:]
        ref_file = ROOT / ".git" / name
        if ref_file.is_file():
            return ref_file.read_text().strip()[:12]
        for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + name):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def versions() -> dict[str, str]:
    try:
        import importlib.metadata as md

        triton_v = md.version("triton")
    except Exception:
        triton_v = "none"
    return {"torch": torch.__version__, "triton": triton_v, "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, threads={torch.get_num_threads()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one small shape, few repeats (CI smoke)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument(
        "--impls",
        default="",
        help="comma list of torch, compile, triton (default: all; quick: "
        "torch,triton, as compile's cold start of tens of seconds is no smoke test)",
    )
    p.add_argument("--vdtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=0, help="timed repeats (CPU); 0 = 20, quick 5")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    p.add_argument("--csv", default=str(CSV_PATH), help="results file ('' = do not write)")
    a = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads:  # on a shared CPU, more threads than idle cores makes each op wait on the rest
        torch.set_num_threads(a.threads)
    vdtype = getattr(torch, a.vdtype)
    shapes = QUICK_SHAPE if a.quick else {k: SHAPES[k] for k in a.shapes.split(",")}
    impls = (a.impls or ("torch,triton" if a.quick else "torch,compile,triton")).split(",")
    if device.type != "cuda" and "triton" in impls:
        impls.remove("triton")
        print("note: no CUDA device: the Triton kernels need a GPU for timing (on CPU they run")
        print("      only in the interpreter, for correctness); timing the torch variants only")
    reps = a.reps or (5 if a.quick else 20)
    bench = timer(device)
    copy_bw = copy_bandwidth(device)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "device": device_name(device),
        "quick": int(a.quick),
        **versions(),
    }
    print(f"device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; "
          f"commit {meta['commit']}" + (f"; copy {copy_bw:.0f} GB/s" if copy_bw else ""))  # fmt: skip
    rows = []
    head = f"{'shape':<14}{'op':<12}{'mode':<9}{'impl':<9}{'median ms':>11}{'[p20, p80]':>22}"
    head += f"{'eff GB/s':>10}" + ("  %copy" if copy_bw else "")
    print(head)
    for name, (b, shape) in shapes.items():
        case = make_case(b, shape, vdtype, device)
        for op in a.ops.split(","):
            for mode in a.modes.split(","):
                for impl in impls:
                    med, p20, p80 = measure(op, impl, mode, case, bench, reps)
                    bmin, bimpl = bytes_moved(op, mode, case)
                    eff = bmin / (med * 1e-3) / 1e9
                    line = f"{name:<14}{op:<12}{mode:<9}{impl:<9}{med:>11.3f}"
                    line += f"{f'[{p20:.3f}, {p80:.3f}]':>22}{eff:>10.1f}"
                    print(line + (f"  {100 * eff / copy_bw:5.1f}" if copy_bw else ""))
                    rows.append({
                        **meta, "op": op, "shape": name, "B": b, "D": math.prod(shape),
                        "x_dtype": "float32", "v_dtype": a.vdtype, "impl": impl, "mode": mode,
                        "median_ms": f"{med:.4f}", "p20_ms": f"{p20:.4f}", "p80_ms": f"{p80:.4f}",
                        "bytes_min": bmin, "bytes_impl": bimpl if impl == "triton" else "",
                        "eff_GBps": f"{eff:.2f}",
                        "copy_GBps": f"{copy_bw:.1f}" if copy_bw else "",
                    })  # fmt: skip
    if a.csv:
        path = Path(a.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
