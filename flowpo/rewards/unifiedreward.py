"""`unifiedreward`: a VLM judge (e.g. UnifiedReward-qwen, Wang et al. 2025, arXiv 2503.05236)
served behind an OpenAI-compatible chat endpoint (sglang or vLLM: `/v1/chat/completions`).

Each image goes as a base64 PNG data URL with a judge prompt asking for a 1-5 rating on
prompt alignment and quality ending in "Final Score: N"; temperature 0. The score is N / 5.
Two prompts (`prompt_template`): `flow_grpo` (default), the question Flow-GRPO's trainer sends,
with its 512x512 resize of every image, so that scores compare with published numbers; and
`flowpo`, our own wording (images as generated). A custom template with `{prompt}` works too.
An answer without a parseable final score is an error for that sample: its score is NaN, the
count is in `details["unparseable"]`, and the reward's failure policy decides (raise, by
default, or mask) — it never silently becomes 0. Requests run `max_concurrency` at a time,
each with `timeout_s`, retried (timeouts, connection errors, 5xx) until `deadline_s`.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from flowpo.rewards.client import JsonHttp, RewardServiceError, encode_png
from flowpo.rewards.contract import RewardOutput, to_uint8_hwc

# Our wording of a pointwise judging instruction in UnifiedReward's answer format.
JUDGE_PROMPT = (
    "You are shown an image generated from the text prompt below. Judge it on two criteria:\n"
    "1. Alignment: does the image show every object, attribute, count, spatial relation and "
    "piece of text the prompt asks for?\n"
    "2. Quality: is the image coherent, detailed and free of artifacts and distortions?\n"
    "Reason briefly, then end with a line 'Final Score: N' where N is an integer from 1 "
    "(poor) to 5 (excellent).\n"
    "Prompt: {prompt}"
)
# Flow-GRPO's judge question, the published text (yifan123/flow_grpo, flow_grpo/rewards.py,
# `unifiedreward_score_sglang`); the caption goes inside the brackets. That client also resizes
# every image to 512x512 before sending it (FLOW_GRPO_IMAGE_SIZE).
FLOW_GRPO_JUDGE_PROMPT = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your "
    "task is to evaluate this image based on two key criteria:\n1. Alignment with the Caption: "
    "Assess how well this image aligns with the provided caption. Consider the accuracy of "
    "depicted objects, their relationships, and attributes as described in the caption.\n2. "
    "Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, "
    "assign a score from 1 to 5 after 'Final Score:'.\nYour task is provided as follows:\nText "
    "Caption: [{prompt}]"
)
FLOW_GRPO_IMAGE_SIZE = 512
# prompt_template names -> (template, image side the judge gets; 0 = as generated)
JUDGE_PROMPTS = {
    "flow_grpo": (FLOW_GRPO_JUDGE_PROMPT, FLOW_GRPO_IMAGE_SIZE),
    "flowpo": (JUDGE_PROMPT, 0),
}
_FINAL = re.compile(r"final\s*score\s*[:：]\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


def parse_final_score(text: str, max_score: float = 5.0) -> float:
    """The last "Final Score: N" in `text`, divided by max_score; NaN if absent or out of
    [0, max_score] (a judge that answers 7/5 is not to be trusted either)."""
    found = _FINAL.findall(text or "")
    if not found:
        return math.nan
    value = float(found[-1])
    return value / max_score if 0 <= value <= max_score else math.nan


def unifiedreward(
    api_url: str = "",
    model: str = "UnifiedReward",
    api_key_env: str = "",
    timeout_s: float = 120.0,
    deadline_s: float = 900.0,
    max_concurrency: int = 8,
    max_tokens: int = 512,
    prompt_template: str = "flow_grpo",
    image_size: int = -1,
):
    """prompt_template: `flow_grpo` (Flow-GRPO's published judge question), `flowpo` (ours), or
    a template with `{prompt}`. image_size: the square side images are resized to before they
    are sent; -1 = the named prompt's (flow_grpo 512, as published; otherwise as generated),
    0 = as generated."""
    # `api_url`, not `url`: reward.options.<name>.url routes a reward through a flowpo service
    raise_if_missing(api_url)
    template, size = resolve_prompt(prompt_template, image_size)
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        raise ValueError(f"unifiedreward: environment variable {api_key_env} is unset")
    http = JsonHttp(
        api_url,
        who="reward 'unifiedreward' judge",
        token=key,
        timeout_s=timeout_s,
        deadline_s=deadline_s,
        deadline_field="reward.options.unifiedreward.deadline_s",
    )

    # shared by every call: the trainer's scoring threads together stay within max_concurrency
    slots = threading.BoundedSemaphore(max_concurrency)

    def ask(args: tuple[str, str]) -> tuple[float, str]:
        png, prompt = args
        payload = {
            "model": model,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                        {"type": "text", "text": template.format(prompt=prompt)},
                    ],
                }
            ],
        }
        with slots:
            data = http.post("/v1/chat/completions", payload)
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RewardServiceError(
                f"reward 'unifiedreward': judge at {api_url} answered without choices[0].message"
            ) from None
        return parse_final_score(text if isinstance(text, str) else ""), text

    def fn(images, prompts, metadata) -> RewardOutput:
        pngs = resized_pngs(images, size) if size else encode_png(images)
        with ThreadPoolExecutor(max(1, min(max_concurrency, len(pngs)))) as pool:
            results = list(pool.map(ask, zip(pngs, prompts)))
        scores = torch.tensor([s for s, _ in results], dtype=torch.float32)
        return RewardOutput(
            scores=scores, details={"unparseable": (~torch.isfinite(scores)).float()}
        )

    fn.http = http  # for tests and logs: attempts / retries
    return fn


def resized_pngs(images: torch.Tensor, size: int) -> list[str]:
    """(B, 3, H, W) float [0, 1] -> base64 PNGs of size x size: the uint8 image resized by PIL
    (bicubic, its default for RGB), as the published client does before sending."""
    from PIL import Image

    out = []
    for arr in to_uint8_hwc(images):
        img = Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def resolve_prompt(prompt_template: str, image_size: int = -1) -> tuple[str, int]:
    """(template, image side) for the factory's options; ValueError naming the option."""
    if prompt_template in JUDGE_PROMPTS:
        template, size = JUDGE_PROMPTS[prompt_template]
    elif "{prompt}" in prompt_template:
        template, size = prompt_template, 0
    else:
        raise ValueError(
            f"unifiedreward: prompt_template {prompt_template!r} is neither one of "
            f"{', '.join(JUDGE_PROMPTS)} nor a template with {{prompt}}"
        )
    if image_size < -1:
        raise ValueError(f"unifiedreward: image_size ({image_size}) must be -1, 0 or a side")
    return template, size if image_size == -1 else image_size


def raise_if_missing(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError(
            "unifiedreward: set the judge's OpenAI-compatible base address, e.g. "
            "reward.options.unifiedreward.api_url=http://127.0.0.1:30000 (got "
            f"{url!r})"
        )
