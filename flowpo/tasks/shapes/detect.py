"""Programmatic detector for the shapes world; scoring is GenEval's rules
(`flowpo.rewards.geneval_rules`, re-exported here).

Detection: each pixel takes the nearest palette colour (or background / unknown), connected
components of each colour (4-connectivity) above a minimum area are objects, and a component's
shape is the nearest template of its 3x3 grid of cell fill fractions (how much of each ninth
of its bounding box it covers), or none when no template is near: the grid tells a square
(all full), a circle (corners half full), a triangle (empty top corners, full bottom row), a
diamond (corners nearly empty, edge cells three-quarters) and a cross (empty corners, full
edge cells) apart at every rendered size.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Any

import numpy as np

from flowpo.rewards.geneval_rules import (  # noqa: F401  (re-exported: the shapes scorer)
    POSITION_THRESHOLD,
    Detection,
    relative_position,
    score,
)
from flowpo.tasks.shapes.world import (
    BACKGROUND,
    MAX_SIDE,
    MIN_SIDE,
    PALETTE,
    SHAPES,
    shape_mask,
)

MIN_AREA = 12  # pixels: smaller blobs are noise (the rendered triangle and diamond have 25)
COLOR_DIST = 110.0  # max RGB distance from a palette colour to count as that colour
# max RMS distance of a component's 3x3 fill grid from its nearest template: rendered shapes
# lie within 0.11 of their own template and at least 0.22 from any other (see the test)
SHAPE_DIST = 0.16
_PALETTE = np.array([BACKGROUND, *PALETTE.values()], np.float32)  # (1 + C, 3)
_NAMES = ["background", *PALETTE]


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


def fill_grid(comp_mask: np.ndarray) -> np.ndarray:
    """(9,) fill fraction of each cell of a 3x3 grid over a box-cropped (h, w) mask. Each pixel
    is split into 3x3 subpixels first, so every side divides by 3 and cells are exact."""
    up = np.repeat(np.repeat(comp_mask.astype(np.float32), 3, 0), 3, 1)
    h, w = comp_mask.shape
    return up.reshape(3, h, 3, w).mean(axis=(1, 3)).ravel()


@lru_cache(maxsize=1)
def shape_templates() -> tuple[tuple[str, ...], np.ndarray]:
    """(names, (S, 9) mean fill grids) of the rendered shapes over the rendered sizes."""
    grids = [
        np.mean(
            [fill_grid(_tight(shape_mask(s, side))) for side in range(MIN_SIDE, MAX_SIDE + 1)], 0
        )
        for s in SHAPES
    ]
    return SHAPES, np.stack(grids)


def _tight(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def classify_shape(comp_mask: np.ndarray) -> str | None:
    """Shape of one component's (h, w) box-cropped mask, or None when it is no clear shape."""
    h, w = comp_mask.shape
    if not 0.6 <= w / h <= 1.67:
        return None
    names, templates = shape_templates()
    dist = np.sqrt(((templates - fill_grid(comp_mask)) ** 2).mean(1))  # (S,) RMS over cells
    best = int(dist.argmin())
    return names[best] if dist[best] <= SHAPE_DIST else None


def detect(image: Any) -> list[Detection]:
    """Objects in an image ((H, W, 3) uint8, or float (3, H, W)/(H, W, 3) in [0, 1])."""
    return detect_with_quality(image)[0]


def detect_with_quality(image: Any) -> tuple[list[Detection], float]:
    """`detect`, plus how clean the drawing is: the fraction of non-background pixels that lie
    in components recognised as shapes (0 for an empty image). Ragged blobs, stray pixels and
    off-palette colours lower it; a rendered ground-truth scene scores 1."""
    found, stats = analyse(image)
    return found, stats["quality"]


def analyse(image: Any) -> tuple[list[Detection], dict[str, float]]:
    """Detections (largest first) and drawing statistics of one image: `quality` (see
    `detect_with_quality`), `components` (palette-coloured components of at least MIN_AREA
    pixels: what the detector looks at) and `recognised` (how many of them are a shape)."""
    arr = _to_uint8(image).astype(np.float32)
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 1+C)
    label = dist.argmin(-1)
    label[dist.min(-1) > COLOR_DIST] = -1  # unknown colour
    found = []
    components = 0
    for ci in range(1, len(_NAMES)):
        for comp in _components(label == ci):
            if len(comp) < MIN_AREA:
                continue
            components += 1
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
    return found, {"quality": quality, "components": components, "recognised": len(found)}
