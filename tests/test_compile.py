"""engine.compile: regional compilation finds each family's repeated blocks, is refused under
ZeRO-3, and trains like the eager model: one epoch gives the same loss and weights, with the
first ratio exactly 1 (rollout and re-scoring call the same compiled blocks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import NO_EVAL, flowpo_main, tiny_model, train_rows


@pytest.mark.parametrize(
    "family, blocks",
    [
        ("sd3", {"transformer_blocks.0", "transformer_blocks.1"}),
        ("flux", {"transformer_blocks.0", "single_transformer_blocks.0"}),
        ("qwen-image", {"transformer_blocks.0", "transformer_blocks.1"}),
        ("bagel", {"language_model.model.layers.0", "language_model.model.layers.1"}),
    ],
)
def test_repeated_blocks_of_every_family(family, blocks, tiny_cache, tmp_path):
    from flowpo.models.base import load_adapter
    from flowpo.models.compiled import repeated_blocks

    adapter = load_adapter("auto", tiny_model(tiny_cache, family, tmp_path / family))
    found = repeated_blocks(adapter.trainable_module)
    assert {name for name, _ in found} >= blocks
    assert len({type(m) for _, m in found}) <= 2  # FLUX: double- and single-stream blocks


def test_compile_is_refused_under_zero3():
    from flowpo.config import Config, ConfigError

    cfg = Config()
    cfg.engine.compile, cfg.engine.zero_stage = True, 3
    with pytest.raises(ConfigError, match="engine.compile does not work with engine.zero_stage=3"):
        cfg.validate()
    cfg.engine.zero_stage = 2
    cfg.validate()


def _epoch(tmp_path: Path, name: str, *extra: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    out = flowpo_main(
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        "--rollout.batch_size=4",
        "--rollout.num_batches=1",
        "--rollout.group_size=4",
        "--sampling.num_steps=3",
        "--train.epochs=1",
        "--logging.wandb=off",
        "--logging.progress=false",
        f"--logging.run_dir={tmp_path}",
        f"--logging.run_name={name}",
        *NO_EVAL,
        *extra,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = train_rows(tmp_path / name)
    ckpts = tmp_path / name / "checkpoints"
    ckpt = ckpts / (ckpts / "latest").read_text().strip() / "trainable.safetensors"
    return row, load_file(str(ckpt))


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two cold compiles: minutes each when the machine is busy
@pytest.mark.parametrize(
    "setting",
    [
        ["--train.lora=true", "--engine.zero_stage=0"],
        ["--train.lora=false", "--engine.zero_stage=2", "--train.learning_rate=1e-4"],
    ],
    ids=["lora-zero0", "full-zero2"],
)
def test_compile_on_and_off_train_the_same_epoch(setting, tmp_path):
    # Adam's first step is lr·g/(|g| + eps): with the default eps 1e-8 an element whose gradient
    # is ~1e-8 moves by lr times g's own relative rounding (measured: one LoRA element 1.3e-5
    # apart at lr 1e-2); eps 1e-6 keeps the comparison about the compiled forward and backward
    setting = [*setting, "--train.adam_eps=1e-6"]
    eager, w_eager = _epoch(tmp_path, "eager", *setting)
    comp, w_comp = _epoch(tmp_path, "compiled", "--engine.compile=true", *setting)
    assert comp["train/first_ratio_max_dev"] == 0.0  # the same compiled blocks rescore
    assert eager["train/first_ratio_max_dev"] == 0.0
    assert comp["train/loss"] == pytest.approx(eager["train/loss"], abs=1e-7)
    assert eager["train/grad_norm"] > 0  # the update moved the weights
    assert comp["train/grad_norm"] == pytest.approx(eager["train/grad_norm"], rel=1e-4)
    assert w_comp.keys() == w_eager.keys() and w_comp
    for key, value in w_eager.items():
        torch.testing.assert_close(w_comp[key], value, atol=1e-5, rtol=1e-4)
    dev = max(float((w_comp[k] - v).abs().max()) for k, v in w_eager.items())
    print(f"compile on/off after one epoch: max |dw| = {dev:.2e}")
