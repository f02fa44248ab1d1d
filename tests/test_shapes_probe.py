"""The conditioning probes (flowpo.tasks.shapes.probe) on the world's own renderer: a perfect
model (each prompt's scene drawn to its metadata) against models blind to the relation word or
to the colour binding (the same scene for a prompt and its opposite or swap)."""

from __future__ import annotations

from flowpo.tasks.shapes.probe import (
    binding_probe,
    position_parts,
    relation_probe,
    render_sampler,
)
from flowpo.tasks.shapes.world import all_prompts, render

SEEDS = [0, 1, 2, 3]
META = {m["prompt"]: m for m in all_prompts()}


perfect = render_sampler()


def relation_blind(prompts, seeds):
    """Draws both shapes, placed by the seed alone: the relation word changes nothing."""
    out = []
    for p in prompts:
        a, b, _ = position_parts(META[p])
        meta = {
            "prompt": f"{a}|{b}",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1}],
        }
        out += [render(meta, s) for s in seeds]
    return out


def binding_blind(prompts, seeds):
    """Draws both shapes with the two named colours in an order set by the seed alone."""
    out = []
    for p in prompts:
        (s1, c1), (s2, c2) = [(c["class"], c["color"]) for c in META[p]["include"]]
        lo, hi = sorted((c1, c2))
        for s in seeds:
            x, y = (lo, hi) if s % 2 == 0 else (hi, lo)
            inc = [{"class": s1, "count": 1, "color": x}, {"class": s2, "count": 1, "color": y}]
            out.append(render({"prompt": f"{s1}|{s2}|{lo}|{hi}", "include": inc}, s))
    return out


def test_relation_probe_tells_a_model_that_follows_the_word_from_one_that_ignores_it():
    good = relation_probe(perfect, SEEDS)
    assert good["prompts"] == 80 and good["samples"] == 80 * len(SEEDS)
    assert good["accuracy"] > 0.95 and good["both_found"] > 0.95
    assert good["alignment"] > 0.6  # every pass has a cosine above 0.5
    assert good["layout_shift_cells"] > 1.0
    blind = relation_probe(relation_blind, SEEDS)
    assert blind["both_found"] > 0.95
    # one layout per (pair, seed) scored against opposite directions: the cosines cancel
    assert abs(blind["alignment"]) < 1e-9
    assert blind["layout_shift_cells"] == 0.0
    assert 0.1 < blind["accuracy"] < 0.6  # GenEval's check still passes by chance


def test_relation_probe_on_one_split_covers_only_its_prompts():
    held = relation_probe(perfect, SEEDS, split="heldout")
    train = relation_probe(relation_blind, SEEDS, split="train")
    assert held["prompts"] == 8 and held["samples"] == 8 * len(SEEDS)
    assert train["prompts"] == 72
    assert held["alignment"] > 0.6
    # the blind model's cosines cancel only where a prompt's flipped twin is in the same split
    assert abs(train["alignment"]) < 0.1


def test_binding_probe_tells_bound_colours_from_colours_blind_to_the_binding():
    good = binding_probe(perfect, SEEDS)
    assert good["prompts"] == 120 and good["both_found"] > 0.95
    assert good["bound"] > 0.95 and good["swapped"] < 0.05
    blind = binding_probe(binding_blind, SEEDS)
    assert blind["both_found"] > 0.95
    # every prompt's swap is a prompt too and gets the same images: bound == swapped exactly
    assert blind["bound"] == blind["swapped"] and 0.3 < blind["bound"] < 0.7
