"""Denoising-reduction benchmark: what the rollout plans save per epoch, measured side by side.

    python benchmarks/bench_denoising_reduction.py                  # ~3 min on a 2-core CPU
    python benchmarks/bench_denoising_reduction.py --rounds 6 --threads 2
    deepspeed --num_gpus 1 benchmarks/bench_denoising_reduction.py   # one GPU (same code)

One tiny-but-not-trivial SD3-family model (4 joint blocks of width 128, 64 px images: 16x16
latent patches + 32 text tokens per row, LoRA rank 8), the same prompts, seeds and group size
(G = 4, one sampling batch of 16 images per epoch) for every case, all in one process through
the real trainer (`GRPOTrainer.rollout` / `update`, DeepSpeed, one rank):

    full        Flow-GRPO, T = 10, SDE at steps 0-8, all 9 trained
    window_w2   Flow-GRPO-Fast window of 2 SDE steps (random in the first half), 2 trained
    window_w1   window of 1
    branch_w2   one ODE prefix per prompt to step 2 (fixed here, so that every round costs the
                same), G branches, 2 SDE steps
    entropy     E-GRPO, tau = 0.5 nats: branch points 0,1,2,3 and 4-5 merged (5 per prompt)
    sample_T40  the full plan's sampling phase at T = 40 (evaluation-like step count)

Phases per epoch (wall time, median over rounds; the cases run interleaved round by round so
that load from other processes spreads evenly): sampling (the denoising loop), reward (VAE
decode + reward, run inline here rather than on the worker threads), training (re-scoring,
backward, optimizer step). Predictions come from counting: a forward hook on the transformer
counts the rows (images) through each forward in sampling and training; the predicted phase
speedup over `full` is the ratio of counted rows (training rows carry forward + backward; the
reward phase scales with the images decoded), and the predicted total combines full's measured
phase times with those ratios. The measured training speedups must land within 20% of their
predictions: that is the check that the trainer adds no overhead the counted passes miss.

Threads: one intra-op thread by default. On a 2-core machine that other jobs share, two OpenMP
threads wait at every barrier for whichever was descheduled, and a forward that takes 10 ms
took anywhere from 10 to 700 ms; with one thread the time per row is linear in the rows and
repeats within a few percent. On an idle machine `--threads 2` is faster and as stable.

Rows are written to benchmarks/results/denoising_reduction.csv (replaced per run) with device,
versions and commit; the chart to denoising_reduction.png.
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowpo.config import load_config  # noqa: E402
from flowpo.trainer.rollout import forward_rows  # noqa: E402

CASES = [  # name, what, overrides
    ("full", "Flow-GRPO: T=10, 9 SDE steps trained", ["--rollout.plan=full"]),
    ("window_w2", "window w=2 (Flow-GRPO-Fast)", ["--rollout.plan=window", "--rollout.window_size=2"]),
    ("window_w1", "window w=1", ["--rollout.plan=window", "--rollout.window_size=1"]),
    ("branch_w2", "branch at step 2, w=2: shared prefix", ["--rollout.plan=branch", "--rollout.window_size=2", "--rollout.window_placement=fixed", "--rollout.window_range=2,5"]),
    ("entropy", "E-GRPO, tau=0.5: 5 branch points", ["--rollout.plan=entropy", "--rollout.entropy_tau=0.5"]),
    ("sample_T40", "sampling only, T=40 (vs 10)", ["--rollout.plan=full", "--sampling.num_steps=40"]),
]  # fmt: skip
SAMPLING_ONLY = {"sample_T40"}

# the "tiny but not trivial" transformer: tiny.py's SD3 encoders and VAE, a wider, deeper DiT
TRANSFORMER = dict(num_layers=4, attention_head_dim=32, num_attention_heads=4)
RESOLUTION = 64


class InlineExecutor:
    """The trainer's reward pool, run synchronously so that reward time is its own phase."""

    def submit(self, fn, *args, **kwargs) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


def build_model(out: Path) -> str:
    from flowpo.models import tiny

    cfg = copy.deepcopy(tiny.TINY_CONFIGS["sd3"])
    width = TRANSFORMER["attention_head_dim"] * TRANSFORMER["num_attention_heads"]
    cfg["transformer"].update(TRANSFORMER, caption_projection_dim=width)
    pipe = tiny._make_sd3(cfg, seed=0, resolution=RESOLUTION)  # tiny.py's builder, wider DiT
    pipe.save_pretrained(str(out))
    return str(out)


def commit() -> str:
    """HEAD's commit, read from .git (no git process)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:10]
        name = head[5:]
        ref = ROOT / ".git" / name
        if ref.is_file():
            return ref.read_text().strip()[:10]
        for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + name):
                return line.split()[0][:10]
    except OSError:
        pass
    return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Case:
    def __init__(self, name, what, overrides, model, run_dir, batch, group):
        from flowpo.trainer.grpo import GRPOTrainer

        self.name, self.what = name, what
        cfg = load_config(
            None,
            [
                f"--model.path={model}",
                "--model.family=sd3",
                f"--logging.run_dir={run_dir}",
                f"--logging.run_name={name}",
                "--logging.wandb=off",
                "--logging.progress=false",
                "--sampling.num_steps=10",
                "--sampling.guidance_scale=1.0",
                f"--rollout.group_size={group}",
                f"--rollout.batch_size={batch}",
                "--rollout.num_batches=1",
                "--rollout.prompts=a red circle,a blue square,a green triangle,two yellow circles",
                "--reward.weights=jpeg_incompressibility:1",
                "--train.learning_rate=1e-4",
                *overrides,
            ],
        )
        self.trainer = tr = GRPOTrainer(cfg)
        tr.setup()
        tr.pool.shutdown()
        tr.pool = InlineExecutor()
        self.rows: dict[str, int] = {"sample": 0, "train": 0}
        self.phase = "sample"
        tr.engine.module.module.register_forward_pre_hook(self._count, with_kwargs=True)
        self.times: dict[str, list[float]] = {"sample": [], "reward": [], "train": []}
        self.batch, self.group = batch, group

    def _count(self, module, args, kwargs):
        self.rows[self.phase] += kwargs["hidden_states"].shape[0]

    def epoch(self, epoch: int, record: bool) -> None:
        tr = self.trainer
        self.rows = {"sample": 0, "train": 0}
        self.phase = "sample"
        data = tr.rollout(epoch)
        m = data.metrics
        self.images = data.rewards.numel()
        self.plan = tr.plan.step_plan(tr.schedule(), epoch, 0)
        if self.name not in SAMPLING_ONLY:
            adv, _ = tr.advantages(data)
            self.phase = "train"
            out = tr.update(data, adv, epoch)
            assert out["train/first_ratio_max_dev"] <= 1e-6, (self.name, out)
            train_s = out["time/train_s"]
        else:
            train_s = 0.0
        if record:
            self.times["sample"].append(m["time/sample_s"])
            self.times["reward"].append(m["time/decode_s"] + m["time/reward_s"])
            self.times["train"].append(train_s)
        # the analytic count the predictions use must be what the trainer ran
        want = forward_rows(self.plan, self.batch, self.group)
        assert self.rows["sample"] == want["sample"], (self.name, self.rows, want)
        if self.name not in SAMPLING_ONLY:
            assert self.rows["train"] == want["train"], (self.name, self.rows, want)

    def median(self, phase: str) -> float:
        return statistics.median(self.times[phase])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="measured rounds (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see above)")
    ap.add_argument("--batch", type=int, default=16, help="images per epoch (one batch)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        cases = [Case(*c, model, Path(tmp) / "runs", args.batch, args.group) for c in CASES]
        torch.set_num_threads(args.threads)  # in case a library reset it during setup
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels, caches)
            for c in cases:
                c.epoch(r, record=r > 0)
            print(f"round {r} done ({time.time() - t_start:.0f}s)", flush=True)
        rows = report(cases, args)
        for c in cases:
            c.trainer.logger.close()
    write_csv(rows, out / "denoising_reduction.csv")
    plot(rows, out / "denoising_reduction.png")
    torch.distributed.destroy_process_group()
    print(f"wrote {out / 'denoising_reduction.csv'} and .png in {time.time() - t_start:.0f}s")


def report(cases: list[Case], args) -> list[dict]:
    full = cases[0]
    f = {p: full.median(p) for p in ("sample", "reward", "train")}
    f_total = sum(f.values())
    meta = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
    }
    rows = []
    for c in cases:
        med = {p: c.median(p) for p in ("sample", "reward", "train")}
        pred = {
            "sample": full.rows["sample"] / c.rows["sample"],
            "reward": full.images / c.images,
            "train": full.rows["train"] / c.rows["train"] if c.rows["train"] else float("nan"),
        }
        only_sampling = c.name in SAMPLING_ONLY
        total = sum(med.values())
        pred_time = sum(
            f[p] / pred[p] for p in ("sample", "reward") + (() if only_sampling else ("train",))
        )
        row = {
            "case": c.name,
            "what": c.what,
            "trained": "-"
            if only_sampling
            else " ".join(
                str(k) if b == k + 1 else f"{k}-{b - 1}" for k, b in c.plan.transitions()
            ),
            "images": c.images,
            "sample_rows": c.rows["sample"],
            "train_rows": c.rows["train"],
            "sample_s": med["sample"],
            "reward_s": med["reward"],
            "train_s": med["train"],
            "total_s": total,
            "speedup_sample": f["sample"] / med["sample"],
            "pred_sample": pred["sample"],
            "speedup_train": f["train"] / med["train"] if med["train"] else float("nan"),
            "pred_train": pred["train"],
            "speedup_total": float("nan") if only_sampling else f_total / total,
            "pred_total": float("nan") if only_sampling else f_total / pred_time,
            **meta,
        }
        row["train_vs_pred"] = row["speedup_train"] / row["pred_train"] - 1
        rows.append(row)
    hdr = (
        f"{'case':11s} {'imgs':>4s} {'sample s':>8s} {'reward s':>8s} {'train s':>8s} "
        f"{'total s':>8s} | {'sample x (pred)':>15s} {'train x (pred)':>15s} {'dev':>6s} "
        f"{'total x (pred)':>15s}"
    )
    print(f"\n{meta['device']}, {meta['threads']} threads, torch {meta['torch']}, median of "
          f"{args.rounds} rounds; speedups over `full`, predictions from counted forward rows")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for r in rows:

        def x(a, b):
            return "" if a != a else f"{a:5.2f} ({b:5.2f})"

        dev = "" if r["train_vs_pred"] != r["train_vs_pred"] else f"{r['train_vs_pred']:+.0%}"
        print(
            f"{r['case']:11s} {r['images']:4d} {r['sample_s']:8.2f} {r['reward_s']:8.2f} "
            f"{r['train_s']:8.2f} {r['total_s']:8.2f} | {x(r['speedup_sample'], r['pred_sample']):>15s} "
            f"{x(r['speedup_train'], r['pred_train']):>15s} {dev:>6s} "
            f"{x(r['speedup_total'], r['pred_total']):>15s}"
        )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    bottom = [0.0] * len(rows)
    for phase, color in (("sample", "#4c72b0"), ("reward", "#dd8452"), ("train", "#55a868")):
        vals = [r[f"{phase}_s"] for r in rows]
        a1.bar(names, vals, bottom=bottom, label=phase, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a1.set_ylabel("seconds per epoch (median)")
    a1.set_title("wall time per phase")
    a1.legend()
    a1.tick_params(axis="x", rotation=30)
    trained = [r for r in rows if r["pred_train"] == r["pred_train"]]
    xs = range(len(trained))
    w = 0.2
    for i, (key, label) in enumerate(
        (("speedup_train", "train measured"), ("pred_train", "train predicted"),
         ("speedup_total", "total measured"), ("pred_total", "total predicted"))
    ):  # fmt: skip
        a2.bar([x + (i - 1.5) * w for x in xs], [r[key] for r in trained], w, label=label)
    a2.set_xticks(list(xs), [r["case"] for r in trained], rotation=30)
    a2.set_ylabel("speedup over full")
    a2.set_title("measured vs predicted from counted passes")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
