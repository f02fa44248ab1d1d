"""The sampler: runs a rollout plan's declaration and stores the trained transitions.

Plans (trainer/plans.py, re-exported here) declare for each sampling batch which steps are
stochastic, merged, shared and trained; `sample_rollout` follows the declaration and returns a
`Rollout`, and the trainer consumes its fields (per-transition sigmas, anchors, images per
sample) without asking for the plan's name.

Shapes: B samples of the batch (P prompts x G), K trained transitions, R images per sample
(1, or K when every transition is its own branch point), D latent elements.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from flowpo.config import Config
from flowpo.sde import SDEStep, ode_step, sde_step_with_logprob, shift_sigmas
from flowpo.trainer.plans import (  # noqa: F401  (re-exported: the registry lives in plans.py)
    PLAN_REGISTRY,
    FullPlan,
    RolloutPlan,
    StepPlan,
    build_plan,
    register_plan,
)


@dataclass
class Rollout:
    """Stored transitions of one or more sampling batches (B samples, K trained transitions)."""

    latents: Tensor  # (B, K, ...) x entering each transition (equal within an anchor)
    next_latents: Tensor  # (B, K, ...) x' drawn by the SDE (treated as constant)
    log_probs: Tensor  # (B, K) log pi_old(x' | x)
    sigmas: Tensor  # (B, K) sigma where each transition starts
    sigmas_next: Tensor  # (B, K) sigma where it ends (sigma_{k+l} for l merged steps)
    noise_levels: Tensor  # (B, K)
    anchors: Tensor  # (B, K) long: row whose transformer forward serves (b, j); b if not shared
    final_latents: Tensor  # (B, R, ...) the latents decoded into images
    means: Tensor | None = None  # (B, K, ...) rollout SDE mean mu_old (GRPO-Guard RatioNorm)

    @property
    def images_per_sample(self) -> int:
        return self.final_latents.shape[1]

    @property
    def num_trained(self) -> int:
        return self.log_probs.shape[1]

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """Concatenate along B; anchors are row numbers, so later parts are offset."""
        out, offset, anchors = {}, 0, []
        for p in parts:
            anchors.append(p.anchors + offset)
            offset += p.log_probs.shape[0]
        for f in fields(Rollout):
            vals = [getattr(p, f.name) for p in parts]
            out[f.name] = None if vals[0] is None else torch.cat(vals, 0)
        out["anchors"] = torch.cat(anchors, 0)
        return Rollout(**out)

    def index(self, idx) -> Rollout:
        """Rows idx; anchors keep their values (ids: equal id = shared forward)."""
        return Rollout(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
                for f in fields(Rollout)
            }
        )


def rollout_sigmas(adapter, cfg: Config, latents: Tensor) -> Tensor:
    """(T+1,) schedule of training rollouts: the model's own, or with `sampling.shift` > 0 the
    static shift s*sigma/(1+(s-1)*sigma) of linspace(1, 0, T+1) (DanceGRPO's and E-GRPO's
    FLUX sampler use s = 3)."""
    num_steps, shift = cfg.sampling.num_steps, cfg.sampling.shift
    if shift <= 0:
        return adapter.sigmas(num_steps, latents)
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigmas(base, shift).float().to(latents.device)


@contextlib.contextmanager
def shared_anchor_forward(adapter, anchor_ids: Tensor):
    """Inside the block, `adapter.velocity(x, sigma, embeds)` on B rows runs the transformer
    once per distinct anchor id (on the first row holding it, in row order) and gives every row
    its anchor's velocity. Rows with equal ids must hold equal x, sigma and prompt.

    This is how training runs ONE forward per (prompt, branch point) for branches that share
    their input latent: the SDE mean depends only on (x, v), so all G branches share it and
    their G stored targets are scored against one velocity. Gradients of the G rows flow back
    to the one forward. With all ids distinct it does nothing.
    """
    ids = anchor_ids.detach().cpu().long()
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    if uniq.numel() == ids.numel():
        yield
        return
    pos = torch.arange(ids.numel())
    first = torch.full((uniq.numel(),), ids.numel()).scatter_reduce(0, inverse, pos, "amin")
    if not bool((first[1:] > first[:-1]).all()):
        raise ValueError("anchor rows must come in row order (each anchor before its branches)")
    prev = adapter.__dict__.get("velocity")
    inner = adapter.velocity

    def velocity(latents: Tensor, sigma, embeds, *args, **kwargs) -> Tensor:
        if latents.shape[0] != ids.numel():
            raise ValueError(
                f"shared_anchor_forward was set up for {ids.numel()} rows, got {latents.shape[0]}"
            )
        dev = latents.device
        sig = torch.as_tensor(sigma)
        if sig.ndim == 1 and sig.numel() == ids.numel():
            sig = sig[first.to(sig.device)]
        v = inner(latents[first.to(dev)], sig, embeds.index(first), *args, **kwargs)
        return v[inverse.to(v.device)]

    adapter.velocity = velocity
    try:
        yield
    finally:
        if prev is None:
            del adapter.velocity
        else:
            adapter.velocity = prev


def _stored_step(step: SDEStep, x: Tensor, v: Tensor, sig, sig_next, a, kw, backend, means):
    """The drawn step as it is stored for training. With the triton backend its log-prob (and
    mean) are recomputed from the drawn x' by the fused kernel that re-scores it in training
    (`update.score_step`), so the first ratio is exactly 1 there too rather than 1 to float32
    rounding (flowpo.sde and the kernel round differently). x' itself, and so the trajectory,
    is the same for both backends."""
    if backend != "triton":
        return step
    from flowpo.kernels import fused_sde_step

    # float32 x as stored in the Rollout and as re-scoring reads it
    return fused_sde_step(x.float(), v, sig, sig_next, a, prev_sample=step.prev_sample,
                          mean_out=means, **kw)  # fmt: skip


def _step_kwargs(cfg: Config, sigmas: Tensor) -> dict:
    s = cfg.sampling
    return dict(
        sde_type=s.sde_type,
        reduce=s.logprob_reduce,
        sigma_max=float(sigmas[1]),  # Flow-SDE's substitute for sigma == 1 (Flow-GRPO)
        cps_legacy_scale=s.cps_legacy_scale,
    )


class _Store:
    """Collects the trained transitions, then stacks them into a Rollout."""

    def __init__(self, store_means: bool):
        self.cols: dict[str, list[Tensor]] = {
            k: [] for k in ("x", "xn", "lp", "mu", "s", "sn", "a", "anc")
        }
        self.store_means = store_means

    def add(self, x, step, sig, sig_next, a: float, anchors: Tensor) -> None:
        n = x.shape[0]
        c = self.cols
        c["x"].append(x.float())
        c["xn"].append(step.prev_sample)
        c["lp"].append(step.log_prob)
        if self.store_means:
            c["mu"].append(step.mean)
        c["s"].append(sig.float().reshape(-1).expand(n))
        c["sn"].append(sig_next.float().reshape(-1).expand(n))
        c["a"].append(torch.full((n,), float(a), device=x.device))
        c["anc"].append(anchors.to(x.device))

    def rollout(self, final_latents: Tensor) -> Rollout:
        c = self.cols
        st = lambda k: torch.stack(c[k], 1)  # noqa: E731
        return Rollout(
            latents=st("x"),
            next_latents=st("xn"),
            log_probs=st("lp"),
            sigmas=st("s"),
            sigmas_next=st("sn"),
            noise_levels=st("a"),
            anchors=st("anc"),
            final_latents=final_latents,
            means=st("mu") if self.store_means else None,
        )


@torch.no_grad()
def sample_rollout(
    adapter,
    embeds,
    plan: StepPlan,
    sigmas: Tensor,
    cfg: Config,
    generator: torch.Generator,
    latents: Tensor | None = None,
    *,
    store_means: bool | None = None,
    backend: str | None = None,
) -> Rollout:
    """Run one batch of B trajectories under `plan`; store the trained transitions.

    sigmas: (T+1,) schedule. embeds: B rows; for plans that share a prefix or an anchor, the
    G rows of a prompt are adjacent (G = rollout.group_size). latents: initial noise (one row
    per trajectory that starts from noise: B, or B / G when shared). store_means: keep the
    SDE means (GRPO-Guard's mu_old); default train.ratio_norm. backend: "torch" | "triton",
    that of the re-scoring (the trainer's); None resolves train.kernels for the adapter's
    device, as `update.rescore` does. The log-probs (and means) stored here are recomputed at
    training with the same function, latents, sigmas and batch, so the first ratio is exactly 1.
    """
    if store_means is None:
        store_means = cfg.train.ratio_norm
    if backend is None:
        from flowpo.kernels import resolve_backend

        backend = resolve_backend(cfg.train.kernels, adapter.device)
    if len(sigmas) - 1 != plan.num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps, the schedule {len(sigmas) - 1}")
    if plan.branch_each or plan.branch_step is not None:
        g = cfg.rollout.group_size
        if len(embeds) % g:
            raise ValueError(f"batch ({len(embeds)}) must hold whole groups of G = {g}")
    fn = _sample_anchored if plan.branch_each else _sample_trajectories
    return fn(adapter, embeds, plan, sigmas, cfg, generator, latents, store_means, backend)


def _sample_trajectories(adapter, embeds, plan, sigmas, cfg, gen, latents, store_means, backend):
    """full / window / branch: walk the steps; with branch_step, the prefix runs on one row per
    prompt and forks into G rows at that step (its forward, too, runs once per prompt)."""
    n, g = len(embeds), cfg.rollout.group_size
    shared = plan.branch_step is not None
    rows = n // g if shared else n
    emb = embeds.index(list(range(0, n, g))) if shared else embeds
    x = adapter.initial_noise(rows, gen) if latents is None else latents
    own = torch.arange(n)
    kw, store, trained = _step_kwargs(cfg, sigmas), _Store(store_means), set(plan.trained)
    for k, k_next, is_sde in plan.walk():
        sig, sig_next = sigmas[k].expand(x.shape[0]), sigmas[k_next].expand(x.shape[0])
        v = adapter.velocity(x, sig, emb)
        anchors = own
        if shared and k == plan.branch_step:
            x, v, emb = x.repeat_interleave(g, 0), v.repeat_interleave(g, 0), embeds
            sig, sig_next = sigmas[k].expand(n), sigmas[k_next].expand(n)
            anchors = own // g * g  # the G branches share this step's input and forward
        if not is_sde:
            x = ode_step(x, v, sig, sig_next)
            continue
        a = plan.noise_level[k]
        step = sde_step_with_logprob(x, v, sig, sig_next, a, generator=gen, **kw)
        if k in trained:
            stored = _stored_step(step, x, v, sig, sig_next, a, kw, backend, store_means)
            store.add(x, stored, sig, sig_next, a, anchors)
        x = step.prev_sample
    return store.rollout(x.unsqueeze(1))


def _ode_to_end(adapter, x: Tensor, sigmas: Tensor, start: int, embeds) -> Tensor:
    n = x.shape[0]
    for k in range(start, len(sigmas) - 1):
        v = adapter.velocity(x, sigmas[k].expand(n), embeds)
        x = ode_step(x, v, sigmas[k].expand(n), sigmas[k + 1].expand(n))
    return x


def _sample_anchored(adapter, embeds, plan, sigmas, cfg, gen, latents, store_means, backend):
    """entropy (E-GRPO): one ODE anchor per prompt; at every SDE transition k -> k + l, its G
    branches take that one step from the anchor latent (with the anchor's velocity) and
    continue by ODE to the end: one image per (sample, transition)."""
    n, g = len(embeds), cfg.rollout.group_size
    p = n // g
    heads = list(range(0, n, g))
    emb_p = embeds.index(heads)
    x = adapter.initial_noise(p, gen) if latents is None else latents
    anchors = torch.arange(n) // g * g
    kw, store, finals = _step_kwargs(cfg, sigmas), _Store(store_means), []
    for k in range(plan.trained[-1] + 1):  # the anchor is not needed past the last branch point
        v = adapter.velocity(x, sigmas[k].expand(p), emb_p)
        if plan.sde[k]:
            k_next, a = k + plan.span[k], plan.noise_level[k]
            xr, vr = x.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
            sig, sig_next = sigmas[k].expand(n), sigmas[k_next].expand(n)
            step = sde_step_with_logprob(xr, vr, sig, sig_next, a, generator=gen, **kw)
            stored = _stored_step(step, xr, vr, sig, sig_next, a, kw, backend, store_means)
            store.add(xr, stored, sig, sig_next, a, anchors)
            finals.append(_ode_to_end(adapter, step.prev_sample, sigmas, k_next, embeds))
        x = ode_step(x, v, sigmas[k].expand(p), sigmas[k + 1].expand(p))
    return store.rollout(torch.stack(finals, 1))


def forward_rows(plan: StepPlan, batch: int, group_size: int) -> dict[str, int]:
    """Transformer rows (images through one forward, before CFG doubling) that one sampling
    batch of `batch` samples costs: `sample` at sampling, `train` forward(+backward) at
    training (one forward per trained column over the distinct anchors). Mirrors the sampler;
    the denoising-reduction benchmark predicts speedups from it and a test checks it against
    counted forward calls."""
    n, g = batch, group_size
    t_steps = plan.num_steps
    if plan.branch_each:
        sample = (plan.trained[-1] + 1) * (n // g)
        sample += sum((t_steps - k - plan.span[k]) * n for k in plan.trained)
        return {"sample": sample, "train": len(plan.trained) * (n // g)}
    sample = 0
    for k, _, _ in plan.walk():
        shared = plan.branch_step is not None and k <= plan.branch_step
        sample += n // g if shared else n
    train = sum(n // g if k == plan.branch_step else n for k in plan.trained)
    return {"sample": sample, "train": train}


@torch.no_grad()
def sample_ode(adapter, embeds, num_steps: int, seeds: list[int]) -> torch.Tensor:
    """Deterministic evaluation samples: ODE at every step, initial noise from per-image seeds.

    Returns images (B, 3, H, W) in [0, 1]; the same (prompt, seed) always gives the same image.
    """
    noise = torch.cat([adapter.initial_noise(1, torch.Generator().manual_seed(sd)) for sd in seeds])
    x = noise
    sigmas = adapter.sigmas(num_steps, x)
    n = x.shape[0]
    for k in range(num_steps):
        v = adapter.velocity(x, sigmas[k].expand(n), embeds)
        x = ode_step(x, v, sigmas[k].expand(n), sigmas[k + 1].expand(n))
    return adapter.decode(x)
