"""benchmarks/phrasing_transfer.py: its pairs describe the same scenes, and its table scores a
saved evaluation with GenEval's strict rule."""

import json

import numpy as np
from PIL import Image

from flowpo.rewards.geneval_rules import score
from flowpo.tasks.shapes.detect import detect
from flowpo.tasks.shapes.world import render, splits
from tests.conftest import load_benchmark


def _bench():
    return load_benchmark("phrasing_transfer")


def test_every_heldout_position_prompt_has_a_training_mirror_and_swap():
    triples = _bench().mirrored_triples()
    sp = splits()
    assert len(triples) == sum(m["tag"] == "position" for m in sp["heldout"])
    train = {m["prompt"] for m in sp["train"]}
    for held, mirror, swap in triples:
        assert held["prompt"] not in train and {mirror["prompt"], swap["prompt"]} <= train
        assert sorted(held["prompt"].split()) == sorted(swap["prompt"].split())  # same words
        for seed in range(3):
            # a scene drawn for either phrasing passes the other's strict rule ...
            assert score(detect(render(held, seed)), mirror)[0]
            assert score(detect(render(mirror, seed)), held)[0]
            # ... and fails the swap's: the same words describe the opposite scene
            assert not score(detect(render(held, seed)), swap)[0]


def test_table_scores_saved_images_and_counts_agreement(tmp_path, capsys):
    bench = _bench()
    held, mirror = bench.mirrored_pairs()[0]
    for side, meta in (("heldout", held), ("train", mirror)):
        (tmp_path / f"{side}.jsonl").write_text(json.dumps(meta) + "\n")
        d = tmp_path / side / "00000"
        (d / "samples").mkdir(parents=True)
        (d / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        # held-out side: two correct scenes and one blank canvas; mirror side: three correct
        images = [render(meta, 0), render(meta, 1), render(meta, 2)]
        if side == "heldout":
            images[2] = np.full_like(images[2], 255)
        for k, img in enumerate(images):
            Image.fromarray(img).save(d / "samples" / f"{k:05}.png")
    csv = tmp_path / "out.csv"
    bench.table([tmp_path], csv)
    rows = csv.read_text().splitlines()
    last = rows[-1].split(",")
    # held-out 2/3, mirror 1, agreement 2/3, held-out images passing the swap's rule 0
    assert np.allclose([float(x) for x in last[-4:]], [2 / 3, 1.0, 2 / 3, 0.0], atol=1e-3)
    assert "gap +0.333" in capsys.readouterr().out
