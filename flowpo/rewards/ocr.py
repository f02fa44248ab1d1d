"""`ocr`: does the image show the text between the prompt's first pair of double quotes?

Rule (Flow-GRPO's OCR reward): the recognised text and the target, spaces removed and
lower-cased; distance 0 if the target is a substring of the recognised text, else the
Levenshtein distance between them capped at the target length; reward 1 - d / len(target).

Backends (imported lazily):
- `rapidocr` (default): the rapidocr 3.x package bundles PP-OCR ONNX models inside the wheel,
  so it runs offline on CPU (onnxruntime). Do not install `rapidocr-onnxruntime` beside it:
  the two pull conflicting opencv builds.
- `paddleocr`: PaddleOCR 3.x; it loads models from a local `model_dir` holding its
  `det/` and `rec/` model folders (PaddleOCR downloads them on first use otherwise, which this
  project never does). Not exercised by the tests here: PaddlePaddle is not installed in CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from flowpo.rewards.contract import RewardOutput, to_uint8_hwc

_QUOTED = re.compile(r'"([^"]*)"')


def target_text(prompt: str) -> str:
    """The text between the prompt's first pair of double quotes (ValueError if none)."""
    m = _QUOTED.search(prompt)
    if not m or not m.group(1).strip():
        raise ValueError(
            f'ocr reward: prompt {prompt!r} has no text in double quotes ("..."); OCR prompts '
            "must quote the text to render"
        )
    return m.group(1)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions cost 1); two-row DP."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognised: str, target: str) -> float:
    """1 - min(d, len(target)) / len(target) on space-free lower-case strings."""
    rec = "".join(recognised.split()).lower()
    tgt = "".join(target.split()).lower()
    if not tgt:
        raise ValueError("ocr reward: the quoted target text is empty")
    d = 0 if tgt in rec else min(levenshtein(rec, tgt), len(tgt))
    return 1.0 - d / len(tgt)


def _rapidocr(model_dir: str):
    from rapidocr import RapidOCR

    if model_dir:
        raise ValueError("ocr backend rapidocr uses its bundled models; leave model_dir empty")
    engine = RapidOCR()

    def read(img) -> str:
        out = engine(np.ascontiguousarray(img[:, :, ::-1]))  # RGB -> BGR, OpenCV's order
        return " ".join(out.txts or ())

    return read


def _paddleocr(model_dir: str):
    try:
        from paddleocr import PaddleOCR
    except ImportError:
        raise ValueError(
            "ocr backend paddleocr needs `pip install paddleocr paddlepaddle`; or use the "
            "default backend rapidocr"
        ) from None
    root = Path(model_dir)
    if not (root / "det").is_dir() or not (root / "rec").is_dir():
        raise ValueError(f"ocr backend paddleocr: model_dir '{model_dir}' needs det/ and rec/")
    engine = PaddleOCR(
        text_detection_model_dir=str(root / "det"),
        text_recognition_model_dir=str(root / "rec"),
        use_doc_orientation_classify=False,
        use_doc_unwarping=False,
        use_textline_orientation=False,
    )

    def read(img) -> str:
        texts = []
        for res in engine.predict(np.ascontiguousarray(img[:, :, ::-1])):  # BGR, like cv2
            texts.extend(res["rec_texts"])
        return " ".join(texts)

    return read


BACKENDS = {"rapidocr": _rapidocr, "paddleocr": _paddleocr}


def ocr(backend: str = "rapidocr", model_dir: str = ""):
    if backend not in BACKENDS:
        raise ValueError(f"ocr backend '{backend}': choose one of {sorted(BACKENDS)}")
    read = BACKENDS[backend](model_dir)

    def fn(images, prompts, metadata) -> RewardOutput:
        targets = [target_text(p) for p in prompts]  # fail before any OCR work
        scores, exact = [], []
        for img, tgt in zip(to_uint8_hwc(images), targets):
            s = ocr_score(read(img), tgt)
            scores.append(s)
            exact.append(float(s == 1.0))
        return RewardOutput(
            scores=torch.tensor(scores, dtype=torch.float32),
            details={"strict": torch.tensor(exact, dtype=torch.float32)},
        )

    return fn
