"""GenEval's rule scorer (arXiv 2310.11513, its `evaluate_images.py`), independent of any
detector: it takes detections (class, colour, box, area) and a prompt's GenEval metadata.

Per include clause: at least `count` objects of the class (the largest first, standing in for
GenEval's most confident detections), then their colour, then their position relative to the
objects matched by the referenced clause; exclude clauses bound the count.
`relative_position` uses GenEval's box-centre offsets with its 0.1 size threshold. Used by the
`geneval` reward (detections from Mask2Former) and the shapes world (a pixel detector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

POSITION_THRESHOLD = 0.1  # GenEval's value
# COCO's 80 detection classes with the names GenEval and Mask2Former's COCO config use, and
# GenEval's 10 colours
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]


@dataclass
class Detection:
    shape: str  # the object's class
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int


def relative_position(box_a, box_b) -> set[str]:
    """Relations of A to B from GenEval's rule: centre offset, shrunk by 0.1 x the summed box
    sizes per axis, normalised; a component beyond 0.5 names the relation (y points down)."""
    a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
    ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    dim_a, dim_b = a[2:] - a[:2], b[2:] - b[:2]
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# unit direction of each relation in image coordinates (y points down)
RELATION_DIRECTIONS = {
    "left of": (-1.0, 0.0),
    "right of": (1.0, 0.0),
    "above": (0.0, -1.0),
    "below": (0.0, 1.0),
}
OPPOSITE = {  # the relation whose direction is the negated one
    rel: next(r for r, d in RELATION_DIRECTIONS.items() if d == (-dx, -dy))
    for rel, (dx, dy) in RELATION_DIRECTIONS.items()
}
GRADED_MAX = 0.75  # the most a failed check can earn with graded credit (a pass earns 1)


def box_centre(box) -> np.ndarray:
    """(x, y) centre of an (x0, y0, x1, y1) box."""
    b = np.asarray(box, np.float64)
    return (b[:2] + b[2:]) / 2


def relation_alignment(box_a, box_b, rel: str) -> float:
    """Cosine between A's centre offset from B and the relation's direction, in [-1, 1]
    (0 when the centres coincide): how close A is to lying `rel` B, whether or not GenEval's
    rule passes."""
    offset = box_centre(box_a) - box_centre(box_b)
    norm = float(np.linalg.norm(offset))
    if norm < 1e-9:
        return 0.0
    return float(offset @ np.asarray(RELATION_DIRECTIONS[rel]) / norm)


def score(
    detections: list[Detection],
    meta: dict[str, Any],
    *,
    position_failure_point: bool = False,
    exact_counts: bool = False,
    graded: bool = False,
) -> tuple[bool, float, list[str]]:
    """(strict correctness, partial-credit score in [0, 1], reasons) for one image.

    Partial credit: every check (count, colour, position of each include clause; each exclude
    clause) is one point, the score is points / checks. `position_failure_point` mimics the
    published Flow-GRPO GenEval score, which still adds a full point after a position failure.

    `exact_counts` adds checks that are not GenEval's, for a training reward without its "at
    least N" loophole (a policy that tiles the canvas with objects passes GenEval's
    single- and two-object prompts): one per class the prompt names (exactly as many objects of
    it as its clauses ask for) and one for every named class present with no object of a class
    the prompt does not name. Without the "exactly" an empty canvas earned these points, and a
    policy trained on that learned to draw nothing (docs/results.md, "Shapes world"). They
    change the partial credit only; strict correctness stays GenEval's.

    `graded` (not GenEval's either; partial credit only) gives a failed count or position check
    a fraction of its point instead of none, so that a near miss scores above a far one: a count
    check with k of the n objects earns GRADED_MAX * k / n, a failed relation earns GRADED_MAX *
    (1 + cos) / 2 averaged over the object pairs, cos being `relation_alignment` (1 when A lies
    exactly in the asked direction from B, -1 opposite). A pass still earns the full point.
    """
    by_class: dict[str, list[Detection]] = {}
    for d in detections:
        by_class.setdefault(d.shape, []).append(d)
    reasons: list[str] = []
    points = checks = 0
    matched_groups: list[list[Detection] | None] = []
    for req in meta["include"]:
        cls, n = req["class"], req["count"]
        found = by_class.get(cls, [])[:n]
        ok = True
        checks += 1
        if len(found) < n:
            ok = False
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
            if graded:
                points += GRADED_MAX * len(found) / n
        else:
            points += 1
        if "color" in req:
            checks += 1
            colors = [d.color for d in found]
            if ok and colors.count(req["color"]) >= n:
                points += 1
            elif ok:
                ok = False
                reasons.append(f"expected {req['color']} {cls}>={n}, found {colors}")
        if "position" in req:
            checks += 1
            rel, ref = req["position"]
            target = matched_groups[ref]
            if ok and target is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            elif ok:
                if all(rel in relative_position(d.box, t.box) for d in found for t in target):
                    points += 1
                else:
                    ok = False
                    reasons.append(f"expected {cls} {rel} target")
                    if position_failure_point:
                        points += 1
                    elif graded:
                        cos = [relation_alignment(d.box, t.box, rel) for d in found for t in target]
                        points += GRADED_MAX * (1 + float(np.mean(cos))) / 2
        matched_groups.append(found if ok else None)
    for req in meta.get("exclude", []):
        checks += 1
        have = len(by_class.get(req["class"], []))
        if have >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {have}")
        else:
            points += 1
    if exact_counts:
        # each extra point needs the clause's own "at least" to hold too, so that an empty
        # canvas (nothing too many, nothing unnamed) earns none of them
        asked: dict[str, int] = {}
        for req in meta["include"]:
            asked[req["class"]] = asked.get(req["class"], 0) + req["count"]
        for cls, n in asked.items():
            checks += 1
            points += int(len(by_class.get(cls, [])) == n)
        checks += 1
        have_all = all(len(by_class.get(c, [])) >= n for c, n in asked.items())
        points += int(have_all and all(d.shape in asked for d in detections))
    return not reasons, points / checks, reasons
