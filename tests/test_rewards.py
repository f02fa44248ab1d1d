"""Rewards: rules (OCR distance, GenEval on synthetic detections, group normalisation), every
model reward's plumbing with tiny random models saved to local directories, OCR end to end
through the bundled OCR models, options validation and the failure policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowpo.config import ConfigError, load_config
from flowpo.rewards.base import (
    RewardError,
    RewardOutput,
    WeightedReward,
    build_reward,
    group_normalized_total,
    register_reward,
)
from flowpo.trainer.preflight import preflight

# -- OCR rule --------------------------------------------------------------------------------


def test_levenshtein_known_distances():
    from flowpo.rewards.ocr import levenshtein

    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_ocr_rule_substring_case_spaces_and_cap():
    from flowpo.rewards.ocr import ocr_score, target_text

    assert target_text('a sign that says "Fresh Bread" and "x"') == "Fresh Bread"
    assert ocr_score("WELCOME TO THE FRESHBREAD shop", "Fresh Bread") == 1.0  # substring
    assert ocr_score("Fresh Brcad", "Fresh Bread") == pytest.approx(1 - 1 / 10)
    assert ocr_score("", "open") == 0.0  # distance capped at the target length
    assert ocr_score("something much longer entirely", "open") == 0.0
    with pytest.raises(ValueError, match="double quotes"):
        target_text("a sign without quotes")


def _text_image(text: str, size=(512, 160)) -> torch.Tensor:
    img = Image.new("RGB", size, "white")
    font = ImageFont.load_default(size=56)
    ImageDraw.Draw(img).text((24, 40), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_ocr_end_to_end_with_bundled_models():
    fn = build_reward("ocr")
    x = torch.stack([_text_image("Hello World"), _text_image("OPEN 24 HOURS")])
    prompts = ['a neon sign reading "hello world"', 'a shop sign that says "Closed"']
    out = fn(x, prompts, [{}, {}])
    assert out.scores[0] >= 0.9, out.scores
    assert out.scores[1] <= 0.5, out.scores
    assert out.details["strict"][1] == 0.0


# -- GenEval rules on synthetic detections ---------------------------------------------------


def det(cls, box, color="", score=0.95):
    return {"class": cls, "box": box, "color": color, "score": score}


def test_geneval_counting_needs_exact_count_and_threshold():
    from flowpo.rewards.geneval import judge, select

    meta = {
        "tag": "counting",
        "include": [{"class": "cat", "count": 2}],
        "exclude": [{"class": "cat", "count": 3}],
    }
    two = [det("cat", (0, 0, 4, 4)), det("cat", (10, 0, 14, 4))]
    assert judge(two, meta)[:2] == (True, 1.0)
    three = two + [det("cat", (20, 0, 24, 4))]
    ok, partial, reasons = judge(three, meta)
    assert not ok and partial == 0.5 and "cat<3" in reasons[0]
    # a weak third detection is dropped by the counting threshold 0.9, not by 0.3
    weak = two + [det("cat", (20, 0, 24, 4), score=0.5)]
    assert judge(select(weak, 0.9), meta)[0] and not judge(select(weak, 0.3), meta)[0]
    # at most 16 per class, most confident first
    many = [det("dog", (i, 0, i + 1, 1), score=0.4 + i / 100) for i in range(20)]
    kept = select(many, 0.3)
    assert len(kept) == 16 and kept[0]["score"] == max(d["score"] for d in many)


def test_geneval_colour_position_and_partial_credit():
    from flowpo.rewards.geneval import colour_needs, judge

    meta = {
        "tag": "position",
        "include": [
            {"class": "cat", "count": 1, "color": "red"},
            {"class": "dog", "count": 1, "position": ["right of", 0]},
        ],
    }
    assert colour_needs(meta) == {"cat": 1}
    cat = det("cat", (0, 20, 10, 30), "red")
    dog_right, dog_left = det("dog", (40, 20, 50, 30)), det("dog", (0, 40, 6, 46))
    assert judge([cat, dog_right], meta) == (True, 1.0, [])
    ok, partial, _ = judge([cat, dog_left], meta)
    assert not ok and partial == pytest.approx(3 / 4)  # count, colour, count ok; position not
    # Flow-GRPO's published score still adds a point after a failed position check
    assert judge([cat, dog_left], meta, position_failure_point=True)[1] == 1.0
    blue = dict(cat, color="blue")
    ok, partial, reasons = judge([blue, dog_right], meta)
    # colour fails -> the clause does not match -> the dog has no reference to be right of
    assert not ok and partial == pytest.approx(2 / 4) and "no target" in reasons[-1]
    assert judge([dog_right], meta)[1] == pytest.approx(1 / 4)


def test_geneval_masked_crop_and_mask_box():
    from flowpo.rewards.geneval import BGCOLOR, mask_box, masked_crop

    img = np.full((8, 8, 3), 7, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 3:6] = True
    mask[5, 3] = True
    box = mask_box(mask)
    assert box == (3, 2, 6, 6) and mask_box(np.zeros((4, 4), bool)) is None
    crop = masked_crop(img, mask, box)
    assert crop.shape == (4, 3, 3)
    assert (crop[0, 0] == 7).all() and (crop[3, 1] == BGCOLOR).all()


# -- model rewards with tiny random models ---------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from flowpo.rewards.tiny import make_tiny_aesthetic

    return make_tiny_aesthetic(str(tmp_path_factory.mktemp("clip")))


def _cosine(model_dir, x, prompts):
    from flowpo.rewards.clip_rewards import clip_cosine, load_clip

    model, proc = load_clip(model_dir, device="cpu")
    return model, clip_cosine(model, proc, x, prompts)[0]


def test_pickscore_and_clipscore_formulas(clip_dir):
    x = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    prompts = ["a red cat", "two dogs", "a blue car"]
    model, cos = _cosine(clip_dir, x, prompts)
    scale = float(model.logit_scale.exp())
    pick = build_reward("pickscore", model_dir=clip_dir)(x, prompts, [{}] * 3).scores
    pick26 = build_reward("pickscore", model_dir=clip_dir, scale_by_26=True)(x, prompts, [{}] * 3)
    torch.testing.assert_close(pick, scale * cos)
    torch.testing.assert_close(pick26.scores, scale * cos / 26)
    clips = build_reward("clipscore", model_dir=clip_dir)(x, prompts, [{}] * 3).scores
    torch.testing.assert_close(clips, 2.5 * cos.clamp_min(0))
    assert (cos.abs() <= 1).all() and cos.unique().numel() == 3


def test_aesthetic_head_from_safetensors_and_pth(clip_dir, tmp_path):
    from safetensors.torch import load_file

    from flowpo.rewards.aesthetic import AestheticHead
    from flowpo.rewards.clip_rewards import load_clip

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = build_reward("aesthetic", model_dir=clip_dir)(x, ["", ""], [{}, {}]).scores
    # recompute by hand: normalised CLIP image embedding through the published layer layout
    state = load_file(f"{clip_dir}/aesthetic_head.safetensors")
    assert sorted({k.split(".")[1] for k in state}) == ["0", "2", "4", "6", "7"]
    model, proc = load_clip(clip_dir, device="cpu")
    from flowpo.rewards.base import to_uint8_hwc

    pix = proc(images=to_uint8_hwc(x), return_tensors="pt")["pixel_values"]
    emb = model.get_image_features(pixel_values=pix)
    emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
    head = AestheticHead(8)
    head.load_state_dict(state)
    with torch.no_grad():
        want = head.eval()(torch.nn.functional.normalize(emb, dim=-1))
    torch.testing.assert_close(out, want)
    # the published .pth layout loads too (tensors only: weights_only=True)
    pth = tmp_path / "head.pth"
    torch.save(state, pth)
    again = build_reward("aesthetic", model_dir=clip_dir, head=str(pth))(x, ["", ""], [{}, {}])
    torch.testing.assert_close(again.scores, out)
    with pytest.raises(ValueError, match="does not fit"):
        torch.save({"layers.0.weight": torch.zeros(3, 3)}, pth)
        build_reward("aesthetic", model_dir=clip_dir, head=str(pth))


def test_geneval_plumbing_with_tiny_mask2former(clip_dir, tmp_path):
    from flowpo.rewards.tiny import make_tiny_mask2former
    from flowpo.tasks.geneval_prompts import generate_geneval

    det_dir = make_tiny_mask2former(str(tmp_path / "m2f"))
    metas = generate_geneval(1, seed=0)
    x = torch.rand(len(metas), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    # threshold 0: the random detector's detections all pass, so colours get classified
    fn = build_reward(
        "geneval", model_dir=det_dir, clip_dir=clip_dir, threshold=0.0, counting_threshold=0.0
    )
    out = fn(x, [m["prompt"] for m in metas], metas)
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    assert set(out.details["strict"].tolist()) <= {0.0, 1.0}
    assert (out.details["detections"] > 0).all()
    # strict correctness implies full partial credit
    assert (out.scores[out.details["strict"] == 1] == 1).all()
    with pytest.raises(ValueError, match="GenEval metadata"):
        fn(x[:1], ["a cat"], [{}])
    with pytest.raises(ValueError, match="unicorn"):
        fn(x[:1], ["a unicorn"], [{"include": [{"class": "unicorn", "count": 1}]}])


def test_published_rewards_without_their_files_stop_at_preflight():
    """hpsv2 / imagereward (tests/test_rewards_published.py) need local checkpoint files: the
    options are checked before training and name what to set."""
    with pytest.raises(ConfigError, match=r"imagereward.*needs \['checkpoint', 'tokenizer_dir'\]"):
        preflight(load_config(None, ["--reward.weights=imagereward:1"]))
    with pytest.raises(ValueError, match=r"reward\.options\.hpsv2\.checkpoint: no checkpoint"):
        build_reward("hpsv2", checkpoint="/nowhere/HPS_v2.1_compressed.pt", device="cpu")


def test_every_builtin_reward_name_resolves_to_its_factory():
    """The registry lists the built-ins as "module:function" strings (listing them imports
    nothing); each must resolve to a callable factory."""
    from flowpo.rewards.registry import REWARD_REGISTRY, known_rewards, reward_factory

    assert {"geneval", "ocr", "pickscore", "shapes", "unifiedreward"} <= set(known_rewards())
    for name in known_rewards():
        assert callable(reward_factory(name)) and not isinstance(REWARD_REGISTRY[name], str)


# -- options, failure policy, group normalisation --------------------------------------------


def _flaky(fail_batches: int = 1):
    calls = {"n": 0}

    def fn(images, prompts, metadata):
        calls["n"] += 1
        if calls["n"] <= fail_batches:
            raise RuntimeError("service down")
        return RewardOutput(scores=torch.ones(images.shape[0]), details={"extra": torch.ones(2)})

    return fn


@pytest.fixture
def flaky_registered():
    from flowpo.rewards.base import REWARD_REGISTRY

    register_reward("_test_flaky")(_flaky)
    yield
    REWARD_REGISTRY.pop("_test_flaky")


def test_failure_policy_raise_and_mask(flaky_registered):
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardError, match="_test_flaky.*service down"):
        WeightedReward({"_test_flaky": 1.0})(x, ["a", "b"], [{}, {}])
    w = WeightedReward(
        {"_test_flaky": 1.0, "jpeg_compressibility": 0.0}, {"_test_flaky": {"failure": "mask"}}
    )
    first = w(x, ["a", "b"], [{}, {}])
    assert torch.isnan(first.scores).all() and first.details["_test_flaky/failed"].sum() == 2
    second = w(x, ["a", "b"], [{}, {}])
    assert torch.isfinite(second.scores).all() and second.details["_test_flaky/failed"].sum() == 0


def test_reward_options_are_validated_with_field_names():
    def check(*overrides):
        preflight(load_config(None, list(overrides)))

    check("--reward.weights=ocr:1", "--reward.options={ocr: {failure: mask}}")
    bad = [
        (["--reward.options={ocr: {failure: mask}}"], "reward.options.ocr: 'ocr' has no weight"),
        (["--reward.weights=ocr:1", "--reward.options={ocr: {failure: drop}}"], "failure"),
        (["--reward.weights=ocr:1", "--reward.options={ocr: {langs: en}}"], "ocr.langs"),
        (["--reward.weights=pickscore:1"], "needs \\['model_dir'\\]"),
        (
            ["--reward.weights=pickscore:1", "--reward.options={pickscore: {url: localhost:1}}"],
            "url 'localhost:1' must start with http",
        ),
        (
            [
                "--reward.weights=pickscore:1",
                "--reward.options={pickscore: {url: 'http://127.0.0.1:1', timeout_s: 0}}",
            ],
            "timeout_s",
        ),
        (
            [
                "--reward.weights=pickscore:1",
                "--reward.options={pickscore: {url: 'http://h:1', model_dir: /x}}",
            ],
            "pass them to `flowpo serve-reward`",
        ),
    ]
    for overrides, match in bad:
        with pytest.raises(ConfigError, match=match):
            check("--reward.weights=jpeg_compressibility:1", *overrides)


def test_group_normalisation_makes_weights_scale_free():
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    a = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    b = torch.tensor([0.1, 0.3, 0.2, 0.5, float("nan"), 0.4])
    total = group_normalized_total({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, groups)
    scaled = group_normalized_total({"a": a * 1000, "b": b}, {"a": 1.0, "b": 1.0}, groups)
    torch.testing.assert_close(total, scaled, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert math.isnan(total[4]) and torch.isfinite(total[[0, 1, 2, 3, 5]]).all()
    # each reward alone is centred within each group
    za = group_normalized_total({"a": a}, {"a": 1.0}, groups)
    assert abs(float(za[:3].sum())) < 1e-5 and abs(float(za[3:].sum())) < 1e-5
    # the NaN sample is left out of group 1's statistics of b: the other two are +-1
    zb = group_normalized_total({"b": b}, {"b": 1.0}, groups)
    assert zb[3].item() == pytest.approx(1.0, abs=1e-2) and zb[5].item() == pytest.approx(
        -1.0, abs=1e-2
    )
