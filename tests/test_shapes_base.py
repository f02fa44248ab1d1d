"""The committed shapes-world base keeps the properties the learning issue asks of it, on a fixed
small evaluation (every held-out prompt x 4 seeds, CFG 3, the default recipe's sampler), so a
future change of the base (or of the world, detector or sampler) cannot silently break them:

- it draws shapes: at least 90% of the detected objects are recognised as a vocabulary shape;
- it follows the prompt's words: colors at least 60% (measured 75% on this evaluation);
  single_object at least 35% (measured 50%: the committed base often draws nothing for a
  one-object prompt, short of the issue's 70%; docs/results.md says so);
- it leaves room for RL: overall strict accuracy below 60% (measured 42.7%), and no tag at 0%.

The evaluation is deterministic, so these bounds only move when the base, world, detector or
sampler change; each sits about one binomial standard error of its tag below the measured value.
"""

import json

import pytest

from tests.conftest import flowpo_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("base_eval")
    # CFG 3, as Flow-GRPO samples (configs/shapes.yaml); the default job's DiffusionNFT recipe
    # evaluates CFG-free, where the base scores lower (docs/results.md)
    proc = flowpo_main(
        "eval", "-c", "configs/shapes.yaml", "--eval.seeds=0,1,2,3", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())


def test_base_draws_recognisable_shapes(base_eval):
    found = base_eval["eval/shapes/recognised_mean"]
    comps = base_eval["eval/shapes/components_mean"]
    assert comps > 0.5, f"the base draws almost nothing: {comps:.2f} objects per image"
    assert found / comps >= 0.9, f"only {found / comps:.1%} of the drawn objects are shapes"


def test_base_follows_single_words_and_leaves_room(base_eval):
    acc = {k.split("/")[-1]: v for k, v in base_eval.items() if k.startswith("eval/acc/")}
    assert acc["single_object"] >= 0.35, acc
    assert acc["colors"] >= 0.6, acc
    assert acc["overall"] < 0.6, acc
    zero = [t for t, v in acc.items() if v == 0.0]
    assert not zero, f"tags at 0%: {zero} ({acc})"
