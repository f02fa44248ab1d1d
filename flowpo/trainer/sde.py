"""The step math moved to `flowpo.sde` (below both the trainer and the kernels); this name
stays so that older imports keep working."""

from flowpo.sde import (
    REDUCE_MODES,
    SDE_TYPES,
    Scalar,
    SDEStep,
    calculate_shift,
    flux_time_shift,
    ode_step,
    sde_mean_std,
    sde_std,
    sde_step_with_logprob,
    shift_sigmas,
)

__all__ = [
    "REDUCE_MODES",
    "SDE_TYPES",
    "SDEStep",
    "Scalar",
    "calculate_shift",
    "flux_time_shift",
    "ode_step",
    "sde_mean_std",
    "sde_std",
    "sde_step_with_logprob",
    "shift_sigmas",
]
