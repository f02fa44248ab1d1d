"""Memory benchmark: per-rank model states under ZeRO 0/2/3, measured, and which real configs fit.

    python benchmarks/bench_memory.py                 # ~40 s on a 2-core CPU
    python benchmarks/bench_memory.py --skip-measure  # only print the real-model table (~10 s)

(1) Measured. flowpo's real `Engine` (flowpo/trainer/engine.py, DeepSpeed, bf16, the shipped
ds_configs/zero{0,2,3}.json) wraps a tiny SD3 transformer (tiny.py's SD3 config widened to
6 heads × 64 = 384 so that most weight matrices exceed ZeRO-3's persistence threshold of 1e5
elements), for LoRA (r 8 on the SD3 adapter's targets) and full fine-tuning, on 1 and on 2
ranks (this script started under `torchrun --standalone`, gloo on CPU). After one backward
(gradients, before the step frees them) and one optimizer step (parameters, optimizer state)
every rank counts the distinct storages it holds:

    parameters  p.data of every parameter, and under ZeRO-3 p.ds_tensor (its partition)
    gradients   p.grad, DeepSpeed's partitioned gradients (averaged_gradients, the ZeRO-2
                grads_in_partition and ZeRO-3 grad_partitions_flat_buffer buffers)
    optimizer   the fp32 master copy (the wrapped optimizer's flat fp32 groups) and the Adam
                state tensors of the torch optimizer (exp_avg, exp_avg_sq)

Communication buckets are not counted (they are fixed-size; the analytic model adds them).
Every rank's largest count is compared, as a ratio to ZeRO-0 on 1 rank, with the analytic
model's prediction (flowpo/memory.py `zero_numels`, the ZeRO paper's accounting) computed
from the same per-tensor sizes. Absolute numbers of a tiny model mean nothing; the ratios are
what transfers to real models.

(2) The real-model table: flowpo/memory.py `fit_table` on 8 × 80 GB from the parameter counts
of SD3.5-Medium, FLUX.1-dev, Qwen-Image and Bagel-7B-MoT (instantiated on the meta device from
their published configs): LoRA vs full fine-tuning (β = 0 and β > 0), ZeRO-2, ZeRO-3 and ZeRO-3
with optimizer + parameter offload. Activations excluded.

Results: benchmarks/results/memory.json and memory.md (replaced per run).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flowpo import memory  # noqa: E402

# the tiny transformer: tiny.py's SD3 config with a wider DiT (see the docstring)
TRANSFORMER = dict(
    num_layers=2, attention_head_dim=64, num_attention_heads=6, caption_projection_dim=384
)
SAMPLE_SIZE = 8  # latent 4×8×8, patch 2: 16 image tokens
LORA_RANK = 8
# (label, ZeRO stage, ds_configs template; "" = ds_configs/zero{stage}.json)
CASES = (("0", 0, ""), ("2", 2, ""), ("3", 3, ""), ("3+offload", 3, "zero3_offload.json"))
BF16 = memory.BF16_ADAM  # the engine runs with engine.precision=bf16
REF_BETA = 0.04  # the full-fine-tuning cases run with KL, so the reference policy exists


# -- worker: runs under torchrun ------------------------------------------------------------------
def build_transformer() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    from flowpo.models.tiny import TINY_CONFIGS

    cfg = copy.deepcopy(TINY_CONFIGS["sd3"]["transformer"])
    cfg.update(TRANSFORMER)
    torch.manual_seed(0)  # the same weights on every rank
    # loaded in bfloat16, as model.dtype=bfloat16 must be with engine.precision=bf16
    return SD3Transformer2DModel(sample_size=SAMPLE_SIZE, **cfg).to(torch.bfloat16)


def held(tensors, seen: set[int]) -> tuple[int, int]:
    """(elements, bytes) of the distinct, not yet `seen` storages behind `tensors`."""
    numel = nbytes = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        s = t.untyped_storage()
        if s.nbytes() == 0 or s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        nbytes += s.nbytes()
        numel += s.nbytes() // t.element_size()
    return numel, nbytes


def _grad_tensors(params, opt) -> list:
    out = [p.grad for p in params]
    for group in (getattr(opt, "averaged_gradients", None) or {}).values():
        out += list(group or [])
    for attr in ("grads_in_partition", "grad_partitions_flat_buffer"):
        out.append(getattr(opt, attr, None))
    return out


def _master_tensors(opt, base) -> list:
    out = [p for g in base.param_groups for p in g["params"]]
    # fp32 flat groups of the bf16 wrapper (ZeRO-0), ZeRO-2 and ZeRO-3
    for attr in (
        "fp32_groups_flat",
        "single_partition_of_fp32_groups",
        "fp32_partitioned_groups_flat",
    ):
        out += list(getattr(opt, attr, None) or [])
    return out


def measure_one(lora: bool, case: tuple[str, int, str], rank: int, world: int) -> dict:
    from flowpo.config import Config
    from flowpo.models.sd3 import SD3Adapter
    from flowpo.trainer.engine import Engine

    cfg = Config()
    cfg.train.lora, cfg.train.lora_rank, cfg.train.lora_alpha = lora, LORA_RANK, 2.0 * LORA_RANK
    # full fine-tuning with KL: the Engine also builds the frozen reference copy (replicated,
    # or under ZeRO-3 its own sharded inference engine); LoRA's reference is the base itself
    cfg.train.beta = 0.0 if lora else REF_BETA
    label, stage, template = case
    cfg.engine.zero_stage, cfg.engine.precision, cfg.model.dtype = stage, "bf16", "bfloat16"
    if template:
        cfg.engine.ds_config = str(ROOT / "ds_configs" / template)
    cfg.rollout.batch_size = 2  # the micro-batch
    eng = Engine(
        cfg,
        build_transformer(),
        lora_targets=SD3Adapter.lora_targets,
        grad_accum=1,
        rank=rank,
        world_size=world,
    )
    ds, opt = eng.module, eng.module.optimizer
    base = getattr(opt, "optimizer", opt)  # the torch AdamW inside DeepSpeed's wrapper
    named = list(ds.module.named_parameters())
    # ZeRO-3 has replaced p.data by an empty tensor; ds_numel is the full size
    sizes = [int(getattr(p, "ds_numel", p.numel())) for _, p in named]
    trainable = [n for (_, p), n in zip(named, sizes) if p.requires_grad]

    g = torch.Generator().manual_seed(rank)
    x = {
        "hidden_states": torch.randn(2, 4, SAMPLE_SIZE, SAMPLE_SIZE, generator=g),
        "encoder_hidden_states": torch.randn(2, 8, 64, generator=g),
        "pooled_projections": torch.randn(2, 64, generator=g),
        "timestep": 1000 * torch.rand(2, generator=g),
    }
    x = {k: v.to(torch.bfloat16) for k, v in x.items()}
    loss = ds(**x).sample.float().pow(2).mean()
    eng.backward(loss)
    params = [p for _, p in named]
    seen: set[int] = set()
    # gradients first: they are freed by the step; parameters are the same before and after
    p_held = held([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params], seen)
    g_held = held(_grad_tensors(params, opt), seen)
    # ZeRO-3: of the tensors small enough to persist, how many DeepSpeed keeps whole
    thr = memory.ds_buffer_sizes()["z3_persistence"]
    small = [p for p, n in zip(params, sizes) if n <= thr] if stage == 3 else []
    persistent = [sum(p.data.numel() > 0 for p in small), len(small)]
    eng.step()
    # a fresh set: the step frees the gradients and may reuse their addresses for Adam's state
    seen = set()
    held([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params], seen)
    m_held = held(_master_tensors(opt, base), seen)
    state = [v for s in base.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    a_held = held(state, seen)
    # the frozen reference's parameters (full + KL only), counted in elements: its dtype is the
    # dtype the model was loaded in (model.dtype)
    r_held = [0, 0]
    if eng.ref_module is not None:
        with torch.no_grad(), eng.reference() as ref_policy:
            ref_policy(**x)  # as the KL term does: ZeRO-3 keeps some small tensors once gathered
        ref = getattr(eng.ref_module, "module", eng.ref_module)
        ref_params = list(ref.parameters())
        r_held = list(
            held(
                [p.data for p in ref_params] + [getattr(p, "ds_tensor", None) for p in ref_params],
                set(),
            )
        )
    return {
        "mode": "lora" if lora else "full",
        "zero": label,
        "stage": stage,
        "world": world,
        "rank": rank,
        "optimizer": type(opt).__name__,
        "sizes": sizes,
        "persistent_kept": persistent,
        "trainable": trainable,
        "measured": {
            "params": p_held,
            "grads": g_held,
            "master": m_held,
            "adam": a_held,
            "reference": r_held,
        },
    }


def worker(out: str) -> None:
    from flowpo.trainer.engine import close_distributed, init_distributed

    rank, world, _ = init_distributed()
    rows = [measure_one(lora, case, rank, world) for lora in (True, False) for case in CASES]
    Path(f"{out}.rank{rank}").write_text(json.dumps(rows))
    close_distributed()


# -- driver -------------------------------------------------------------------------------------
def run_ranks(world: int, tmp: Path) -> list[dict]:
    out = tmp / f"world{world}"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.update(WANDB_MODE="disabled", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={world}", __file__, "--worker", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{world}-rank measurement failed (exit {proc.returncode})")
    rows = []
    for r in range(world):
        rows += json.loads(Path(f"{out}.rank{r}").read_text())
    return rows


def predicted_bytes(row: dict) -> dict[str, int]:
    thr = memory.ds_buffer_sizes()["z3_persistence"] if row["stage"] == 3 else 0
    z = memory.zero_numels(row["sizes"], row["trainable"], row["stage"], row["world"], thr)
    return {
        "params": z["params"] * BF16.param,
        "grads": z["grads"] * BF16.grad,
        "master": z["master"] * BF16.master,
        "adam": z["adam"] * BF16.adam // 2,  # BF16.adam is bytes for m and v together
    }


CATS = ("params", "grads", "optimizer", "total")

REFERENCE_NOTES = """\
The full-fine-tuning cases above run with `train.beta={beta}`, so flowpo's Engine also builds the
frozen reference policy: a copy of the base taken before DeepSpeed wraps the policy, kept whole
under ZeRO 0/2 and wrapped in its own inference-only ZeRO-3 engine under ZeRO-3
(`reference_ds_config`: sharded like the policy, parameter offload included). Elements held by
the fullest rank as a fraction of the model's parameters, `measured / predicted` (flowpo/memory.py
`zero_numels` of a frozen module; under ZeRO-3 its persistence bound counts every small tensor
whole), counted after one forward of the reference (as the KL term runs it). Its dtype is the
one the model was loaded in (`model.dtype`, bfloat16 with `engine.precision=bf16`)."""

MEASURED_NOTES = """\
Largest per-rank bytes as a ratio to ZeRO-0 on 1 rank of the same mode, `measured / predicted`;
predicted = flowpo/memory.py `zero_numels` on the same tensor sizes (2 B bf16 parameters and
gradients, 4 B fp32 master, 8 B Adam m + v). Gradients are counted after the backward, before
the step frees them. On CPU the offload target is the same memory, so `3+offload` shows only
that the shipped `ds_configs/zero3_offload.json` partitions exactly like ZeRO-3 with flowpo's
Engine (torch AdamW, `zero_force_ds_cpu_optimizer: false`). ZeRO-2 gradients above 0.5: the
fullest rank holds the whole gradient of the tensor that straddles its partition boundary
(modelled). ZeRO-3 parameters above 0.5: tensors of at most 1e5 elements
(`stage3_param_persistence_threshold`) that DeepSpeed keeps whole once gathered; the model
counts all of them, an upper bound (DeepSpeed kept {kept} of {eligible} such tensors here)."""

TABLE_NOTES = """\
Model states per GPU in GiB and whether they fit in {gpu:g} GiB, from flowpo/memory.py
`fit_table` (ZeRO paper accounting: bf16 parameters and gradients, fp32 master + Adam m, v =
12 B per trained parameter; stage 2 partitions gradients and optimizer state over the {world}
ranks, stage 3 also the parameters; offload = optimizer state and gradient partitions plus
parameter partitions in host memory, `host` = GiB per node of {world} ranks). **Activations are
excluded**: what is left of the {gpu:g} GiB is for activations, which depend on resolution,
batch and gradient checkpointing. Included: the frozen LoRA base and SD3's positional table;
for full fine-tuning with β > 0 the frozen reference copy of the trained weights (replicated
under ZeRO-2, sharded like the policy under ZeRO-3); the frozen text encoders and VAE in bf16
on every GPU (column `encoders`; a prompt-embedding cache lets the text encoders go); the
DeepSpeed buckets of ds_configs/zero{{2,3}}.json and, under ZeRO-3, the largest block gathered.
Counts come from the real classes on the meta device with the published configs. LoRA: SD3.5-M
and Qwen-Image on the SD3 adapter's attention projections, FLUX.1 on the FLUX adapter's
attention + MLP projections, Bagel on the generation expert's projections (docs/bagel.md §9); Bagel
full fine-tuning trains the generation expert only (6.53B of 14.17B)."""


def summarise(rows: list[dict]) -> list[dict]:
    """Largest per-rank bytes per (mode, ZeRO case, world), measured and predicted, and their
    ratios to ZeRO-0 on one rank of the same mode."""
    order = [c[0] for c in CASES]
    keys = sorted(
        {(r["mode"], r["zero"], r["world"]) for r in rows},
        key=lambda k: (k[0] != "lora", order.index(k[1]), k[2]),
    )
    out, by = [], {}
    for key in keys:
        ranks = [r for r in rows if (r["mode"], r["zero"], r["world"]) == key]
        meas = {c: 0 for c in CATS}
        for r in ranks:
            m = {k: v[1] for k, v in r["measured"].items()}
            per = {"params": m["params"], "grads": m["grads"], "optimizer": m["master"] + m["adam"]}
            per["total"] = sum(per.values())
            meas = {c: max(meas[c], per[c]) for c in CATS}
        p = predicted_bytes(ranks[0])
        pred = {"params": p["params"], "grads": p["grads"], "optimizer": p["master"] + p["adam"]}
        pred["total"] = sum(pred.values())
        by[key] = (meas, pred)
        # the frozen reference (full + KL): elements on the fullest rank vs the ZeRO model of a
        # frozen module (stage 3: sharded like the policy, persistence bound included)
        r0 = ranks[0]
        thr = memory.ds_buffer_sizes()["z3_persistence"] if r0["stage"] == 3 else 0
        reference = {
            "measured": max(r["measured"]["reference"][0] for r in ranks),
            "predicted": memory.zero_numels(r0["sizes"], (), r0["stage"], r0["world"], thr)[
                "params"
            ]
            if key[0] == "full"
            else 0,
        }
        out.append(
            {
                "mode": key[0],
                "zero": key[1],
                "stage": ranks[0]["stage"],
                "world": key[2],
                "optimizer_class": ranks[0]["optimizer"],
                "trainable": sum(ranks[0]["trainable"]),
                "wrapped": sum(ranks[0]["sizes"]),
                "persistent_kept": ranks[0]["persistent_kept"],
                "measured_bytes": meas,
                "predicted_bytes": pred,
                "reference_elements": reference,
            }
        )
    for row in out:
        meas0, pred0 = by[(row["mode"], "0", 1)]
        row["measured_ratio"] = {c: row["measured_bytes"][c] / meas0[c] for c in CATS}
        row["predicted_ratio"] = {c: row["predicted_bytes"][c] / pred0[c] for c in CATS}
    return out


def reference_table(summary: list[dict]) -> str:
    """The frozen reference policy of full fine-tuning with KL, per rank, as a fraction of the
    model's parameter count: measured / predicted."""
    lines = ["| ZeRO | ranks | reference parameters |", "|---|---|---|"]
    for r in summary:
        if r["mode"] != "full":
            continue
        ref, n = r["reference_elements"], r["wrapped"]
        lines.append(
            f"| {r['zero']} | {r['world']} | {ref['measured'] / n:.3f} / {ref['predicted'] / n:.3f} |"
        )
    return "\n".join(lines)


def measured_table(summary: list[dict]) -> str:
    lines = [
        "| mode | ZeRO | ranks | params | grads | optimizer | total |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        cells = [f"{r['measured_ratio'][c]:.3f} / {r['predicted_ratio'][c]:.3f}" for c in CATS]
        lines.append(f"| {r['mode']} | {r['zero']} | {r['world']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for world in (1, 2):
            rows += run_ranks(world, Path(tmp))
    return summarise(rows)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "diffusers", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            out[pkg] = "missing"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--skip-measure", action="store_true", help="only the real-model table")
    ap.add_argument("--world", type=int, default=8, help="GPUs for the real-model table")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (GiB)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from bench_denoising_reduction import commit, cpu_name

    t0 = time.perf_counter()
    result: dict = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": cpu_name(),
        "versions": versions(),
    }
    sections = []
    if not args.skip_measure:
        summary = measure()
        result["measured"] = summary
        table = measured_table(summary)
        print("Per-rank model states, measured / predicted, as ratios to ZeRO-0 on 1 rank (bf16):")
        print(table)
        sections += ["## Measured per-rank model states (tiny SD3 transformer, bf16)", ""]
        z3 = next(r for r in summary if (r["mode"], r["zero"], r["world"]) == ("full", "3", 2))
        kept, eligible = z3["persistent_kept"]
        sections += [MEASURED_NOTES.format(kept=kept, eligible=eligible), "", table, ""]
        ref_table = reference_table(summary)
        print("\nFrozen reference policy (full fine-tuning, KL), per rank, measured / predicted:")
        print(ref_table)
        sections += [
            "## Measured frozen reference policy (full fine-tuning with KL)",
            "",
            REFERENCE_NOTES.format(beta=REF_BETA),
            "",
            ref_table,
            "",
        ]
    rows = memory.fit_table(world=args.world, gpu_gib=args.gpu_gib)
    fit = memory.format_fit_table(rows)
    result["counts"] = memory.counts_summary()
    result["fit_table"] = {"world": args.world, "gpu_gib": args.gpu_gib, "rows": rows}
    print(f"\nModel states per GPU (GiB) on {args.world} x {args.gpu_gib:g} GiB (no activations):")
    print(fit)
    sections += [
        f"## Which configs fit on {args.world} × {args.gpu_gib:g} GiB (model states, GiB per GPU)",
        "",
        fit,
        "",
        TABLE_NOTES.format(world=args.world, gpu=args.gpu_gib),
        "",
    ]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.skip_measure:  # a quick look: keep the results files, which hold the measured part
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    head = [
        "# Memory model",
        "",
        f"`python benchmarks/bench_memory.py` ({result['date']}, commit {result['commit']}, "
        f"{result['device']}, torch {result['versions']['torch']}, "
        f"deepspeed {result['versions']['deepspeed']}; {result['seconds']} s)",
        "",
    ]
    (out / "memory.md").write_text("\n".join(head + sections))
    print(f"\nwrote {out / 'memory.json'} and {out / 'memory.md'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
