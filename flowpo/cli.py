"""flowpo command line.

    flowpo train [-c configs/RECIPE.yaml] [--section.field=value ...] [--resume DIR|latest]
    flowpo sample --model DIR [--checkpoint CKPT] --prompt "..." [--num 4] [--out grid.png]
    flowpo make-tiny {sd3,flux} OUT_DIR

One rank on CPU: `python -m flowpo train`. Several ranks: `deepspeed --num_gpus N -m flowpo train`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowpo.config import ConfigError, apply_overrides, config_from_dict, load_config

TRAIN_HELP = """Run online RL (Flow-GRPO) on a flow-matching model.

With no recipe it runs the CPU default: a tiny random SD3-family model trained with LoRA on the
jpeg_incompressibility reward. Any config field can be overridden as --section.field=value
(sections: model, sampling, rollout, train, reward, engine, logging, eval, checkpoint), e.g.
  flowpo train -c configs/tiny_sd3_jpeg.yaml --train.epochs=5 --rollout.group_size=4
Resume: --resume latest --logging.run_name=NAME, or --resume RUN/checkpoints/checkpoint-N."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flowpo",
        description="Online RL fine-tuning of flow-matching text-to-image models (Flow-GRPO family).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train with Flow-GRPO (CPU default: tiny SD3 + jpeg reward)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("-c", "--config", default=None, help="YAML recipe (see configs/)")
    t.add_argument("--resume", default=None, help="checkpoint directory, or 'latest'")
    t.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)

    s = sub.add_parser(
        "sample",
        help="ODE-sample images from a model directory (+ optional checkpoint)",
        description="Deterministic ODE sampling; writes a PNG grid (one row per prompt, one "
        "column per seed).",
    )
    s.add_argument("--model", required=True, help="local diffusers model directory")
    s.add_argument("--family", default="auto", help="sd3 | flux | auto (default)")
    s.add_argument("--checkpoint", default=None, help="flowpo checkpoint dir (LoRA or full)")
    s.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    s.add_argument("--num", type=int, default=4, help="images per prompt (seeds 0..num-1)")
    s.add_argument("--steps", type=int, default=10, help="ODE steps")
    s.add_argument("--guidance-scale", type=float, default=1.0)
    s.add_argument("--out", default="samples.png", help="output PNG grid")

    m = sub.add_parser(
        "make-tiny",
        help="write a tiny random model directory in the diffusers pipeline layout",
        description="Builds a tiny random model (tokenizers trained offline) and saves it with "
        "save_pretrained, so it loads exactly like real weights.",
    )
    m.add_argument("family", choices=["sd3", "flux"])
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    return p


def resolve_train_config(args: argparse.Namespace, overrides: list[str]):
    """Recipe + overrides; on resume, the run's saved resolved config + overrides."""
    import yaml

    from flowpo.trainer.grpo import find_checkpoint

    if args.resume is None:
        return load_config(args.config, overrides)
    if args.resume == "latest":
        first = load_config(args.config, overrides)
        if not first.logging.run_name:
            raise ConfigError(
                "--resume latest needs the run to continue: add --logging.run_name=NAME"
            )
        run_dir = Path(first.logging.run_dir) / first.logging.run_name
    else:
        run_dir = find_checkpoint(args.resume, Path(".")).parent.parent
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

    cfg = resolve_train_config(args, overrides)
    # fail on bad input before any process group or model is started
    cfg.validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    trainer = GRPOTrainer(cfg)
    ok = False
    try:
        trainer.setup()
        trainer.train()
        ok = True
    finally:
        trainer.close(clean=ok)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from flowpo.models.base import load_adapter
    from flowpo.trainer.logging import save_grid
    from flowpo.trainer.rollout import sample_ode

    adapter = load_adapter(args.family, args.model, guidance_scale=args.guidance_scale)
    adapter.freeze_frozen_parts()
    if args.checkpoint:
        load_trainable(adapter, Path(args.checkpoint))
    images = []
    for prompt in args.prompt:
        emb = adapter.encode_prompts([prompt] * args.num)
        images.append(sample_ode(adapter, emb, args.steps, list(range(args.num))))
    path = save_grid(torch.cat(images), Path(args.out), nrow=args.num, captions=args.prompt)
    print(f"wrote {path}")
    return 0


def load_trainable(adapter, ckpt: Path) -> None:
    """Apply a checkpoint's trainable weights (LoRA adapters or full state dict) to the adapter."""
    import json

    import yaml
    from safetensors.torch import load_file

    state = json.loads((ckpt / "trainer_state.json").read_text())
    weights = load_file(str(ckpt / "trainable.safetensors"))
    module = adapter.trainable_module
    if state["lora"]:
        from peft import LoraConfig, set_peft_model_state_dict

        cfg = config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
        module.add_adapter(
            LoraConfig(
                r=cfg.train.lora_rank,
                lora_alpha=cfg.train.lora_alpha,
                target_modules=adapter.lora_targets,
            )
        )
        result = set_peft_model_state_dict(module, weights)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint has unexpected LoRA keys: {result.unexpected_keys[:5]}")
    else:
        module.load_state_dict(weights)


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from flowpo.models.tiny import make_tiny

    out = make_tiny(args.family, args.out_dir, seed=args.seed)
    print(f"wrote tiny {args.family} model to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from flowpo.models.base import ModelLoadError
    from flowpo.trainer.logging import quiet_libraries

    quiet_libraries()
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        if args.command == "sample":
            return cmd_sample(args)
        return cmd_make_tiny(args)
    except (ConfigError, ModelLoadError, FileNotFoundError) as e:
        print(f"flowpo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
