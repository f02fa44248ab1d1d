"""`shapes`: the shapes-world GenEval score (flowpo/tasks/shapes). Training score = GenEval-rule
partial credit; `details["strict"]` = strict correctness (1/0) used for evaluation."""

from __future__ import annotations

import torch

from flowpo.rewards.base import RewardOutput, register_reward, to_uint8_hwc


@register_reward("shapes")
def shapes_reward(position_failure_point: bool = False):
    from flowpo.tasks.shapes.detect import detect, score

    def fn(images, prompts, metadata) -> RewardOutput:
        partial, strict = [], []
        for img, prompt, meta in zip(to_uint8_hwc(images), prompts, metadata):
            if not meta or "include" not in meta:
                raise ValueError(
                    f"reward 'shapes' needs GenEval metadata for prompt {prompt!r}; use "
                    "rollout.prompt_file=shapes:train (or a GenEval-style .jsonl)"
                )
            ok, sc, _ = score(detect(img), meta, position_failure_point=position_failure_point)
            partial.append(sc)
            strict.append(float(ok))
        return RewardOutput(
            scores=torch.tensor(partial, dtype=torch.float32),
            details={"strict": torch.tensor(strict, dtype=torch.float32)},
        )

    return fn
