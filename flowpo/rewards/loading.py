"""Loading published reward checkpoints safely, and the CLIP-style image preprocessing that
HPS-v2 and ImageReward share.

`load_state_file` reads a `.safetensors` file, or a torch pickle through
`torch.load(weights_only=True)`: tensors, dicts, lists and numbers only, so a checkpoint that
needs code to unpickle is refused instead of running that code. Errors name the reward option
(`reward.options.<reward>.<option>`) and the fix.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from flowpo.rewards.contract import to_uint8_hwc

# CLIP's normalisation (OpenAI), used by open_clip's ViT-H-14 transform and by ImageReward
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_state_file(path: str, where: str, fix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file; `where` is the option (`reward.options.hpsv2.checkpoint`),
    `fix` says where the file comes from. A `{"state_dict": {...}}` wrapper is unwrapped."""
    p = Path(path)
    if not path or not p.is_file():
        raise ValueError(f"{where}: no checkpoint file at '{path}'; {fix}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0][:200]
            raise ValueError(
                f"{where}: '{path}' is a pickle that needs code to load, and flowpo loads only "
                f"tensors (torch.load(weights_only=True) refused it: {first}). In an "
                "environment you trust, load it once and save its state dict of tensors "
                "(torch.save(state_dict, ...) or safetensors.torch.save_file), then point "
                f"{where} at that file"
            ) from None
        except Exception as e:  # not a torch file at all
            raise ValueError(
                f"{where}: '{path}' is not a torch or safetensors checkpoint "
                f"({type(e).__name__}: {str(e)[:200]}); {fix}"
            ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: '{path}' holds no state dict of tensors; {fix}")
    return state


def clip_preprocess(
    images: torch.Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD
) -> torch.Tensor:
    """(B, 3, H, W) floats in [0, 1] -> (B, 3, size, size) normalised, as CLIP's eval transform
    does on a PIL image: bicubic resize of the short side to `size` (PIL, antialiased), centre
    crop, /255, (x - mean) / std. The images go through uint8 first, as a saved PNG would."""
    from PIL import Image

    out = []
    for arr in to_uint8_hwc(images):
        img = Image.fromarray(arr)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # torchvision's Resize(int) rounding
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BICUBIC)
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
