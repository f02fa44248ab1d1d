"""The committed shapes-world base keeps the properties the learning issue asks of it, on the
default job's own held-out evaluation (31 prompts x 17 seeds = 527 CFG-free ODE samples, about
a minute), so a future change of the base (or of the world, detector or sampler) cannot silently
break them. The bounds are the issue's bars, not fitted to the base:

- it draws shapes: at least 90% of the detected objects are recognised as a vocabulary shape
  (measured 90.7%);
- it follows the prompt's words: single_object and colors each at least 70% (measured 96.1% and
  71.8%);
- it leaves room for RL: overall strict accuracy (GenEval's tag mean) between 25% and 60%
  (measured 50.5%), and no tag at 0% (the lowest, color_attr, 16.2%).

The evaluation is deterministic on a host (the same numbers with 1 and 2 threads, in the job and
in `flowpo eval`). The thinnest margins are colors (61 of 85 samples, 1 above the bar) and the
recognised fraction (0.7 points above): a host whose floating point differs may move them, and a
failure here then says which property the base no longer meets (docs/results.md, "The binding
base").
"""

import json

import pytest

from tests.conftest import flowpo_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("base_eval")
    proc = flowpo_main("eval", "--out", str(out))  # the default recipe, configs/shapes_nft.yaml
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    assert result["num_samples"] == 527
    return result


def test_base_draws_recognisable_shapes(base_eval):
    found = base_eval["eval/shapes/recognised_mean"]
    comps = base_eval["eval/shapes/components_mean"]
    assert comps > 1.0, f"the base draws almost nothing: {comps:.2f} objects per image"
    assert found / comps >= 0.9, f"only {found / comps:.1%} of the drawn objects are shapes"


def test_base_follows_single_words_and_leaves_room(base_eval):
    acc = {k.split("/")[-1]: v for k, v in base_eval.items() if k.startswith("eval/acc/")}
    assert acc["single_object"] >= 0.7, acc
    assert acc["colors"] >= 0.7, acc
    assert 0.25 <= acc["overall"] <= 0.6, acc
    zero = [t for t, v in acc.items() if v == 0.0]
    assert not zero, f"tags at 0%: {zero} ({acc})"
