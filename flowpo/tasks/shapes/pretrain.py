"""Pretrain the shapes-world base model: a tiny pixel-space SD3-family model (SD3 transformer on
32x32 RGB with 4x4 patches, CLIP x2 + T5 text encoders trained jointly) by rectified-flow
matching on rendered (prompt, image) pairs of the training split.

    flowpo pretrain-shapes OUT_DIR [--steps 4000] [--batch-size 64] [--resume OUT_DIR]

Captions are noisy the way web alt-text is (the reason real base models are weak at GenEval's
compositional tags): a `position` caption's relation holds only when its scene was drawn to
match it (`CAPTION_NOISE["position"]` of them are placed freely), a `counting` caption is off by
one for a fraction of scenes, and a `color_attr` caption has its two colours swapped for a
fraction. Shapes and colours of single objects are always right. The base therefore draws the
words well and composes them only partly: the room that RL is meant to close.

The saved transformer and text encoders are an exponential moving average of the trained ones
(decay `ema_decay`), as diffusion models are usually released: it draws cleaner shapes than the
last iterate. Pretraining is a fixed number of steps with a step-based learning-rate schedule
and saves its full state (weights, EMA, optimiser, RNGs) every `save_every` steps, so a run
resumed with `--resume` ends bit-identical to one that was never interrupted.

With `aux_text_weight > 0` the text encoders also learn an auxiliary objective (docs/results.md,
"Why position and color_attr do not move"): in every color_attr caption each shape word's tokens
(its CLIP and its T5 position in the conditioning sequence) predict that shape's colour, and in
every position caption the placed shape's tokens predict the relation and the reference's tokens
its opposite, through linear heads that are trained with them and not saved. Without it the
jointly trained encoders read a caption as a bag of words: the flow-matching loss alone barely
rewards knowing which colour belongs to which shape or which way a relation points. The targets
come from the caption, never from the (possibly mis-described) scene. Measured with weight 1 from
step 0: the tokens learn it, but the transformer still does not place by the relation and the
base draws worse, so it is off by default and the committed base is trained without it.

With `contrast_weight > 0` each position and color_attr scene drawn to match its caption must
also be denoised better under that caption than under a counterfactual naming the same words
(`counterfactual_prompt`, `caption_contrast_loss`). Measured as a second stage from the committed
base (`init_from`, `focus_frac` 0.5, clean captions for those tags): it teaches the colour
binding within a few hundred steps, not yet the placement by a relation; off by default.
`contrast_sigma_min` moves the contrast to noise levels in [min, 1], where only the caption can
tell the layout (measured with 0.7 over 900 steps: no placement either, weaker binding, worse
drawing). With three quarters of every batch from position scenes over 4500 steps (`focus_frac`,
`focus_tags`) the placement is learned, at the cost of drawing; `contrast_margin` caps the error
difference the contrast asks for, and `contrast_batch` gives the contrast scenes of its own so the
flow-matching batch keeps its tag mix (docs/results.md, "Why the flow-matching loss does not teach
word order"). The committed base is the staged recipe `BASE_STAGES` (`pretrain_staged`, the CLI's
`--staged`): the defaults for 4000 steps, then such a contrast-batch stage, three short
continuations, and two stages of a weaker contrast at all noise levels on position and color_attr
scenes that teach the colour binding.

The directory is a StableDiffusion3Pipeline layout with `"vae": [null, null]`: the SD3 adapter
treats such a model as pixel space (latents are images in [-1, 1]).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowpo.rewards.geneval_rules import OPPOSITE, RELATION_DIRECTIONS
from flowpo.sde import shift_sigmas
from flowpo.tasks.shapes.world import CELL, COLORS, SIZE, TAGS, article, render, splits

SIGMA_SHIFT = 1.0  # pretraining sigmas and the saved scheduler (see "scheduler" below)
# fraction of each tag's training scenes whose caption is wrong in the way described above
CAPTION_NOISE = {"position": 0.5, "counting": 0.4, "color_attr": 0.3}
# the tags whose captions depend on word order (a relation's direction, a colour's shape)
FOCUS_TAGS = ("position", "color_attr")
STATE_FILE = "pretrain_state.pt"
SUMMARY_FILE = "pretrain_summary.json"  # settings, time, losses and quick checks of a run

BASE_CONFIG: dict[str, Any] = {
    "transformer": dict(
        sample_size=SIZE,
        # one patch per world cell (8x8 px): 16 image tokens, each drawing one whole object or
        # background; placing objects is choosing tokens (see world.CELL). Width 192 = the
        # 192 values of a patch, so every noise dimension can be removed (see world.CELL)
        patch_size=CELL,
        in_channels=3,
        out_channels=3,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=6,
        joint_attention_dim=64,
        caption_projection_dim=192,
        pooled_projection_dim=64,
        pos_embed_max_size=SIZE // CELL,
        qk_norm="rms_norm",
    ),
    # shift 1. At 32x32 an object averages the noise over ~100 pixels, so its outline is still
    # readable near sigma 0.9 and the first Euler step commits to the initial noise's blobs.
    # Shift 3 (SD3's, in training and sampling) was measured not to fix that and to score lower:
    # 0.196 held-out strict accuracy after 5000 steps against 0.228 (docs/results.md, "Shapes
    # world").
    "scheduler": dict(num_train_timesteps=1000, shift=SIGMA_SHIFT),
}


class ResumeMismatch(ValueError):
    """`--resume` was given settings that differ from those the saved run was started with."""


def build_base(seed: int = 0, sigma_shift: float = SIGMA_SHIFT) -> Any:
    """A randomly initialised pixel-space SD3 pipeline (tokenizers built offline)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from flowpo.models.tiny import TINY_CONFIGS, seeded, text_encoders

    clip_tok, (clip1, clip2), t5_tok, t5 = text_encoders(TINY_CONFIGS["sd3"], seed, 2, True)
    transformer = seeded(seed + 30, lambda: SD3Transformer2DModel(**BASE_CONFIG["transformer"]))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            **{**BASE_CONFIG["scheduler"], "shift": sigma_shift}
        ),
        vae=None,
        text_encoder=clip1,
        tokenizer=clip_tok,
        text_encoder_2=clip2,
        tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def trained_modules(pipe) -> list[torch.nn.Module]:
    """The modules pretraining trains (and saves the EMA of): the transformer and the three
    text encoders."""
    return [getattr(pipe, n) for n in TRAINED]


def load_base(path) -> Any:
    """A saved base (pixel space, no VAE) loaded from a local directory, progress bars off."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), vae=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noisy_scene_meta(meta: dict, rng: random.Random, noise: dict[str, float]) -> dict:
    """The metadata of the scene drawn for a caption: `meta` itself, or for a noisy caption
    the scene it mis-describes (free placement, a count off by one, swapped colours)."""
    p = noise.get(meta["tag"], 0.0)
    if p <= 0 or rng.random() >= p:
        return meta
    inc = [dict(c) for c in meta["include"]]
    if meta["tag"] == "position":
        for c in inc:
            c.pop("position", None)
    elif meta["tag"] == "counting":
        n = inc[0]["count"]
        inc[0]["count"] = n + rng.choice((-1, 1)) if n > 1 else n + 1
        exc = [{**c, "count": inc[0]["count"] + 1} for c in meta.get("exclude", [])]
        return {**meta, "include": inc, "exclude": exc}
    elif meta["tag"] == "color_attr":
        inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
    return {**meta, "include": inc}


def _images(
    metas: list[dict],
    rng: random.Random,
    noise: dict[str, float] | None = None,
    matched: list[bool] | None = None,
) -> torch.Tensor:
    """(B, 3, SIZE, SIZE) in [-1, 1] for freshly rendered scenes of (noisy) captions; appends to
    `matched`, when given, whether each scene was drawn to match its caption."""
    scenes = [noisy_scene_meta(m, rng, noise or {}) for m in metas]
    if matched is not None:
        matched += [sc is m for sc, m in zip(scenes, metas)]
    arr = np.stack([render(m, rng.randrange(1 << 30)) for m in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1


def training_scenes(
    n: int, rng: random.Random, *, captions: bool, noise: dict[str, float] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """n freshly rendered scenes of the training split drawn as pretraining draws them (tags
    uniformly, then a prompt of the tag; a noisy caption's scene mis-describes it, `noise`
    defaulting to CAPTION_NOISE): ((n, 3, SIZE, SIZE) in [-1, 1], their captions, or n empty
    strings with captions=False). The RL trainer's drawing anchor (trainer/anchor.py) uses it."""
    by_tag = _train_by_tag()
    metas = [rng.choice(by_tag[rng.choice(TAGS)]) for _ in range(n)]
    images = _images(metas, rng, CAPTION_NOISE if noise is None else noise)
    return images, [m["prompt"] if captions else "" for m in metas]


def training_captions() -> list[str]:
    """Every caption `training_scenes` can return (the training split's prompts)."""
    return [m["prompt"] for ms in _train_by_tag().values() for m in ms]


@functools.cache
def _train_by_tag() -> dict[str, list[dict]]:
    train = splits()["train"]
    return {t: [m for m in train if m["tag"] == t] for t in TAGS}


def encode_prompts(pipe, prompts: list[str]):
    """(token-sequence embeddings, pooled embeddings) of the base's three text encoders, as
    its transformer receives them; shared by pretraining, quick checks and the probes."""
    pe, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=pipe.tokenizer_3.model_max_length,
    )
    return pe, pooled


@torch.no_grad()
def ode_samples(
    pipe, prompts: list[str], seeds: list[int], steps: int = 10, guidance: float = 1.0
) -> torch.Tensor:
    """(len(prompts) x len(seeds), 3, SIZE, SIZE) ODE samples in [0, 1], prompt-major, the
    sampler flowpo eval uses (Euler on the pipeline's sigmas, CFG when guidance != 1)."""
    pe, pooled = encode_prompts(pipe, [p for p in prompts for _ in seeds])
    ue, upooled = encode_prompts(pipe, [""] * pe.shape[0])
    x = torch.cat(
        [torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(s)) for s in seeds]
        * len(prompts)
    )
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    sig = sched.sigmas
    for k in range(steps):
        t = torch.full((x.shape[0],), float(sig[k]) * 1000)
        v = pipe.transformer(
            hidden_states=x, encoder_hidden_states=pe, pooled_projections=pooled, timestep=t
        ).sample
        if guidance != 1.0:
            vu = pipe.transformer(
                hidden_states=x, encoder_hidden_states=ue, pooled_projections=upooled, timestep=t
            ).sample
            v = vu + guidance * (v - vu)
        x = x + v * (sig[k + 1] - sig[k])
    return (x / 2 + 0.5).clamp(0, 1)


def quick_accuracy(
    pipe, metas: list[dict], seeds: list[int], steps: int = 10, guidance: float = 1.0
) -> float:
    """Strict accuracy of ODE samples (same sampler as flowpo eval) on (prompt, seed) pairs."""
    from flowpo.tasks.shapes.detect import detect, score

    imgs = ode_samples(pipe, [m["prompt"] for m in metas], seeds, steps, guidance)
    flat = [m for m in metas for _ in seeds]
    return float(np.mean([score(detect(im), m)[0] for im, m in zip(imgs, flat)]))


RELATIONS = list(RELATION_DIRECTIONS)  # the auxiliary relation head's classes, in this order


def word_positions(pipe, prompt: str, word: str) -> list[int]:
    """Positions in the conditioning sequence (CLIP part first, then T5, as encode_prompt
    concatenates them) of the token that ends `word` in `prompt`: where the transformer reads it."""
    clip_len = pipe.tokenizer.model_max_length
    ids = pipe.tokenizer(prompt, max_length=clip_len, truncation=True).input_ids
    out, acc = [], ""
    for i, tok in enumerate(pipe.tokenizer.convert_ids_to_tokens(ids)):
        if tok.startswith("<|"):
            continue
        acc += tok.replace("</w>", "")
        if tok.endswith("</w>"):
            if acc == word:
                out.append(i)
            acc = ""
    t5_len = pipe.tokenizer_3.model_max_length  # encode_prompts truncates T5 there too
    t5_ids = pipe.tokenizer_3(prompt, max_length=t5_len, truncation=True).input_ids
    for j, tok in enumerate(pipe.tokenizer_3.convert_ids_to_tokens(t5_ids)):
        if tok == "\u2581" + word:
            out.append(clip_len + j)
    return out


def aux_text_targets(
    pipe, metas: list[dict], prompts: list[str], cache: dict | None = None
) -> dict[str, tuple[list[tuple[int, int]], list[int]]]:
    """The auxiliary text loss's examples for a batch: {"color": (positions, colour indices),
    "relation": (positions, relation indices)}, a position being (batch row, sequence index).
    Captions dropped to "" and position captions naming one shape twice give none."""
    cache = {} if cache is None else cache

    def where(prompt: str, word: str) -> list[int]:
        if (prompt, word) not in cache:
            cache[(prompt, word)] = word_positions(pipe, prompt, word)
        return cache[(prompt, word)]

    colours = list(COLORS)
    out: dict[str, tuple[list, list]] = {"color": ([], []), "relation": ([], [])}
    for b, (m, prompt) in enumerate(zip(metas, prompts)):
        if not prompt:
            continue
        if m["tag"] == "color_attr":
            for c in m["include"]:
                for q in where(prompt, c["class"]):
                    out["color"][0].append((b, q))
                    out["color"][1].append(colours.index(c["color"]))
        elif m["tag"] == "position":
            ref, placed = m["include"]
            if placed["class"] == ref["class"]:
                continue
            rel = placed["position"][0]
            for obj, r in ((placed, rel), (ref, OPPOSITE[rel])):
                for q in where(prompt, obj["class"]):
                    out["relation"][0].append((b, q))
                    out["relation"][1].append(RELATIONS.index(r))
    return out


def aux_text_loss(heads: dict, pe: torch.Tensor, targets: dict) -> torch.Tensor:
    """Sum over the heads that have examples of their mean cross-entropy on the token embeddings."""
    import torch.nn.functional as F

    terms = []
    for name, (pos, y) in targets.items():
        if pos:
            h = torch.stack([pe[b, q] for b, q in pos])
            terms.append(F.cross_entropy(heads[name](h), torch.tensor(y)))
    return torch.stack(terms).sum() if terms else pe.new_zeros(())


def flow_matching_sq_error(forward, x0, eps, sigma, pe, pooled) -> torch.Tensor:
    """Elementwise squared error of the rectified-flow velocity at x_sigma = (1 - sigma) x0 +
    sigma eps (target eps - x0); `forward` is the transformer (or its compiled form)."""
    s = sigma.view(-1, 1, 1, 1)
    v = forward(
        hidden_states=(1 - s) * x0 + s * eps,
        encoder_hidden_states=pe,
        pooled_projections=pooled,
        timestep=sigma * 1000,
    ).sample
    return (v - (eps - x0)) ** 2


def counterfactual_prompt(
    meta: dict, rng: random.Random, allowed: Collection[str] | None = None
) -> str | None:
    """A prompt of the world that names the same words as `meta`'s but does not describe its
    scene: a position caption with its relation flipped or its two shapes exchanged (one of the
    two at random), a color_attr caption with its two colours exchanged; None for the other tags
    and for position captions that name one shape twice.

    `allowed` (pretraining passes the training split's prompts) restricts the answer to those
    prompts: a form outside it is replaced by the other form, or None when both are outside.
    Without it a training caption's counterfactual is a held-out prompt about one time in ten
    (position) or twenty (color_attr), and the contrast would train on held-out prompt text."""
    if meta["tag"] == "position":
        ref, placed = meta["include"]
        a, b, rel = placed["class"], ref["class"], placed["position"][0]
        if a == b:
            return None
        forms = [f"a photo of a {a} {OPPOSITE[rel]} a {b}", f"a photo of a {b} {rel} a {a}"]
        if rng.random() >= 0.5:
            forms.reverse()
    elif meta["tag"] == "color_attr":
        (a, ca), (b, cb) = [(c["class"], c["color"]) for c in meta["include"]]
        forms = [f"a photo of {article(cb)} {cb} {a} and {article(ca)} {ca} {b}"]
    else:
        return None
    return next((f for f in forms if allowed is None or f in allowed), None)


def caption_contrast_loss(
    per_true: torch.Tensor, per_counter: torch.Tensor, beta: float, margin: float = 0.0
) -> torch.Tensor:
    """Mean over the samples of softplus(-beta (L_counter - L_true)): the denoiser read as a
    classifier between a scene's caption and its counterfactual (the error under each caption,
    per sample, as its negative logit), trained to prefer the true one. The flow-matching loss
    alone barely rewards reading word order (a prompt pair that differs only in it is drawn
    identically after 1500 steps trained on nothing else); this term rewards exactly that.
    margin > 0 caps the difference at the margin: a sample whose true caption already wins by
    that much gives no gradient, so the term stops pushing the counterfactual's error up (an
    uncapped contrast kept pushing and cost the drawing; docs/results.md)."""
    diff = per_counter - per_true
    if margin > 0:
        diff = torch.clamp(diff, max=margin)
    return torch.nn.functional.softplus(-beta * diff).mean()


def pretrain(
    out_dir: str,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    eval_every: int = 1000,
    save_every: int = 500,
    text_dropout: float = 0.1,
    sigma_shift: float = SIGMA_SHIFT,
    ema_decay: float = 0.999,
    caption_noise: dict[str, float] | None = None,
    compile: bool = True,
    uniform_sigma: float = 0.5,
    aux_text_weight: float = 0.0,
    contrast_weight: float = 0.0,
    contrast_beta: float = 100.0,
    contrast_sigma_min: float = 0.0,
    contrast_margin: float = 0.0,
    contrast_batch: int = 0,
    focus_frac: float = 0.0,
    focus_tags: tuple[str, ...] = FOCUS_TAGS,
    init_from: str | None = None,
    resume: bool = False,
    stop_at: int = 0,
    log=print,
) -> dict[str, Any] | None:
    """Train the base model for `steps` steps; saves it to out_dir and returns a summary (also
    written there). With resume=True it continues from out_dir's saved state; stop_at > 0 stops
    after that step with the state saved (a sitting of a longer run) and returns None."""
    from tqdm.auto import tqdm

    noise = dict(CAPTION_NOISE if caption_noise is None else caption_noise)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    sp = splits()
    by_tag = {t: [m for m in sp["train"] if m["tag"] == t] for t in TAGS}
    train_prompts = {m["prompt"] for m in sp["train"]}  # the contrast's counterfactuals
    pipe = build_base(seed, sigma_shift)
    modules = trained_modules(pipe)
    # a later stage of a staged recipe starts from a saved base's weights (a resumed one loads
    # its own saved weights below, so the base it started from need not exist any more)
    if init_from and not resume:
        for m, src in zip(modules, trained_modules(load_base(init_from))):
            m.load_state_dict(src.state_dict())
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]
    for m in modules:
        m.train().requires_grad_(True)
    heads: dict[str, torch.nn.Module] = {}
    if aux_text_weight > 0:  # own RNG stream: the run without heads keeps its random numbers
        dim = BASE_CONFIG["transformer"]["joint_attention_dim"]
        with torch.random.fork_rng():
            torch.manual_seed(seed + 50)
            heads = {
                "color": torch.nn.Linear(dim, len(COLORS)),
                "relation": torch.nn.Linear(dim, len(RELATIONS)),
            }
    head_params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.AdamW(params + head_params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    token_cache: dict = {}
    warmup = 200
    step, ema_loss, ema_aux, ema_con, history, seconds = 0, None, None, None, [], 0.0
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "text_dropout": text_dropout,
        "sigma_shift": sigma_shift,
        "ema_decay": ema_decay,
        "caption_noise": noise,
        "compile": compile,
        "uniform_sigma": uniform_sigma,
    }
    # the options below are recorded only when used: states saved before they existed resume
    if aux_text_weight > 0:
        settings["aux_text_weight"] = aux_text_weight
    if contrast_weight > 0:
        settings.update(contrast_weight=contrast_weight, contrast_beta=contrast_beta)
        if contrast_sigma_min > 0:
            settings["contrast_sigma_min"] = contrast_sigma_min
        if contrast_margin > 0:
            settings["contrast_margin"] = contrast_margin
        if contrast_batch > 0:
            settings["contrast_batch"] = contrast_batch
    if focus_frac > 0:
        settings["focus_frac"] = focus_frac
    if (focus_frac > 0 or contrast_batch > 0) and tuple(focus_tags) != FOCUS_TAGS:
        settings["focus_tags"] = list(focus_tags)
    if init_from:
        settings["init_from"] = str(Path(init_from).resolve())
    if resume:
        state_path = out / STATE_FILE
        st = load_state(out)
        if st["settings"] != settings:
            diff = {
                k: (st["settings"].get(k), v)
                for k, v in settings.items()
                if st["settings"].get(k) != v
            }
            raise ResumeMismatch(
                f"--resume {out}: settings differ from the saved run (saved, now): {diff}; "
                "drop those options (`--resume OUT_DIR` alone continues with the saved ones)"
            )
        with torch.no_grad():
            for p, v in zip(params, st["params"]):
                p.copy_(v)
            for e, v in zip(ema, st["ema"]):
                e.copy_(v)
            for p, v in zip(head_params, st.get("head_params", [])):
                p.copy_(v)
        opt.load_state_dict(st["opt"])
        rng.setstate(st["py_rng"])
        torch.set_rng_state(st["torch_rng"])
        step, ema_loss, history, seconds = st["step"], st["ema_loss"], st["history"], st["seconds"]
        ema_aux, ema_con = st.get("ema_aux"), st.get("ema_con")
        log(f"resumed pretraining from {state_path} at step {step}")
    t0 = time.time() - seconds

    def save_state() -> None:
        tmp = out / (STATE_FILE + ".tmp")
        torch.save(
            {
                "settings": settings,
                "params": [p.detach() for p in params],
                "ema": ema,
                "head_params": [p.detach() for p in head_params],
                "opt": opt.state_dict(),
                "py_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "ema_loss": ema_loss,
                "ema_aux": ema_aux,
                "ema_con": ema_con,
                "history": history,
                "seconds": time.time() - t0,
            },
            tmp,
        )
        tmp.replace(out / STATE_FILE)  # atomic: a kill mid-save keeps the previous state

    def swap_ema() -> None:  # exchange live weights and EMA weights in place
        with torch.no_grad():
            for p, e in zip(params, ema):
                tmp = p.detach().clone()
                p.copy_(e)
                e.copy_(tmp)

    # torch.compile: 1.4x faster training steps on CPU after a ~60 s compile (measured at batch
    # 64 on one thread); evaluation runs the eager module (other batch sizes, no recompiles).
    # Compiled and eager kernels round differently, so `compile` is part of the settings.
    forward = torch.compile(pipe.transformer) if compile else pipe.transformer
    focus = tuple(focus_tags)
    bar = tqdm(total=steps, initial=step, desc="pretrain", disable=not sys.stderr.isatty())

    def draw_sigma(n: int) -> torch.Tensor:
        u = torch.rand(n)
        ln = torch.sigmoid(torch.randn(n))
        return shift_sigmas(torch.where(u < uniform_sigma, torch.rand(n), ln), sigma_shift)

    while step < steps:
        # tags sampled uniformly so the rare ones (single/two object) are seen as often
        # (focus_frac: a share from focus_tags, by default the two tags that need word order;
        # no draw when 0, so the committed recipe keeps its random stream)
        metas = [
            rng.choice(
                by_tag[rng.choice(focus if focus_frac and rng.random() < focus_frac else TAGS)]
            )
            for _ in range(batch_size)
        ]
        matched: list[bool] = []
        x0 = _images(metas, rng, noise, matched)
        # empty prompts teach the unconditional velocity, so CFG can be used at sampling
        prompts = ["" if rng.random() < text_dropout else m["prompt"] for m in metas]
        pe, pooled = encode_prompts(pipe, prompts)
        # logit-normal (SD3's sampling) mixed with uniform: logit-normal alone rarely draws
        # sigma < 0.1, where the last sampling step cleans edges and colours; shifted like the
        # saved scheduler
        sigma = draw_sigma(batch_size)
        eps = torch.randn_like(x0)
        err = flow_matching_sq_error(forward, x0, eps, sigma, pe, pooled)
        loss = torch.mean(err)
        total = loss
        if contrast_weight > 0:
            if contrast_batch > 0:  # its own scenes from the focus tags, captions kept: the
                # flow-matching batch keeps its tag mix, so the contrast's exposure does not
                # shift what the drawing is trained on
                c_metas = [rng.choice(by_tag[rng.choice(focus)]) for _ in range(contrast_batch)]
                c_matched: list[bool] = []
                c_x0 = _images(c_metas, rng, noise, c_matched)
                c_prompts = [m["prompt"] for m in c_metas]
                c_eps, c_sigma, c_err = torch.randn_like(c_x0), draw_sigma(contrast_batch), None
            else:
                c_metas, c_prompts, c_matched = metas, prompts, matched
                c_x0, c_eps, c_sigma, c_err = x0, eps, sigma, err
            rows, counter = [], []
            for i, (m, p, ok) in enumerate(zip(c_metas, c_prompts, c_matched)):
                q = counterfactual_prompt(m, rng, train_prompts) if p and ok else None
                if q is not None:
                    rows.append(i)
                    counter.append(q)
            con = loss.new_zeros(())
            if rows:
                idx = torch.tensor(rows)
                pe2, pooled2 = encode_prompts(pipe, counter)
                if contrast_sigma_min > 0:  # own noise levels in [min, 1]: the band where the
                    # noisy image does not show the layout yet, so only the caption can tell
                    sig_c = contrast_sigma_min + (1 - contrast_sigma_min) * torch.rand(len(rows))
                else:
                    sig_c = c_sigma[idx]
                if c_err is not None and contrast_sigma_min == 0:
                    true_c = c_err[idx]  # the batch's own error at the batch's noise levels
                else:
                    if c_err is None:  # the contrast's own scenes: their true captions
                        pe1, pooled1 = encode_prompts(pipe, [c_prompts[i] for i in rows])
                    else:
                        pe1, pooled1 = pe[idx], pooled[idx]
                    true_c = flow_matching_sq_error(
                        forward, c_x0[idx], c_eps[idx], sig_c, pe1, pooled1
                    )
                err2 = flow_matching_sq_error(forward, c_x0[idx], c_eps[idx], sig_c, pe2, pooled2)
                con = caption_contrast_loss(
                    true_c.mean(dim=(1, 2, 3)),
                    err2.mean(dim=(1, 2, 3)),
                    contrast_beta,
                    contrast_margin,
                )
            total = total + contrast_weight * con
            ema_con = con.item() if ema_con is None else 0.98 * ema_con + 0.02 * con.item()
        if heads:
            aux = aux_text_loss(heads, pe, aux_text_targets(pipe, metas, prompts, token_cache))
            total = total + aux_text_weight * aux
            ema_aux = aux.item() if ema_aux is None else 0.98 * ema_aux + 0.02 * aux.item()
        frac = step / steps
        for g in opt.param_groups:  # warmup, then cosine to 10% over the steps
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        # EMA warm-up (decay grows from 0) so early steps do not keep the random init
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        aux_txt = "" if ema_aux is None else f" aux {ema_aux:.3f}"
        aux_txt += "" if ema_con is None else f" contrast {ema_con:.3f}"
        bar.set_postfix_str(f"loss={ema_loss:.4f}{aux_txt}")
        if bar.disable and step % 100 == 0:  # no TTY (a log file): a line every 100 steps
            log(f"step {step}/{steps} loss {ema_loss:.4f}{aux_txt} ({time.time() - t0:.0f}s)")
        if step % eval_every == 0 or step == steps:
            for m in modules:
                m.eval()
            swap_ema()
            acc = quick_accuracy(pipe, sp["heldout"], [0, 1])
            acc_cfg = quick_accuracy(pipe, sp["heldout"], [0, 1], guidance=3.0)
            swap_ema()
            for m in modules:
                m.train()
            history.append(
                {
                    "step": step,
                    "loss": ema_loss,
                    "heldout_acc": acc,
                    "heldout_acc_cfg3": acc_cfg,
                    **({} if ema_aux is None else {"aux_loss": ema_aux}),
                    **({} if ema_con is None else {"contrast_loss": ema_con}),
                    "seconds": time.time() - t0,
                }
            )
            n = len(sp["heldout"]) * 2
            log(
                f"step {step}: loss {ema_loss:.4f}, EMA weights' held-out strict acc (quick, "
                f"{n} samples) {acc:.3f}, with CFG 3: {acc_cfg:.3f}, {time.time() - t0:.0f}s"
            )
        if step % save_every == 0 and step < steps:
            save_state()
        if step == stop_at and step < steps:
            save_state()
            bar.close()
            log(f"stopped at step {step} of {steps}; continue with --resume {out}")
            return None
    bar.close()
    save_state()
    swap_ema()  # the released weights are the EMA
    for m in modules:
        m.eval().requires_grad_(False)
    pipe.save_pretrained(str(out))
    summary = {**settings, "seconds": time.time() - t0, "final_loss": ema_loss, "history": history}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    log(f"saved base model to {out} after {step} steps ({summary['seconds']:.0f}s)")
    return summary


def load_state(state_dir) -> dict[str, Any]:
    """A pretraining run's saved resumable state (weights, EMA, optimiser, RNGs, settings)."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {state_dir}: no {STATE_FILE} there to resume from")
    return torch.load(path, weights_only=False)  # our own file: RNG states are tuples


def saved_settings(state_dir: str) -> dict[str, Any]:
    """The settings a pretraining run saved with its resumable state (what `--resume` alone
    continues with)."""
    return dict(load_state(state_dir)["settings"])


def save_snapshot(state_dir: str, out_dir: str) -> int:
    """Save the EMA weights of a pretraining run's last saved state (a run still going, or
    stopped with --stop-at) as a model directory at out_dir; returns the state's step."""
    st = load_state(state_dir)
    cfg = st["settings"]
    pipe = build_base(cfg["seed"], cfg["sigma_shift"])
    modules = trained_modules(pipe)
    with torch.no_grad():
        for p, e in zip([p for m in modules for p in m.parameters()], st["ema"]):
            p.copy_(e)
    pipe.save_pretrained(str(out_dir))
    summary = {
        **cfg,
        "snapshot_step": int(st["step"]),
        "seconds": st["seconds"],
        "final_loss": st["ema_loss"],
        "history": st["history"],
    }
    (Path(out_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return int(st["step"])


# The committed base's staged recipe (docs/results.md, "The binding base"): the
# flow-matching base of 4000 steps, then a stage that teaches placement by the relation word
# (clean position captions, a caption contrast at noise levels >= 0.7 on 42 position scenes of
# its own each step), then three short continuations at a lower learning rate that recover the
# drawing; then two stages that teach the colour binding (a caption contrast at every noise
# level, weight 0.1, on 42 scenes of their own drawn from position and color_attr captions),
# 1000 steps at lr 3e-4 and 500 at 1e-4. Each later stage starts from the previous stage's saved
# EMA weights with a fresh optimiser and schedule; every stage uses seed 0.
_PLACING = dict(
    contrast_weight=0.3,
    contrast_sigma_min=0.7,
    contrast_batch=42,
    focus_tags=("position",),
    caption_noise={**CAPTION_NOISE, "position": 0.0, "color_attr": 0.0},
)
_BINDING = dict(
    contrast_weight=0.1,
    contrast_batch=42,
    focus_tags=("position", "color_attr"),
    caption_noise={**CAPTION_NOISE, "position": 0.0, "color_attr": 0.0},
)
BASE_STAGES: tuple[dict[str, Any], ...] = (
    dict(steps=4000),
    dict(steps=4500, lr=3e-4, eval_every=500, save_every=250, **_PLACING),
    dict(steps=1000, lr=1e-4, eval_every=500, save_every=250, **_PLACING),
    dict(steps=1000, lr=1e-4, eval_every=500, save_every=250, **_PLACING),
    dict(steps=1000, lr=1e-4, eval_every=500, save_every=250, **_PLACING),
    dict(steps=1000, lr=3e-4, eval_every=500, save_every=250, **_BINDING),
    dict(steps=500, lr=1e-4, eval_every=500, save_every=250, **_BINDING),
)
STAGES_FILE = "staged_recipe.json"


def stage_json(stages) -> list[dict[str, Any]]:
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()} for s in stages]


# the stage settings a stage's summary records and that `stage_mismatches` compares
_COMPARED = ("steps", "lr", "contrast_weight", "contrast_batch", "focus_tags", "caption_noise")


def stage_mismatches(made: list[dict[str, Any]], stages=BASE_STAGES) -> list[str]:
    """How the per-stage summaries `made` (a staged run's `pretrain_summary.json` "stages") differ
    from the recipe `stages`: one line per differing setting, or per missing or extra stage."""
    recipe = stage_json(stages)
    out = (
        [f"{len(made)} stages made, {len(recipe)} in the recipe"]
        if len(made) != len(recipe)
        else []
    )
    for i, (done, want) in enumerate(zip(made, recipe), 1):
        for key in _COMPARED:
            if key not in want:
                continue
            # focus_tags is recorded only where it differs from the default
            got = done.get(key, list(FOCUS_TAGS) if key == "focus_tags" else None)
            if got != want[key]:
                out.append(f"stage {i}: {key} {got} made, {want[key]} in the recipe")
    return out


def is_staged(out_dir) -> bool:
    """Whether out_dir holds a staged pretraining run (`pretrain_staged`)."""
    return (Path(out_dir) / STAGES_FILE).is_file()


def current_stage_dir(out_dir) -> Path:
    """The stage of a staged run that holds its latest saved state (for `--snapshot`)."""
    stages = json.loads((Path(out_dir) / STAGES_FILE).read_text())
    with_state = [
        Path(out_dir) / f"stage{i}"
        for i in range(1, len(stages) + 1)
        if (Path(out_dir) / f"stage{i}" / STATE_FILE).is_file()
    ]
    if not with_state:
        raise FileNotFoundError(f"{out_dir}: no stage has saved a state yet")
    return with_state[-1]


def pretrain_staged(
    out_dir: str, *, stages=BASE_STAGES, compile: bool = True, log=print
) -> dict[str, Any]:
    """Run a staged recipe into out_dir: stage k trains in out_dir/stage{k} from stage k-1's
    saved model; the last stage's model is then copied to out_dir itself with a summary of all
    stages. Run again on the same out_dir, it skips the finished stages and resumes the one in
    progress from its last saved state, so a run interrupted anywhere (between or inside stages)
    ends as one that never was (bit-identical on the same host)."""
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {"stages": stage_json(stages), "compile": compile}
    marker = out / STAGES_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved != recipe:
            raise ResumeMismatch(
                f"--resume {out}: its staged recipe differs from this one (saved {saved}, now "
                f"{recipe}); start a new OUT_DIR"
            )
    else:
        marker.write_text(json.dumps(recipe, indent=1))
    summaries, prev = [], None
    for i, stage in enumerate(stages, 1):
        sdir = out / f"stage{i}"
        if (sdir / SUMMARY_FILE).is_file():
            log(f"stage {i}/{len(stages)}: done earlier ({sdir})")
        else:
            resume = (sdir / STATE_FILE).is_file()
            log(f"stage {i}/{len(stages)}: {'resuming' if resume else 'starting'} in {sdir}")
            pretrain(str(sdir), **stage, compile=compile, init_from=prev, resume=resume, log=log)
        summaries.append(json.loads((sdir / SUMMARY_FILE).read_text()))
        prev = str(sdir)
    for item in Path(prev).iterdir():  # the final model, without the resumable state
        if item.name in (STATE_FILE, SUMMARY_FILE):
            continue
        dest = out / item.name
        if item.is_dir():
            shutil.copytree(item, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(item, dest)
    summary = {"seconds": sum(s["seconds"] for s in summaries), "stages": summaries}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    log(f"saved the staged base to {out} ({len(stages)} stages, {summary['seconds']:.0f}s)")
    return summary
