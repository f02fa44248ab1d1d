"""Prompt sets (bundled, generated, malformed files) and `flowpo eval` writing GenEval's layout."""

from __future__ import annotations

import json

import pytest

from flowpo.cli import main
from flowpo.tasks.geneval_prompts import COCO_CLASSES, COLORS, TAGS, generate_geneval
from flowpo.trainer.data import bundled_sets, load_prompt_items
from tests.conftest import free_port


def test_generated_geneval_records_follow_the_metadata_format():
    recs = generate_geneval(5, seed=3)
    assert [r["tag"] for r in recs] == [t for t in TAGS for _ in range(5)]
    assert generate_geneval(5, seed=3) == recs  # deterministic in the seed
    for r in recs:
        for req in r["include"] + r.get("exclude", []):
            assert req["class"] in COCO_CLASSES and req.get("color", "red") in COLORS
        if r["tag"] == "counting":
            n = r["include"][0]["count"]
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": n + 1}]
        if r["tag"] == "position":
            rel, ref = r["include"][1]["position"]
            assert ref == 0 and f" {rel} " in r["prompt"]


def test_bundled_sets_load_with_metadata():
    assert {"geneval_small", "ocr_small"} <= set(bundled_sets())
    prompts, metas = load_prompt_items("bundled:geneval_small")
    assert len(prompts) == 24 and {m["tag"] for m in metas} == set(TAGS)
    prompts, _ = load_prompt_items("bundled:ocr_small")
    assert all(p.count('"') >= 2 for p in prompts)
    with pytest.raises(ValueError, match="bundled:geneval_small"):
        load_prompt_items("bundled:nope")


def test_malformed_prompt_files_name_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a cat", "include": [{"class": "cat", "count": 1}]}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"p.jsonl' line 3: not valid JSON"):
        load_prompt_items(str(bad))
    bad.write_text('{"prompt": "a cat", "include": [{"class": "cat"}]}\n')
    with pytest.raises(ValueError, match="line 1: 'include' must be a list"):
        load_prompt_items(str(bad))
    bad.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 1 needs a 'prompt'"):
        load_prompt_items(str(bad))


def test_make_prompts_cli(tmp_path):
    out = tmp_path / "g.jsonl"
    assert main(["make-prompts", "geneval", str(out), "-n", "2", "--seed", "1"]) == 0
    prompts, metas = load_prompt_items(str(out))
    assert len(prompts) == 2 * len(TAGS) and metas == generate_geneval(2, seed=1)
    assert main(["make-prompts", "ocr", str(tmp_path / "o.jsonl"), "-n", "3"]) == 0
    assert len(load_prompt_items(str(tmp_path / "o.jsonl"))[0]) == 3


def test_eval_writes_geneval_layout_summary_and_grid(tmp_path):
    out = tmp_path / "ev"
    rc = main(
        [
            "eval",
            "--eval.num_prompts=3",
            "--eval.seeds=0,1",
            "--out",
            str(out),
            "--save-images",
        ]
    )
    assert rc == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["00000", "00001", "00002"]
    for f in folders:
        meta = json.loads((out / f / "metadata.jsonl").read_text())
        assert "prompt" in meta and "include" in meta
        assert sorted(p.name for p in (out / f / "samples").iterdir()) == ["00000.png", "00001.png"]
    summary = json.loads((out / "eval.json").read_text())
    assert summary["num_samples"] == 6 and "eval/shapes_mean" in summary
    assert 0 <= summary["eval/acc/overall"] <= 1 and (out / "samples.png").is_file()


def test_eval_checks_reward_services_before_loading(tmp_path, capsys):
    """`flowpo eval` with a reward url where no service answers stops with train's one-line
    error before any model loads (it used to fail at the first scoring, after sampling)."""
    out = tmp_path / "ev"
    rc = main(
        [
            "eval",
            "--eval.num_prompts=1",
            "--eval.seeds=0",
            f"--reward.options={{shapes: {{url: 'http://127.0.0.1:{free_port()}', deadline_s: 1}}}}",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no service answers at" in err and "serve-reward" in err
    assert "Loading pipeline" not in err and not (out / "eval.json").exists()


def test_eval_guidance_scale_evaluates_with_its_own_cfg(tmp_path):
    """eval.guidance_scale samples the evaluation with that CFG scale whatever the rollouts'
    (a CFG-free run evaluated the way a CFG 3 recipe samples): the same numbers as evaluating
    with sampling.guidance_scale=3, different ones from CFG-free, and the setting is scoped to
    the evaluation."""

    def ev(name: str, *overrides: str) -> dict:
        args = ["eval", "--eval.num_prompts=3", "--eval.seeds=0,1", "--out", str(tmp_path / name)]
        assert main([*args, *overrides]) == 0
        return json.loads((tmp_path / name / "eval.json").read_text())

    free = ev("cfg1")  # the default recipe samples CFG-free
    via_eval = ev("eval3", "--eval.guidance_scale=3")
    via_sampling = ev("sampling3", "--sampling.guidance_scale=3")
    assert via_eval["eval/shapes_mean"] == via_sampling["eval/shapes_mean"]
    assert via_eval["eval/shapes_mean"] != free["eval/shapes_mean"]

    from flowpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.guidance_scale"):
        load_config(None, ["--eval.guidance_scale=-1"]).validate()


def test_adapter_guidance_block_restores_the_scale(tiny_dirs):
    from flowpo.models.base import load_adapter

    adapter = load_adapter("sd3", tiny_dirs["sd3"])
    assert not adapter.cfg_active
    with adapter.guidance(3.0):
        assert adapter.cfg_active and adapter.encode_prompts(["a cat"]).has_negative
    assert adapter.guidance_scale == 1.0 and not adapter.cfg_active
    with adapter.guidance(None):
        assert adapter.guidance_scale == 1.0


def test_tag_weights_balance_the_drawn_tags_whatever_their_prompt_counts():
    from collections import Counter

    from flowpo.config import ConfigError
    from flowpo.trainer.data import KRepeatSampler, tag_strata

    # 90 prompts of tag a, 10 of tag b, none of c: uniform draws give b a tenth of the groups
    metas = [{"prompt": f"a{i}", "tag": "a"} for i in range(90)]
    metas += [{"prompt": f"b{i}", "tag": "b"} for i in range(10)]
    prompts = [m["prompt"] for m in metas]

    def shares(strata):
        s = KRepeatSampler(
            prompts,
            group_size=4,
            images_per_rank=32,
            world_size=1,
            rank=0,
            seed=3,
            metadata=metas,
            strata=strata,
        )
        c = Counter(it.metadata["tag"] for e in range(300) for it in s.epoch_items(e))
        return c["b"] / sum(c.values())

    assert abs(shares(None) - 0.10) < 0.02
    assert abs(shares(tag_strata(metas, {"a": 1, "b": 1})) - 0.5) < 0.03
    assert abs(shares(tag_strata(metas, {"a": 1, "b": 3})) - 0.75) < 0.03
    assert shares(tag_strata(metas, {"b": 1})) == 1.0  # unnamed tags never drawn
    assert tag_strata(metas, {}) is None
    with pytest.raises(ConfigError, match="names \\['c'\\]"):
        tag_strata(metas, {"a": 1, "c": 1})
    with pytest.raises(ConfigError, match="'tag'"):
        tag_strata([{"prompt": "x"}], {"a": 1})
