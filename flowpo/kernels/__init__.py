"""Fused Triton kernels (SDE-step log-probability, GRPO-Guard loss) and their torch references.

The trainer runs the torch reference path (`flowpo.trainer.sde`) until the kernels land; no
Triton import happens outside this package.
"""
