"""`shapes`: the shapes-world GenEval score. Training score = GenEval-rule partial credit;
`details["strict"]` = strict correctness (1/0) used for evaluation. Registered by name in
`flowpo.rewards.registry` (lazily), so the rewards package does not import the task."""

from __future__ import annotations

import torch

from flowpo.rewards.contract import RewardOutput, to_uint8_hwc


def shapes_reward(
    position_failure_point: bool = False,
    quality_weight: float = 0.0,
    exact_counts: bool = False,
    strict_weight: float = 0.0,
    excess_penalty: float = 0.0,
    graded: bool = False,
):
    """strict_weight > 0 adds that much for a strictly correct image (GenEval's rule) to the
    partial credit, so the reward separates "all checks but one" from "correct".
    quality_weight > 0 adds a dense drawing-quality term (the fraction of drawn pixels in
    recognised shapes, `details["quality"]`) to the partial credit: GenEval's score is flat
    while shapes are too ragged to detect, the quality term grades that. exact_counts adds
    checks against extra objects to the partial credit (see `geneval_rules.score`); `strict`
    stays GenEval's rule, so evaluations are unchanged. excess_penalty > 0 subtracts that much
    per recognised object beyond the number the prompt asks for: exact_counts checks each named
    class, but a policy could still gain partial credit by drawing more objects overall (on the
    world-v3 base, a window-plan run raised the excess from +0.17 to +0.57 objects per image
    with exact_counts alone; docs/results.md). The details also carry drawing
    statistics that evaluation reports to expose reward hacking: `excess_objects` (recognised
    objects minus the objects the prompt asks for), `components` and `recognised`.
    graded gives failed count and relation checks part of their point by how near they came
    (see `geneval_rules.score`): a dense signal for the relation and counting prompts, where a
    pass/fail check separates little within a group."""
    from flowpo.tasks.shapes.detect import analyse, score

    def fn(images, prompts, metadata) -> RewardOutput:
        partial, strict, quality, excess, comps, recog = [], [], [], [], [], []
        for img, prompt, meta in zip(to_uint8_hwc(images), prompts, metadata):
            if not meta or "include" not in meta:
                raise ValueError(
                    f"reward 'shapes' needs GenEval metadata for prompt {prompt!r}; use "
                    "rollout.prompt_file=shapes:train (or a GenEval-style .jsonl)"
                )
            found, stats = analyse(img)
            q = stats["quality"]
            ok, sc, _ = score(
                found,
                meta,
                position_failure_point=position_failure_point,
                exact_counts=exact_counts,
                graded=graded,
            )
            asked = sum(c["count"] for c in meta["include"])
            extra = len(found) - asked
            partial.append(
                sc + quality_weight * q + strict_weight * float(ok) - excess_penalty * max(extra, 0)
            )
            strict.append(float(ok))
            quality.append(q)
            excess.append(extra)
            comps.append(stats["components"])
            recog.append(stats["recognised"])
        return RewardOutput(
            scores=torch.tensor(partial, dtype=torch.float32),
            details={
                "strict": torch.tensor(strict, dtype=torch.float32),
                "quality": torch.tensor(quality, dtype=torch.float32),
                # drawing statistics (not rewarded): objects drawn beyond those asked for,
                # and the detector's components and how many of them are recognised shapes
                "excess_objects": torch.tensor(excess, dtype=torch.float32),
                "components": torch.tensor(comps, dtype=torch.float32),
                "recognised": torch.tensor(recog, dtype=torch.float32),
            },
        )

    return fn
