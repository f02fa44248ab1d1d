"""Config loading, overrides and cross-field validation: errors name the field and the fix."""

import pytest

from flowpo.config import Config, ConfigError, load_config
from flowpo.trainer.preflight import preflight


def test_defaults_validate():
    Config().validate(world_size=1)
    preflight(Config(), world_size=1)


def test_override_types_are_coerced():
    cfg = load_config(
        None,
        [
            "--train.learning_rate=1e-3",
            "--rollout.group_size=2",
            "--train.lora=false",
            "--eval.seeds=5,6",
            "--reward.weights=jpeg_compressibility:0.5",
        ],
    )
    assert cfg.train.learning_rate == 1e-3
    assert cfg.rollout.group_size == 2
    assert cfg.train.lora is False
    assert cfg.eval.seeds == [5, 6]
    assert cfg.reward.weights == {"jpeg_compressibility": 0.5}


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'train.learning_rat'; did you mean 'train.learning_rate'",
    ):
        load_config(None, ["--train.learning_rat=1"])


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'; did you mean 'train'"):
        load_config(None, ["--trian.epochs=1"])


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"^train.epochs: expected an integer, got 'ten'$"):
        load_config(None, ["--train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"^train.lora: expected true/false, got 'maybe'$"):
        load_config(None, ["--train.lora=maybe"])


def test_non_divisible_layout_names_group_size():
    cfg = load_config(None, ["--rollout.group_size=3"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=1)
    msg = str(e.value)
    assert msg.startswith("rollout.group_size (3) must divide the images per epoch")
    assert "16" in msg and "\n" not in msg


def test_micro_batch_must_divide():
    cfg = load_config(None, ["--train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(3\) must divide"):
        cfg.validate()


def test_choices_are_checked():
    cfg = load_config(None, ["--sampling.sde_type=ddim"])
    with pytest.raises(
        ConfigError,
        match=r"sampling.sde_type='ddim' is not allowed; choose one of: flow, cps, dance",
    ):
        cfg.validate()


def test_recipe_file_roundtrip(tmp_path):
    cfg = load_config("configs/tiny_sd3_jpeg.yaml", ["--train.epochs=2"])
    assert cfg.recipe == "tiny_sd3_jpeg" and cfg.train.epochs == 2
    cfg.save(tmp_path / "c.yaml")
    import yaml

    from flowpo.config import config_from_dict

    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again.to_dict() == cfg.to_dict()


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def test_derived_sizes():
    cfg = load_config(
        None,
        [
            "--rollout.batch_size=8",
            "--rollout.num_batches=2",
            "--train.micro_batch_size=4",
            "--train.steps_per_epoch=2",
        ],
    )
    sizes = cfg.derived_sizes(world_size=2, num_trained_steps=9)
    assert sizes["images_per_epoch"] == 32
    assert sizes["prompts_per_epoch"] == 8
    assert sizes["gradient_accumulation_steps"] == 2 * 9


def test_bf16_precision_needs_bf16_model_dtype():
    cfg = load_config(None, ["--engine.precision=bf16"])
    with pytest.raises(ConfigError, match=r"engine.precision=bf16 .* set model.dtype=bfloat16"):
        cfg.validate()
    load_config(None, ["--engine.precision=bf16", "--model.dtype=bfloat16"]).validate()


def test_float16_is_trained_only_with_fp16_loss_scaling():
    cfg = load_config(None, ["--model.dtype=float16"])
    with pytest.raises(
        ConfigError, match=r"model.dtype=float16 trains only with engine.precision=fp16 .* not fp32"
    ):
        cfg.validate()
    cfg.validate(training=False)  # evaluation and sampling may run in float16
    load_config(None, ["--model.dtype=float16", "--engine.precision=fp16"]).validate()


def test_prompt_files_are_read_at_preflight(tmp_path):
    """bundled: sets pass (README's recipes name them); a missing file lists the choices; a
    bad JSONL line is reported with its number before any model is loaded."""
    preflight(load_config(None, ["--rollout.prompt_file=bundled:geneval_small"]))
    cfg = load_config(None, [f"--rollout.prompt_file={tmp_path / 'nope.txt'}"])
    with pytest.raises(ConfigError, match=r"does not exist; .* shapes:train, .*bundled:ocr_small"):
        preflight(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{not json\n')
    cfg = load_config(None, [f"--eval.prompt_file={bad}"])
    with pytest.raises(
        ConfigError, match=r"^eval.prompt_file '.*bad.jsonl' line 2: not valid JSON"
    ):
        preflight(cfg)


def test_micro_batch_0_follows_a_step_smaller_than_the_rollout_batch():
    """train.micro_batch_size 0 is the rollout batch, or one optimizer step's samples when
    steps_per_epoch splits the epoch finer: the default recipe (4 steps an epoch) stays valid
    when a user shrinks its batches."""
    cfg = load_config(None, ["--rollout.num_batches=2", "--train.steps_per_epoch=4"])
    cfg.validate()
    sizes = cfg.derived_sizes(world_size=1, num_trained_steps=9)
    assert sizes["samples_per_rank_per_optimizer_step"] == 8 and sizes["micro_batch_size"] == 8
    assert sizes["gradient_accumulation_steps"] == 9
    big = load_config(None, ["--rollout.num_batches=8", "--train.steps_per_epoch=2"])
    assert big.micro_batch_size == big.rollout.batch_size


def test_tag_weights_are_checked_and_parsed():
    cfg = load_config(None, ['rollout.tag_weights={"position": 1, "color_attr": 2}'])
    assert cfg.rollout.tag_weights == {"position": 1.0, "color_attr": 2.0}
    cfg.validate()
    for bad in ('{"position": -1}', '{"position": 0}'):
        cfg = load_config(None, [f"rollout.tag_weights={bad}"])
        with pytest.raises(
            ConfigError, match=r"rollout.tag_weights .* weights >= 0 with a positive"
        ):
            cfg.validate()
