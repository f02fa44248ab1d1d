"""Multi-rank DeepSpeed on CPU (gloo), real launchers: ZeRO-2/3 partitioning and update
equivalence (docs/algorithms.md §6.7), ratio == 1 under 2-rank ZeRO-3 with CFG and β > 0, the
`deepspeed` launcher, exact resume after SIGKILL, SIGTERM checkpointing, export round trips.
Runs that need a process boundary (launchers, several ranks, signals) start fresh processes; the
one-rank references, exports and resumes run in this process (conftest.flowpo_main)."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    ENV,
    NO_EVAL,
    ROOT,
    ZERO3_P0,
    as_fresh_process,
    euler_sample,
    flowpo_main,
    free_port,
    run_ok,
    sigkill_at_checkpoint,
    torchrun_cmd,
    train_rows,
    two_rank_group,
)

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
COMMON = [
    "--logging.wandb=off",
    "--logging.progress=false",
    "--sampling.num_steps=4",
    "--sampling.guidance_scale=4.5",
    "--eval.num_prompts=2",
    "--eval.seeds=0,1",
    "--train.beta=0.04",
]


@pytest.fixture(scope="module")
def sd3_dir(tiny_dirs):
    return tiny_dirs["sd3"]


# -- §6.7: one update of the same global batch, every layout -------------------------------------
# and an evaluation of the base policy: 48 (prompt, seed) pairs = 3 chunks, split over ranks
LR = [
    "--train.learning_rate=1e-4",
    "--eval.num_prompts=3",
    f"--eval.seeds={','.join(str(i) for i in range(16))}",
]
Z3 = ["--engine.zero_stage=3", ZERO3_P0]
GRPO_TWO = two_rank_group(
    "sd3_grpo",
    cases={
        "lora_z2": [*LR, "--engine.zero_stage=2"],
        "lora_z3": [*LR, *Z3],
        "lora_z3_actckpt": [*LR, *Z3, "--engine.gradient_checkpointing=true"],
        "full_z2": [*LR, "--train.lora=false", "--engine.zero_stage=2"],
        "full_z3": [*LR, "--train.lora=false", *Z3],
        "full_z3_offload": [
            *LR,
            "--train.lora=false",
            *Z3,
            "--engine.offload_optimizer=true",
            "--engine.offload_params=true",
        ],
    },
)


@pytest.mark.two_rank(GRPO_TWO)
def test_same_update_on_1_and_2_ranks_zero2_zero3_and_accumulation(sd3_dir, two_rank, tmp_path):
    one = {
        "lora_mb8": LR,
        "lora_mb4x2": [*LR, "--train.micro_batch_size=4"],
        "full_mb8": [*LR, "--train.lora=false"],
        "full_mb4x2": [*LR, "--train.lora=false", "--train.micro_batch_size=4"],
    }
    from tests.dist_update import run_cases

    with as_fresh_process():  # the one-rank reference, in this process
        res = run_cases(sd3_dir, one, tmp_path / "runs")
    res.update(two_rank.results(GRPO_TWO))  # 2 ranks: the session's one launch

    base = load_file(str(Path(sd3_dir) / "transformer" / "diffusion_pytorch_model.safetensors"))
    for kind, ref_name in (("lora", "lora_mb8"), ("full", "full_mb8")):
        ref = res[ref_name]
        # the update did something: LoRA B left zero / the full weights left the base
        if kind == "lora":
            assert any(v.abs().max() > 0 for k, v in ref["weights"].items() if "lora_B" in k)
        else:
            moved = max(float((ref["weights"][k] - base[k]).abs().max()) for k in base)
            assert moved > 1e-5
        for name, r in res.items():
            if not name.startswith(kind) or name == ref_name:
                continue
            assert r["weights"].keys() == ref["weights"].keys(), name
            for key, w in ref["weights"].items():
                torch.testing.assert_close(r["weights"][key], w, atol=1e-5, rtol=0, msg=name)
            # the global gradient norm (before clipping) agrees: gradients are averaged, not summed
            assert math.isclose(r["grad_norm"], ref["grad_norm"], rel_tol=1e-5), name
    # evaluation split over 2 ranks (one rank repeats a chunk to keep ZeRO-3's collectives in
    # step) gives exactly the one-rank numbers when the base weights stay where they were
    # (LoRA, ZeRO-2: same batches, merged in order). Where DeepSpeed moves the weights into
    # flat or gathered buffers (full fine-tuning, ZeRO-3), CPU matmuls may round differently
    # (alignment), so those agree closely, not bitwise.
    evals = {name: r["eval"] for name, r in res.items()}
    ref_eval = evals["lora_mb8"]
    assert ref_eval[2] == 48 and evals["lora_z2"] == ref_eval
    for name, (mean, std, n) in evals.items():
        assert n == 48 and math.isclose(mean, ref_eval[0], rel_tol=1e-4), (name, mean)
        assert math.isclose(std, ref_eval[1], rel_tol=1e-2), (name, std)
    assert (
        res["lora_mb4x2"]["sizes"]["gradient_accumulation_steps"]
        == 2 * (res["lora_mb8"]["sizes"]["gradient_accumulation_steps"])
    )

    # ZeRO-3 really partitions: every parameter is an empty placeholder locally, and the two
    # ranks hold halves of it (up to alignment padding)
    for name in ("full_z3", "lora_z3", "lora_z3_actckpt", "full_z3_offload"):
        rank0, rank1 = res[name]["reports"]
        for (pname, local, shard0, full), (_, local1, shard1, _) in zip(rank0, rank1):
            assert local == 0 and local1 == 0, (name, pname)
            assert shard0 == shard1 == math.ceil(full / 2), (name, pname, shard0, full)
    assert res["lora_z3_actckpt"]["activation_checkpointing"]
    assert not res["lora_z3"]["activation_checkpointing"]
    # full fine-tuning with β > 0 under ZeRO-3: the reference is a ZeRO-3 inference engine
    assert res["full_z3"]["ref_is_engine"] == "DeepSpeedEngine"
    assert res["full_z2"]["ref_is_engine"] != "DeepSpeedEngine"


# -- the deepspeed launcher, 2 ranks, ZeRO-3 + LoRA + CFG + β > 0; LoRA export round trip -------
def test_deepspeed_launcher_zero3_lora_ratio_one_and_lora_export(sd3_dir, tmp_path):
    run = tmp_path / "ds"
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "flowpo",
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        f"--model.path={sd3_dir}",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=ds",
        "--rollout.batch_size=4",
        "--rollout.num_batches=2",
        "--train.epochs=2",
        "--engine.zero_stage=3",
        "--model.drop_text_encoders=true",
        *COMMON,
        *NO_EVAL,  # the training mechanics only
    ]
    proc = run_ok(cmd)
    assert "world_size=2" in proc.stdout
    assert "text encoders freed" in proc.stdout
    rows = train_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:  # invariant 4 under 2-rank ZeRO-3, CFG, KL to the reference
        assert r["train/first_ratio_max_dev"] <= 1e-6 and math.isfinite(r["train/kl"])

    ckpt = run / "checkpoints" / "checkpoint-1"
    out = tmp_path / "lora_export"
    p = flowpo_main("export", str(ckpt), str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_export_matches_policy(sd3_dir, ckpt, out, lora=True)


def _assert_export_matches_policy(base_dir: str, ckpt: Path, out: Path, lora: bool) -> None:
    """The exported weights loaded by diffusers' own pipeline give the same ODE samples as the
    trained policy (the checkpoint applied to flowpo's adapter), same noise, same embeddings."""
    from diffusers import StableDiffusion3Pipeline

    from flowpo.models.base import load_adapter
    from flowpo.trainer.checkpoint import load_trainable
    from flowpo.trainer.rollout import sample_ode

    policy = load_adapter("sd3", base_dir, guidance_scale=4.5)
    load_trainable(policy, ckpt)
    prompts = ["a red circle", "two blue squares"]
    emb = policy.encode_prompts(prompts)
    x0 = policy.initial_noise(2, torch.Generator().manual_seed(3))
    if lora:
        pipe = StableDiffusion3Pipeline.from_pretrained(base_dir, local_files_only=True)
        pipe.load_lora_weights(str(out))
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompt_embeds=emb.prompt_embeds,
        pooled_prompt_embeds=emb.pooled,
        negative_prompt_embeds=emb.neg_prompt_embeds,
        negative_pooled_prompt_embeds=emb.neg_pooled,
        height=policy.height,
        width=policy.width,
        num_inference_steps=4,
        guidance_scale=4.5,
        latents=x0.clone(),
        output_type="latent",
    ).images
    base = load_adapter("sd3", base_dir, guidance_scale=4.5)
    with torch.no_grad():
        mine = euler_sample(policy, x0, emb, 4)
        untouched = euler_sample(base, x0, base.encode_prompts(prompts), 4)
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)
    assert (mine - untouched).abs().max() > 1e-6, "the trained weights must differ from the base"
    # and flowpo's own ODE sampler on the policy decodes the same images
    imgs = sample_ode(policy, emb, 4, [0, 1])
    assert imgs.shape[0] == 2


# -- exact resume after SIGKILL, 2 ranks, ZeRO-3 full fine-tuning, CFG, β > 0 --------------------
RESUME_ARGS = [
    "train",
    "-c",
    "configs/tiny_sd3_jpeg.yaml",
    "--rollout.batch_size=4",
    "--rollout.num_batches=2",
    "--train.epochs=4",
    "--train.lora=false",
    "--train.learning_rate=1e-4",
    "--train.ema=true",
    "--engine.zero_stage=3",
    ZERO3_P0,
    "--checkpoint.every=1",
    "--checkpoint.keep_last_n=3",
    "--eval.at_start=false",  # the end evaluations are compared
    *COMMON,
    "--engine.shard_frozen=true",
]
# the uninterrupted 2-rank run, in the session's one 2-rank launch
RESUME_TWO = two_rank_group("sd3_resume", kind="train", cases={"straight": RESUME_ARGS})


@pytest.mark.two_rank(RESUME_TWO)
def test_exact_resume_after_sigkill_zero3_full_finetune_and_full_export(
    sd3_dir, zero3_threshold0, two_rank, tmp_path
):
    def train_cmd(name: str, *extra: str) -> list[str]:
        args = [a.replace("<zero3_threshold0>", zero3_threshold0) for a in RESUME_ARGS]
        return torchrun_cmd(
            2,
            "-m",
            "flowpo",
            *args,
            f"--model.path={sd3_dir}",
            f"--logging.run_dir={tmp_path}",
            f"--logging.run_name={name}",
            *extra,
        )

    straight = two_rank.runs(RESUME_TWO)["straight"]  # exited 0 on both ranks
    straight_dir = straight.run_dir
    # frozen text encoders and VAE partitioned too (ZeRO-3 inference engines): rank 0 holds half
    sharded = re.findall(r"ZeRO-3 sharded (\w+): ([\d,]+) of ([\d,]+) parameters", straight.stdout)
    assert {name for name, *_ in sharded} >= {"text_encoder", "vae"}
    for _, held, total in sharded:
        assert int(held.replace(",", "")) == pytest.approx(
            int(total.replace(",", "")) / 2, rel=0.01
        )

    # the same run, killed (SIGKILL to the whole process group) once checkpoint-1 is the latest
    sigkill_at_checkpoint(train_cmd("killed"), tmp_path / "killed")
    assert not (tmp_path / "killed" / "summary.json").is_file()
    done = [r["epoch"] for r in train_rows(tmp_path / "killed")]
    assert done[:2] == [0, 1] and len(done) < 4

    resumed = run_ok(train_cmd("killed", "--resume", "latest"))
    assert "resumed from" in resumed.stdout

    straight, killed = train_rows(straight_dir), train_rows(tmp_path / "killed")
    # epochs logged before the kill stay in the file; the resumed run re-logs from epoch 2
    by_epoch = {r["epoch"]: r for r in killed}
    assert sorted(by_epoch) == [0, 1, 2, 3]
    for a in straight:
        b = by_epoch[a["epoch"]]
        for key, value in a.items():
            if key.startswith(("reward", "train/", "adv")) and key != "train/grad_norm":
                assert b[key] == value, (a["epoch"], key, value, b[key])
        assert math.isclose(b["train/grad_norm"], a["train/grad_norm"], rel_tol=1e-6)
        assert a["train/first_ratio_max_dev"] <= 1e-6  # ZeRO-3 full FT, CFG, β > 0
    for name in ("trainable.safetensors", "trainable_ema.safetensors"):
        w_a = load_file(str(straight_dir / "checkpoints" / "checkpoint-3" / name))
        w_b = load_file(str(tmp_path / "killed" / "checkpoints" / "checkpoint-3" / name))
        assert w_a.keys() == w_b.keys()
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a), name
    end_a = json.loads((straight_dir / "summary.json").read_text())["eval_end"]
    end_b = json.loads((tmp_path / "killed" / "summary.json").read_text())["eval_end"]
    assert end_a["reward_mean"] == end_b["reward_mean"]

    # full export: a complete model directory diffusers loads, consolidated from ZeRO-3 shards
    ckpt = straight_dir / "checkpoints" / "checkpoint-3"
    out = tmp_path / "full_export"
    p = flowpo_main("export", str(ckpt), str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
    _assert_export_matches_policy(sd3_dir, ckpt, out, lora=False)
    # --ema exports the EMA weights instead; a finished export is never overwritten
    ema_out = tmp_path / "ema_export"
    p = flowpo_main("export", str(ckpt), str(ema_out), "--ema")
    assert p.returncode == 0, p.stderr[-3000:]
    ema = load_file(str(ckpt / "trainable_ema.safetensors"))
    exported = load_file(str(ema_out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(exported[k], ema[k]) for k in exported)
    final = load_file(str(ckpt / "trainable.safetensors"))
    assert any(not torch.equal(ema[k], final[k]) for k in ema), "EMA must differ from the weights"
    p = flowpo_main("export", str(ckpt), str(ema_out))
    assert p.returncode != 0 and "not empty" in p.stderr


# -- SIGTERM: checkpoint at the next safe point, exit 143, resume continues ------------------------
def test_sigterm_writes_a_checkpoint_and_the_run_resumes(sd3_dir, tmp_path):
    args = [
        sys.executable,
        "-m",
        "flowpo",
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        f"--model.path={sd3_dir}",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=t",
        "--rollout.batch_size=4",
        "--rollout.num_batches=2",
        "--train.epochs=200",
        *COMMON,
        *NO_EVAL,
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any("train/loss" in ln for ln in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert "stopped by SIGTERM" in out
    ckpts = tmp_path / "t" / "checkpoints"
    last = (ckpts / "latest").read_text().strip()
    n = int(last.split("-")[1])
    assert 0 <= n < 199 and (ckpts / last / "manifest.json").is_file()
    again = [a for a in args[3:] if a != "--train.epochs=200"]
    p = flowpo_main(*again, f"--train.epochs={n + 3}", "--resume", "latest")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert f"at epoch {n + 1}" in p.stdout
    assert [r["epoch"] for r in train_rows(tmp_path / "t")][-2:] == [n + 1, n + 2]


def test_unreachable_reward_service_stops_every_rank(sd3_dir, tmp_path):
    """The startup service check's outcome is shared: both ranks stop with the one-line error
    (naming the ranks that failed) before any model loads, instead of one rank leaving the
    other at a barrier."""
    dead = f"http://127.0.0.1:{free_port()}"
    opts = f'{{jpeg_incompressibility: {{url: "{dead}", deadline_s: 2}}}}'
    cmd = torchrun_cmd(2, "-m", "flowpo", "train", "-c", "configs/tiny_sd3_jpeg.yaml")
    cmd += [f"--model.path={sd3_dir}", f"--logging.run_dir={tmp_path}", *COMMON]
    cmd += ["--logging.run_name=svc", f"--reward.options={opts}"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120
    out = proc.stdout + proc.stderr
    assert out.count("flowpo: error: reward 'jpeg_incompressibility': no service answers") == 2
    assert "(rank(s) 0, 1)" in out
