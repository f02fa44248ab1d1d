"""The drawing anchor (train.anchor_weight; trainer/anchor.py): its scenes are the pretraining
draw of the shapes world, its loss is the base's own flow-matching loss (checked against the
pretraining code's loss on the pipeline's transformer), its draws are fixed by the run's seed and
position, config errors name the field, a model it cannot train on is refused with the fix, and
a short `flowpo train` with it logs its loss and trains."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from flowpo.config import ConfigError, load_config
from flowpo.models.base import load_adapter
from flowpo.models.resolve import SHAPES_BASE
from flowpo.tasks.shapes.pretrain import (
    encode_prompts,
    flow_matching_sq_error,
    load_base,
    training_captions,
    training_scenes,
)
from flowpo.tasks.shapes.world import SIZE, splits
from flowpo.trainer.anchor import DrawingAnchor
from flowpo.trainer.grpo import keyed_generator
from flowpo.trainer.preflight import preflight
from tests.conftest import flowpo_main, train_rows


def test_training_scenes_are_rendered_training_split_scenes():
    images, prompts = training_scenes(12, random.Random(3), captions=True)
    assert images.shape == (12, 3, SIZE, SIZE)
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.flatten(1).std(1).min() > 0  # every scene draws something on its background
    train = {m["prompt"] for m in splits()["train"]}
    assert set(prompts) <= train and set(training_captions()) == train
    again, same = training_scenes(12, random.Random(3), captions=True)
    assert torch.equal(images, again) and prompts == same
    blank, empty = training_scenes(12, random.Random(3), captions=False)
    assert torch.equal(images, blank) and empty == [""] * 12  # the same draw, no caption


def _anchor(adapter, prompts="empty", weight=2.0, seed=0):
    cfg = SimpleNamespace(
        train=SimpleNamespace(
            anchor_weight=weight, anchor_batch=6, anchor_prompts=prompts, seed=seed
        ),
        model=SimpleNamespace(path="shapes:base"),
    )

    trainer = SimpleNamespace(
        cfg=cfg,
        adapter=adapter,
        rank=0,
        device=torch.device("cpu"),
        _generator=lambda *keys: keyed_generator(seed, *keys),  # the trainer's, with this seed
    )
    return DrawingAnchor(trainer)


@pytest.fixture(scope="module")
def shapes_adapter():
    return load_adapter("sd3", str(SHAPES_BASE))


@pytest.mark.parametrize("prompts", ["empty", "captions"])
def test_anchor_loss_is_the_pretraining_flow_matching_loss(shapes_adapter, prompts):
    anchor = _anchor(shapes_adapter, prompts)
    x0, caps, eps, sigma = anchor.draw(epoch=2, start=16, j=3)
    assert (caps == [""] * 6) == (prompts == "empty")
    loss, stats = anchor.loss(epoch=2, start=16, j=3)
    pipe = load_base(str(SHAPES_BASE))  # the pretraining code's path to the same model
    with torch.no_grad():
        pe, pooled = encode_prompts(pipe, caps)
        want = flow_matching_sq_error(pipe.transformer, x0, eps, sigma, pe, pooled).mean()
    torch.testing.assert_close(stats["anchor_loss"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 2.0 * want, rtol=1e-5, atol=1e-6)
    assert 0.0 < float(want) < 1.0  # the base denoises its world's scenes (pure noise: ~2)


def test_anchor_draws_are_fixed_by_seed_and_position(shapes_adapter):
    a, b = _anchor(shapes_adapter), _anchor(shapes_adapter)
    first, again = a.draw(1, 0, 0), b.draw(1, 0, 0)
    assert all(torch.equal(x, y) for x, y in zip(first[::2], again[::2]))
    for other in (a.draw(1, 0, 1), a.draw(1, 16, 0), a.draw(2, 0, 0), _anchor(
        shapes_adapter, seed=1
    ).draw(1, 0, 0)):  # fmt: skip
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[2], other[2])


@pytest.mark.parametrize(
    "override,field",
    [
        ("--train.anchor_weight=-1", "train.anchor_weight"),
        ("--train.anchor_batch=0", "train.anchor_batch"),
        ("--train.anchor_prompts=scenes", "train.anchor_prompts"),
    ],
)
def test_anchor_config_errors_name_the_field(override, field):
    cfg = load_config("configs/shapes_long.yaml", [override])
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        preflight(cfg)


def test_anchor_refuses_a_latent_space_model_and_says_what_to_use(tiny_dirs):
    adapter = load_adapter("sd3", tiny_dirs["sd3"])
    with pytest.raises(ConfigError, match=r"train\.anchor_weight.*shapes:base"):
        _anchor(adapter)


@pytest.mark.slow
def test_train_with_the_anchor_logs_its_loss_and_trains(tmp_path):
    common = [
        "train", "-c", "configs/shapes_long.yaml", f"--logging.run_dir={tmp_path}",
        "--logging.wandb=off", "--logging.progress=false", "--train.epochs=2",
        "--rollout.num_batches=1", "--eval.at_start=false", "--eval.at_end=false",
        "--eval.every=0", "--train.anchor_batch=4",
    ]  # fmt: skip
    runs = {
        "off": [],
        "empty": ["--train.anchor_weight=1"],
        # captions, with every prompt served from the cache (the anchor's captions cached too)
        "captions": [
            "--train.anchor_weight=1",
            "--train.anchor_prompts=captions",
            "--model.drop_text_encoders=true",
        ],
    }
    rows = {}
    for name, extra in runs.items():
        proc = flowpo_main(*common, f"--logging.run_name={name}", *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        rows[name] = train_rows(tmp_path / name)
    assert all("train/anchor_loss" not in r for r in rows["off"])
    for name in ("empty", "captions"):
        for r in rows[name]:
            assert math.isfinite(r["train/anchor_loss"]) and 0 < r["train/anchor_loss"] < 1
        # epoch 0 samples with the same weights; the anchor changes its update's gradient
        assert rows[name][0]["reward_mean"] == rows["off"][0]["reward_mean"]
        # train/loss is the RL loss alone (with the anchor's ~0.07 in it, it would differ by 5%)
        assert rows[name][0]["train/loss"] == pytest.approx(rows["off"][0]["train/loss"], rel=1e-5)
        assert rows[name][0]["train/grad_norm"] != rows["off"][0]["train/grad_norm"]
