"""The shapes world: a miniature GenEval.

Vocabulary: 5 shapes x 4 colours on a white 32x32 canvas, counts 1-4, four relative positions.
Prompts follow GenEval's six tags and its metadata format (arXiv 2310.11513): each prompt has
`include` clauses {class, count[, color][, position: [relation, clause_index]]} and, for
counting, an `exclude` clause {class, count: n+1}. The renderer draws a prompt's scene with
black ink where the prompt names no colour, and random non-touching placement on a 4-px grid.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowpo.rewards.geneval_rules import relative_position

SIZE = 32  # canvas side in pixels: a 4x4 grid of CELL-px cells
SHAPES = ("circle", "square", "triangle", "diamond", "ring")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 200, 20),
}
# objects whose colour the prompt leaves free are drawn in black ink, as line art: a colour
# appears only when the prompt names one, so an unconditioned image is not a blend of colours
# (a tiny model's ODE samples of "any colour" came out as mixed, ragged blobs)
DEFAULT_COLOR = "black"
PALETTE = {**COLORS, DEFAULT_COLOR: (30, 30, 30)}  # drawable colours
BACKGROUND = (255, 255, 255)
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# held-out prompts per tag: at least 3 in every tag, so no single prompt carries a sixth of
# GenEval's overall (the mean over tags); 31 prompts x 17 seeds = 527 evaluation samples
HELDOUT_PER_TAG = {
    "single_object": 3,
    "two_object": 3,
    "counting": 4,
    "colors": 5,
    "position": 8,
    "color_attr": 8,
}
SPLIT_SEED = 1234
# objects are 7x7 px, one per CELL x CELL cell (top-left, 1 px free to the next cell): the base
# model's patch is one cell, so one image token draws one whole shape and placing objects is
# choosing cells. (The second world put 8-px objects on a 4-px grid over 4-px patches; its base
# drew clean quarter-shapes that did not join: coordinating the four patches of one object was
# what a tiny transformer did not learn in 3 CPU-hours. docs/results.md, "Shapes world, second
# version".) The cell is 8 px, not more, because a token's output is a linear map of its hidden
# state: with width W a patch of P values can only ever remove W of its P noise dimensions, so
# the base needs W >= P = 3 x CELL^2 (192 here; a 10-px cell would need width 300).
MIN_SIDE, MAX_SIDE = 7, 7
CELL = 8
CELLS = SIZE // CELL  # cells per row: up to CELLS**2 = 16 objects
GAP = 1  # minimum free pixels between objects, so components never touch (4-connectivity)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_prompts() -> list[dict[str, Any]]:
    """Every prompt of the world with its GenEval metadata (deterministic order)."""
    out: list[dict[str, Any]] = []

    def add(tag: str, prompt: str, include: list[dict], exclude: list[dict] | None = None):
        item = {"tag": tag, "prompt": prompt, "include": include}
        if exclude:
            item["exclude"] = exclude
        out.append(item)

    for s in SHAPES:
        add("single_object", f"a photo of a {s}", [{"class": s, "count": 1}])
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            add(
                "two_object",
                f"a photo of a {a} and a {b}",
                [{"class": a, "count": 1}, {"class": b, "count": 1}],
            )
    for s in SHAPES:
        for n in (2, 3, 4):
            add(
                "counting",
                f"a photo of {NUMBERS[n]} {PLURAL[s]}",
                [{"class": s, "count": n}],
                [{"class": s, "count": n + 1}],
            )
    for s in SHAPES:
        for c in COLORS:
            add(
                "colors",
                f"a photo of {article(c)} {c} {s}",
                [{"class": s, "count": 1, "color": c}],
            )
    for a in SHAPES:
        for b in SHAPES:
            if a == b:
                continue
            for rel in RELATIONS:
                add(
                    "position",
                    f"a photo of a {a} {rel} a {b}",
                    [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                )
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            for ca in COLORS:
                for cb in COLORS:
                    if ca == cb:
                        continue
                    add(
                        "color_attr",
                        f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}",
                        [
                            {"class": a, "count": 1, "color": ca},
                            {"class": b, "count": 1, "color": cb},
                        ],
                    )
    return out


def splits() -> dict[str, list[dict[str, Any]]]:
    """Fixed train / held-out split: per tag, a seeded `HELDOUT_PER_TAG[tag]` prompts are held
    out. Every word of a held-out prompt occurs in training prompts (held out = new
    combinations; `tests/test_shapes_world.py` checks it)."""
    rng = random.Random(SPLIT_SEED)
    train, held = [], []
    for tag in TAGS:
        items = [p for p in all_prompts() if p["tag"] == tag]
        chosen = set(rng.sample(range(len(items)), HELDOUT_PER_TAG[tag]))
        for i, item in enumerate(items):
            (held if i in chosen else train).append(item)
    return {"train": train, "heldout": held}


def write_metadata(path: str | Path, items: list[dict[str, Any]]) -> None:
    """GenEval-style JSONL: one metadata object per line."""
    Path(path).write_text("".join(json.dumps(m) + "\n" for m in items))


def validate_metadata(meta: dict[str, Any]) -> None:
    """Raise ValueError if a metadata line does not follow the world's GenEval schema."""
    if meta.get("tag") not in TAGS:
        raise ValueError(f"metadata tag {meta.get('tag')!r} is not one of {TAGS}")
    if not isinstance(meta.get("prompt"), str) or not meta["prompt"]:
        raise ValueError("metadata needs a non-empty 'prompt'")
    inc = meta.get("include")
    if not isinstance(inc, list) or not inc:
        raise ValueError("metadata needs a non-empty 'include' list")
    for i, c in enumerate(inc + meta.get("exclude", [])):
        if c.get("class") not in SHAPES:
            raise ValueError(f"clause {i}: class {c.get('class')!r} is not one of {SHAPES}")
        if not isinstance(c.get("count"), int) or not 1 <= c["count"] <= 5:
            raise ValueError(f"clause {i}: count must be an integer in 1..5")
        if "color" in c and c["color"] not in COLORS:
            raise ValueError(f"clause {i}: color {c['color']!r} is not one of {tuple(COLORS)}")
        if "position" in c:
            rel, ref = c["position"]
            if rel not in RELATIONS or not 0 <= ref < i:
                raise ValueError(f"clause {i}: bad position {c['position']!r}")


# -- rendering -------------------------------------------------------------------------------------


@dataclass
class Obj:
    shape: str
    color: str
    x0: int  # bounding box, inclusive-exclusive
    y0: int
    side: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side

    @property
    def tight_box(self) -> tuple[int, int, int, int]:
        """Box of the drawn pixels (what a detector sees)."""
        ys, xs = np.nonzero(shape_mask(self.shape, self.side))
        return (
            self.x0 + xs.min(),
            self.y0 + ys.min(),
            self.x0 + xs.max() + 1,
            self.y0 + ys.max() + 1,
        )


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean (side, side) mask of a shape filling its box (no anti-aliasing)."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        r = side / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base at the bottom
        return np.abs(xx - side / 2) <= yy / 2
    if shape == "diamond":  # a square standing on a corner
        return np.abs(xx - side / 2) + np.abs(yy - side / 2) <= side / 2
    if shape == "ring":  # a circle with a hole, the band a quarter of the side (>= 2 px)
        r = side / 2
        d2 = (xx - r) ** 2 + (yy - r) ** 2
        return (d2 <= r * r) & (d2 > (r - max(2.0, side / 4)) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def draw(objs: list[Obj]) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 image of the objects on the white background."""
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    for o in objs:
        m = shape_mask(o.shape, o.side)
        img[o.y0 : o.y0 + o.side, o.x0 : o.x0 + o.side][m] = PALETTE[o.color]
    return img


def _free(box, placed) -> bool:
    x0, y0, x1, y1 = box
    for o in placed:
        a0, b0, a1, b1 = o.box
        if x0 < a1 + GAP and a0 < x1 + GAP and y0 < b1 + GAP and b0 < y1 + GAP:
            return False
    return True


def relation_holds(a: Obj, b: Obj, rel: str) -> bool:
    return rel in relative_position(a.tight_box, b.tight_box)


def scene_for(meta: dict[str, Any], rng: random.Random, max_tries: int = 200) -> list[Obj]:
    """Random scene satisfying the metadata (counts, colours, relations, no touching objects)."""
    wanted: list[tuple[str, str | None, int]] = []  # (shape, colour, include index)
    for i, c in enumerate(meta["include"]):
        wanted += [(c["class"], c.get("color"), i)] * c["count"]
    for _ in range(max_tries):
        placed: list[Obj] = []
        owner: list[int] = []
        ok = True
        for shape, color, idx in wanted:
            for _ in range(50):
                side = rng.randint(MIN_SIDE, MAX_SIDE)
                pad = (CELL - side) // 2
                o = Obj(
                    shape,
                    color or DEFAULT_COLOR,
                    CELL * rng.randrange(CELLS) + pad,
                    CELL * rng.randrange(CELLS) + pad,
                    side,
                )
                if not _free(o.box, placed):
                    continue
                pos = meta["include"][idx].get("position")
                if pos and not all(
                    relation_holds(o, ref, pos[0])
                    for ref, own in zip(placed, owner)
                    if own == pos[1]
                ):
                    continue
                placed.append(o)
                owner.append(idx)
                break
            else:
                ok = False
                break
        if ok:
            return placed
    raise RuntimeError(f"could not place a scene for {meta['prompt']!r}")


def render(meta: dict[str, Any], seed: int) -> np.ndarray:
    """Ground-truth image for a prompt's metadata; the same (prompt, seed) gives the same image."""
    rng = random.Random(f"{meta['prompt']}|{seed}")
    return draw(scene_for(meta, rng))
