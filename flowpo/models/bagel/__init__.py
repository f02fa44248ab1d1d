"""Bagel-7B-MoT (ByteDance-Seed) image generation: flowpo's own MoT implementation
(`modeling.py`), the official checkpoint layout (`checkpoint.py`), the adapter registered as
family `bagel` (`adapter.py`) and the tiny model writer (`tiny.py`). Importing the package
registers the adapter and imports torch only; transformers and diffusers load with a model."""

from flowpo.models.bagel.adapter import BAGEL_LORA_TARGETS, BagelAdapter

__all__ = ["BAGEL_LORA_TARGETS", "BagelAdapter"]
