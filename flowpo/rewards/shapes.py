"""`shapes`: the shapes-world GenEval score (flowpo/tasks/shapes). Training score = GenEval-rule
partial credit; `details["strict"]` = strict correctness (1/0) used for evaluation."""

from __future__ import annotations

import torch

from flowpo.rewards.base import RewardOutput, register_reward, to_uint8_hwc


@register_reward("shapes")
def shapes_reward(
    position_failure_point: bool = False, quality_weight: float = 0.0, exact_counts: bool = False
):
    """quality_weight > 0 adds a dense drawing-quality term (the fraction of drawn pixels in
    recognised shapes, `details["quality"]`) to the partial credit: GenEval's score is flat
    while shapes are too ragged to detect, the quality term grades that. exact_counts adds
    checks against extra objects to the partial credit (see `detect.score`); `strict` stays
    GenEval's rule, so evaluations are unchanged."""
    from flowpo.tasks.shapes.detect import detect_with_quality, score

    def fn(images, prompts, metadata) -> RewardOutput:
        partial, strict, quality = [], [], []
        for img, prompt, meta in zip(to_uint8_hwc(images), prompts, metadata):
            if not meta or "include" not in meta:
                raise ValueError(
                    f"reward 'shapes' needs GenEval metadata for prompt {prompt!r}; use "
                    "rollout.prompt_file=shapes:train (or a GenEval-style .jsonl)"
                )
            found, q = detect_with_quality(img)
            ok, sc, _ = score(
                found,
                meta,
                position_failure_point=position_failure_point,
                exact_counts=exact_counts,
            )
            partial.append(sc + quality_weight * q)
            strict.append(float(ok))
            quality.append(q)
        return RewardOutput(
            scores=torch.tensor(partial, dtype=torch.float32),
            details={
                "strict": torch.tensor(strict, dtype=torch.float32),
                "quality": torch.tensor(quality, dtype=torch.float32),
            },
        )

    return fn
