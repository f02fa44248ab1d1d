"""Checkpoint completeness (manifest), `latest` selection, engine options and launcher argv."""

import json
import os

import pytest

from flowpo.cli import strip_local_rank
from flowpo.config import ConfigError, load_config
from flowpo.trainer.checkpoint import checkpoint_problem, find_checkpoint, write_manifest


def _ckpt(root, n, payload=b"x" * 100, manifest=True):
    d = root / "checkpoints" / f"checkpoint-{n}"
    (d / "engine").mkdir(parents=True)
    (d / "engine" / "model_states.pt").write_bytes(payload)
    (d / "trainer_state.json").write_text(json.dumps({"epoch": n, "lora": True}))
    if manifest:
        write_manifest(d)
    return d


def test_manifest_detects_missing_and_truncated_files(tmp_path):
    d = _ckpt(tmp_path, 0)
    assert checkpoint_problem(d) is None
    names = json.loads((d / "manifest.json").read_text())
    assert names == {
        "engine/model_states.pt": 100,
        "trainer_state.json": len((d / "trainer_state.json").read_text()),
    }
    (d / "engine" / "model_states.pt").write_bytes(b"x" * 10)  # truncated mid-write
    assert "10 bytes" in checkpoint_problem(d)
    (d / "engine" / "model_states.pt").unlink()
    assert "missing" in checkpoint_problem(d)
    assert "no manifest" in checkpoint_problem(_ckpt(tmp_path, 1, manifest=False))


def test_latest_skips_an_incomplete_checkpoint_even_when_the_pointer_names_it(tmp_path, capsys):
    _ckpt(tmp_path, 0)
    good = _ckpt(tmp_path, 1)
    bad = _ckpt(tmp_path, 2)
    (bad / "engine" / "model_states.pt").write_bytes(b"")  # truncated
    _ckpt(tmp_path, 3, manifest=False)  # the save died before its manifest
    (tmp_path / "checkpoints" / ".tmp-checkpoint-4").mkdir()  # an abandoned temporary
    (tmp_path / "checkpoints" / "latest").write_text("checkpoint-2")
    assert find_checkpoint("latest", tmp_path) == good
    err = capsys.readouterr().out
    assert "skipping" in err and "checkpoint-2" in err and "checkpoint-3" in err
    with pytest.raises(FileNotFoundError, match="incomplete"):
        find_checkpoint(str(bad), tmp_path)
    assert find_checkpoint(str(good), tmp_path) == good


def test_latest_without_any_complete_checkpoint_says_so(tmp_path):
    _ckpt(tmp_path, 0, manifest=False)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint("latest", tmp_path)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["--engine.offload_params=true", "--engine.zero_stage=2"], "engine.offload_params"),
        (["--engine.offload_optimizer=true"], "engine.offload_optimizer"),
        (["--engine.shard_frozen=true", "--engine.zero_stage=2"], "engine.shard_frozen"),
    ],
)
def test_offload_needs_the_right_zero_stage(overrides, field):
    cfg = load_config("configs/tiny_sd3_jpeg.yaml", overrides)
    with pytest.raises(ConfigError, match=field):
        cfg.validate()


def test_offload_fills_the_deepspeed_config():
    from flowpo.trainer.engine import build_ds_config, reference_ds_config

    cfg = load_config(
        "configs/tiny_sd3_jpeg.yaml",
        [
            "--engine.zero_stage=3",
            "--engine.offload_optimizer=true",
            "--engine.offload_params=true",
        ],
    )
    ds = build_ds_config(cfg, world_size=2, grad_accum=3)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu"
    assert z["offload_param"]["device"] == "cpu"
    assert ds["train_batch_size"] == cfg.micro_batch_size * 3 * 2
    ref = reference_ds_config(ds, world_size=2)
    # the reference is sharded like the policy, and has no optimizer or accumulation
    assert ref["zero_optimization"]["stage"] == 3
    assert ref["zero_optimization"]["offload_param"] == z["offload_param"]
    assert "optimizer" not in ref and ref["gradient_accumulation_steps"] == 1


def test_deepspeed_launchers_local_rank_flag_is_taken_out(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["--local_rank=1", "train", "-c", "x.yaml", "--train.epochs=2"]
    assert strip_local_rank(argv) == ["train", "-c", "x.yaml", "--train.epochs=2"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["--local-rank", "0", "train"]) == ["train"]


def test_dropping_text_encoders_keeps_cached_prompts_and_refuses_new_ones(tiny_dirs):
    import torch

    from flowpo.models.base import load_adapter

    a = load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=4.5)
    before = a.encode_prompts(["a red circle", "a cat"])
    n = a.cache_prompts(
        ["a red circle", "a cat", "a red circle"],
        drop_encoders=True,
        reason="model.drop_text_encoders=true",
    )
    assert n == 2
    assert "text_encoder" not in a.frozen_modules() and a.pipe.text_encoder is None
    after = a.encode_prompts(["a cat", "a red circle"])
    assert torch.equal(after.prompt_embeds, before.prompt_embeds.flip(0))
    assert torch.equal(after.neg_prompt_embeds, before.neg_prompt_embeds)  # CFG negative kept
    with pytest.raises(RuntimeError, match="model.drop_text_encoders"):
        a.encode_prompts(["a dog"])
