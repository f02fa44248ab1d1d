"""Run tracking: the run directory, stdout (rank 0), metrics JSONL, wandb (offline unless a key
is configured), tensorboard (option), image grids and curve plots as PNG.

(Named `tracking`, not `logging`, so that it never shadows the standard library's module.)"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"  # a run's metrics, one JSON object per line (RunLogger)


def resolve_run_dir(cfg, rank: int, broadcast: Callable[[Any], Any]) -> Path:
    """logging.run_dir / logging.run_name; without a name, RECIPE-TIMESTAMP with rank 0's clock
    (`broadcast` hands rank 0's value to every rank)."""
    name = cfg.logging.run_name
    if not name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S") if rank == 0 else None
        name = f"{cfg.recipe}-{broadcast(stamp)}"
    return Path(cfg.logging.run_dir) / name


def quiet_libraries() -> None:
    """Keep stdout readable: library progress bars and info chatter off (errors still show)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's detection warning
    import logging as _logging

    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        _logging.getLogger(name).setLevel(_logging.WARNING)


def print0(*args: Any, rank: int | None = None, **kwargs: Any) -> None:
    r = int(os.environ.get("RANK", "0")) if rank is None else rank
    if r == 0:
        print(*args, **kwargs, flush=True)


def progress(iterable, *, desc: str, enabled: bool, total: int | None = None):
    """tqdm progress bar on rank 0 when enabled and stderr is a terminal; else the iterable."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


class RunLogger:
    """Writes metrics to `metrics.jsonl` (one JSON object per line) and to the enabled sinks."""

    def __init__(self, run_dir: Path, *, rank: int, wandb_mode: str, tensorboard: bool, config):
        self.run_dir = run_dir
        self.rank = rank
        self.path = run_dir / METRICS_FILE
        self._wandb = None
        self._tb = None
        if rank != 0:
            return
        mode = wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        if mode != "off":
            import wandb

            self._wandb = wandb.init(
                project="flowpo",
                name=run_dir.name,
                dir=str(run_dir),
                mode=mode,
                config=config.to_dict(),
                settings=wandb.Settings(silent=True),
            )
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"epoch": step, **clean}) + "\n")
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.rank == 0 and self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def save_grid(
    images: torch.Tensor,
    path: Path,
    *,
    nrow: int,
    captions: list[str] | None = None,
    scale: int = 4,
) -> Path:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid, upscaled (nearest) for small images;
    optional captions label each row (one per row)."""
    from PIL import Image, ImageDraw

    b, _, h, w = images.shape
    ncol = nrow
    rows = math.ceil(b / ncol)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    cap_w = 0 if not captions else 8 + 6 * max(len(c) for c in captions)
    pad = 2
    cell_h, cell_w = h * scale, w * scale
    grid = Image.new(
        "RGB", (cap_w + ncol * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    for i in range(b):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(arr[i].permute(1, 2, 0).numpy()).resize(
            (cell_w, cell_h), Image.NEAREST
        )
        grid.paste(tile, (cap_w + pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    for r, text in enumerate(captions or []):
        draw.text((4, pad + r * (cell_h + pad) + cell_h // 2 - 5), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def plot_curves(
    metrics_path: Path,
    out: Path,
    keys: list[tuple[str, str | None]],
    title: str,
    labels: dict[str, str] | None = None,
    bold: tuple[str, ...] = (),
):
    """Plot `key` (with optional band +- `std_key`: a std or a standard error) against epoch
    from a metrics JSONL file; `labels` renames keys in the legend, `bold` keys are drawn
    thick and dashed `eval_train/` keys (training prompts) beside held-out ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7.2, 3.6), dpi=120)
    for key, std_key in keys:
        pts = [
            (r["epoch"], r[key], r.get(std_key, 0.0) if std_key else 0.0) for r in rows if key in r
        ]
        if not pts:
            continue
        xs, ys, ss = zip(*pts)
        style = {"lw": 2.5, "color": "black"} if key in bold else {"lw": 1.2}
        if key.startswith("eval_train/"):
            style["ls"] = "--"
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=(labels or {}).get(key, key), **style)
        if std_key:
            lo = [y - s for y, s in zip(ys, ss)]
            hi = [y + s for y, s in zip(ys, ss)]
            ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
