"""`imagereward`: not supported in this build.

ImageReward v1.0 (Xu et al. 2023, arXiv 2304.05977) ships as the `image-reward` package
(1.5; BLIP + MLP head in a pickled `ImageReward.pt`). Its loader (`ImageReward/utils.py`,
`models/BLIP/blip.py`) builds a BERT tokenizer by hub name
(`BertTokenizer.from_pretrained("bert-base-uncased")`), fetches `med_config.json` from the hub
unless given a path, unpickles the checkpoint with an unrestricted `torch.load`, and pins
`timm==0.6.13` and `fairscale==0.4.13`, which conflict with this stack. Rather than score with a half-working loader, building
this reward raises an error that says what to use instead.
"""

from __future__ import annotations

NOT_SUPPORTED = (
    "reward 'imagereward' is not supported: the ImageReward loader (package image-reward 1.5) "
    "fetches its BERT tokenizer from the hub at load time, unpickles its checkpoint, and pins "
    "timm/fairscale versions that conflict with flowpo's stack. Serve it yourself behind the flowpo reward "
    "protocol (POST /score, see docs/reward-service.md) and set "
    "reward.options.imagereward.url, or use pickscore / aesthetic / unifiedreward."
)


def imagereward(model_dir: str = "", **_: object):
    raise ValueError(NOT_SUPPORTED)


imagereward.unsupported = NOT_SUPPORTED  # config validation stops here, before training
