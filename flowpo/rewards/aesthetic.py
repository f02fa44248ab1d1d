"""`aesthetic`: the LAION aesthetic predictor (Schuhmann et al., "improved aesthetic predictor",
the head DDPO and Flow-GRPO use): CLIP ViT-L/14 image embedding, L2-normalised, through an MLP
768-1024-128-64-16-1 (dropouts between the first four linears, no activations; scores ~1-10).

Expected files, all local:
- `model_dir`: a transformers CLIP ViT-L/14 directory (config.json, weights, processor files).
- `head`: the MLP weights; default `model_dir/aesthetic_head.safetensors` (or `.pth`). Keys are
  those of the published `sac+logos+ava1-l14-linearMSE.pth`: layers.{0,2,4,6,7}.{weight,bias}.
  A `.pth` is read with `torch.load(weights_only=True)` (tensors only, no code runs); converting
  it once to safetensors is preferred.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from flowpo.rewards.contract import RewardOutput, to_uint8_hwc


class AestheticHead(nn.Module):
    """The LAION head; `in_dim` is the CLIP projection size (768 for ViT-L/14)."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        # layer indices match the published state dict (dropouts at 1, 3, 5)
        self.layers = nn.Sequential(
            nn.Linear(in_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # (B, E) -> (B,)
        return self.layers(emb).squeeze(-1)


def load_head_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def find_head(model_dir: str, head: str) -> Path:
    if head:
        path = Path(head)
        if not path.is_file():
            raise ValueError(f"aesthetic head '{head}' does not exist")
        return path
    for name in ("aesthetic_head.safetensors", "aesthetic_head.pth"):
        path = Path(model_dir) / name
        if path.is_file():
            return path
    raise ValueError(
        f"no aesthetic head in {model_dir}: put the LAION MLP weights there as "
        "aesthetic_head.safetensors (or .pth), or set the reward option head=PATH"
    )


def aesthetic(model_dir: str, head: str = "", device: str = "", dtype: str = "float32"):
    from flowpo.rewards.clip_rewards import load_clip

    model, processor = load_clip(model_dir, "", device, dtype)
    dev = next(model.parameters()).device
    mlp = AestheticHead(model.config.projection_dim)
    state = load_head_state(find_head(model_dir, head))
    try:
        mlp.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"aesthetic head does not fit CLIP ({model_dir}): {e}") from None
    mlp = mlp.to(dev).eval().requires_grad_(False)

    @torch.no_grad()
    def fn(images, prompts, metadata) -> RewardOutput:
        pix = processor(images=to_uint8_hwc(images), return_tensors="pt")["pixel_values"]
        emb = model.get_image_features(pixel_values=pix.to(dev, next(model.parameters()).dtype))
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return RewardOutput(scores=mlp(emb).float().cpu())

    return fn
