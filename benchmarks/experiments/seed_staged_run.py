"""Seed a staged pretraining directory with stages that an earlier base already finished, so
that `flowpo pretrain-shapes --resume OUT` runs only the stages after them.

    python benchmarks/experiments/seed_staged_run.py OUT --base DIR --done 5

DIR is a base made by the first `--done` stages of `pretrain.BASE_STAGES` (its
`pretrain_summary.json` must list exactly that many stages with the same settings): its model is
copied into OUT/stage{done} and its per-stage summaries into OUT/stage1..{done}, as a staged run
that stopped after stage {done} would have left them. Used to add stages 6-7 (the colour binding)
to the five-stage base committed before them without spending two hours remaking stages 1-5
(docs/results.md, "The binding base").
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from flowpo.tasks.shapes.pretrain import (
    BASE_STAGES,
    STAGES_FILE,
    STATE_FILE,
    SUMMARY_FILE,
    stage_json,
    stage_mismatches,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--base", required=True, help="model dir made by the first --done stages")
    ap.add_argument("--done", type=int, required=True)
    a = ap.parse_args()
    out, base = Path(a.out_dir), Path(a.base)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new directory")
    stages = json.loads((base / SUMMARY_FILE).read_text()).get("stages")
    if not stages or len(stages) != a.done:
        raise SystemExit(f"{base}/{SUMMARY_FILE}: lists {len(stages or [])} stages, not {a.done}")
    wrong = stage_mismatches(stages, BASE_STAGES[: a.done])
    if wrong:
        raise SystemExit(f"{base} was not made by the first {a.done} stages: {'; '.join(wrong)}")
    out.mkdir(parents=True)
    (out / STAGES_FILE).write_text(
        json.dumps({"stages": stage_json(BASE_STAGES), "compile": True}, indent=1)
    )
    for i, summary in enumerate(stages, 1):
        sdir = out / f"stage{i}"
        if i == a.done:
            shutil.copytree(base, sdir, ignore=shutil.ignore_patterns(STATE_FILE, SUMMARY_FILE))
        else:
            sdir.mkdir()
        (sdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    print(
        f"seeded {out}: stages 1-{a.done} from {base}; run `flowpo pretrain-shapes --resume {out}`"
    )


if __name__ == "__main__":
    main()
