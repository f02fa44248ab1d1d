"""Shapes world: prompt generator and splits, renderer, detector and GenEval-rule scorer."""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flowpo.tasks.shapes.detect import detect, relative_position, score
from flowpo.tasks.shapes.world import (
    TAGS,
    Obj,
    all_prompts,
    draw,
    render,
    splits,
    validate_metadata,
)


def test_splits_are_disjoint_deterministic_and_cover_every_tag():
    a, b = splits(), splits()
    assert a == b
    train = {m["prompt"] for m in a["train"]}
    held = {m["prompt"] for m in a["heldout"]}
    assert not train & held
    assert train | held == {m["prompt"] for m in all_prompts()}
    for tag in TAGS:
        assert any(m["tag"] == tag for m in a["heldout"]), tag
        assert any(m["tag"] == tag for m in a["train"]), tag
    # every held-out word was seen in training prompts (held out = new combinations)
    words = {w for p in train for w in p.split()}
    assert all(w in words for p in held for w in p.split())


def test_heldout_split_spreads_the_score_over_prompts():
    """At least 3 held-out prompts per tag (no prompt carries a sixth of the overall), and the
    default job's evaluation has at least 500 (prompt, seed) samples."""
    from flowpo.config import load_config

    held = splits()["heldout"]
    for tag in TAGS:
        assert sum(m["tag"] == tag for m in held) >= 3, tag
    cfg = load_config("configs/shapes.yaml")
    assert cfg.eval.prompt_file == "shapes:heldout" and cfg.eval.num_prompts == 0
    assert len(held) * len(cfg.eval.seeds) >= 500


def test_shape_templates_separate_every_rendered_shape():
    """Each rendered shape at every size lies within SHAPE_DIST of its own 3x3 fill template
    and beyond it from every other template (so noise has room on both sides)."""
    from flowpo.tasks.shapes.detect import SHAPE_DIST, _tight, fill_grid, shape_templates
    from flowpo.tasks.shapes.world import MAX_SIDE, MIN_SIDE, SHAPES, shape_mask

    names, templates = shape_templates()
    assert names == SHAPES
    for s in SHAPES:
        for side in range(MIN_SIDE, MAX_SIDE + 1):
            g = fill_grid(_tight(shape_mask(s, side)))
            d = np.sqrt(((templates - g) ** 2).mean(1))
            own = d[names.index(s)]
            other = np.delete(d, names.index(s)).min()
            assert own <= 0.75 * SHAPE_DIST and other >= 1.3 * SHAPE_DIST, (s, side, own, other)


def test_noisy_captions_mis_describe_only_their_tags_at_their_rates():
    from flowpo.tasks.shapes.detect import analyse
    from flowpo.tasks.shapes.pretrain import CAPTION_NOISE, noisy_scene_meta

    rng = random.Random(0)
    for tag in TAGS:
        metas = [m for m in splits()["train"] if m["tag"] == tag]
        changed = 0
        for k in range(400):
            m = metas[k % len(metas)]
            n = noisy_scene_meta(m, rng, CAPTION_NOISE)
            changed += n != m
            if n == m:
                continue
            if tag == "position":  # placed freely: no position clause left
                assert all("position" not in c for c in n["include"])
            elif tag == "counting":  # off by one, never zero
                assert abs(n["include"][0]["count"] - m["include"][0]["count"]) == 1
                assert n["include"][0]["count"] >= 1
            elif tag == "color_attr":  # the two colours swapped
                assert [c["color"] for c in n["include"]] == [
                    c["color"] for c in m["include"][::-1]
                ]
            # the mis-described scene still renders and scores as its own description
            img = render(n, k)
            assert score(analyse(img)[0], n)[0]
        rate = CAPTION_NOISE.get(tag, 0.0)
        assert abs(changed / 400 - rate) < 0.08, (tag, changed / 400, rate)


def test_metadata_lines_validate_and_bad_ones_fail():
    for m in all_prompts():
        validate_metadata(m)
    with pytest.raises(ValueError, match="tag"):
        validate_metadata(
            {"tag": "nope", "prompt": "x", "include": [{"class": "circle", "count": 1}]}
        )
    with pytest.raises(ValueError, match="color"):
        validate_metadata(
            {
                "tag": "colors",
                "prompt": "x",
                "include": [{"class": "circle", "count": 1, "color": "pink"}],
            }
        )


def test_render_is_deterministic_per_prompt_and_seed():
    m = all_prompts()[0]
    assert (render(m, 3) == render(m, 3)).all()
    assert (render(m, 3) != render(m, 4)).any()


@pytest.mark.parametrize("tag", TAGS)
def test_scorer_is_right_on_rendered_ground_truth(tag):
    metas = [m for m in all_prompts() if m["tag"] == tag]
    results = [
        score(detect(render(m, s)), m) for m in metas for s in range(max(4, 240 // len(metas)))
    ]
    strict = [ok for ok, _, _ in results]
    assert sum(strict) / len(strict) >= 0.99
    assert all(sc == 1.0 for ok, sc, _ in results if ok)


def _meta(prompt):
    return next(m for m in all_prompts() if m["prompt"] == prompt)


def test_known_failures_score_as_geneval_would():
    # missing object
    m = _meta("a photo of a circle and a square")
    ok, sc, why = score(detect(draw([Obj("circle", "red", 2, 2, 10)])), m)
    assert not ok and sc == 0.5 and "expected square>=1, found 0" in why[0]
    # wrong colour
    m = _meta("a photo of a red circle")
    ok, sc, why = score(detect(draw([Obj("circle", "blue", 10, 10, 10)])), m)
    assert not ok and sc == 0.5 and "expected red circle" in why[0]
    # wrong count: counting needs exactly n (include >= n, exclude < n + 1)
    m = _meta("a photo of two triangles")
    three = [Obj("triangle", "green", x, 2, 9) for x in (0, 11, 22)]
    ok, sc, why = score(detect(draw(three)), m)
    assert not ok and sc == 0.5 and "expected triangle<3, found 3" in why[0]
    ok, _, _ = score(detect(draw(three[:2])), m)
    assert ok
    # wrong side
    m = _meta("a photo of a square left of a circle")
    wrong = [Obj("square", "red", 20, 10, 10), Obj("circle", "blue", 2, 10, 10)]
    ok, sc, why = score(detect(draw(wrong)), m)
    assert not ok and abs(sc - 2 / 3) < 1e-9 and "left of" in why[0]
    ok, sc2, _ = score(detect(draw(wrong)), m, position_failure_point=True)
    assert not ok and sc2 == 1.0
    right = [Obj("square", "red", 2, 10, 10), Obj("circle", "blue", 20, 10, 10)]
    assert score(detect(draw(right)), m)[0]


def test_relative_position_follows_geneval_rule():
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((0, 20, 10, 30), (0, 0, 10, 10)) == {"below"}
    # nearly overlapping centres: within the 0.1 x size margin, no relation
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()


def test_shapes_reward_contract():
    from flowpo.rewards.base import WeightedReward

    metas = [_meta("a photo of a red circle"), _meta("a photo of a red circle")]
    imgs = [draw([Obj("circle", "red", 5, 5, 10)]), draw([Obj("circle", "blue", 5, 5, 10)])]
    x = torch.from_numpy(__import__("numpy").stack(imgs)).permute(0, 3, 1, 2).float() / 255
    out = WeightedReward({"shapes": 1.0})(x, [m["prompt"] for m in metas], metas)
    assert out.scores.tolist() == [1.0, 0.5]
    assert out.details["shapes/strict"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        WeightedReward({"shapes": 1.0})(x, ["a red circle"] * 2, [{}, {}])


def test_detector_ignores_specks():
    rng = random.Random(0)
    img = draw([])
    for _ in range(20):
        img[rng.randrange(32), rng.randrange(32)] = (220, 30, 30)
    assert detect(img) == []


def test_quality_term_is_one_on_clean_drawings_and_lower_on_ragged_ones():
    import numpy as np

    from flowpo.rewards.base import WeightedReward
    from flowpo.tasks.shapes.detect import detect_with_quality

    clean = draw([Obj("circle", "red", 5, 5, 10), Obj("square", "blue", 18, 18, 9)])
    assert detect_with_quality(clean)[1] == 1.0
    ragged = clean.copy()
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, 32, 60), rng.integers(0, 32, 60)
    ragged[ys, xs] = (30, 160, 40)  # stray green pixels: drawn, but in no shape
    found, q = detect_with_quality(ragged)
    assert 0.0 < q < 1.0 and {d.shape for d in found} <= {"circle", "square"}
    assert detect_with_quality(draw([]))[1] == 0.0  # nothing drawn
    meta = _meta("a photo of a red circle")
    x = torch.from_numpy(np.stack([clean, ragged])).permute(0, 3, 1, 2).float() / 255
    out = WeightedReward({"shapes": 1.0}, {"shapes": {"quality_weight": 0.5}})(
        x, [meta["prompt"]] * 2, [meta] * 2
    )
    q = out.details["shapes/quality"]
    assert q[0] == 1.0 and q[1] < 1.0
    assert out.scores[0] == 1.0 + 0.5 * 1.0  # full partial credit + weight x quality
    assert out.scores[0] > out.scores[1]


def test_pretrain_saves_a_loadable_base_with_its_sigma_shift(tmp_path):
    """`flowpo pretrain-shapes` in miniature: two steps, then the saved directory loads as an
    SD3 pipeline whose scheduler carries the shift the sigmas were trained under."""
    from diffusers import StableDiffusion3Pipeline

    from flowpo.tasks.shapes.pretrain import pretrain

    summary = pretrain(
        str(tmp_path),
        steps=2,
        batch_size=4,
        eval_every=10**9,
        sigma_shift=2.5,
        compile=False,
        log=lambda m: m,
    )
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path), vae=None, local_files_only=True)
    assert pipe.scheduler.config.shift == 2.5
    assert (tmp_path / "pretrain_summary.json").is_file()


@pytest.mark.parametrize(
    "aux,contrast,band,cbatch",
    [
        (0.0, 0.0, 0.0, 0),
        (1.0, 0.5, 0.7, 0),  # the auxiliary text heads and the banded contrast together
        (0.0, 0.5, 0.0, 4),
    ],
)
def test_pretrain_resumed_across_sittings_is_bit_identical(tmp_path, aux, contrast, band, cbatch):
    """A run stopped after step 2 and resumed with --resume saves the same weights as one run
    straight through (weights, EMA, optimiser, RNG states and the auxiliary text heads are all
    restored)."""
    from safetensors.torch import load_file

    from flowpo.tasks.shapes.pretrain import pretrain

    kw = dict(
        steps=4,
        batch_size=8,
        eval_every=10**9,
        save_every=10**9,
        compile=False,
        aux_text_weight=aux,
        contrast_weight=contrast,
        contrast_sigma_min=band,
        contrast_batch=cbatch,
        focus_frac=0.5 if contrast and not cbatch else 0.0,
    )
    pretrain(str(tmp_path / "a"), **kw, log=lambda m: m)
    assert pretrain(str(tmp_path / "b"), **kw, stop_at=2, log=lambda m: m) is None
    assert not (tmp_path / "b" / "transformer").exists()
    pretrain(str(tmp_path / "b"), **kw, resume=True, log=lambda m: m)
    for sub in ("transformer/diffusion_pytorch_model", "text_encoder_3/model"):
        a = load_file(tmp_path / "a" / f"{sub}.safetensors")
        b = load_file(tmp_path / "b" / f"{sub}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    with pytest.raises(ValueError, match="settings differ"):
        pretrain(str(tmp_path / "b"), **{**kw, "steps": 6}, resume=True, log=lambda m: m)


def test_counterfactual_prompts_are_world_prompts_that_misdescribe_the_scene():
    """Every position and color_attr prompt gets a counterfactual that is itself a prompt of the
    world, names the same words, and is false of every scene drawn for the original (the
    relation fails, or a colour sits on the wrong shape); the other tags get none. Both kinds of
    position counterfactual (relation flipped, shapes exchanged) occur."""
    from flowpo.rewards.geneval_rules import OPPOSITE
    from flowpo.tasks.shapes.pretrain import counterfactual_prompt

    metas = {m["prompt"]: m for m in all_prompts()}
    rng = random.Random(0)
    kinds = set()
    for m in metas.values():
        q = counterfactual_prompt(m, rng)
        if m["tag"] not in ("position", "color_attr"):
            assert q is None
            continue
        assert q in metas and q != m["prompt"]
        assert sorted(q.split()) == sorted(m["prompt"].split()) or m["tag"] == "position"
        scene = render(m, 3)
        assert score(detect(scene), m)[0] and not score(detect(scene), metas[q])[0], (m, q)
        if m["tag"] == "position":
            rel = m["include"][1]["position"][0]
            kinds.add("flip" if OPPOSITE[rel] in q else "swap")
    assert kinds == {"flip", "swap"}


def test_counterfactuals_in_pretraining_never_name_a_held_out_prompt():
    """Restricted to the training prompts (as pretraining calls it), no training caption's
    counterfactual is a held-out prompt, while unrestricted some are (the leak the restriction
    closes); a caption is left without one only where the unrestricted answer was held out,
    and the restriction changes no answer that was already allowed."""
    from flowpo.tasks.shapes.pretrain import counterfactual_prompt

    sp = splits()
    train = {m["prompt"] for m in sp["train"]}
    held = {m["prompt"] for m in sp["heldout"]}
    leaked, kept, dropped = 0, 0, 0
    for m in sp["train"]:
        if m["tag"] not in ("position", "color_attr"):
            continue
        for seed in range(4):
            free = counterfactual_prompt(m, random.Random(seed))
            q = counterfactual_prompt(m, random.Random(seed), train)
            leaked += free in held
            if q is None:
                dropped += 1
                assert free in held
                continue
            assert q in train and q not in held
            if free in train:
                assert q == free
                kept += 1
    assert leaked > 0 and kept > 0
    assert dropped < leaked  # most leaks are replaced by the other form, not dropped


def test_caption_contrast_loss_prefers_the_true_caption():
    """softplus(-beta (L_counter - L_true)): log 2 at a tie, near 0 when the true caption fits
    much better, and its gradient lowers the true caption's error and raises the other's."""
    from flowpo.tasks.shapes.pretrain import caption_contrast_loss

    lt = torch.tensor([0.1, 0.1], requires_grad=True)
    lc = torch.tensor([0.1, 0.2], requires_grad=True)
    out = caption_contrast_loss(lt, lc, beta=100.0)
    assert out.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-10))) / 2)
    out.backward()
    assert (lt.grad > 0).all() and (lc.grad < 0).all()
    assert lt.grad[0] > lt.grad[1]  # the tie is pushed hardest


def test_caption_contrast_margin_stops_pushing_once_the_true_caption_wins_by_it():
    from flowpo.tasks.shapes.pretrain import caption_contrast_loss

    lt = torch.tensor([0.1, 0.1], requires_grad=True)
    lc = torch.tensor([0.105, 0.2], requires_grad=True)  # ahead by 0.005 and by 0.1
    out = caption_contrast_loss(lt, lc, beta=100.0, margin=0.02)
    assert out.item() == pytest.approx((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-2))) / 2)
    out.backward()
    assert lt.grad[0] > 0 and lc.grad[0] < 0  # below the margin: still pushed
    assert lt.grad[1] == 0 and lc.grad[1] == 0  # past it: no gradient


def test_pretrain_can_start_from_a_saved_base(tmp_path):
    """A later stage (--init-from) starts from the saved base's weights: with a zero learning
    rate its saved model equals the one it started from."""
    from safetensors.torch import load_file

    from flowpo.tasks.shapes.pretrain import pretrain

    kw = dict(batch_size=4, eval_every=10**9, compile=False, log=lambda m: m)
    pretrain(str(tmp_path / "a"), steps=2, **kw)
    pretrain(str(tmp_path / "b"), steps=2, lr=0.0, init_from=str(tmp_path / "a"), **kw)
    for sub in ("transformer/diffusion_pytorch_model", "text_encoder/model"):
        a = load_file(tmp_path / "a" / f"{sub}.safetensors")
        b = load_file(tmp_path / "b" / f"{sub}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    summary = json.loads((tmp_path / "b" / "pretrain_summary.json").read_text())
    assert summary["init_from"] == str((tmp_path / "a").resolve())
    # a stage stopped midway resumes from its own state even when its base is gone
    c = str(tmp_path / "c")
    assert pretrain(c, steps=2, lr=0.0, init_from=str(tmp_path / "a"), stop_at=1, **kw) is None
    shutil.rmtree(tmp_path / "a")
    pretrain(c, steps=2, lr=0.0, init_from=str(tmp_path / "a"), resume=True, **kw)
    sub = "transformer/diffusion_pytorch_model.safetensors"
    bw, cw = load_file(tmp_path / "b" / sub), load_file(tmp_path / "c" / sub)
    assert all(torch.equal(bw[k], cw[k]) for k in bw)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--focus-frac", "1.5"], "--focus-frac"),
        (["--focus-frac", "0.5", "--focus-tags", "position,relations"], "--focus-tags"),
        (["--focus-tags", "position"], "--focus-frac > 0"),
        (["--contrast-batch", "-2", "--contrast-weight", "0.3"], "--contrast-batch"),
        (["--contrast-batch", "16"], "--contrast-weight > 0"),
        (["--contrast-weight", "-1"], "--contrast-weight"),
        (["--contrast-margin", "-0.1"], "--contrast-margin"),
        (["--contrast-sigma-min", "1.0"], "--contrast-sigma-min"),
        (["--init-from", "nowhere"], "--init-from"),
    ],
)
def test_pretrain_cli_names_the_fix_for_bad_stage_options(tmp_path, capsys, args, needle):
    from flowpo.cli import main

    assert main(["pretrain-shapes", str(tmp_path / "m"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_auxiliary_text_targets_name_each_shapes_colour_and_relation():
    """The auxiliary loss's examples: in a position caption the placed shape's tokens (CLIP and
    T5) get the relation and the reference's tokens its opposite; in a color_attr caption each
    shape's tokens get its colour; dropped captions give none. The positions index the very
    tokens of those words in the sequence the transformer receives."""
    from diffusers import StableDiffusion3Pipeline

    from flowpo.models.resolve import SHAPES_BASE
    from flowpo.tasks.shapes.pretrain import (
        RELATIONS,
        aux_text_loss,
        aux_text_targets,
        encode_prompts,
    )
    from flowpo.tasks.shapes.world import COLORS

    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(SHAPES_BASE), vae=None, local_files_only=True
    )
    pos = {
        "tag": "position",
        "prompt": "a photo of a circle left of a square",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
    }
    col = {
        "tag": "color_attr",
        "prompt": "a photo of a red triangle and a blue circle",
        "include": [
            {"class": "triangle", "count": 1, "color": "red"},
            {"class": "circle", "count": 1, "color": "blue"},
        ],
    }
    metas = [pos, col, pos]
    t = aux_text_targets(pipe, metas, [pos["prompt"], col["prompt"], ""])
    clip_len = pipe.tokenizer.model_max_length
    rel_pos, rel_y = t["relation"]
    assert {b for b, _ in rel_pos} == {0}  # the dropped caption gives no example
    by_label = {}
    for (_, q), y in zip(rel_pos, rel_y):
        by_label.setdefault(RELATIONS[y], []).append(q)
    # one CLIP and one T5 position per shape word
    assert sorted(by_label) == ["left of", "right of"]
    for qs in by_label.values():
        assert len(qs) == 2 and qs[0] < clip_len <= qs[1]
    circle_clip, square_clip = by_label["left of"][0], by_label["right of"][0]
    toks = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(pos["prompt"]).input_ids)

    def word_ending_at(q):  # a word may be split into subtokens; the last one ends in </w>
        return "".join(toks[1 : q + 1]).replace("</w>", " ").split()[-1]

    assert toks[circle_clip].endswith("</w>") and word_ending_at(circle_clip) == "circle"
    assert toks[square_clip].endswith("</w>") and word_ending_at(square_clip) == "square"
    t5_ids = pipe.tokenizer_3(pos["prompt"]).input_ids
    t5_toks = pipe.tokenizer_3.convert_ids_to_tokens(t5_ids)
    assert t5_toks[by_label["left of"][1] - clip_len] == "\u2581circle"
    col_pos, col_y = t["color"]
    assert {b for b, _ in col_pos} == {1} and len(col_pos) == 4
    assert sorted(list(COLORS)[y] for y in col_y) == ["blue", "blue", "red", "red"]
    # the loss is a finite cross-entropy with gradients into the text encoders
    heads = {"color": torch.nn.Linear(64, len(COLORS)), "relation": torch.nn.Linear(64, 4)}
    pipe.text_encoder_3.requires_grad_(True)
    pe, _ = encode_prompts(pipe, [pos["prompt"], col["prompt"], ""])
    loss = aux_text_loss(heads, pe, t)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in pipe.text_encoder_3.parameters()
    )


def test_overall_standard_error_combines_binomial_tag_errors():
    from flowpo.trainer.evaluation import EvalResult, accuracy_table

    res = EvalResult(reward_mean=0.5, reward_std=0.1, num_samples=60)
    res.accuracy = {"colors": 0.5, "counting": 0.2, "overall": 0.35}
    res.counts = {"colors": 20, "counting": 40, "overall": 60}
    want = math.sqrt(0.5 * 0.5 / 20 + 0.2 * 0.8 / 40) / 2
    assert math.isclose(res.overall_se(), want, rel_tol=1e-12)
    assert math.isclose(res.metrics()["eval/acc_se/overall"], want, rel_tol=1e-12)
    assert f"before {want:.3f}, after {want:.3f}" in accuracy_table(res, res)
    assert math.isnan(EvalResult(reward_mean=0.0, reward_std=0.0, num_samples=0).overall_se())


def test_run_summary_reports_the_training_reward_first_vs_last_epochs(tmp_path, capsys):
    """The closing summary compares the mean training reward of the first and the last 5 epochs
    (the std over those epochs beside it); the windows shrink so they never overlap."""
    from flowpo.trainer.summary import finish_run, reward_trend

    history = {"train_reward": [(0.1 * i, 0.05) for i in range(12)]}
    summary = finish_run(tmp_path, history, None, 1.0, reward_names=["shapes"], rank=0)
    sd = math.sqrt(sum((0.1 * i - 0.2) ** 2 for i in range(5)) / 4)
    assert summary["train_reward_trend_k"] == 5
    assert summary["train_reward_first_k"] == pytest.approx(0.2)
    assert summary["train_reward_last_k"] == pytest.approx(0.9)
    assert summary["train_reward_first_k_std"] == pytest.approx(sd)
    assert summary["train_reward_last_k_std"] == pytest.approx(sd)
    out = capsys.readouterr().out
    assert f"first 5 vs the last 5 epochs (± std over those epochs): 0.2000 ± {sd:.4f} -> " in out
    assert (tmp_path / "summary.json").is_file()
    assert reward_trend([(0.3, 0.1), (0.5, 0.1), (0.4, 0.1)])["train_reward_trend_k"] == 1
    assert reward_trend([(0.3, 0.1)]) == {}


def test_reward_decline_flags_a_fall_from_the_best_window_and_not_noise_or_a_rise():
    """The trainer's warning for a policy that unlearns: the last 5 epochs' mean reward against
    the best earlier 5-epoch mean, in standard errors of the difference (4 by default)."""
    from flowpo.trainer.summary import reward_decline

    wiggle = [0.01 * (-1) ** i for i in range(40)]  # epoch-to-epoch noise, SD 0.01
    rise = [(0.5 + 0.01 * i + w, 0.1) for i, w in enumerate(wiggle)]
    assert reward_decline(rise) is None
    flat = [(0.7 + w, 0.1) for w in wiggle]
    assert reward_decline(flat) is None
    peak = [(min(0.5 + 0.02 * i, 1.3 - 0.02 * i) + w, 0.1) for i, w in enumerate(wiggle)]
    d = reward_decline(peak)
    assert d is not None and d["best"] > d["last"] + 0.3 and d["drop_se"] > 4
    assert 14 <= d["best_first_epoch"] <= 18  # the window around the peak at epoch 20
    assert reward_decline(peak[:9]) is None  # fewer than 2 windows of 5
    small = [(0.7 + w - (0.01 if i >= 35 else 0.0), 0.1) for i, w in enumerate(wiggle)]
    assert reward_decline(small) is None  # a fall within the noise is not flagged


def test_trainer_warns_once_per_10_epochs_when_the_training_reward_falls(capsys):
    """GRPOTrainer._log_epoch prints the decline warning (the epoch line's own fields given)."""
    from types import SimpleNamespace

    from flowpo.trainer.grpo import GRPOTrainer

    logged = []
    fake = SimpleNamespace(
        history={},
        rank=0,
        logger=SimpleNamespace(log=lambda m, step: logged.append(step)),
        _decline_warned=-(10**9),  # as GRPOTrainer.__init__ sets it
    )
    metrics = {"train/loss": 0.1, "time/epoch_s": 1.0}
    for epoch in range(40):
        r = min(0.5 + 0.02 * epoch, 1.3 - 0.02 * epoch) + 0.01 * (-1) ** epoch
        GRPOTrainer._log_epoch(fake, epoch, metrics, {"reward_mean": r, "reward_std": 0.1})
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "training reward fell" in line]
    assert logged == list(range(40)) and 2 <= len(warnings) <= 3
    assert "the policy may be unlearning its task" in warnings[0]


def test_exact_counts_closes_the_at_least_loophole_in_partial_credit_only():
    """GenEval passes "a photo of a circle" on two circles and a square; with exact_counts the
    training score loses a point for the extra circle and one for the unnamed square, while
    strict correctness (evaluation) stays GenEval's."""
    m = _meta("a photo of a circle")
    clutter = [
        Obj("circle", "red", 1, 1, 9),
        Obj("circle", "blue", 20, 1, 9),
        Obj("square", "green", 10, 20, 9),
    ]
    ok, sc, _ = score(detect(draw(clutter)), m)
    assert ok and sc == 1.0
    ok, sc, _ = score(detect(draw(clutter)), m, exact_counts=True)
    assert ok and abs(sc - 1 / 3) < 1e-9  # count ok; too many circles; unnamed square
    ok, sc, _ = score(detect(draw(clutter[:1])), m, exact_counts=True)
    assert ok and sc == 1.0  # a clean answer keeps full credit
    ok, sc, _ = score(detect(draw([])), m, exact_counts=True)
    assert not ok and sc == 0.0  # an empty canvas earns none of the extra points
    # through the reward's options
    from flowpo.rewards.base import WeightedReward

    x = torch.from_numpy(np.stack([draw(clutter), draw(clutter[:1])])).permute(0, 3, 1, 2)
    out = WeightedReward({"shapes": 1.0}, {"shapes": {"exact_counts": True}})(
        x.float() / 255, [m["prompt"]] * 2, [m] * 2
    )
    assert abs(out.scores[0].item() - 1 / 3) < 1e-6 and out.scores[1].item() == 1.0
    assert out.details["shapes/strict"].tolist() == [1.0, 1.0]


def test_excess_penalty_charges_each_object_beyond_the_asked_number():
    """excess_penalty subtracts its value per recognised object beyond the objects the prompt
    asks for (here 3 drawn, 1 asked), on top of GenEval's partial credit and of exact_counts;
    a clean answer pays nothing and strict correctness stays GenEval's."""
    from flowpo.rewards.base import WeightedReward

    m = _meta("a photo of a circle")
    clutter = [
        Obj("circle", "red", 1, 1, 9),
        Obj("circle", "blue", 20, 1, 9),
        Obj("square", "green", 10, 20, 9),
    ]
    x = torch.from_numpy(np.stack([draw(clutter), draw(clutter[:1])])).permute(0, 3, 1, 2)
    x = x.float() / 255
    for exact, base in ((False, 1.0), (True, 1 / 3)):
        opts = {"shapes": {"exact_counts": exact, "excess_penalty": 0.25}}
        out = WeightedReward({"shapes": 1.0}, opts)(x, [m["prompt"]] * 2, [m] * 2)
        assert abs(out.scores[0].item() - (base - 2 * 0.25)) < 1e-6, exact
        assert out.scores[1].item() == 1.0
        assert out.details["shapes/strict"].tolist() == [1.0, 1.0]
        assert out.details["shapes/excess_objects"].tolist() == [2.0, 0.0]


def test_graded_credit_ranks_near_misses_above_far_ones_and_keeps_strict():
    """graded gives a failed relation part of its point by how near A lies to the asked
    direction from B, and a short count part by the objects found: "a circle left of a square"
    with the circle straight above the square beats the circle right of it, both stay below a
    pass, and strict correctness (GenEval's rule) is unchanged."""
    m = _meta("a photo of a circle left of a square")
    square = Obj("square", "red", 12, 12, 7)
    at = {
        "left": Obj("circle", "blue", 2, 12, 7),
        "above": Obj("circle", "blue", 12, 2, 7),
        "right": Obj("circle", "blue", 22, 12, 7),
    }
    plain, graded = {}, {}
    for k, c in at.items():
        dets = detect(draw([c, square]))
        plain[k] = score(dets, m)
        graded[k] = score(dets, m, graded=True)
        assert graded[k][0] == plain[k][0] == (k == "left")  # strict stays GenEval's
    assert graded["left"][1] == plain["left"][1] == 1.0
    assert plain["above"][1] == plain["right"][1]  # pass/fail cannot tell them apart
    assert plain["right"][1] == graded["right"][1]  # exactly opposite: no relation credit
    assert plain["above"][1] < graded["above"][1] < graded["left"][1]
    # a count check with 2 of 3 triangles earns 2/3 of GRADED_MAX, 0 of 3 earns nothing
    from flowpo.rewards.geneval_rules import GRADED_MAX

    m = _meta("a photo of three triangles")
    two = [Obj("triangle", "red", 2, 2, 7), Obj("triangle", "red", 22, 22, 7)]
    ok, sc, _ = score(detect(draw(two)), m, graded=True)
    ok0, sc0, _ = score(detect(draw(two)), m)
    assert not ok and not ok0
    checks = len(m["include"]) + len(m.get("exclude", []))
    assert sc - sc0 == pytest.approx(GRADED_MAX * 2 / 3 / checks)
    assert score(detect(draw([])), m, graded=True)[1] == score(detect(draw([])), m)[1]


@pytest.mark.parametrize("bad", ["position=2", "shapes=0.1", "position"])
def test_pretrain_cli_names_the_fix_for_a_bad_caption_noise(tmp_path, capsys, bad):
    from flowpo.cli import main

    assert main(["pretrain-shapes", str(tmp_path / "m"), "--caption-noise", bad]) == 2
    err = capsys.readouterr().err
    assert "--caption-noise" in err and "TAG=P" in err and "color_attr" in err
    assert not (tmp_path / "m").exists()


def test_pretrain_cli_resume_alone_continues_with_the_saved_settings(tmp_path, capsys):
    """`flowpo pretrain-shapes --resume OUT` with no other option continues a run started with
    non-default settings to the weights of the uninterrupted run; a setting given beside it that
    differs from the saved one is refused with the difference named."""
    from safetensors.torch import load_file

    from flowpo.cli import main

    flags = ["--steps", "4", "--batch-size", "8", "--lr", "3e-4", "--no-compile"]
    flags += ["--eval-every", "1000000", "--save-every", "1000000"]
    assert main(["pretrain-shapes", str(tmp_path / "a"), *flags]) == 0
    assert main(["pretrain-shapes", str(tmp_path / "b"), *flags, "--stop-at", "2"]) == 0
    assert main(["pretrain-shapes", "--resume", str(tmp_path / "b"), "--lr", "1e-3"]) == 2
    assert "'lr': (0.0003, 0.001)" in capsys.readouterr().err
    assert main(["pretrain-shapes", "--resume", str(tmp_path / "b")]) == 0
    sub = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / sub), load_file(tmp_path / "b" / sub)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["pretrain-shapes", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no pretrain_state.pt" in capsys.readouterr().err


def test_staged_pretraining_skips_finished_stages_and_resumes_the_one_in_progress(tmp_path):
    """`pretrain_staged` (`--staged`): each stage starts from the previous one's model, the
    final model lands in OUT with a summary of every stage, and a run interrupted inside its
    second stage, continued on the same OUT, ends with the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    from flowpo.tasks.shapes.pretrain import (
        BASE_STAGES,
        ResumeMismatch,
        pretrain,
        pretrain_staged,
    )

    tiny = dict(batch_size=8, eval_every=10**9, save_every=10**9)
    stages = (
        dict(steps=3, **tiny),
        # the placing stage's contrast, focus and caption settings, at a tiny size
        dict(steps=4, lr=3e-4, **tiny, **{
            k: v for k, v in BASE_STAGES[1].items() if k.startswith(("contrast", "focus", "cap"))
        }),
    )  # fmt: skip
    quiet = dict(compile=False, log=lambda m: m)
    full = pretrain_staged(str(tmp_path / "a"), stages=stages, **quiet)
    assert [s["steps"] for s in full["stages"]] == [3, 4]
    assert full["stages"][1]["init_from"] == str((tmp_path / "a" / "stage1").resolve())
    assert full["stages"][1]["contrast_batch"] == 42
    assert not (tmp_path / "a" / "pretrain_state.pt").exists()

    b = tmp_path / "b"
    pretrain_staged(str(b), stages=stages[:1], **quiet)  # stage 1 finished ...
    (b / "staged_recipe.json").unlink()
    # ... and stage 2 stopped after two of its steps
    init = str(b / "stage1")
    assert pretrain(str(b / "stage2"), **stages[1], init_from=init, stop_at=2, **quiet) is None
    pretrain_staged(str(b), stages=stages, **quiet)
    sub = "transformer/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(tmp_path / "a" / sub), load_file(b / sub)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ResumeMismatch, match="staged recipe differs"):
        pretrain_staged(str(b), stages=stages[:1], **quiet)


def test_staged_pretraining_cli_refuses_settings_of_its_own(tmp_path, capsys):
    """The staged recipe fixes every setting: an option beside `--staged` is refused by name
    (nothing is trained), and `--snapshot` of a staged run with no saved state says so."""
    from flowpo.cli import main

    assert main(["pretrain-shapes", str(tmp_path / "m"), "--staged", "--lr", "1e-4"]) == 2
    assert "--lr: the staged recipe fixes its settings" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "staged_recipe.json").write_text('{"stages": [{}], "compile": true}')
    assert main(["pretrain-shapes", "--resume", str(tmp_path / "m"), "--snapshot", "x"]) == 2
    assert "no stage has saved a state yet" in capsys.readouterr().err


def test_committed_base_was_made_by_the_staged_recipe():
    """The committed base's `pretrain_summary.json` lists one stage per entry of
    `pretrain.BASE_STAGES` with the same settings, so the recipe `--staged` runs and the model
    it is said to reproduce cannot drift apart."""
    from flowpo.tasks.shapes.pretrain import BASE_STAGES, SUMMARY_FILE, stage_mismatches

    base = Path(__file__).resolve().parents[1] / "flowpo" / "tasks" / "shapes" / "base_model"
    made = json.loads((base / SUMMARY_FILE).read_text())["stages"]
    assert stage_mismatches(made) == []
    # and the comparison sees a difference: stage 2's learning rate changed, one stage fewer
    changed = [made[0], {**made[1], "lr": 0.5}, *made[2:]]
    want = BASE_STAGES[1]["lr"]
    assert stage_mismatches(changed) == [f"stage 2: lr 0.5 made, {want} in the recipe"]
    assert stage_mismatches(made[:-1])[0].startswith(f"{len(made) - 1} stages made")
