"""Recipes in configs/: every one loads with typed values; the real-size ones are consistent at
the rank count their header names (the plan's own checks, group and batch layout; their model
directories, datasets and reward models are not here); each tiny-CPU plan recipe trains 2
epochs end to end (slow) with ratio == 1 on every first update."""

import re
from pathlib import Path

import pytest

from flowpo.config import load_config
from flowpo.trainer.plans import PLAN_REGISTRY
from flowpo.trainer.preflight import preflight
from tests.conftest import NO_EVAL, ROOT, flowpo_main, train_rows

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY_PLAN_RECIPES = [
    "tiny_sd3_fast",
    "tiny_sd3_mixgrpo",
    "tiny_sd3_branch",
    "tiny_flux_entropy",
    "tiny_sd3_guard",
]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_loads_and_cites_its_source(path: Path):
    cfg = load_config(str(path))
    head = path.read_text().splitlines()[0]
    assert head.startswith("#"), f"{path.name}: start with a comment saying what it reproduces"
    ranks = re.search(r"ranks: (\d+)", path.read_text())
    if ranks is None:  # CPU recipes validate completely
        preflight(cfg, world_size=1)
        return
    world = int(ranks.group(1))
    assert re.search(r"arXiv \d{4}\.\d{5}|flow_grpo", path.read_text()), path.name
    PLAN_REGISTRY[cfg.rollout.plan].check_config(cfg)
    images = world * cfg.samples_per_rank()
    assert images % cfg.rollout.group_size == 0, path.name
    assert cfg.samples_per_rank() % cfg.train.steps_per_epoch == 0, path.name
    per_step = cfg.samples_per_rank() // cfg.train.steps_per_epoch
    assert per_step % cfg.micro_batch_size == 0, path.name


def test_every_plan_has_a_tiny_recipe():
    plans = {
        load_config(str(ROOT / "configs" / f"{n}.yaml")).rollout.plan for n in TINY_PLAN_RECIPES
    }
    assert plans == set(PLAN_REGISTRY)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_PLAN_RECIPES)
def test_tiny_plan_recipe_trains_two_epochs(tmp_path, name):
    proc = flowpo_main(
        "train",
        "-c",
        f"configs/{name}.yaml",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=run",
        "--logging.wandb=off",
        "--logging.progress=false",
        "--train.epochs=2",
        *NO_EVAL,  # the training mechanics only
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "run"
    rows = train_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for r in rows:
        assert r["train/first_ratio_max_dev"] <= 1e-6, r
        assert r["time/train_s"] > 0 and r["time/sample_s"] > 0
    if name == "tiny_sd3_mixgrpo":  # the progressive window moves one step per epoch
        assert [r["rollout/first_trained_step"] for r in rows] == [0, 1]
    ckpt = run / "checkpoints" / "checkpoint-1"
    assert (ckpt / "trainable.safetensors").is_file()
    cfg = load_config(f"{ROOT}/configs/{name}.yaml")
    assert (ckpt / "trainable_ema.safetensors").is_file() == cfg.train.ema
