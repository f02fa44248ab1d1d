"""Programmatic detector and GenEval-rule scorer for the shapes world.

Detection: each pixel takes the nearest palette colour (or background / unknown), connected
components of each colour (4-connectivity) above a minimum area are objects, and a component's
shape follows from its fill ratio (area / bounding box) and how its width changes from top to
bottom (triangles point up). Scoring applies GenEval's rules (arXiv 2310.11513, its
`evaluate_images.py`): per include clause, at least `count` objects of the class (the largest
first, standing in for GenEval's most confident detections), then their colour, then their
relative position to the objects matched by the referenced clause; exclude clauses bound the
count; `relative_position` uses GenEval's box-centre offsets with its 0.1 size threshold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowpo.tasks.shapes.world import BACKGROUND, COLORS

MIN_AREA = 12  # pixels: smaller blobs are noise (the smallest rendered triangle has ~36)
COLOR_DIST = 110.0  # max RGB distance from a palette colour to count as that colour
POSITION_THRESHOLD = 0.1  # GenEval's value
_PALETTE = np.array([BACKGROUND, *COLORS.values()], np.float32)  # (1 + C, 3)
_NAMES = ["background", *COLORS]


@dataclass
class Detection:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int


def _to_uint8(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return arr


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """4-connected components of a boolean (H, W) mask, as lists of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, comp = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        comps.append(comp)
    return comps


def classify_shape(comp_mask: np.ndarray) -> str | None:
    """Shape of one component's (h, w) box-cropped mask, or None when it is no clear shape."""
    h, w = comp_mask.shape
    if not 0.6 <= w / h <= 1.67:
        return None
    fill = comp_mask.sum() / (h * w)
    widths = comp_mask.sum(1).astype(np.float32)
    q = max(1, h // 4)
    top, bottom = widths[:q].mean(), widths[-q:].mean()
    if fill < 0.35:
        return None
    if top < 0.6 * bottom and fill < 0.7:
        return "triangle"
    if fill >= 0.88:
        return "square"
    if fill >= 0.62:
        return "circle"
    return None


def detect(image: Any) -> list[Detection]:
    """Objects in an image ((H, W, 3) uint8, or float (3, H, W)/(H, W, 3) in [0, 1])."""
    return detect_with_quality(image)[0]


def detect_with_quality(image: Any) -> tuple[list[Detection], float]:
    """`detect`, plus how clean the drawing is: the fraction of non-background pixels that lie
    in components recognised as shapes (0 for an empty image). Ragged blobs, stray pixels and
    off-palette colours lower it; a rendered ground-truth scene scores 1."""
    arr = _to_uint8(image).astype(np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 1+C)
    label = dist.argmin(-1)
    label[dist.min(-1) > COLOR_DIST] = -1  # unknown colour
    found = []
    for ci in range(1, len(_NAMES)):
        for comp in _components(label == ci):
            if len(comp) < MIN_AREA:
                continue
            ys, xs = np.array(comp).T
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            crop = np.zeros((y1 - y0, x1 - x0), bool)
            crop[ys - y0, xs - x0] = True
            shape = classify_shape(crop)
            if shape is not None:
                found.append(Detection(shape, _NAMES[ci], (x0, y0, x1, y1), len(comp)))
    found.sort(key=lambda d: -d.area)
    drawn = int((label != 0).sum())
    quality = sum(d.area for d in found) / drawn if drawn else 0.0
    return found, quality


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


def score(
    detections: list[Detection],
    meta: dict[str, Any],
    *,
    position_failure_point: bool = False,
    exact_counts: bool = False,
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
    policy trained on that learned to draw nothing (README, "Shapes world"). They change the
    partial credit only; strict correctness stays GenEval's.
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
                    points += int(position_failure_point)
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
