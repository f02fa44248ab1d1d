"""End to end through the CLI (`flowpo.cli.main`, in this process), with real DeepSpeed (one
rank, gloo): 3 epochs of tiny SD3 -> finite losses, LoRA weights changed, first ratio == 1,
run-dir artifacts, checkpoint written, and `--resume latest` continues from the next epoch.
The fresh-process runs (launchers, signals, several ranks) are in test_distributed.py."""

import json
import math

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import NO_EVAL, flowpo_main, run_flowpo, train_rows

pytestmark = pytest.mark.slow

COMMON = [
    "--logging.wandb=off",
    "--logging.progress=false",
    "--rollout.batch_size=4",
    "--rollout.num_batches=2",
    "--sampling.num_steps=4",
    "--eval.num_prompts=2",
    "--eval.seeds=0,1",
    "--train.beta=0.04",
]


def test_three_epochs_then_resume(tmp_path):
    args = [
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=e2e",
        "--checkpoint.every=1",
        *COMMON,
    ]
    proc = flowpo_main(*args, "--train.epochs=3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "e2e"
    rows = train_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"])
        # invariant 4 through DeepSpeed + LoRA + CFG-free SD3: first update sees ratio == 1
        assert r["train/first_ratio_max_dev"] <= 1e-6
    for name in (
        "config.yaml",
        "samples_start.png",
        "samples_end.png",
        "reward_curve.png",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    assert "== summary ==" in proc.stdout and str(run) in proc.stdout
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "checkpoint-2"
    # keep_last_n=2 pruned checkpoint-0
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    lora = load_file(str(ckpts / "checkpoint-2" / "trainable.safetensors"))
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and any(v.abs().max() > 0 for v in b), "LoRA B started at zero and must have moved"

    # the checkpoint's LoRA applies through `flowpo sample` and changes the images
    grids = {}
    for tag, extra in (("base", []), ("tuned", ["--checkpoint", str(ckpts / "checkpoint-2")])):
        out = tmp_path / f"{tag}.png"
        p = flowpo_main(
            "sample",
            "--model",
            str(run / "base_model"),
            "--prompt",
            "a red circle",
            "--num",
            "2",
            "--steps",
            "4",
            "--out",
            str(out),
            *extra,
        )
        assert p.returncode == 0, p.stderr[-3000:]
        grids[tag] = np.asarray(Image.open(out), dtype=np.float32)
    assert np.abs(grids["base"] - grids["tuned"]).max() > 0

    start = json.loads((run / "summary.json").read_text())["eval_start"]
    proc = flowpo_main(*args, "--train.epochs=5", "--resume", "latest")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "at epoch 3" in proc.stdout
    # the start evaluation comes from the checkpoint's trainer state, not a new evaluation
    assert "eval [start]" not in proc.stdout and "eval [end]" in proc.stdout
    assert json.loads((run / "summary.json").read_text())["eval_start"] == start
    assert [r["epoch"] for r in train_rows(run)] == [0, 1, 2, 3, 4]
    assert (ckpts / "latest").read_text().strip() == "checkpoint-4"


def test_tiny_flux_trains(tmp_path):
    proc = flowpo_main(
        "train",
        "-c",
        "configs/tiny_flux_jpeg.yaml",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=flux",
        "--train.epochs=2",
        *COMMON,
        *NO_EVAL,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = train_rows(tmp_path / "flux")
    assert len(rows) == 2 and all(r["train/first_ratio_max_dev"] <= 1e-6 for r in rows)
    # eval.at_start=false, eval.at_end=false: no start or end evaluation, and a summary without
    summary = json.loads((tmp_path / "flux" / "summary.json").read_text())
    assert "eval_start" not in summary and "eval_end" not in summary
    assert "train_reward_first" in summary and "train_reward_last" in summary
    assert not list((tmp_path / "flux").glob("samples_*.png"))
    assert "== summary ==" in proc.stdout and "eval reward" not in proc.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_train_on_one_rank(tmp_path, stage):
    """engine.zero_stage picks the ds_configs/ template; LoRA trains under ZeRO-2 and ZeRO-3."""
    proc = flowpo_main(
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=z",
        "--train.epochs=2",
        f"--engine.zero_stage={stage}",
        *COMMON,
        *NO_EVAL,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = train_rows(tmp_path / "z")
    assert len(rows) == 2
    assert all(
        r["train/first_ratio_max_dev"] <= 1e-6 and math.isfinite(r["train/loss"]) for r in rows
    )
    lora = load_file(str(tmp_path / "z" / "checkpoints" / "checkpoint-1" / "trainable.safetensors"))
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)


def test_bf16_full_fine_tuning_with_kl(tmp_path):
    """engine.precision=bf16 with model.dtype=bfloat16 (the GPU recipes' pair): full fine-tuning
    with KL under ZeRO-2 (bf16 policy, replicated bf16 reference) trains with finite losses;
    the mismatched pair stops at the config with the fix."""
    bf16 = ["--engine.precision=bf16", "--model.dtype=bfloat16"]
    full = ["--train.lora=false", "--train.learning_rate=1e-4", "--engine.zero_stage=2"]
    args = ["train", "-c", "configs/tiny_sd3_jpeg.yaml", f"--logging.run_dir={tmp_path}"]
    proc = flowpo_main(
        *args, "--logging.run_name=bf", "--train.epochs=2", *COMMON, *NO_EVAL, *bf16, *full
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = train_rows(tmp_path / "bf")
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]), r
        assert r["train/first_ratio_max_dev"] <= 1e-3, r  # rollout and update share bf16 math
    assert rows[1]["train/kl"] > 0  # the policy moved away from its reference
    bad = flowpo_main(*args, "--logging.run_name=bad", "--engine.precision=bf16", *COMMON)
    assert bad.returncode != 0
    assert "set model.dtype=bfloat16" in bad.stderr, bad.stderr[-2000:]


def test_identical_runs_are_bit_identical_in_this_process_and_in_a_fresh_one(tmp_path):
    """Two identical runs give bit-identical metrics, weights and base model, one through
    `flowpo.cli.main` in this process and one in a fresh `python -m flowpo` process, both copying
    `tiny:sd3` from the session's tiny cache: what lets the other tests run the CLI in-process."""
    args = ["train", "-c", "configs/tiny_sd3_jpeg.yaml", f"--logging.run_dir={tmp_path}",
            "--train.epochs=2", *COMMON, *NO_EVAL]  # fmt: skip
    here = flowpo_main(*args, "--logging.run_name=here")
    fresh = run_flowpo(*args, "--logging.run_name=fresh")
    for proc in (here, fresh):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    a, b = tmp_path / "here", tmp_path / "fresh"
    rows_a, rows_b = train_rows(a), train_rows(b)
    assert len(rows_a) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if not k.startswith("time/")} == {
            k: v for k, v in rb.items() if not k.startswith("time/")
        }
    for d in ("base_model", "checkpoints/checkpoint-1"):
        files = sorted(f.relative_to(a / d) for f in (a / d).rglob("*.safetensors"))
        assert files
        for f in files:
            assert (a / d / f).read_bytes() == (b / d / f).read_bytes(), f
