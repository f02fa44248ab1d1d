"""`geneval`: GenEval's protocol (Ghosh et al. 2023, arXiv 2310.11513, its evaluate_images.py)
on models loadable through transformers, for training (partial credit) and evaluation (strict).

- Detection: Mask2Former instance segmentation with COCO labels (e.g. a local copy of
  facebook/mask2former-swin-large-coco-instance); GenEval's thresholds: confidence 0.3, 0.9 for
  `counting` prompts, at most 16 objects per class, most confident first. Boxes are the extents
  of the instance masks (transformers' Mask2Former returns masks, not boxes).
- Colour: CLIP zero-shot over GenEval's 10 colours ("a photo of a {colour} {class}") on the
  object's box crop with pixels outside its mask painted grey #999 (GenEval's bgcolor).
- Rules: flowpo/rewards/geneval_rules.py's `score` (GenEval's count, colour, position rules with
  its 0.1 position threshold); `details["strict"]` is GenEval correctness, the score is partial
  credit (one point per check). `position_failure_point=True` reproduces Flow-GRPO's published
  score, which still adds a full point after a failed position check (default off).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flowpo.rewards.contract import RewardOutput, to_uint8_hwc
from flowpo.rewards.geneval_rules import COLORS, Detection, score

THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS = 0.3, 0.9, 16  # GenEval's values
BGCOLOR = (153, 153, 153)  # GenEval's #999


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) exclusive extents of a boolean (H, W) mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def masked_crop(img: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """(h, w, 3) uint8 crop of the box with pixels outside the mask set to BGCOLOR."""
    x0, y0, x1, y1 = box
    crop = img[y0:y1, x0:x1].copy()
    crop[~mask[y0:y1, x0:x1]] = BGCOLOR
    return crop


def select(raw: list[dict], threshold: float, max_objects: int = MAX_OBJECTS) -> list[dict]:
    """GenEval's filtering of raw detections ({class, score, ...}): score > threshold, most
    confident first, at most `max_objects` per class."""
    kept: dict[str, list[dict]] = {}
    for d in sorted(raw, key=lambda d: -d["score"]):
        if d["score"] > threshold and len(kept.setdefault(d["class"], [])) < max_objects:
            kept[d["class"]].append(d)
    return [d for ds in kept.values() for d in ds]


def colour_needs(meta: dict[str, Any]) -> dict[str, int]:
    """class -> how many of its most confident detections need a colour."""
    need: dict[str, int] = {}
    for req in meta["include"]:
        if "color" in req:
            need[req["class"]] = max(need.get(req["class"], 0), req["count"])
    return need


def judge(dets: list[dict], meta: dict[str, Any], position_failure_point: bool = False):
    """(strict ok, partial score, reasons) of selected detections {class, score, box, color?}
    under GenEval's rules. Detections must be ordered most confident first within a class."""
    objs = [Detection(d["class"], d.get("color", ""), tuple(d["box"]), 0) for d in dets]
    return score(objs, meta, position_failure_point=position_failure_point)


def check_metadata(meta: dict[str, Any], prompt: str, classes: set[str]) -> None:
    if not meta or "include" not in meta:
        raise ValueError(
            f"reward 'geneval' needs GenEval metadata for prompt {prompt!r}; use a GenEval-style "
            ".jsonl prompt file (flowpo.tasks.geneval_prompts writes them)"
        )
    for req in meta["include"] + meta.get("exclude", []):
        if req["class"] not in classes:
            raise ValueError(
                f"reward 'geneval': class '{req['class']}' is not among the detector's labels"
            )
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"reward 'geneval': colour '{req['color']}' is not one of {COLORS}")


def geneval(
    model_dir: str,
    clip_dir: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    position_failure_point: bool = False,
    device: str = "",
):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    from flowpo.rewards.clip_rewards import default_device, load_clip

    dev = device or default_device()
    det = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir, local_files_only=True)
    det = det.to(dev).eval().requires_grad_(False)
    proc = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    labels = {int(k): v for k, v in det.config.id2label.items()}
    clip, clip_proc = load_clip(clip_dir, "", dev)
    low = min(threshold, counting_threshold)

    @torch.no_grad()
    def detect(img: np.ndarray) -> list[dict]:
        inputs = proc(images=[img], return_tensors="pt")
        out = det(pixel_values=inputs["pixel_values"].to(dev))
        res = proc.post_process_instance_segmentation(
            out, threshold=low, target_sizes=[img.shape[:2]], return_binary_maps=True
        )[0]
        found = []
        if res["segmentation"] is None:
            return found
        masks = res["segmentation"].bool().cpu().numpy()  # (S, H, W)
        for m, info in zip(masks, res["segments_info"]):
            box = mask_box(m)
            if box is not None:
                found.append(
                    {
                        "class": labels[int(info["label_id"])],
                        "score": float(info["score"]),
                        "box": box,
                        "mask": m,
                    }
                )
        return found

    @torch.no_grad()
    def colours(img: np.ndarray, objs: list[dict], cls: str) -> list[str]:
        crops = [masked_crop(img, o["mask"], o["box"]) for o in objs]
        texts = [f"a photo of a {c} {cls}" for c in COLORS]
        pix = clip_proc(images=crops, return_tensors="pt")["pixel_values"]
        txt = clip_proc(text=texts, padding=True, return_tensors="pt")
        p = next(clip.parameters())
        ie = clip.get_image_features(pixel_values=pix.to(dev, p.dtype))
        te = clip.get_text_features(
            input_ids=txt["input_ids"].to(dev), attention_mask=txt["attention_mask"].to(dev)
        )
        ie = ie if isinstance(ie, torch.Tensor) else ie.pooler_output
        te = te if isinstance(te, torch.Tensor) else te.pooler_output
        sim = (
            torch.nn.functional.normalize(ie.float(), dim=-1)
            @ torch.nn.functional.normalize(te.float(), dim=-1).T
        )  # (n, 10)
        return [COLORS[i] for i in sim.argmax(-1).tolist()]

    def fn(images, prompts, metadata) -> RewardOutput:
        for p, m in zip(prompts, metadata):
            check_metadata(m, p, set(labels.values()))
        partial, strict, n_det = [], [], []
        for img, meta in zip(to_uint8_hwc(images), metadata):
            thr = counting_threshold if meta.get("tag") == "counting" else threshold
            dets = select(detect(img), thr, max_objects)
            for cls, n in colour_needs(meta).items():
                objs = [d for d in dets if d["class"] == cls][:n]
                for o, c in zip(objs, colours(img, objs, cls) if objs else []):
                    o["color"] = c
            ok, sc, _ = judge(dets, meta, position_failure_point)
            partial.append(sc)
            strict.append(float(ok))
            n_det.append(float(len(dets)))
        return RewardOutput(
            scores=torch.tensor(partial, dtype=torch.float32),
            details={
                "strict": torch.tensor(strict, dtype=torch.float32),
                "detections": torch.tensor(n_det, dtype=torch.float32),
            },
        )

    return fn
