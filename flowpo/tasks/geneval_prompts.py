"""GenEval-style prompt generation (Ghosh et al. 2023, arXiv 2310.11513): the 80 COCO classes,
GenEval's 10 colours, counts 2-4, four relative positions and its six tags, as metadata JSONL
records that `geneval` scores; plus OCR prompts with quoted targets for `ocr`.

Records follow GenEval's evaluation_metadata.jsonl: {"tag", "include": [{"class", "count",
"color"?, "position"?: [relation, index of the referenced include clause]}], "exclude"?,
"prompt"}. Generation is deterministic in the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from flowpo.rewards.geneval_rules import COCO_CLASSES, COLORS

POSITIONS = ["left of", "right of", "above", "below"]
NUMBERS = {2: "two", 3: "three", 4: "four"}
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
_IRREGULAR = {
    "person": "people", "mouse": "mice", "sheep": "sheep", "skis": "skis", "scissors": "scissors",
    "knife": "knives", "tie": "ties", "bus": "buses", "wine glass": "wine glasses",
    "hair drier": "hair driers", "couch": "couches", "bench": "benches", "sandwich": "sandwiches",
    "toothbrush": "toothbrushes", "skateboard": "skateboards", "tv": "tvs",
}  # fmt: skip


def plural(name: str) -> str:
    if name in _IRREGULAR:
        return _IRREGULAR[name]
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    return name + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(word: str) -> str:
    return f"{article(word)} {word}"


def make_record(tag: str, rng: random.Random) -> dict:
    """One GenEval record of `tag`."""
    c1, c2 = rng.sample(COCO_CLASSES, 2)
    if tag == "single_object":
        return {
            "tag": tag,
            "include": [{"class": c1, "count": 1}],
            "prompt": f"a photo of {_a(c1)}",
        }
    if tag == "two_object":
        inc = [{"class": c1, "count": 1}, {"class": c2, "count": 1}]
        return {"tag": tag, "include": inc, "prompt": f"a photo of {_a(c1)} and {_a(c2)}"}
    if tag == "counting":
        n = rng.choice(list(NUMBERS))
        return {
            "tag": tag,
            "include": [{"class": c1, "count": n}],
            "exclude": [{"class": c1, "count": n + 1}],
            "prompt": f"a photo of {NUMBERS[n]} {plural(c1)}",
        }
    if tag == "colors":
        col = rng.choice(COLORS)
        inc = [{"class": c1, "count": 1, "color": col}]
        return {"tag": tag, "include": inc, "prompt": f"a photo of {_a(col)} {c1}"}
    if tag == "position":
        rel = rng.choice(POSITIONS)
        # GenEval phrases "a photo of a B right of a A": clause 1 (B) relates to clause 0 (A)
        inc = [{"class": c1, "count": 1}, {"class": c2, "count": 1, "position": [rel, 0]}]
        return {"tag": tag, "include": inc, "prompt": f"a photo of {_a(c2)} {rel} {_a(c1)}"}
    if tag == "color_attr":
        k1, k2 = rng.sample(COLORS, 2)
        inc = [{"class": c1, "count": 1, "color": k1}, {"class": c2, "count": 1, "color": k2}]
        return {"tag": tag, "include": inc, "prompt": f"a photo of {_a(k1)} {c1} and {_a(k2)} {c2}"}
    raise ValueError(f"unknown GenEval tag '{tag}'; choose one of {TAGS}")


def generate_geneval(n_per_tag: int, seed: int = 0, tags: list[str] | None = None) -> list[dict]:
    rng = random.Random(seed)
    return [make_record(t, rng) for t in (tags or TAGS) for _ in range(n_per_tag)]


# Short words and phrases for text-rendering prompts: common signage vocabulary
_OCR_WORDS = [
    "OPEN", "CLOSED", "SALE", "EXIT", "WELCOME", "COFFEE", "BAKERY", "HELLO", "STOP", "PARKING",
    "HOTEL", "MARKET", "FRESH BREAD", "GOOD MORNING", "NO ENTRY", "BOOKS", "PIZZA", "MUSEUM",
    "LIBRARY", "FLOWERS", "ICE CREAM", "TAXI", "PHARMACY", "GARDEN", "STATION", "THANK YOU",
]  # fmt: skip
_OCR_TEMPLATES = [
    'a shop sign that says "{}"',
    'a neon sign reading "{}"',
    'a chalkboard with the words "{}" written on it',
    'a poster with the title "{}" in bold letters',
    'a coffee mug printed with "{}"',
    'a wooden signpost carved with "{}"',
    'a T-shirt with the text "{}"',
    'a book cover titled "{}"',
]


def generate_ocr(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(_OCR_WORDS)
        out.append({"tag": "ocr", "text": word, "prompt": rng.choice(_OCR_TEMPLATES).format(word)})
    return out


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
