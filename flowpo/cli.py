"""flowpo command line.

    flowpo train [-c configs/RECIPE.yaml] [--section.field=value ...] [--resume DIR|latest]
    flowpo sample --model DIR [--checkpoint CKPT] --prompt "..." [--num 4] [--out grid.png]
    flowpo eval [--model DIR] [--checkpoint CKPT [--ema]] [--section.field=value ...]
    flowpo pretrain-shapes OUT_DIR [--steps N | --staged] | --resume OUT_DIR
    flowpo make-tiny {sd3,flux,qwen-image,bagel} OUT_DIR
    flowpo serve-reward --reward NAME [--model-dir DIR] [--port 8100] [--token-env VAR]
    flowpo make-prompts {geneval,ocr} OUT.jsonl [-n 10] [--seed 0]
    flowpo export RUN/checkpoints/checkpoint-N OUT_DIR [--ema] [--base DIR]
    flowpo doctor [-c RECIPE] [--section.field=value ...] | --gpu-check [--out REPORT.json]

One rank on CPU: `python -m flowpo train`. Several ranks: `deepspeed --num_gpus N --module flowpo train`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowpo.config import ConfigError, apply_overrides, config_from_dict, load_config

# the committed shapes-world base (flowpo/tasks/shapes/base_model) is made by the staged recipe
# (`flowpo pretrain-shapes OUT --staged`, pretrain.BASE_STAGES) whose first stage is a
# PRETRAIN_STEPS-step run with the defaults below (docs/results.md, "The binding base")
PRETRAIN_STEPS = 4000

TRAIN_HELP = """Run online RL (Flow-GRPO, DiffusionNFT, AWM) on a flow-matching model.

With no recipe it runs the CPU default (configs/shapes_nft.yaml): DiffusionNFT with LoRA on the
shapes world, a miniature GenEval, from the committed tiny pixel-space SD3-family base model, and
prints held-out strict accuracy per tag before and after (configs/shapes.yaml is the same job
with Flow-GRPO). Any config field can be overridden as --section.field=value
(sections: model, sampling, rollout, train, forward, reward, engine, logging, eval, checkpoint), e.g.
  flowpo train -c configs/tiny_sd3_jpeg.yaml --train.epochs=5 --rollout.group_size=4
Resume: --resume latest --logging.run_name=NAME, or --resume RUN/checkpoints/checkpoint-N."""


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint and --ema, for the commands that load a trained checkpoint onto a model."""
    p.add_argument("--checkpoint", default=None, help="flowpo checkpoint dir (LoRA or full)")
    p.add_argument(
        "--ema",
        action="store_true",
        help="use the checkpoint's EMA weights (train.ema runs: what their own evaluations use)",
    )


def _check_checkpoint_args(args: argparse.Namespace) -> None:
    """Before any model loads: --ema needs --checkpoint."""
    if args.ema and not args.checkpoint:
        raise ConfigError("--ema reads a checkpoint's EMA weights: give --checkpoint too")


def _load_checkpoint(adapter, args: argparse.Namespace) -> None:
    """Apply --checkpoint (its EMA weights with --ema) to the adapter, if one was given."""
    from flowpo.trainer.checkpoint import load_trainable

    if args.checkpoint:
        load_trainable(adapter, Path(args.checkpoint), ema=args.ema)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowpo",
        description="Online RL fine-tuning of flow-matching text-to-image models (Flow-GRPO family).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train with Flow-GRPO (CPU default: the shapes world, a miniature GenEval)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("-c", "--config", default=None, help="YAML recipe (see configs/)")
    t.add_argument("--resume", default=None, help="checkpoint directory, or 'latest'")

    s = sub.add_parser(
        "sample",
        help="ODE-sample images from a model directory (+ optional checkpoint)",
        description="Deterministic ODE sampling; writes a PNG grid (one row per prompt, one "
        "column per seed).",
    )
    s.add_argument("--model", required=True, help="local diffusers model directory")
    s.add_argument("--family", default="auto", help="sd3 | flux | auto (default)")
    _checkpoint_args(s)
    s.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    s.add_argument("--num", type=int, default=4, help="images per prompt (seeds 0..num-1)")
    s.add_argument("--steps", type=int, default=10, help="ODE steps")
    s.add_argument("--guidance-scale", type=float, default=1.0)
    s.add_argument("--out", default="samples.png", help="output PNG grid")

    e = sub.add_parser(
        "eval",
        help="evaluate a model (+ optional checkpoint): reward, per-tag accuracy, grids",
        description="ODE-samples every eval prompt once per eval seed and scores the images. "
        "Defaults: the shapes world's held-out prompts x 17 seeds with the `shapes` reward "
        "(strict GenEval-rule accuracy per tag). Any config field can be overridden, e.g. "
        "--eval.prompt_file=prompts.jsonl --reward.weights=shapes:1 --eval.seeds=0,1,2",
    )
    e.add_argument("--model", default=None, help="model directory (default: the recipe's)")
    _checkpoint_args(e)
    e.add_argument("-c", "--config", default=None, help="YAML recipe (see configs/)")
    e.add_argument("--out", default="eval_out", help="folder for grid PNG and results JSON")
    e.add_argument(
        "--save-images",
        action="store_true",
        help="also write every image in GenEval's layout: OUT/{i:05}/metadata.jsonl, "
        "OUT/{i:05}/samples/{k:05}.png (k = seed index)",
    )

    p2 = sub.add_parser(
        "pretrain-shapes",
        allow_abbrev=False,  # `--resume` tells the options given from those left to the run's own
        help="reproduce the shapes-world base model (flow matching on rendered scenes)",
        description="Trains the tiny pixel-space SD3-family base model of the shapes world on "
        "rendered (noisily captioned) (prompt, image) pairs of the training split and saves it "
        "to OUT_DIR. Its full state is saved every --save-every steps: `--resume OUT_DIR` "
        "continues an interrupted run with its saved settings to the same result (settings "
        "given beside it must match the saved ones).",
    )
    p2.add_argument("out_dir", nargs="?", help="where the model (and the resumable state) goes")
    p2.add_argument("--resume", metavar="OUT_DIR", help="continue the run saved in OUT_DIR")
    p2.add_argument(
        "--staged",
        action="store_true",
        help="run the committed base's staged recipe (seven stages in OUT_DIR/stage1..7, the "
        "final model in OUT_DIR; about 2.6 h with two threads on an idle 2-core host); its "
        "settings are fixed, `--resume OUT_DIR` continues it",
    )
    p2.add_argument(
        "--steps",
        type=int,
        default=PRETRAIN_STEPS,
        help=f"optimizer steps of the schedule (the committed base: all {PRETRAIN_STEPS}, the "
        "final EMA weights)",
    )
    p2.add_argument("--save-every", type=int, default=500, help="steps between saved states")
    p2.add_argument("--eval-every", type=int, default=1000, help="steps between quick evals")
    p2.add_argument(
        "--snapshot",
        metavar="MODEL_DIR",
        help="save the EMA weights of OUT_DIR's last saved state to MODEL_DIR and exit",
    )
    p2.add_argument(
        "--stop-at", type=int, default=0, help="stop after this step, state saved (one sitting)"
    )
    p2.add_argument(
        "--no-compile", action="store_true", help="eager training steps (no torch.compile)"
    )
    p2.add_argument("--batch-size", type=int, default=64)
    p2.add_argument("--lr", type=float, default=1e-3)
    p2.add_argument("--seed", type=int, default=0)
    p2.add_argument(
        "--sigma-shift",
        type=float,
        default=1.0,
        help="static shift of the training sigmas and of the saved scheduler (committed: 1)",
    )
    p2.add_argument(
        "--aux-text-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary text loss (shape tokens predict their colour and "
        "relation; 0 = off)",
    )
    p2.add_argument(
        "--caption-noise",
        default=None,
        metavar="TAG=P,...",
        help="fraction of each tag's captions that mis-describe their scene, e.g. "
        "position=0.5,counting=0.4,color_attr=0.3 (the default)",
    )
    p2.add_argument(
        "--contrast-weight",
        type=float,
        default=0.0,
        help="weight of the caption-contrast loss: a position or color_attr scene drawn to match "
        "its caption must be denoised better under it than under its counterfactual (relation "
        "flipped, shapes or colours exchanged); 0 = off",
    )
    p2.add_argument(
        "--contrast-beta",
        type=float,
        default=100.0,
        help="scale of the per-sample error difference inside the contrast's softplus",
    )
    p2.add_argument(
        "--contrast-sigma-min",
        type=float,
        default=0.0,
        help="draw the contrast's noise levels uniformly from [this, 1] (the band where the noisy "
        "image does not show the layout yet) instead of sharing the batch's; 0 = share",
    )
    p2.add_argument(
        "--contrast-margin",
        type=float,
        default=0.0,
        help="cap the per-sample error difference in the contrast at this margin: no gradient "
        "once the true caption wins by it (0 = no cap)",
    )
    p2.add_argument(
        "--contrast-batch",
        type=int,
        default=0,
        metavar="N",
        help="give the contrast N scenes of its own each step, drawn from the --focus-tags, so "
        "the flow-matching batch keeps its tag mix (0 = the contrast uses the batch's position "
        "and color_attr scenes)",
    )
    p2.add_argument(
        "--focus-frac",
        type=float,
        default=0.0,
        help="fraction of every batch drawn from the --focus-tags (0 = tags uniform)",
    )
    p2.add_argument(
        "--focus-tags",
        default=None,
        metavar="TAG,...",
        help="the tags --focus-frac and --contrast-batch draw from (default: position,color_attr, "
        "the two that need word order)",
    )
    p2.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="start from this base's weights instead of a random init (a later stage of a "
        "staged recipe)",
    )

    g = sub.add_parser(
        "make-prompts",
        help="write a GenEval-style or OCR prompt set (metadata JSONL)",
        description="geneval: N records per GenEval tag over the 80 COCO classes, 10 colours, "
        "counts 2-4 and 4 positions; ocr: N text-rendering prompts with quoted targets.",
    )
    g.add_argument("kind", choices=["geneval", "ocr"])
    g.add_argument("out", help="output .jsonl")
    g.add_argument("-n", type=int, default=10, help="records per tag (geneval) or in all (ocr)")
    g.add_argument("--seed", type=int, default=0)

    r = sub.add_parser(
        "serve-reward",
        help="serve one reward model over HTTP (JSON + base64 PNG; see docs/reward-service.md)",
        description="POST /score {images: [base64 PNG], prompts, metadata} -> {scores, details}; "
        "GET /health. Loopback by default; one worker (model replica) per GPU. The trainer "
        "uses it with --reward.options='{NAME: {url: http://HOST:PORT}}'.",
    )
    r.add_argument("--reward", required=True, help="reward name (pickscore, ocr, geneval, ...)")
    r.add_argument("--model-dir", default="", help="local model directory of the reward")
    r.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="scorer option (repeatable), e.g. --option clip_dir=/models/clip",
    )
    r.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    r.add_argument("--port", type=int, default=8100)
    r.add_argument("--token", default="", help="bearer token required on /score")
    r.add_argument("--token-env", default="", help="read the token from this variable")
    r.add_argument("--workers", type=int, default=1, help="model replicas (one per GPU)")
    r.add_argument("--max-batch", type=int, default=64, help="images per request, at most")
    r.add_argument("--max-body-mb", type=float, default=64.0, help="request body limit (MiB)")
    r.add_argument("--score-timeout-s", type=float, default=600.0)

    m = sub.add_parser(
        "make-tiny",
        help="write a tiny random model directory in the diffusers pipeline layout",
        description="Builds a tiny random model (tokenizers trained offline) and saves it with "
        "save_pretrained, so it loads exactly like real weights.",
    )
    m.add_argument("family", choices=["sd3", "flux", "qwen-image", "bagel"])
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)

    x = sub.add_parser(
        "export",
        help="write a checkpoint as a diffusers LoRA file or a complete model directory",
        description="LoRA runs: OUT/pytorch_lora_weights.safetensors with its adapter metadata "
        "(Pipeline.from_pretrained(BASE).load_lora_weights(OUT)). Full fine-tuning: a model "
        "directory for Pipeline.from_pretrained(OUT), ZeRO-3 shards consolidated.",
    )
    x.add_argument("checkpoint", help="RUN/checkpoints/checkpoint-N")
    x.add_argument("out_dir", help="new (or empty) output directory")
    x.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema runs)")
    x.add_argument("--base", default=None, help="base model directory (default: the run's)")

    d = sub.add_parser(
        "doctor",
        help="versions, devices, the fast paths a recipe would use, what would stop its run",
        description="Reads the recipe and overrides as `flowpo train` does and reports the "
        "library versions, the devices, the re-scoring kernels, attention backend, compile "
        "and precision the run would use, and what would stop it (missing model directory, "
        "unreachable reward service, stale build lock), one line each with the fix; exit "
        "status 1 if a run would stop. --gpu-check runs scripts/gpu_check.sh's checks "
        "(docs/gpu.md).",
    )
    d.add_argument("-c", "--config", default=None, help="YAML recipe (see configs/)")
    d.add_argument("--gpu-check", action="store_true", help="run the GPU validation checks")
    d.add_argument("--out", default="gpu_check.json", help="--gpu-check: the JSON report")
    return p


# The CPU default main job: DiffusionNFT on the shapes world (a miniature GenEval); it learns the
# world several times faster than Flow-GRPO (configs/shapes.yaml), docs/results.md
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "shapes_nft.yaml"


def _recipe(path: str | None) -> str | None:
    if path:
        return path
    return str(DEFAULT_RECIPE) if DEFAULT_RECIPE.is_file() else None


def resolve_train_config(args: argparse.Namespace, overrides: list[str]):
    """Recipe + overrides; on resume, the run's saved resolved config + overrides."""
    import yaml

    from flowpo.trainer.checkpoint import find_checkpoint, run_dir_of

    if args.resume is None:
        return load_config(_recipe(args.config), overrides)
    if args.resume == "latest":
        first = load_config(_recipe(args.config), overrides)
        if not first.logging.run_name:
            raise ConfigError(
                "--resume latest needs the run to continue: add --logging.run_name=NAME"
            )
        run_dir = Path(first.logging.run_dir) / first.logging.run_name
    else:
        run_dir = run_dir_of(find_checkpoint(args.resume, Path(".")))
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(
            f"--resume: {run_dir} has no config.yaml; it is not a flowpo run directory"
        )
    cfg = config_from_dict(yaml.safe_load(saved.read_text()))
    apply_overrides(cfg, overrides)
    cfg.logging.run_dir, cfg.logging.run_name = str(run_dir.parent), run_dir.name
    cfg.checkpoint.resume = args.resume
    return cfg


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from flowpo.trainer.grpo import GRPOTrainer
    from flowpo.trainer.preflight import preflight
    from flowpo.trainer.signals import TrainingInterrupted

    cfg = resolve_train_config(args, overrides)
    # fail on bad input before any process group or model is started
    preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))

    trainer = GRPOTrainer(cfg)
    ok = False
    try:
        trainer.setup()
        trainer.train()
        ok = True
    except TrainingInterrupted as stop:
        # every rank stopped at the same point and the checkpoint is written: a clean stop
        ok = True
        print(f"[rank {trainer.rank}] {stop}; continue with --resume latest", flush=True)
        return 128 + stop.signum
    finally:
        trainer.close(clean=ok)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from flowpo.models.base import load_adapter
    from flowpo.trainer.rollout import sample_ode
    from flowpo.trainer.tracking import save_grid

    _check_checkpoint_args(args)
    adapter = load_adapter(args.family, args.model, guidance_scale=args.guidance_scale)
    adapter.freeze_frozen_parts()
    _load_checkpoint(adapter, args)
    images = []
    for prompt in args.prompt:
        emb = adapter.encode_prompts([prompt] * args.num)
        images.append(sample_ode(adapter, emb, args.steps, list(range(args.num))))
    path = save_grid(torch.cat(images), Path(args.out), nrow=args.num, captions=args.prompt)
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flowpo.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, ema=args.ema, base=args.base)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    import json

    from flowpo.models.base import load_adapter
    from flowpo.models.resolve import resolve_model_path, torch_dtype
    from flowpo.rewards.base import WeightedReward, check_reward_services
    from flowpo.trainer.evaluation import (
        accuracy_table,
        drawing_table,
        run_eval,
        save_eval_grid,
    )
    from flowpo.trainer.preflight import preflight

    _check_checkpoint_args(args)
    cfg = load_config(_recipe(args.config), overrides)
    if args.model:
        cfg.model.path = args.model
    preflight(cfg, training=False)
    check_reward_services(cfg.reward.weights, cfg.reward.options)  # before the model loads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = load_adapter(
        cfg.model.family,
        resolve_model_path(cfg.model.path, out, seed=cfg.train.seed),
        dtype=torch_dtype(cfg.model.dtype),
        resolution=cfg.model.resolution or None,
        guidance_scale=cfg.sampling.guidance_scale,
        **cfg.model.options,
    )
    if cfg.model.attn_backend != "native":  # preflight checked that it runs here
        adapter.set_attention_backend(cfg.model.attn_backend)
    _load_checkpoint(adapter, args)
    res = run_eval(
        adapter,
        WeightedReward(cfg.reward.weights, cfg.reward.options),
        cfg,
        show_progress=True,
        save_dir=out if args.save_images else None,
    )
    grid = save_eval_grid(res, out / "samples.png")
    payload = {
        "model": cfg.model.path,
        "checkpoint": args.checkpoint,
        "ema": args.ema,
        **res.metrics(),
        "counts": res.counts,
        "num_samples": res.num_samples,
    }
    (out / "eval.json").write_text(json.dumps(payload, indent=1))
    print(f"reward {res.reward_mean:.4f} ± {res.reward_std:.4f} over {res.num_samples} samples")
    if res.accuracy:
        print(accuracy_table(None, res))
    if drawing := drawing_table(None, res):
        print(drawing)
    print(f"wrote {out / 'eval.json'}" + (f" and {grid}" if grid else ""))
    return 0


def cmd_make_prompts(args: argparse.Namespace) -> int:
    from flowpo.tasks.geneval_prompts import generate_geneval, generate_ocr, write_jsonl

    make = generate_geneval if args.kind == "geneval" else generate_ocr
    path = write_jsonl(make(args.n, seed=args.seed), args.out)
    print(f"wrote {path}")
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    import yaml

    from flowpo.rewards.server import make_app_from_args, serve

    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token:
            print(f"flowpo: error: --token-env {args.token_env} is unset", file=sys.stderr)
            return 2
    options = {}
    for item in args.option:
        if "=" not in item:
            print(f"flowpo: error: --option '{item}' must look like KEY=VALUE", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        options[key] = yaml.safe_load(value)
    try:
        app = make_app_from_args(
            args.reward,
            args.model_dir,
            args.workers,
            token,
            options,
            max_batch=args.max_batch,
            max_body_bytes=int(args.max_body_mb * 2**20),
            score_timeout_s=args.score_timeout_s,
        )
    except ValueError as e:
        print(f"flowpo: error: {e}", file=sys.stderr)
        return 2
    serve(app, args.host, args.port)
    return 0


def _focus_tags(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(t.strip() for t in args.focus_tags.split(","))


def _bad_stage_option(args: argparse.Namespace) -> str | None:
    """What is wrong with pretrain-shapes' staged-recipe options (the first problem), or None."""
    if not 0.0 <= args.focus_frac <= 1.0:
        return f"--focus-frac {args.focus_frac}: give a fraction in [0, 1]"
    from flowpo.tasks.shapes.world import TAGS

    if args.focus_tags and any(t not in TAGS for t in _focus_tags(args)):
        return f"--focus-tags {args.focus_tags}: give a comma-separated list of {', '.join(TAGS)}"
    if args.focus_tags and args.focus_frac == 0 and args.contrast_batch == 0:
        return (
            f"--focus-tags {args.focus_tags} acts only with --focus-frac > 0 or "
            "--contrast-batch > 0: give one of them"
        )
    if args.contrast_batch < 0:
        return f"--contrast-batch {args.contrast_batch}: give a number of scenes >= 0"
    if args.contrast_batch > 0 and args.contrast_weight == 0:
        return "--contrast-batch acts only with --contrast-weight > 0: give both"
    if args.contrast_weight < 0 or args.contrast_beta <= 0:
        return "--contrast-weight must be >= 0 and --contrast-beta > 0"
    if args.contrast_margin < 0:
        return f"--contrast-margin {args.contrast_margin}: give a margin >= 0 (0 = no cap)"
    if not 0.0 <= args.contrast_sigma_min < 1.0:
        return (
            f"--contrast-sigma-min {args.contrast_sigma_min}: give a noise level in [0, 1) "
            "(0 = the batch's own)"
        )
    # a resumed run loads its own saved weights: the base it started from may be gone
    if (
        args.init_from
        and not args.resume
        and not (Path(args.init_from) / "model_index.json").is_file()
    ):
        return (
            f"--init-from {args.init_from}: not a model directory (no model_index.json); give "
            "a base saved by pretrain-shapes"
        )
    return None


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _fill_from_saved(args: argparse.Namespace, argv: list[str]) -> None:
    """`--resume OUT_DIR`: the settings not given on the command line come from the saved run
    (those given must still match it: pretrain() says which differ)."""
    from flowpo.tasks.shapes.pretrain import saved_settings

    # a saved setting is the option of the same name (compile: --no-compile); settings with
    # no option (text_dropout, ...) stay pretrain()'s defaults and are checked there
    for key, value in saved_settings(args.resume).items():
        flag = "--no-compile" if key == "compile" else "--" + key.replace("_", "-")
        if (key != "compile" and not hasattr(args, key)) or _given(argv, flag):
            continue
        if key == "caption_noise":
            args.caption_noise = ",".join(f"{t}={p}" for t, p in value.items())
        elif key == "focus_tags":
            args.focus_tags = ",".join(value)
        elif key == "compile":
            args.no_compile = not value
        else:
            setattr(args, key, value)


def cmd_pretrain_shapes(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from flowpo.tasks.shapes.pretrain import ResumeMismatch

    if args.resume and args.out_dir and Path(args.out_dir) != Path(args.resume):
        print("flowpo: error: give OUT_DIR or --resume OUT_DIR, not both", file=sys.stderr)
        return 2
    if not (args.resume or args.out_dir):
        print("flowpo: error: pretrain-shapes needs OUT_DIR (or --resume OUT_DIR)", file=sys.stderr)
        return 2
    from flowpo.tasks.shapes.pretrain import is_staged

    if args.staged or (args.resume and is_staged(args.resume)):
        return _cmd_pretrain_staged(args, argv or [])
    if args.resume and not args.snapshot:
        _fill_from_saved(args, argv or [])
    noise = None
    if args.caption_noise:
        from flowpo.tasks.shapes.pretrain import CAPTION_NOISE

        noise = dict(CAPTION_NOISE)
        for item in args.caption_noise.split(","):
            tag, _, val = item.partition("=")
            try:
                p = float(val)
            except ValueError:
                p = -1.0
            if tag.strip() not in CAPTION_NOISE or not 0.0 <= p <= 1.0:
                print(
                    f"flowpo: error: --caption-noise {item!r}: give TAG=P with TAG one of "
                    f"{', '.join(CAPTION_NOISE)} and P in [0, 1]",
                    file=sys.stderr,
                )
                return 2
            noise[tag.strip()] = p
    bad = _bad_stage_option(args)
    if bad:
        print(f"flowpo: error: {bad}", file=sys.stderr)
        return 2
    if args.snapshot:
        from flowpo.tasks.shapes.pretrain import save_snapshot

        step = save_snapshot(args.resume or args.out_dir, args.snapshot)
        print(f"saved the EMA weights of step {step} to {args.snapshot}")
        return 0
    try:
        _run_pretrain(args, noise)
    except ResumeMismatch as e:
        print(f"flowpo: error: {e}", file=sys.stderr)
        return 2
    return 0


# the only pretrain-shapes options a staged run takes (the recipe fixes every other setting)
_STAGED_OPTIONS = ("--resume", "--staged", "--snapshot", "--no-compile")


def _cmd_pretrain_staged(args: argparse.Namespace, argv: list[str]) -> int:
    """`--staged OUT_DIR` (or `--resume OUT_DIR` of a staged run): the committed base's recipe."""
    from flowpo.tasks.shapes.pretrain import (
        ResumeMismatch,
        current_stage_dir,
        pretrain_staged,
        save_snapshot,
    )

    given = [a.split("=")[0] for a in argv if a.startswith("--")]
    given = [f for f in given if f not in _STAGED_OPTIONS]
    if given:
        print(
            f"flowpo: error: {', '.join(given)}: the staged recipe fixes its settings (see "
            "pretrain.BASE_STAGES); drop them, or run single stages without --staged "
            "(interrupt a staged run at any time and continue it with --resume OUT_DIR)",
            file=sys.stderr,
        )
        return 2
    out = args.resume or args.out_dir
    try:
        if args.snapshot:
            stage = current_stage_dir(out)
            step = save_snapshot(stage, args.snapshot)
            print(f"saved the EMA weights of {stage.name}, step {step}, to {args.snapshot}")
        else:
            pretrain_staged(out, compile=not args.no_compile, log=lambda m: print(m, flush=True))
    except (ResumeMismatch, FileNotFoundError) as e:
        print(f"flowpo: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_pretrain(args: argparse.Namespace, noise: dict | None) -> None:
    from flowpo.tasks.shapes.pretrain import pretrain

    pretrain(
        args.resume or args.out_dir,
        resume=bool(args.resume),
        save_every=args.save_every,
        eval_every=args.eval_every,
        compile=not args.no_compile,
        stop_at=args.stop_at,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        sigma_shift=args.sigma_shift,
        aux_text_weight=args.aux_text_weight,
        contrast_weight=args.contrast_weight,
        contrast_beta=args.contrast_beta,
        contrast_sigma_min=args.contrast_sigma_min,
        contrast_margin=args.contrast_margin,
        contrast_batch=args.contrast_batch,
        focus_frac=args.focus_frac,
        **({"focus_tags": _focus_tags(args)} if args.focus_tags else {}),
        init_from=args.init_from,
        caption_noise=noise,
        log=lambda m: print(m, flush=True),
    )


def cmd_doctor(args: argparse.Namespace, overrides: list[str]) -> int:
    if args.gpu_check:
        from flowpo.gpu_check import run_gpu_check

        return run_gpu_check(args.out)
    from flowpo.doctor import run_doctor

    try:
        cfg = load_config(_recipe(args.config), overrides)
    except ConfigError as e:
        return run_doctor(None, error=str(e))
    return run_doctor(cfg)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from flowpo.models.tiny import make_tiny

    out = make_tiny(args.family, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.family} model to {out}")
    return 0


def strip_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher puts `--local_rank=N` right after the module name (before the
    subcommand); the rank comes from the LOCAL_RANK variable it also sets, so drop the flag."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = strip_local_rank(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and args.command not in ("train", "eval", "doctor"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from flowpo.models.base import ModelLoadError
    from flowpo.rewards.client import RewardServiceError
    from flowpo.trainer.jit_lock import StaleExtensionLock
    from flowpo.trainer.nonfinite import TrainingDiverged
    from flowpo.trainer.tracking import quiet_libraries

    quiet_libraries()
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "sample":
            return cmd_sample(args)
        if args.command == "eval":
            return cmd_eval(args, extra)
        if args.command == "pretrain-shapes":
            return cmd_pretrain_shapes(args, argv)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "serve-reward":
            return cmd_serve_reward(args)
        if args.command == "doctor":
            return cmd_doctor(args, extra)
        if args.command == "make-prompts":
            return cmd_make_prompts(args)
        return cmd_make_tiny(args)
    except (
        ConfigError,
        ModelLoadError,
        FileNotFoundError,
        RewardServiceError,
        TrainingDiverged,
        StaleExtensionLock,
    ) as e:
        print(f"flowpo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
