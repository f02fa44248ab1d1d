"""Fused Triton kernels for re-scoring stored SDE steps, and their torch references.

Public API (docs/algorithms.md §1, §5):
- `sde_step_logprob(sample, velocity, prev_sample, sigma, sigma_next, noise_level, *, sde_type,
  reduce, sigma_max, mean_out, cps_legacy_scale)` -> log_prob (B,) [, mean]; grad into velocity.
- `guard_clipped_loss(velocity, sample, prev_sample, mean_old, sigma, sigma_next, noise_level,
  advantages, clip_low, clip_high, *, sde_type, gradient_reweight, sigma_max)` -> (loss, stats):
  GRPO-Guard's RatioNorm clipped objective with its backward into velocity.
- `resolve_backend(train.kernels, device)` -> "triton" | "torch"; `fused_sde_step`, the
  kernel-backed drop-in for `flowpo.sde.sde_step_with_logprob` used by the trainer.
- `reference`: the torch versions of both ops (float32 or float64), which the tests and
  benchmarks compare against.

The plain (non-Guard) clipped objective stays in torch (`trainer.losses.clipped_policy_loss`):
it is per sample, not per element, so a kernel would save nothing.

Layout (Liger-Kernel style): private `@triton.jit` kernels, launchers (`*_forward`,
`*_backward`) and one `torch.autograd.Function` per op, in `sde_logprob.py` and `guard_loss.py`.
Triton is imported only by those modules and `_common.py`, and only when one of the two kernel
ops is first used (this package's `__getattr__`): `import flowpo.kernels` and the torch backend
work without a working Triton. On CPU the kernels run in Triton's interpreter, which must be
switched on (TRITON_INTERPRET=1) before they are imported.
"""

from __future__ import annotations

from flowpo.kernels.dispatch import KERNEL_MODES, fused_sde_step, resolve_backend

__all__ = [
    "KERNEL_MODES",
    "fused_sde_step",
    "guard_clipped_loss",
    "resolve_backend",
    "sde_step_logprob",
]

_LAZY = {
    "sde_step_logprob": "flowpo.kernels.sde_logprob",
    "guard_clipped_loss": "flowpo.kernels.guard_loss",
}


def __getattr__(name: str):
    if name in _LAZY:  # importing these runs @triton.jit (see the module docstring)
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flowpo.kernels' has no attribute {name!r}")
