"""Divergence never goes unnoticed (issue 15 §4): every float of the config is finite; at run
time a non-finite loss, log-probability or gradient norm skips that optimizer step on every
rank (weights and optimizer state untouched, counted in train/skipped_steps), too many skips in
a row stop the run with one line naming the epoch and the quantity, and no checkpoint is ever
written with non-finite weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowpo.config import Config, ConfigError, load_config
from flowpo.trainer.nonfinite import (
    GRAD_NORM,
    LOG_PROB,
    LOSS,
    NonFiniteGuard,
    TrainingDiverged,
    nonfinite_code,
)
from tests.conftest import (
    TINY_CHECKPOINTED_RUN,
    flowpo_main,
    poison_grpo_loss,
    train_rows,
    two_rank_group,
)

# -- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,field",
    [
        ("--sampling.noise_level=nan", "sampling.noise_level"),
        ("--train.learning_rate=inf", "train.learning_rate"),
        ("--train.clip_range=-inf", "train.clip_range"),
        ("--train.beta=1e999", "train.beta"),
        (
            "--reward.weights={jpeg_incompressibility: .nan}",
            "reward.weights.jpeg_incompressibility",
        ),
    ],
)
def test_non_finite_config_floats_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"^{field} \(.*\) must be a finite number$"):
        load_config(None, [override])


def test_validate_refuses_non_finite_floats_set_in_code():
    cfg = Config()
    cfg.forward.nft_beta = float("nan")
    with pytest.raises(ConfigError, match=r"forward.nft_beta \(nan\) must be a finite number"):
        cfg.validate()
    cfg = Config()
    cfg.reward.weights = {"jpeg_incompressibility": float("inf")}
    with pytest.raises(ConfigError, match=r"reward.weights.jpeg_incompressibility \(inf\)"):
        cfg.validate()


def test_cli_stops_a_nan_noise_level_with_one_line():
    """The new user's try from the issue: it used to train 100+ epochs with `loss nan`."""
    p = flowpo_main("train", "-c", "configs/tiny_sd3_jpeg.yaml", "--sampling.noise_level=nan")
    assert p.returncode == 2
    assert p.stderr == "flowpo: error: sampling.noise_level (nan) must be a finite number\n"


def test_max_nonfinite_steps_must_be_positive():
    with pytest.raises(ConfigError, match=r"train.max_nonfinite_steps \(0\) must be >= 1"):
        load_config(None, ["--train.max_nonfinite_steps=0"]).validate()


# -- the guard's bookkeeping -----------------------------------------------------------------------


def test_nonfinite_code_names_the_root_quantity():
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    assert nonfinite_code(ok, (torch.zeros(3),)) == 0
    assert nonfinite_code(torch.tensor(float("inf"))) == LOSS
    assert nonfinite_code(nan, (torch.tensor([0.0, float("-inf")]),)) == LOG_PROB


def test_guard_poisons_bad_terms_and_stops_after_the_limit():
    g = NonFiniteGuard(limit=2)
    w = torch.ones(2, requires_grad=True)
    loss = g.check(w.sum(), (torch.tensor([float("nan")]),))  # finite loss, NaN log-prob
    loss.backward()
    assert torch.isnan(w.grad).all(), "a bad term must carry NaN gradients to every rank"
    assert g.window == LOG_PROB
    g.after_step(None, epoch=0)  # between accumulation boundaries: nothing happens
    assert g.window == LOG_PROB
    g.after_step(LOG_PROB, epoch=0)
    assert (g.window, g.streak, g.epoch_skipped) == (0, 1, 1)
    g.after_step(0, epoch=1)  # a finite step resets the run of skips
    assert g.streak == 0
    g.begin_epoch()
    g.after_step(GRAD_NORM, epoch=2)
    with pytest.raises(TrainingDiverged) as err:
        g.after_step(LOSS, epoch=3)
    msg = str(err.value)
    assert msg.startswith("epoch 3: 2 optimizer steps in a row skipped for a non-finite loss")
    assert "train.max_nonfinite_steps=2" in msg and "\n" not in msg
    assert g.metrics() == {"train/skipped_steps": 2.0, "train/skipped_steps_total": 3.0}


class _FakeEngine:
    """What save_checkpoint asks first: a rank with NaN in its weights (no DeepSpeed needed)."""

    is_rank0, rank = True, 0

    def has_nonfinite_weights(self) -> bool:
        return True

    def max_over_ranks(self, value: int) -> int:
        return value

    def barrier(self):
        raise AssertionError("nothing may be written")


def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path):
    from flowpo.trainer.checkpoint import save_checkpoint

    with pytest.raises(TrainingDiverged, match=r"^checkpoint-4 not written: .* NaN or infinite"):
        save_checkpoint(tmp_path, 4, engine=_FakeEngine(), cfg=Config(), history={})
    assert not (tmp_path / "checkpoints").exists()


# -- training runs (DeepSpeed, one rank, in this process) -----------------------------------------

RUN = TINY_CHECKPOINTED_RUN


def _weights(run: Path, epoch: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"checkpoint-{epoch}" / "trainable.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (0, "bf16"), (3, "fp32")])
def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(
    tmp_path, monkeypatch, stage, precision
):
    """ZeRO-0 fp32 is the engine's own check (DeepSpeed would apply the NaN there); ZeRO-2/3 and
    bf16 are DeepSpeed's overflow skip, which the engine reads and agrees on."""
    poison_grpo_loss(monkeypatch, {1}, "log_prob" if stage == 0 else "loss")
    dtype = ["--model.dtype=bfloat16"] if precision == "bf16" else []
    p = flowpo_main(
        *RUN,
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=r",
        "--train.epochs=3",
        f"--engine.zero_stage={stage}",
        f"--engine.precision={precision}",
        *dtype,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = train_rows(tmp_path / "r")
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 0]
    assert [r["train/skipped_steps_total"] for r in rows] == [0, 1, 1]
    assert "1 optimizer step(s) skipped: non-finite values" in p.stdout
    w0, w1, w2 = (_weights(tmp_path / "r", e) for e in range(3))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the skipped epoch changed the weights"
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "training must go on after a skip"
    assert all(bool(torch.isfinite(v).all()) for v in w2.values())


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run_with_one_line(tmp_path, monkeypatch):
    poison_grpo_loss(monkeypatch, {1, 2, 3}, "loss")
    p = flowpo_main(
        *RUN,
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=r",
        "--train.epochs=5",
        "--train.max_nonfinite_steps=2",
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    last = p.stderr.splitlines()[-1]  # the model loader's progress bars come before it
    assert last.startswith(
        "flowpo: error: epoch 2: 2 optimizer steps in a row skipped for a non-finite loss "
        "(train.max_nonfinite_steps=2)"
    )
    assert "Traceback" not in p.stderr
    run = tmp_path / "r"
    ckpts = sorted(d.name for d in (run / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-0", "checkpoint-1"]  # none after the stop
    for name in ckpts:
        w = load_file(str(run / "checkpoints" / name / "trainable.safetensors"))
        assert all(bool(torch.isfinite(v).all()) for v in w.values())
    assert json.loads((run / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())


# the 2-rank run, in the session's one 2-rank launch: rank 1's loss is NaN in epoch 1
NAN_ONE_RANK_TWO = two_rank_group(
    "sd3_nan_one_rank",
    kind="train",
    cases={"r": [*RUN, "--train.epochs=3", "--engine.zero_stage=2"]},
    poison=(1, (1,)),
)


@pytest.mark.slow
@pytest.mark.two_rank(NAN_ONE_RANK_TWO)
def test_a_nan_on_one_rank_makes_every_rank_skip(two_rank):
    """Rank 1 alone sees a NaN loss in epoch 1: both ranks skip that step together and the
    weights stay as they were. ZeRO-2, where the reduce-scatter carries the NaN gradients to the
    owner of their partition only, so the agreement is DeepSpeed's overflow all-reduce plus the
    engine's (ZeRO-0, the engine's own check, measured the same way by hand: 60 s a launch).
    The run is a case of the session's one 2-rank launch (dist_update.poisoned patches the
    loss on rank 1 only)."""
    run = two_rank.runs(NAN_ONE_RANK_TWO)["r"].run_dir  # exited 0 on both ranks
    rows = train_rows(run)
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 0]
    w0, w1, w2 = (_weights(run, e) for e in range(3))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    assert all(bool(torch.isfinite(v).all()) for v in w2.values())


# -- a stale lock in torch's extension cache stops the start with one line --------------------------


def _plant_lock(ext_dir: Path, age_s: float) -> Path:
    import os
    import time

    lock = ext_dir / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_is_told_apart_from_a_live_build(tmp_path):
    import os

    from flowpo.trainer.jit_lock import stale_lock_problem

    lock = _plant_lock(tmp_path, age_s=600)
    problem = stale_lock_problem(lock, stale_after=300)
    assert problem.startswith(f"stale lock file {lock} (10 min old, no process holds it)")
    assert problem.endswith(f"delete it (rm {lock}) and start again")
    assert stale_lock_problem(lock, stale_after=900) is None  # young enough: a build may run
    fd = os.open(lock, os.O_RDONLY)  # a live builder keeps its lock open
    try:
        assert stale_lock_problem(lock, stale_after=300) is None
    finally:
        os.close(fd)
    lock.unlink()
    assert stale_lock_problem(lock, stale_after=0) is None


def test_a_planted_stale_lock_stops_the_start_with_one_line(tmp_path):
    """The hang of the issue: a start-up killed while DeepSpeed loaded its shm op left
    deepspeed_shm_comm/lock behind, and every later start slept forever without a word."""
    lock = _plant_lock(tmp_path / "ext", age_s=600)
    p = flowpo_main(
        *RUN, f"--logging.run_dir={tmp_path}", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")
    )
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    last = p.stderr.splitlines()[-1]
    assert re.match(rf"flowpo: error: stale lock file {re.escape(str(lock))} \(1\d min old", last)
    assert last.endswith(f"delete it (rm {lock}) and start again")


def test_a_lock_that_turns_stale_during_the_wait_is_caught_by_the_watcher(tmp_path, monkeypatch):
    """A lock young at the start-up check (a build may hold it), whose holder then dies: the
    main thread waits in torch's own lock wait (FileBaton, what DeepSpeed's JIT load runs) and
    the watcher stops it once the lock is older than FLOWPO_STALE_LOCK_S."""
    import time

    from torch.utils.file_baton import FileBaton

    from flowpo.trainer.jit_lock import StaleExtensionLock, guard_extension_locks

    monkeypatch.setenv("FLOWPO_STALE_LOCK_S", "1")
    lock = _plant_lock(tmp_path, age_s=0)
    t0 = time.monotonic()
    with pytest.raises(StaleExtensionLock, match=rf"^stale lock file {lock} \(0 min old"):
        with guard_extension_locks([lock], poll_s=0.1):
            FileBaton(str(lock)).wait()  # would sleep forever
    assert time.monotonic() - t0 < 10
    # a SIGINT handler that only records the signal (as the trainer's does) neither swallows
    # the watcher's interrupt nor is lost: the wait runs under Python's own handler
    import signal

    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        stale = _plant_lock(tmp_path / "c", age_s=0)
        with pytest.raises(StaleExtensionLock):
            with guard_extension_locks([stale], poll_s=0.1):
                deadline = time.monotonic() + 20  # FileBaton's wait, bounded: fail, not hang
                while stale.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler and not seen
    finally:
        signal.signal(signal.SIGINT, previous)
    # a lock that goes away ends the wait normally, and the watcher stays quiet
    young = _plant_lock(tmp_path / "b", age_s=0)
    monkeypatch.setenv("FLOWPO_STALE_LOCK_S", "60")
    with guard_extension_locks([young], poll_s=0.05):
        young.unlink()
        FileBaton(str(young)).wait()
