"""DiffusionNFT and AWM (docs/algorithms.md §7, §8): the NFT loss against an independent
float64 reading of the paper's formula (values and gradients), the invariants that follow from
the math (§7 invariants 1-2, §8 invariant 1), the old-policy decay schedule and swap, config
errors that name the field, and a short `flowpo train` with train.algorithm=nft (finite
metrics, old policy checkpointed, resume bit-identical to the uninterrupted run)."""

import json
import math

import pytest
import torch

from flowpo.config import ConfigError, load_config
from flowpo.trainer.forward_rl import (
    OldPolicy,
    awm_log_likelihood,
    awm_policy_loss,
    nft_loss,
    old_policy_decay,
    optimality_probability,
)
from flowpo.trainer.preflight import preflight
from tests.conftest import (
    TINY_AESTHETIC,
    flowpo_main,
    run_ok,
    sigkill_at_checkpoint,
    torchrun_cmd,
    train_rows,
    two_rank_group,
)


def _batch(seed: int, b: int = 5, shape=(3, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *shape, generator=g)
    noise = torch.randn(b, *shape, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    v_old = torch.randn(b, *shape, generator=g)
    v = v_old + 0.3 * torch.randn(b, *shape, generator=g)
    return x0, noise, t, v_old, v


def _paper_nft_loss64(v, v_old, x0, noise, t, r, beta, adaptive, scale):
    """The paper's form, independently, in float64: v+ = (1 - beta) v_old + beta v_theta,
    v- = (1 + beta) v_old - beta v_theta, x_t = (1 - t) x0 + t eps; adaptive weighting in x0
    space with a stop-gradient weight; L = mean_B [r l+ + (1 - r) l-] / beta * scale."""
    v, v_old, x0, noise = (z.double() for z in (v, v_old, x0, noise))
    t, r = t.double().view(-1, 1, 1, 1), r.double()
    xt = (1 - t) * x0 + t * noise
    u = noise - x0
    v_pos = (1 - beta) * v_old + beta * v
    v_neg = (1 + beta) * v_old - beta * v
    out = []
    for vb in (v_pos, v_neg):
        if adaptive:
            x0_hat = xt - t * vb
            w = (x0_hat - x0).abs().mean((1, 2, 3)).detach().clamp_min(1e-5)
            out.append(((x0_hat - x0) ** 2).mean((1, 2, 3)) / w)
        else:
            out.append(((vb - u) ** 2).mean((1, 2, 3)))
    return ((r * out[0] + (1 - r) * out[1]) / beta * scale).mean()


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("r_kind", ["zeros", "ones", "mixed"])
def test_nft_loss_matches_float64_paper_formula(beta, r_kind, adaptive):
    x0, noise, t, v_old, v = _batch(int(beta * 10) + len(r_kind))
    r = {
        "zeros": torch.zeros(5),
        "ones": torch.ones(5),
        "mixed": torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0]),
    }[r_kind]
    v32 = v.clone().requires_grad_(True)
    loss, _ = nft_loss(v32, v_old, x0, noise, t, r, beta=beta, adaptive=adaptive, scale=5.0)
    loss.backward()
    v64 = v.double().requires_grad_(True)
    ref = _paper_nft_loss64(v64, v_old, x0, noise, t, r, beta, adaptive, 5.0)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=2e-6)
    # float32 against float64: elements are compared on the scale of the whole gradient
    scale = v64.grad.abs().max().item()
    torch.testing.assert_close(v32.grad.double(), v64.grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_nft_gradient_is_exactly_zero_at_r_half_and_old_policy(beta, adaptive):
    """§7 invariant 1: every r = 1/2 (all advantages 0) and v_theta == v_old -> gradient 0."""
    x0, noise, t, v_old, _ = _batch(3)
    v = v_old.clone().requires_grad_(True)
    r = optimality_probability(torch.zeros(5), adv_clip_max=5.0)
    assert torch.equal(r, torch.full((5,), 0.5))
    loss, _ = nft_loss(v, v_old, x0, noise, t, r, beta=beta, adaptive=adaptive, scale=5.0)
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_nft_gradient_is_exactly_zero_through_a_module_and_the_old_policy_swap():
    """The same invariant through parameters: the old policy is the module's own weights
    switched in by OldPolicy.applied() (a fresh copy), so every parameter gradient is 0."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    old = OldPolicy(net)
    x0, noise = torch.randn(4, 8), torch.randn(4, 8)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = (1 - t[:, None]) * x0 + t[:, None] * noise
    with torch.no_grad(), old.applied():
        v_old = net(xt)
    v = net(xt)
    r = torch.full((4,), 0.5)
    shape = (4, 8, 1, 1)
    loss, _ = nft_loss(
        v.view(shape), v_old.view(shape), x0.view(shape), noise.view(shape), t, r, beta=1.0
    )
    loss.backward()
    for p in net.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_nft_with_every_r_one_is_flow_matching_toward_the_samples(beta):
    """§7 invariant 2: r = 1 and v_theta == v_old: dL/dv = scale * t^2 / sg(w) * d/dv of the
    plain flow-matching loss mean_D((v - u)^2) (per sample, / B), w = t mean_D |v - u|; without
    the adaptive weighting, scale * d/dv mean_D((v - u)^2) / B."""
    x0, noise, t, v_old, _ = _batch(7)
    u = noise - x0
    r = torch.ones(5)
    for adaptive in (True, False):
        v = v_old.clone().requires_grad_(True)
        loss, _ = nft_loss(v, v_old, x0, noise, t, r, beta=beta, adaptive=adaptive, scale=5.0)
        loss.backward()
        fm = v_old.clone().requires_grad_(True)
        per = ((fm - u) ** 2).mean((1, 2, 3))
        if adaptive:
            w = t * (v_old - u).abs().mean((1, 2, 3))
            per = per * t**2 / w
        (5.0 * per.mean()).backward()
        torch.testing.assert_close(v.grad, fm.grad, rtol=1e-5, atol=1e-8)
        # the direction pulls v toward the sample's own velocity u
        assert ((v.grad * (v_old - u)).sum((1, 2, 3)) > 0).all()


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.0])
def test_nft_per_sample_optimum_is_old_plus_signed_step_toward_the_sample(beta):
    """§7 invariant 4 (plain weighting): per sample, L is minimised at
    v = v_old + (2r - 1)(u - v_old) / beta: toward the sample for r > 1/2, away below."""
    x0, noise, t, v_old, _ = (z.double() for z in _batch(17))
    r = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    u = noise - x0
    step = ((2 * r - 1) / beta).view(-1, 1, 1, 1)
    v = (v_old + step * (u - v_old)).requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x0, noise, t, r, beta=beta, adaptive=False)
    loss.backward()
    assert v.grad.abs().max() < 1e-12


def test_optimality_probability_is_the_clipped_normalised_advantage():
    adv = torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    r = optimality_probability(adv, adv_clip_max=5.0)
    assert torch.equal(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))
    # forward.nft_positive_only: the samples below their group's mean get r = 1/2
    pos = optimality_probability(adv, adv_clip_max=5.0, positive_only=True)
    assert torch.equal(pos, torch.tensor([0.5, 0.5, 0.5, 0.5, 0.6, 1.0, 1.0]))


def test_nft_positive_only_gives_below_mean_samples_no_gradient_at_the_old_policy():
    """With r clipped to 1/2 a below-mean sample's loss has zero gradient at v_theta = v_old
    (§7 invariant 1), so it is not pushed away from; an above-mean sample's is unchanged."""
    x0, noise, t, v_old, _ = _batch(5, b=4)
    adv = torch.tensor([-3.0, -0.5, 0.5, 3.0])
    for positive_only in (False, True):
        v = v_old.clone().requires_grad_(True)
        r = optimality_probability(adv, 5.0, positive_only=positive_only)
        loss, _ = nft_loss(v, v_old, x0, noise, t, r, beta=1.0, adaptive=True, scale=5.0)
        loss.backward()
        per_sample = v.grad.flatten(1).abs().amax(1)
        if positive_only:
            assert per_sample[:2].max() == 0.0
        else:
            assert per_sample[:2].min() > 0.0
        assert per_sample[2:].min() > 0.0


@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber", "ghuber"])
def test_awm_zero_advantages_give_zero_policy_gradient(weighting):
    """§8 invariant 1."""
    x0, noise, t, _, v = _batch(11)
    v = v.clone().requires_grad_(True)
    logp = awm_log_likelihood(v, x0, noise, t, weighting=weighting)
    loss, stats = awm_policy_loss(logp, logp.detach(), torch.zeros(5, dtype=logp.dtype), 1.0)
    loss.backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    assert stats["ratio_max_dev"] == 0


def test_awm_gradient_is_advantage_weighted_flow_matching():
    """With ratio 1 the AWM policy gradient is -mean_B A_b d(log p_b)/dv, log p = -w(t) FM."""
    x0, noise, t, _, v = _batch(13)
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    v1 = v.clone().requires_grad_(True)
    logp = awm_log_likelihood(v1, x0, noise, t, weighting="t")
    awm_policy_loss(logp, logp.detach(), adv, 1.0)[0].backward()
    v2 = v.double().requires_grad_(True)
    fm = ((v2 - (noise - x0).double()) ** 2).mean((1, 2, 3)) * t.double()
    (adv * fm).mean().backward()
    torch.testing.assert_close(v1.grad.double(), v2.grad, rtol=1e-5, atol=1e-9)


def test_old_policy_decay_follows_the_published_schedules():
    nft = load_config("configs/tiny_sd3_jpeg.yaml", ["--train.algorithm=nft"])
    assert [old_policy_decay(nft, n) for n in (0, 1, 100, 499, 500, 5000)] == pytest.approx(
        [0.0, 0.001, 0.1, 0.499, 0.5, 0.5]
    )
    ocr = load_config(
        None,
        [
            "--train.algorithm=nft",
            "--forward.old_decay_delay=75",
            "--forward.old_decay_rate=0.0075",
            "--forward.old_decay_max=0.999",
        ],
    )
    assert old_policy_decay(ocr, 74) == 0.0
    assert old_policy_decay(ocr, 175) == pytest.approx(0.75)
    assert old_policy_decay(ocr, 1000) == pytest.approx(0.999)
    awm = load_config(None, ["--train.algorithm=awm"])
    assert old_policy_decay(awm, 1000) == pytest.approx(0.3)


def test_old_policy_fold_and_swap():
    net = torch.nn.Linear(3, 2)
    old = OldPolicy(net)
    before = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    old.fold(0.25)  # old <- 0.25 old + 0.75 theta
    with old.applied():
        torch.testing.assert_close(net.weight, before + 0.75)
    torch.testing.assert_close(net.weight, before + 1.0)  # the training weights are back


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["--train.algorithm=ppo"], "train.algorithm"),
        (["--train.algorithm=nft", "--rollout.plan=window"], "rollout.plan"),
        (["--train.algorithm=nft", "--train.ratio_norm=true"], "train.ratio_norm"),
        (["--train.algorithm=nft", "--forward.num_times=11"], "forward.num_times"),
        (["--train.algorithm=nft", "--forward.nft_beta=0"], "forward.nft_beta"),
        (["--train.algorithm=nft", "--forward.rollout_guidance_scale=-1"], "forward.rollout"),
        (["--forward.rollout_guidance_scale=3"], "forward.rollout_guidance_scale"),  # grpo
        (["--train.algorithm=awm", "--train.steps_per_epoch=2"], "train.steps_per_epoch"),
        (["--train.algorithm=awm", "--forward.awm_weighting=cosine"], "forward.awm_weighting"),
    ],
)
def test_algorithm_config_errors_name_the_field(overrides, field):
    cfg = load_config("configs/tiny_sd3_jpeg.yaml", overrides)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        preflight(cfg)


@pytest.mark.slow
def test_nft_trains_two_epochs_and_resumes_bit_identically(tmp_path):
    common = [
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        f"--logging.run_dir={tmp_path}",
        "--logging.wandb=off",
        "--logging.progress=false",
        "--rollout.batch_size=4",
        "--rollout.num_batches=2",
        "--sampling.num_steps=4",
        "--eval.at_start=false",
        "--eval.at_end=false",
        "--eval.every=0",
        "--train.algorithm=nft",
        "--train.beta=0.01",
        "--checkpoint.every=1",
    ]
    straight = flowpo_main(*common, "--logging.run_name=straight", "--train.epochs=3")
    assert straight.returncode == 0, straight.stdout[-2000:] + straight.stderr[-4000:]
    rows = train_rows(tmp_path / "straight")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    for r in rows:
        for key in ("train/loss", "train/policy_loss", "train/kl", "train/grad_norm"):
            assert math.isfinite(r[key]), key
        assert 0.0 <= r["train/r_mean"] <= 1.0
    assert rows[0]["train/old_deviation"] == 0.0  # epoch 0: the old policy is the policy
    assert rows[1]["train/old_deviation"] > 0.0
    ckpt = tmp_path / "straight" / "checkpoints" / "checkpoint-2"
    assert (ckpt / "old_policy_rank0.pt").is_file()

    first = flowpo_main(*common, "--logging.run_name=resumed", "--train.epochs=2")
    assert first.returncode == 0, first.stderr[-4000:]
    again = flowpo_main(
        *common, "--logging.run_name=resumed", "--train.epochs=3", "--resume", "latest"
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    resumed = train_rows(tmp_path / "resumed")

    def numbers(r):
        return {k: v for k, v in r.items() if not k.startswith("time/")}

    assert json.dumps(numbers(resumed[-1])) == json.dumps(numbers(rows[-1]))


@pytest.mark.slow
def test_nft_rollout_guidance_samples_with_cfg_and_trains_the_unguided_policy(tmp_path):
    """forward.rollout_guidance_scale=3 with sampling.guidance_scale=1: the first epoch's
    rollouts are those of a run whose policy is guided at 3 (the same reward), but its training
    forwards are not (another loss); CFG-free rollouts give other images."""
    common = [
        "train", "-c", "configs/tiny_sd3_jpeg.yaml", f"--logging.run_dir={tmp_path}",
        "--logging.wandb=off", "--logging.progress=false", "--rollout.batch_size=4",
        "--rollout.num_batches=1", "--rollout.group_size=4", "--sampling.num_steps=3",
        "--eval.at_start=false", "--eval.at_end=false", "--eval.every=0", "--train.epochs=1",
        "--train.algorithm=nft", "--train.beta=0",
    ]  # fmt: skip
    runs = {
        "roll3": ["--sampling.guidance_scale=1", "--forward.rollout_guidance_scale=3"],
        "policy3": ["--sampling.guidance_scale=3"],
        "free": ["--sampling.guidance_scale=1"],
    }
    rows = {}
    for name, extra in runs.items():
        proc = flowpo_main(*common, f"--logging.run_name={name}", *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        (rows[name],) = train_rows(tmp_path / name)
    assert rows["roll3"]["reward_mean"] == rows["policy3"]["reward_mean"]
    assert rows["roll3"]["reward_mean"] != rows["free"]["reward_mean"]
    assert rows["roll3"]["train/loss"] != rows["policy3"]["train/loss"]


NFT = ["--train.algorithm=nft", "--train.learning_rate=1e-4", "--train.beta=0.01"]
AWM = ["--train.algorithm=awm", "--train.learning_rate=1e-4", "--train.beta=0.01"]
NFT_TWO = two_rank_group(
    "sd3_nft",
    cases={
        "lora_z2": [*NFT, "--engine.zero_stage=2"],
        "full_z2": [*NFT, "--train.lora=false", "--engine.zero_stage=2"],
        "awm_z2": [*AWM, "--engine.zero_stage=2"],
    },
)


@pytest.mark.slow
@pytest.mark.two_rank(NFT_TWO)
def test_nft_same_update_on_1_and_2_ranks_zero2_and_accumulation(tiny_dirs, two_rank, tmp_path):
    """§6.7 for nft (and awm): one update of the same 8 clean samples (per-sample training
    times and noise keyed by the global sample index) gives the same weights and gradient norm
    on one rank (micro-batch 8, or 4 x 2 accumulation) and on two ranks under ZeRO-2, LoRA and
    full fine-tuning, with the KL to the reference."""

    from tests.conftest import as_fresh_process
    from tests.dist_update import run_cases

    one = {
        "lora_mb8": NFT,
        "lora_mb4x2": [*NFT, "--train.micro_batch_size=4"],
        "full_mb8": [*NFT, "--train.lora=false"],
        "awm_mb8": AWM,
    }
    with as_fresh_process():
        res = run_cases(tiny_dirs["sd3"], one, tmp_path / "runs")
    res.update(two_rank.results(NFT_TWO))  # 2 ranks: the session's one launch
    for kind, ref_name in (("lora", "lora_mb8"), ("full", "full_mb8"), ("awm", "awm_mb8")):
        ref = res[ref_name]
        assert math.isfinite(ref["loss"]) and ref["grad_norm"] > 0
        for name, r in res.items():
            if not name.startswith(kind) or name == ref_name:
                continue
            assert r["weights"].keys() == ref["weights"].keys(), name
            for key, w in ref["weights"].items():
                torch.testing.assert_close(r["weights"][key], w, atol=1e-5, rtol=0, msg=name)
            assert math.isclose(r["grad_norm"], ref["grad_norm"], rel_tol=1e-5), name
    assert any(v.abs().max() > 0 for k, v in res["lora_mb8"]["weights"].items() if "lora_B" in k)


RESUME_ARGS = [
    "train",
    "-c",
    "configs/tiny_sd3_jpeg.yaml",
    "--logging.wandb=off",
    "--logging.progress=false",
    "--rollout.batch_size=4",
    "--rollout.num_batches=2",
    "--sampling.num_steps=4",
    "--train.epochs=4",
    "--train.algorithm=nft",
    "--train.beta=0.01",
    "--train.ema=true",
    "--engine.zero_stage=2",
    "--checkpoint.every=1",
    "--checkpoint.keep_last_n=3",
    "--eval.at_start=false",
    "--eval.at_end=false",
    "--eval.every=0",
]
# the uninterrupted 2-rank run, in the session's one 2-rank launch
RESUME_TWO = two_rank_group("sd3_nft_resume", kind="train", cases={"straight": RESUME_ARGS})


@pytest.mark.slow
@pytest.mark.two_rank(RESUME_TWO)
def test_nft_exact_resume_after_sigkill_two_ranks_zero2(tiny_dirs, two_rank, tmp_path):
    """2 ranks, ZeRO-2, LoRA, β > 0, train.ema: a run SIGKILLed once checkpoint-1 is the latest
    and resumed gives the uninterrupted run's numbers and weights bit for bit (the old policy
    is restored from old_policy_rank{R}.pt)."""

    from safetensors.torch import load_file

    def train_cmd(name: str, *extra: str) -> list[str]:
        return torchrun_cmd(
            2,
            "-m",
            "flowpo",
            *RESUME_ARGS,
            f"--model.path={tiny_dirs['sd3']}",
            f"--logging.run_dir={tmp_path}",
            f"--logging.run_name={name}",
            *extra,
        )

    straight_dir = two_rank.runs(RESUME_TWO)["straight"].run_dir  # exited 0 on both ranks
    sigkill_at_checkpoint(train_cmd("killed"), tmp_path / "killed")
    assert [r["epoch"] for r in train_rows(tmp_path / "killed")][:2] == [0, 1]
    resumed = run_ok(train_cmd("killed", "--resume", "latest"))
    assert "resumed from" in resumed.stdout

    straight = train_rows(straight_dir)
    by_epoch = {r["epoch"]: r for r in train_rows(tmp_path / "killed")}
    assert sorted(by_epoch) == [0, 1, 2, 3]
    for a in straight:
        b = by_epoch[a["epoch"]]
        for key, value in a.items():
            if key.startswith(("reward", "train/", "adv")):
                assert b[key] == value, (a["epoch"], key, value, b[key])
    for name in ("trainable.safetensors", "trainable_ema.safetensors"):
        w_a = load_file(str(straight_dir / "checkpoints" / "checkpoint-3" / name))
        w_b = load_file(str(tmp_path / "killed" / "checkpoints" / "checkpoint-3" / name))
        assert w_a.keys() == w_b.keys()
        assert all(torch.equal(w_a[k], w_b[k]) for k in w_a), name
    for rank in (0, 1):
        old = f"old_policy_rank{rank}.pt"
        o_a = torch.load(straight_dir / "checkpoints" / "checkpoint-3" / old)
        o_b = torch.load(tmp_path / "killed" / "checkpoints" / "checkpoint-3" / old)
        assert all(torch.equal(o_a["shadow"][k], o_b["shadow"][k]) for k in o_a["shadow"])


# That nft learns is checked statistically on the default recipe, where it matters:
# tests/test_shapes_rl.py::test_nft_on_the_shapes_reward_raises_rollout_strict_accuracy_by_more_than_3_se
# (the shapes reward from the committed base; rollouts' strict rate, > 3 binomial SE in 10 epochs).
# It replaced a 24-epoch tiny-SD3 jpeg_incompressibility run of the same claim (50 s, and its rise
# depended on what earlier tests had left in the process).


SWAP_ARGS = [
    "train",
    "-c",
    "configs/tiny_sd3_jpeg.yaml",
    "--logging.wandb=off",
    "--logging.progress=false",
    "--rollout.batch_size=4",
    "--rollout.num_batches=1",
    "--sampling.num_steps=4",
    "--train.epochs=3",
    "--train.algorithm=nft",
    "--train.beta=0.01",
    "--train.learning_rate=3e-2",
    "--forward.old_decay_rate=0.5",
    "--forward.old_decay_max=0.9",
    "--train.ema=true",
    "--train.ema_update_interval=1",
    "--eval.at_start=false",
    "--eval.at_end=false",
    "--eval.every=0",
    # a reward continuous in the pixels: after the first update ZeRO-2's and ZeRO-3's weights
    # differ by float rounding (their gradient reductions differ), and the jpeg size turned
    # that into a whole-byte step in one image of the second epoch (reward 1.58275 vs 1.58250),
    # which the 4-image groups' normalisation made a different update
    "--reward.weights={aesthetic: 1.0}",
    "--reward.options={aesthetic: {model_dir: " + TINY_AESTHETIC + "}}",
]
SWAP_TWO = two_rank_group(
    "sd3_nft_swap",
    kind="train",
    cases={f"z{stage}": [*SWAP_ARGS, f"--engine.zero_stage={stage}"] for stage in (2, 3)},
)


@pytest.mark.slow
@pytest.mark.two_rank(SWAP_TWO)
def test_nft_zero3_matches_zero2_on_two_ranks_with_the_old_policy_swapped_in(two_rank):
    """Under ZeRO-3 the old policy is swapped into the partitions, and the whole copies of
    gathered parameters (LoRA weights are small enough to stay gathered at the template's
    persistence threshold) are dropped and re-gathered around the swap (Engine.refresh_gathered):
    3 epochs on 2 ranks give ZeRO-2's numbers, with the old policy well away from the policy.
    The same swap serves train.ema (evaluation, trainable_ema.safetensors): ZeRO-3's EMA export
    is ZeRO-2's, not the current weights. Both runs: the session's one 2-rank launch."""

    from safetensors.torch import load_file

    runs = two_rank.runs(SWAP_TWO)  # each exited 0 on both ranks
    z2, z3 = (train_rows(runs[name].run_dir) for name in ("z2", "z3"))
    assert z2[-1]["train/old_deviation"] > 1e-3  # the old policy differs from the policy
    for a, b in zip(z2, z3, strict=True):
        for key in ("reward_mean", "train/loss", "train/old_deviation", "train/grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-5), (a["epoch"], key, a[key], b[key])
    ckpt = "checkpoints/checkpoint-2"
    ema2 = load_file(str(runs["z2"].run_dir / ckpt / "trainable_ema.safetensors"))
    ema3 = load_file(str(runs["z3"].run_dir / ckpt / "trainable_ema.safetensors"))
    now3 = load_file(str(runs["z3"].run_dir / ckpt / "trainable.safetensors"))
    assert max(float((ema3[k] - now3[k]).abs().max()) for k in now3) > 1e-3
    # the two stages reduce gradients in different orders, and 3 Adam epochs can carry that to
    # ~1e-5 in one element (1.5e-5 measured on an AMD EPYC host): the bound stays 20x below the
    # EMA-vs-current separation asserted above, so exporting the current weights still fails
    for k, w in ema2.items():
        torch.testing.assert_close(ema3[k], w, atol=5e-5, rtol=0)
