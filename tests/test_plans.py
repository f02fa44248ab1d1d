"""Rollout plans (docs/algorithms.md §2; §6 invariants 4 and 8): each plan stores and trains exactly
the steps it declares, ODE steps draw no noise, windows move as specified, E-GRPO's merged
transitions are deterministic and reach tau, branches share one prefix / one forward, the
first re-scoring of every plan gives ratio == 1, and the trainer makes as many backward calls
per optimizer step as DeepSpeed's accumulation count (the real update with DeepSpeed)."""

import math

import pytest
import torch

import flowpo.trainer.rollout as rollout_mod
from flowpo.config import ConfigError, load_config
from flowpo.models.base import load_adapter
from flowpo.sde import sde_std, shift_sigmas
from flowpo.trainer.plans import entropy_per_dim, select_entropy_transitions, window_start
from flowpo.trainer.preflight import preflight
from flowpo.trainer.rollout import (
    build_plan,
    forward_rows,
    rollout_sigmas,
    sample_rollout,
    shared_anchor_forward,
)
from flowpo.trainer.update import step_loss
from tests.conftest import add_active_lora, as_fresh_process

PROMPTS = ["a red circle", "two blue squares"]


def _cfg(plan, *extra):
    return load_config(
        None,
        [f"--rollout.plan={plan}", "--sampling.num_steps=6", "--rollout.group_size=2", *extra],
    )


def _grouped_embeds(adapter, g=2):
    return adapter.encode_prompts([p for p in PROMPTS for _ in range(g)])


@pytest.fixture(scope="module")
def sd3(tiny_dirs):
    adapter = load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=1.0)
    adapter.freeze_frozen_parts()
    return adapter


class _Recorder:
    """Wraps the sampler's step functions and the adapter's velocity to record what ran."""

    def __init__(self, monkeypatch, adapter, sigmas):
        self.sde, self.ode, self.rows = [], [], []
        self.sigmas = [float(s) for s in sigmas]
        sde_fn, ode_fn, vel = rollout_mod.sde_step_with_logprob, rollout_mod.ode_step, None

        def k_of(sig):
            return self.sigmas.index(float(torch.as_tensor(sig).reshape(-1)[0]))

        def sde(x, v, sig, sig_next, a, **kw):
            self.sde.append((k_of(sig), k_of(sig_next), "generator" in kw))
            return sde_fn(x, v, sig, sig_next, a, **kw)

        def ode(x, v, sig, sig_next):
            self.ode.append(k_of(sig))
            return ode_fn(x, v, sig, sig_next)

        vel = adapter.velocity

        def velocity(x, sig, emb, *a, **kw):
            self.rows.append((k_of(sig), x.shape[0]))
            return vel(x, sig, emb, *a, **kw)

        monkeypatch.setattr(rollout_mod, "sde_step_with_logprob", sde)
        monkeypatch.setattr(rollout_mod, "ode_step", ode)
        monkeypatch.setattr(adapter, "velocity", velocity)


# -- window ---------------------------------------------------------------------------------------


def test_window_plan_stores_and_trains_exactly_the_window(sd3, monkeypatch):
    cfg = _cfg("window", "--rollout.window_size=2", "--rollout.window_range=1,5")
    sigmas = sd3.sigmas(6, sd3.initial_noise(1, torch.Generator().manual_seed(0)))
    plan = build_plan(cfg).step_plan(sigmas, epoch=3, batch=1)
    start = plan.trained[0]
    assert plan.trained == [start, start + 1] and 1 <= start <= 3
    assert plan.sde == [k in plan.trained for k in range(6)]
    rec = _Recorder(monkeypatch, sd3, sigmas)
    ro = sample_rollout(sd3, _grouped_embeds(sd3), plan, sigmas, cfg, torch.Generator())
    # SDE (with the noise generator) exactly on the window, the Euler ODE step elsewhere
    assert rec.sde == [(k, k + 1, True) for k in plan.trained]
    assert sorted(rec.ode) == [k for k in range(6) if k not in plan.trained]
    assert ro.log_probs.shape == (4, 2) and ro.images_per_sample == 1
    assert torch.equal(ro.sigmas[0], sigmas[plan.trained])
    assert torch.equal(ro.sigmas_next[0], sigmas[[k + 1 for k in plan.trained]])
    assert torch.equal(ro.anchors, torch.arange(4).unsqueeze(1).expand(4, 2))
    assert ro.means is None  # only stored for RatioNorm


def test_random_window_is_per_batch_deterministic_and_in_range():
    cfg = _cfg("window", "--rollout.window_size=2", "--sampling.num_steps=10")
    starts = {(e, b): window_start(cfg, 10, e, b) for e in range(20) for b in range(3)}
    assert set(starts.values()) == {0, 1, 2, 3}  # [0, T//2 = 5) minus the width
    assert starts == {(e, b): window_start(cfg, 10, e, b) for e in range(20) for b in range(3)}


def test_progressive_window_moves_with_training():
    cfg = _cfg(
        "window",
        "--sampling.num_steps=10",
        "--rollout.window_placement=progressive",
        "--rollout.window_size=2",
        "--rollout.window_range=1,7",
        "--rollout.window_shift_every=3",
        "--rollout.window_shift_stride=2",
    )
    plan = build_plan(cfg)
    got = [plan.step_plan(10, epoch=e).trained for e in range(12)]
    want_start = [min(1 + (e // 3) * 2, 7 - 2) for e in range(12)]
    assert got == [[s, s + 1] for s in want_start]
    assert got[0] == [1, 2] and got[3] == [3, 4] and got[-1] == [5, 6]  # stops at the range end


def test_window_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"rollout.window_size \(4\) does not fit"):
        preflight(_cfg("window", "--rollout.window_size=4", "--rollout.window_range=0,3"))
    with pytest.raises(ConfigError, match=r"rollout.window_range \[2, 6\) must satisfy"):
        preflight(_cfg("window", "--rollout.window_range=2,6"))
    with pytest.raises(ConfigError, match=r"rollout.window_placement='sliding' is not allowed"):
        _cfg("window", "--rollout.window_placement=sliding").validate()
    with pytest.raises(ConfigError, match=r"train.micro_batch_size \(3\) must be a multiple"):
        preflight(
            load_config(
                None,
                [
                    "--rollout.plan=branch",
                    "--rollout.group_size=2",
                    "--rollout.batch_size=6",
                    "--train.micro_batch_size=3",
                ],
            )
        )


# -- branch ---------------------------------------------------------------------------------------


def test_branch_plan_shares_one_prefix_per_prompt(sd3, monkeypatch):
    cfg = _cfg(
        "branch",
        "--rollout.window_size=2",
        "--rollout.window_placement=fixed",
        "--rollout.window_range=2,5",
    )
    sigmas = sd3.sigmas(6, sd3.initial_noise(1, torch.Generator().manual_seed(0)))
    plan = build_plan(cfg).step_plan(sigmas, 0, 0)
    assert plan.branch_step == 2 and plan.trained == [2, 3]
    rec = _Recorder(monkeypatch, sd3, sigmas)
    ro = sample_rollout(sd3, _grouped_embeds(sd3), plan, sigmas, cfg, torch.Generator())
    # prefix and the branch step's forward once per prompt (2 rows), then 4 branches
    assert rec.rows == [(0, 2), (1, 2), (2, 2), (3, 4), (4, 4), (5, 4)]
    assert sum(r for _, r in rec.rows) == forward_rows(plan, 4, 2)["sample"]
    assert rec.sde == [(2, 3, True), (3, 4, True)]
    x0 = ro.latents[:, 0]
    assert torch.equal(x0[0], x0[1]) and torch.equal(x0[2], x0[3]) and not torch.equal(x0[0], x0[2])
    assert not torch.equal(ro.next_latents[0, 0], ro.next_latents[1, 0])  # branches differ
    assert ro.anchors[:, 0].tolist() == [0, 0, 2, 2] and ro.anchors[:, 1].tolist() == [0, 1, 2, 3]


# -- entropy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde_type,a", [("flow", 0.7), ("dance", 0.7), ("flow", 0.9)])
@pytest.mark.parametrize("tau", [-0.3, 0.5, 0.9])
def test_entropy_merge_is_deterministic_and_reaches_tau(sde_type, a, tau):
    """Invariant 8: chosen steps and merge lengths are deterministic for a schedule and tau,
    each merged transition's per-dimension entropy is >= tau, and merging is minimal."""
    sigmas = shift_sigmas(torch.linspace(1, 0, 17, dtype=torch.float64), 3.0).float()
    kw = dict(sde_type=sde_type, noise_level=a, tau=tau, start=0, end=8)
    chosen = select_entropy_transitions(sigmas, **kw)
    assert chosen == select_entropy_transitions(sigmas.clone(), **kw)
    assert chosen, "some transition must reach tau"

    def h(k, span):
        std = sde_std(
            float(sigmas[k]),
            float(sigmas[k + span]),
            a,
            sde_type=sde_type,
            sigma_max=float(sigmas[1]),
        )
        return float(entropy_per_dim(std))

    for k, span in chosen:
        assert 0 <= k < 8 and k + span <= 15
        assert h(k, span) >= tau
        assert span == 1 or h(k, span - 1) < tau  # the smallest merge that reaches tau
    starts = [k for k, _ in chosen]
    ends = [k + s for k, s in chosen]
    assert all(e <= s for e, s in zip(ends[:-1], starts[1:]))  # no overlap


def test_entropy_fixed_merge_length_and_expected_selection():
    sigmas = shift_sigmas(torch.linspace(1, 0, 17, dtype=torch.float64), 3.0).float()
    kw = dict(sde_type="flow", noise_level=0.7, start=0, end=8)
    assert select_entropy_transitions(sigmas, tau=0.0, merge_length=3, **kw) == [
        (0, 3),
        (3, 3),
        (6, 3),
    ]
    # tau = 0.5 nats: the high-noise steps stay single, later ones merge in pairs
    assert select_entropy_transitions(sigmas, tau=0.5, **kw) == [
        (0, 1),
        (1, 1),
        (2, 1),
        (3, 1),
        (4, 2),
        (6, 2),
    ]
    assert float(entropy_per_dim(1.0)) == pytest.approx(0.5 * math.log(2 * math.pi * math.e))


def test_entropy_plan_branches_off_one_anchor(sd3, monkeypatch):
    cfg = _cfg("entropy", "--rollout.entropy_tau=0.4", "--sampling.shift=3")
    sigmas = rollout_sigmas(sd3, cfg, sd3.initial_noise(1, torch.Generator()))
    assert torch.allclose(sigmas, shift_sigmas(torch.linspace(1, 0, 7), 3.0))
    plan = build_plan(cfg).step_plan(sigmas, 0, 0)
    merged = [(k, plan.span[k]) for k in plan.trained]
    assert plan.branch_each and plan.images_per_sample == len(merged) >= 2
    rec = _Recorder(monkeypatch, sd3, sigmas)
    ro = sample_rollout(sd3, _grouped_embeds(sd3), plan, sigmas, cfg, torch.Generator())
    k_last = plan.trained[-1]
    # anchor: one row per prompt up to the last branch point; each branch point's 4 branches
    # continue by ODE from its merged end
    anchor = [(k, r) for k, r in rec.rows if r == 2]
    assert anchor == [(k, 2) for k in range(k_last + 1)]
    assert sum(r for _, r in rec.rows) == forward_rows(plan, 4, 2)["sample"]
    assert rec.sde == [(k, k + s, True) for k, s in merged]
    assert ro.final_latents.shape[:2] == (4, len(merged))
    assert ro.sigmas_next[0].tolist() == [float(sigmas[k + s]) for k, s in merged]
    for j in range(len(merged)):
        assert torch.equal(ro.latents[0, j], ro.latents[1, j])
        assert ro.anchors[:, j].tolist() == [0, 0, 2, 2]


def test_entropy_tau_too_high_names_the_field(sd3):
    cfg = _cfg("entropy", "--rollout.entropy_tau=9")
    sigmas = sd3.sigmas(6, sd3.initial_noise(1, torch.Generator()))
    with pytest.raises(ValueError, match=r"rollout.entropy_tau \(9.0 nats\) is reached by no"):
        build_plan(cfg).step_plan(sigmas, 0, 0)


# -- ratio == 1 (invariant 4) for every plan ------------------------------------------------------

PLAN_ARGS = {
    "full": [],
    "window": ["--rollout.window_size=2"],
    "branch": ["--rollout.window_size=2"],
    "entropy": ["--rollout.entropy_tau=0.3"],
}


@pytest.mark.parametrize("plan_name", list(PLAN_ARGS))
@pytest.mark.parametrize("family,guidance", [("sd3", 4.5), ("flux", 3.5)])
def test_first_rescore_ratio_is_exactly_one_on_every_plan(tiny_dirs, plan_name, family, guidance):
    """Re-score each stored transition as the trainer does (shared-anchor forward, training
    mode, autograd, LoRA active): ratio == 1 exactly, RatioNorm's log-ratio exactly 0."""
    cfg = _cfg(plan_name, *PLAN_ARGS[plan_name], "--train.ratio_norm=true")
    adapter = load_adapter(family, tiny_dirs[family], guidance_scale=guidance)
    adapter.freeze_frozen_parts()
    module = add_active_lora(adapter)
    assert family != "sd3" or adapter.cfg_active
    embeds = _grouped_embeds(adapter)
    sigmas = rollout_sigmas(adapter, cfg, adapter.initial_noise(1, torch.Generator()))
    plan = build_plan(cfg).step_plan(sigmas, epoch=1, batch=0)
    module.eval()
    ro = sample_rollout(adapter, embeds, plan, sigmas, cfg, torch.Generator().manual_seed(0))
    module.train()
    calls = []
    hook = module.register_forward_pre_hook(lambda m, a: calls.append(1))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    for j in range(ro.num_trained):
        # the trainer's own per-transition loss: shared-anchor forward, re-score (kernel
        # dispatch included), RatioNorm's log-ratio, the clipped objective
        out = step_loss(adapter, ro, j, embeds, adv, cfg, sigma_max=float(sigmas[1]))
        step = out.step
        assert step.log_prob.requires_grad and out.loss.requires_grad
        ratio = torch.exp(step.log_prob - ro.log_probs[:, j])
        assert (ratio - 1).abs().max().item() <= 1e-6, (plan_name, j)
        assert torch.equal(step.mean, ro.means[:, j])  # RatioNorm's dmu is exactly 0
        assert out.stats["ratio_max_dev"].item() == 0.0  # so its ratio is exactly 1
    hook.remove()
    assert len(calls) == ro.num_trained  # one transformer forward per trained column


def test_shared_anchor_forward_runs_one_forward_per_prompt_with_gradients(sd3):
    module = add_active_lora(sd3)
    embeds = _grouped_embeds(sd3, g=3)  # 2 prompts x 3 branches
    x = sd3.initial_noise(2, torch.Generator()).repeat_interleave(3, 0)
    sig = torch.full((6,), 0.8)
    rows = []
    hook = module.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    with shared_anchor_forward(sd3, torch.tensor([0, 0, 0, 3, 3, 3])):
        v = sd3.velocity(x, sig, embeds)
    hook.remove()
    assert rows == [2] and "velocity" not in vars(sd3)  # restored on exit
    full = sd3.velocity(x, sig, embeds)
    assert torch.allclose(v, full, atol=1e-6)
    lora = [p for n, p in module.named_parameters() if "lora_B" in n]
    g1 = torch.autograd.grad(v.square().sum(), lora)
    g2 = torch.autograd.grad(full.square().sum(), lora)
    for a, b in zip(g1, g2):
        # same math, different float32 summation order (one anchor row vs G copies)
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, err
    module.delete_adapters(module.active_adapters())


# -- the trainer: accumulation count == backward calls, forward count, ratio == 1 ----------------


def _trainer_updates(model: str, run_dir) -> dict:
    """One epoch's rollout and update of every plan through GRPOTrainer with DeepSpeed: the
    transformer forwards (rows each), optimizer steps, sizes and the first ratio."""
    from flowpo.trainer.grpo import GRPOTrainer

    plans = {"full": [], "window": ["--rollout.window_size=2"],
             "branch": ["--rollout.window_size=2"], "entropy": ["--rollout.entropy_tau=0.3"]}  # fmt: skip
    out = {}
    for name, extra in plans.items():
        cfg = load_config(None, [f"--model.path={model}", f"--logging.run_dir={run_dir}",
            f"--logging.run_name={name}", "--logging.wandb=off", "--logging.progress=false",
            "--rollout.batch_size=8", "--rollout.num_batches=2", "--sampling.num_steps=6",
            "--train.steps_per_epoch=2", f"--rollout.plan={name}", *extra])  # fmt: skip
        tr = GRPOTrainer(cfg)
        tr.setup()
        data = tr.rollout(0)
        adv, _ = tr.advantages(data)
        rows: list[int] = []
        hook = tr.engine.module.module.register_forward_pre_hook(
            lambda m, a, kw, rows=rows: rows.append(kw["hidden_states"].shape[0]),
            with_kwargs=True,
        )
        metrics = tr.update(data, adv, 0)
        hook.remove()
        out[name] = dict(rows=rows, opt_steps=tr.engine.optimizer_steps, sizes=tr.sizes,
                         K=data.rollout.num_trained, R=data.rollout.images_per_sample,
                         n_rewards=data.rewards.numel(), n_groups=len(set(data.group_ids.tolist())),
                         first_dev=metrics["train/first_ratio_max_dev"])  # fmt: skip
        tr.pool.shutdown()
        tr.logger.close()
        tr.signals.restore()
    return out


def test_trainer_backward_calls_match_accumulation_and_one_forward_per_anchor(tiny_dirs, tmp_path):
    with as_fresh_process():  # the trainer's process group is closed after
        res = _trainer_updates(tiny_dirs["sd3"], tmp_path)
    n, mb, g = 16, 8, 4  # samples per rank per epoch, micro-batch, group size
    for name, r in res.items():
        # DeepSpeed stepped exactly steps_per_epoch times: its accumulation count equals the
        # backward calls per optimizer step (n / mb / 2 micro-batches x K transitions)
        assert r["opt_steps"] == 2, (name, r)
        assert r["sizes"]["gradient_accumulation_steps"] == (n // 2 // mb) * r["K"], name
        assert len(r["rows"]) == (n // mb) * r["K"], name  # one forward per backward
        assert r["first_dev"] <= 1e-6, name
    assert res["full"]["K"] == 5 and res["window"]["K"] == 2
    assert res["branch"]["rows"] == [mb // g, mb] * 2  # branch step once per prompt
    ent = res["entropy"]
    # E-GRPO: one transformer forward per (prompt, active transition) in training
    assert ent["rows"] == [mb // g] * (2 * ent["K"])
    assert ent["R"] == ent["K"] and ent["n_rewards"] == n * ent["K"]
    assert ent["n_groups"] == (n // g) * ent["K"]  # advantages per branch point's G branches
