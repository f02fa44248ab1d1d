"""fp16 mixed precision (issue 15 §1): engine.precision=fp16 is DeepSpeed's fp16 mode with
dynamic loss scaling; the transformer runs in float16, the optimizer holds fp32 master weights,
overflowing steps are skipped by the scaler, counted (train/overflow_steps, train/loss_scale) and
never taken for divergence; the first update re-scores with ratio exactly 1.

DeepSpeed's CPU accelerator reports fp16 only on CPUs with AVX512-FP16 or AMX-FP16
(torch.ops.mkldnn._is_mkldnn_fp16_supported()); elsewhere it refuses fp16 at
deepspeed.initialize ("Type fp16 is not supported on your device") and flowpo stops first with
one line. The training tests override that capability report only (`fp16_cpu`): every fp16
operation then really runs, on CPU, in float16, through DeepSpeed's own fp16 optimizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowpo.config import ConfigError, load_config
from flowpo.trainer.engine import build_ds_config
from flowpo.trainer.preflight import preflight
from tests.conftest import TINY_CHECKPOINTED_RUN, flowpo_main, poison_grpo_loss, train_rows

FP16 = ["--model.dtype=float16", "--engine.precision=fp16"]

# -- the config ----------------------------------------------------------------------------------


def test_fp16_fills_deepspeeds_fp16_section_with_dynamic_loss_scaling():
    cfg = load_config(None, [*FP16, "--engine.fp16_initial_scale_power=12"])
    cfg.validate()
    ds = build_ds_config(cfg, world_size=1, grad_accum=1)
    assert ds["fp16"] == {
        "enabled": True,
        "loss_scale": 0,  # 0 = dynamic
        "initial_scale_power": 12,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert ds["bf16"]["enabled"] is False
    assert build_ds_config(load_config(None, []), 1, 1)["fp16"] == {"enabled": False}


@pytest.mark.parametrize(
    "override,message",
    [
        (["--model.dtype=float16"], "model.dtype=float16 trains only with engine.precision=fp16"),
        (["--engine.precision=fp16"], r"set model.dtype=float16 \(or engine.precision=fp32\)"),
        ([*FP16, "--engine.fp16_hysteresis=0"], r"engine.fp16_hysteresis \(0\) must be >= 1"),
        ([*FP16, "--engine.fp16_loss_scale_window=0"], "engine.fp16_loss_scale_window"),
        ([*FP16, "--engine.fp16_min_loss_scale=0"], r"engine.fp16_min_loss_scale \(0\)"),
        ([*FP16, "--engine.fp16_initial_scale_power=65"], "must be in 0..64"),
        (
            [*FP16, "--engine.fp16_initial_scale_power=2", "--engine.fp16_min_loss_scale=8"],
            "must not exceed the initial loss scale",
        ),
    ],
)
def test_fp16_settings_are_checked_with_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, override).validate()
    assert "\n" not in str(e.value)


def test_float16_is_still_fine_for_evaluation_only():
    load_config(None, ["--model.dtype=float16"]).validate(training=False)


@pytest.mark.parametrize("recipe", ["tiny_flux_jpeg", "tiny_qwen_image_jpeg", "tiny_bagel_jpeg"])
def test_fp16_training_is_refused_for_families_that_do_not_run_in_float16(recipe):
    cfg = load_config(f"configs/{recipe}.yaml", FP16)
    with pytest.raises(ConfigError, match="does not run in float16") as e:
        preflight(cfg)
    assert "engine.precision=bf16" in str(e.value) and "\n" not in str(e.value)
    preflight(cfg, training=False)  # float16 evaluation is not refused here


def test_sd3_real_size_recipes_train_in_fp16_as_flow_grpo_does():
    for path in sorted(Path("configs").glob("sd3_*.yaml")):
        cfg = load_config(str(path), [])
        assert (cfg.engine.precision, cfg.model.dtype) == ("fp16", "float16"), path
    for name in ("flux_flow_grpo_pickscore", "flux_egrpo_hps", "qwen_image_pickscore"):
        assert load_config(f"configs/{name}.yaml", []).engine.precision == "bf16", name


# -- training ------------------------------------------------------------------------------------

RUN = [*TINY_CHECKPOINTED_RUN, "--train.epochs=2", *FP16]


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


@pytest.fixture
def fp16_cpu(monkeypatch):
    """DeepSpeed's accelerator reports fp16 support (see the module docstring); and the Engine
    of the run is kept for inspection (`engines`)."""
    from flowpo.trainer import engine as engine_mod

    monkeypatch.setattr(_accelerator(), "is_fp16_supported", lambda: True)
    engines = []
    real = engine_mod.Engine.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(engine_mod.Engine, "__init__", init)
    return engines


def _weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"checkpoint-{epoch}" / "trainable.safetensors"))


def _master_dtypes(engine) -> set[torch.dtype]:
    """The dtypes of the optimizer's master weights (what Adam updates)."""
    opt = engine.module.optimizer
    if hasattr(opt, "fp32_groups"):  # FP16_UnfusedOptimizer (no ZeRO)
        return {p.dtype for g in opt.fp32_groups for p in g}
    return {p.dtype for p in opt.single_partition_of_fp32_groups}  # ZeRO-1/2


def test_without_fp16_support_the_start_stops_with_one_line(tmp_path):
    if _accelerator().is_fp16_supported():
        pytest.skip("this machine's DeepSpeed accelerator supports fp16")
    p = flowpo_main(*RUN, f"--logging.run_dir={tmp_path}", "--logging.run_name=r")
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("flowpo: error: engine.precision=fp16: DeepSpeed's cpu accelerator")
    assert "engine.precision=bf16 or fp32" in line


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_trains_two_epochs_with_fp32_masters_and_first_ratio_one(tmp_path, fp16_cpu, stage):
    p = flowpo_main(
        *RUN,
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=r",
        f"--engine.zero_stage={stage}",
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = train_rows(tmp_path / "r")
    assert len(rows) == 2
    for r in rows:
        assert torch.isfinite(torch.tensor(r["train/loss"])), r
        assert r["train/first_ratio_max_dev"] == 0.0  # re-scored in float16: exactly the rollout
        assert r["train/overflow_steps"] == 0 and r["train/skipped_steps"] == 0
        assert r["train/loss_scale"] == 2.0**16
        # the norm of the unscaled gradient: the same scale as fp32 training (not x 2**16 or
        # / 2**16; without ZeRO the engine scales the loss itself, see engine._setup_fp16)
        assert 1e-6 < r["train/grad_norm"] < 1e3, r["train/grad_norm"]
    (engine,) = fp16_cpu
    assert next(engine.module.module.parameters()).dtype == torch.float16
    assert _master_dtypes(engine) == {torch.float32}
    w0, w1 = _weights(tmp_path / "r", 0), _weights(tmp_path / "r", 1)
    assert all(v.dtype == torch.float16 and bool(torch.isfinite(v).all()) for v in w1.values())
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "the second epoch must update"


def test_zero0_and_zero2_fp16_take_the_same_first_step(tmp_path, fp16_cpu):
    """Without ZeRO DeepSpeed would leave the loss unscaled while still dividing the gradients
    by the scale; the engine's own scaling makes the first update match ZeRO-2's."""
    norms, first = {}, {}
    for stage in (0, 2):
        run = [*RUN, "--train.epochs=1", f"--engine.zero_stage={stage}"]
        p = flowpo_main(*run, f"--logging.run_dir={tmp_path}", f"--logging.run_name=z{stage}")
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        norms[stage] = train_rows(tmp_path / f"z{stage}")[0]["train/grad_norm"]
        first[stage] = _weights(tmp_path / f"z{stage}", 0)
    assert norms[0] == pytest.approx(norms[2], rel=1e-2)
    for k in first[0]:
        torch.testing.assert_close(first[0][k].float(), first[2][k].float(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("stage", [0, 2])
def test_an_overflow_is_skipped_counted_and_not_divergence(tmp_path, fp16_cpu, stage):
    """A loss scale of 2**40 overflows float16 gradients: every step is skipped by the scaler,
    the scale halves each time (hysteresis 1), the weights stay the initial ones, and the run
    ends normally although train.max_nonfinite_steps is 1."""
    p = flowpo_main(
        *RUN,
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=r",
        f"--engine.zero_stage={stage}",
        "--engine.fp16_initial_scale_power=40",
        "--engine.fp16_hysteresis=1",
        "--train.max_nonfinite_steps=1",
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = train_rows(tmp_path / "r")
    assert [r["train/overflow_steps"] for r in rows] == [1, 1]
    assert [r["train/overflow_steps_total"] for r in rows] == [1, 2]
    assert [r["train/loss_scale"] for r in rows] == [2.0**39, 2.0**38]
    assert [r["train/skipped_steps"] for r in rows] == [0, 0]  # not non-finite values
    assert "1 fp16 overflow step(s) skipped, loss scale 5.49756e+11" in p.stdout
    (engine,) = fp16_cpu
    assert engine.optimizer_steps == 0 and engine.overflow_steps == 2
    w0, w1 = _weights(tmp_path / "r", 0), _weights(tmp_path / "r", 1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "an overflowing step changed the weights"
    lora_b = [v for k, v in w1.items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b), "LoRA B must still be its zero init"


@pytest.mark.parametrize("stage", [0, 2])
def test_an_overflow_at_the_minimum_scale_is_a_non_finite_gradient(tmp_path, fp16_cpu, stage):
    """The scaler cannot go lower: the overflow is the gradient's own, so it counts toward
    train.max_nonfinite_steps and stops the run with one line (not DeepSpeed's exception)."""
    p = flowpo_main(
        *RUN,
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=r",
        f"--engine.zero_stage={stage}",
        "--engine.fp16_initial_scale_power=40",
        f"--engine.fp16_min_loss_scale={2**40}",
        "--engine.fp16_hysteresis=1",
        "--train.max_nonfinite_steps=1",
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert (
        p.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "flowpo: error: epoch 0: 1 optimizer steps in a row skipped for a non-finite gradient norm"
        )
    )


def test_a_nan_loss_under_fp16_is_a_skipped_step_not_an_overflow(tmp_path, fp16_cpu, monkeypatch):
    poison_grpo_loss(monkeypatch, {1}, "loss")
    p = flowpo_main(
        *RUN, f"--logging.run_dir={tmp_path}", "--logging.run_name=r", "--engine.zero_stage=2"
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = train_rows(tmp_path / "r")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1]
    assert [r["train/overflow_steps"] for r in rows] == [0, 0]
    w0, w1 = _weights(tmp_path / "r", 0), _weights(tmp_path / "r", 1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the skipped step changed the weights"


def test_doctor_tells_whether_deepspeed_allows_fp16_on_this_cpu():
    from flowpo.doctor import _cpu_fp16, _precision_finding

    finding = _precision_finding(load_config(None, FP16), "cpu")
    assert _cpu_fp16() == bool(_accelerator().is_fp16_supported())  # the same question
    if _cpu_fp16():
        assert finding.status == "ok"
    else:
        assert finding.status == "FAIL" and "AVX512-FP16" in finding.text
