"""The model adapter contract, prompt embeddings, and the model registry.

An adapter hides one model family (SD3, FLUX, ...) behind the few calls the trainer needs:
encode prompts, draw initial noise, the sigma schedule, the velocity v = ε − x0 (with CFG or
distilled guidance inside), decode latents to images, and the trainable transformer. The
trainer never asks which family it runs. This module imports with torch only; diffusers and
transformers are imported by the family modules when a model is loaded.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import importlib.util
import inspect
import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class ModelLoadError(ValueError):
    """A model directory or family the user named cannot be loaded; the message says the fix."""


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of B prompts (rows align with the latents' batch)."""

    prompt_embeds: Tensor  # (B, L, C) token embeddings of the prompt
    pooled: Tensor | None = None  # (B, P) pooled embedding, where the family has one
    neg_prompt_embeds: Tensor | None = None  # (B, L, C) negative prompt (""), only under CFG
    neg_pooled: Tensor | None = None  # (B, P)
    extra: dict[str, Tensor] = field(default_factory=dict)  # family extras, each (B, ...)
    # Token masks, for families whose prompts have per-row lengths (Qwen-Image): 1 = token,
    # 0 = right padding. With masks, `cat` pads rows of different lengths instead of failing.
    mask: Tensor | None = None  # (B, L) over prompt_embeds' tokens
    neg_mask: Tensor | None = None  # (B, L') over neg_prompt_embeds' tokens

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        return self.neg_prompt_embeds is not None

    def _map(self, fn: Callable[[Tensor], Tensor]) -> PromptEmbeds:
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return PromptEmbeds(
            prompt_embeds=fn(self.prompt_embeds),
            pooled=opt(self.pooled),
            neg_prompt_embeds=opt(self.neg_prompt_embeds),
            neg_pooled=opt(self.neg_pooled),
            extra={k: fn(v) for k, v in self.extra.items()},
            mask=opt(self.mask),
            neg_mask=opt(self.neg_mask),
        )

    def trimmed(self) -> PromptEmbeds:
        """Without the padding columns no row uses (no-op without masks)."""
        out = self._map(lambda t: t)
        for emb, msk in (("prompt_embeds", "mask"), ("neg_prompt_embeds", "neg_mask")):
            m = getattr(self, msk)
            if m is None:
                continue
            used = torch.nonzero(m.any(dim=0))
            length = int(used.max()) + 1 if used.numel() else 0
            setattr(out, emb, getattr(self, emb)[:, :length])
            setattr(out, msk, m[:, :length])
        return out

    def index(self, idx: Tensor | Sequence[int]) -> PromptEmbeds:
        """Rows `idx` (a (K,) index tensor or list of ints) -> PromptEmbeds of length K."""
        dev = self.prompt_embeds.device
        idx = torch.as_tensor(idx, dtype=torch.long).to(dev)
        return self._map(lambda t: t.index_select(0, idx))

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each row repeated n times in place: (B, ...) -> (B·n, ...), as prompts × group."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        """Move to `device`; `dtype` applies to floating tensors only (masks, ids keep theirs)."""
        return self._map(
            lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        )

    @classmethod
    def cat(cls, items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch; all items must carry the same optional fields."""
        if not items:
            raise ValueError("PromptEmbeds.cat needs at least one item")
        first = items[0]

        def cat_opt(name: str) -> Tensor | None:
            vals = [getattr(e, name) for e in items]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise ValueError(f"PromptEmbeds.cat: '{name}' is set on some items but not all")
            return torch.cat(vals, dim=0)

        def cat_tokens(emb: str, msk: str) -> tuple[Tensor | None, Tensor | None]:
            """Embeddings of different token counts are right-padded (zeros, mask 0)."""
            embs, masks = [getattr(e, emb) for e in items], [getattr(e, msk) for e in items]
            if all(v is None for v in embs):
                return None, cat_opt(msk)
            if any(v is None for v in embs):
                raise ValueError(f"PromptEmbeds.cat: '{emb}' is set on some items but not all")
            length = max(v.shape[1] for v in embs)
            if any(v.shape[1] != length for v in embs):
                if any(m is None for m in masks):
                    raise ValueError(
                        f"PromptEmbeds.cat: '{emb}' has different token counts "
                        f"{sorted({v.shape[1] for v in embs})} and no '{msk}' to pad with"
                    )

                def pad(t: Tensor) -> Tensor:
                    extra = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
                    return torch.cat([t, extra], dim=1)

                embs, masks = [pad(v) for v in embs], [pad(m) for m in masks]
            both = all(m is not None for m in masks)
            if not both and any(m is not None for m in masks):
                raise ValueError(f"PromptEmbeds.cat: '{msk}' is set on some items but not all")
            return torch.cat(embs, dim=0), torch.cat(masks, dim=0) if both else None

        pe, mask = cat_tokens("prompt_embeds", "mask")
        neg, neg_mask = cat_tokens("neg_prompt_embeds", "neg_mask")
        return cls(
            prompt_embeds=pe,
            pooled=cat_opt("pooled"),
            neg_prompt_embeds=neg,
            neg_pooled=cat_opt("neg_pooled"),
            extra={k: torch.cat([e.extra[k] for e in items], dim=0) for k in first.extra},
            mask=mask,
            neg_mask=neg_mask,
        )


class ModelAdapter(abc.ABC):
    """One model family behind the calls the trainer makes. Subclasses load `model_dir`.

    Latents are float32 outside the adapter; the transformer runs in `self.dtype`.
    """

    name: str = ""  # registry name, set by @register_model
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s this adapter loads
    layout_files: tuple[str, ...] = ()  # or: files that mark a non-diffusers layout (Bagel's)
    lora_targets: list[str] = []  # module-name suffixes for peft `target_modules`
    # Bound on cached prompts: a real SD3 prompt embedding is ~2.7 MB in bf16, so an unbounded
    # cache over a large prompt set would grow without limit; least recently used go first.
    max_cached_prompts: int = 1024
    negative_prompt: str = ""  # the CFG negative ("" for SD3; Qwen-Image uses " ")
    # False where a row's velocity depends on which other rows share its forward beyond the
    # batch size (Bagel trims the text to the batch's longest prompt): re-scoring then needs
    # the sampling batches themselves (train.micro_batch_size = rollout.batch_size) for the
    # first ratio to be exactly 1, and the GRPO config check refuses anything else
    batch_invariant: bool = True
    # engine.precision=fp16 (float16 transformer, loss scaling): False where the family is not
    # run in float16 at all, as Flow-GRPO advises "bf16 for models like FLUX that do not support
    # fp16 inference"; the preflight refuses fp16 training for them (docs/gpu.md, fp16)
    fp16_training: bool = True

    def __init__(
        self,
        model_dir: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        resolution: int | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        self.model_dir = str(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = resolution  # subclasses replace None by the model's default
        self.guidance_scale = float(guidance_scale)
        self._transformer: nn.Module | None = None
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()  # prompt -> (1, ...) row
        self._negative: PromptEmbeds | None = None  # "" encoded once, (1, ...)

    @contextlib.contextmanager
    def guidance(self, scale: float | None):
        """Inside the block, prompts are encoded and velocities combined with CFG scale `scale`
        (None or the current scale: unchanged); e.g. a CFG-free policy evaluated with CFG
        (eval.guidance_scale)."""
        old = self.guidance_scale
        if scale is not None:
            self.guidance_scale = float(scale)
        try:
            yield
        finally:
            self.guidance_scale = old

    # ---- prompts -----------------------------------------------------------------------
    @property
    def cfg_active(self) -> bool:
        """Whether velocity() combines unconditional and conditional predictions (CFG)."""
        return False

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode prompts with the text encoders (positive fields only), B = len(prompts);
        families with per-row lengths also return `mask`."""

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Embeddings for `prompts` (B rows), with the negative under CFG. Cached per prompt."""
        with torch.no_grad():
            missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
            if missing and getattr(self, "_cache_only", ""):
                self._check_cached(missing)
            if missing:
                enc = self._encode(missing)
                for i, p in enumerate(missing):
                    # unpadded (masked families), so a batch is padded to its own longest row;
                    # clone: a view would keep the whole batch's storage alive in the cache
                    self._cache[p] = enc.index([i]).trimmed()._map(lambda t: t.clone())
            rows = []
            for p in prompts:
                self._cache.move_to_end(p)
                rows.append(self._cache[p])
            out = PromptEmbeds.cat(rows)
            while len(self._cache) > self.max_cached_prompts:
                self._cache.popitem(last=False)
            if self.cfg_active:
                if self._negative is None:
                    self._negative = self._encode([self.negative_prompt])
                n = len(prompts)
                out.neg_prompt_embeds = self._negative.prompt_embeds.expand(n, -1, -1).clone()
                if self._negative.pooled is not None:
                    out.neg_pooled = self._negative.pooled.expand(n, -1).clone()
                if self._negative.mask is not None:
                    out.neg_mask = self._negative.mask.expand(n, -1).clone()
        return out

    def clear_prompt_cache(self) -> None:
        if getattr(self, "_cache_only", ""):
            raise RuntimeError("prompts are served from the cache only; it cannot be cleared")
        self._cache.clear()
        self._negative = None

    def cache_prompts(self, prompts: list[str], *, drop_encoders: bool, reason: str) -> int:
        """Encode every prompt (and the negative) once, in the same chunks on every rank, and
        from then on serve prompts from the cache only; with `drop_encoders` free the text
        encoders (they can outweigh the policy). `reason` names the option, for the error an
        uncached prompt raises later. Returns the number of cached prompts."""
        unique = list(dict.fromkeys(prompts))
        self.max_cached_prompts = max(self.max_cached_prompts, len(unique))
        for i in range(0, len(unique), 64):
            self.encode_prompts(unique[i : i + 64])
        if self._negative is None:
            self._negative = self._encode([self.negative_prompt])
        pipe = getattr(self, "pipe", None)
        if drop_encoders and pipe is not None:
            for name in list(self.frozen_modules()):
                if name.startswith("text_encoder"):
                    setattr(pipe, name, None)
        self._cache_only = reason
        return len(unique)

    def _check_cached(self, prompts: list[str]) -> None:
        missing = [p for p in prompts if p not in self._cache]
        if missing:
            raise RuntimeError(
                f"prompt {missing[0]!r} is not in the embedding cache, which holds every "
                f"training and eval prompt; with {self._cache_only} new prompts cannot be "
                "encoded during training"
            )

    # ---- sampling ----------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latents (without the batch), in the adapter's own format."""

    @abc.abstractmethod
    def initial_noise(self, n: int, generator: torch.Generator) -> Tensor:
        """Standard normal latents (n, *latent_shape), float32, on self.device."""

    @abc.abstractmethod
    def sigmas(self, num_steps: int, latents: Tensor) -> Tensor:
        """The model's own schedule for `num_steps` steps: (T+1,) float32, 1 → exactly 0."""

    @abc.abstractmethod
    def velocity(
        self,
        latents: Tensor,
        sigma: Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """v = ε − x0 at noise level `sigma` (B,) for latents (B, ...): float32, same shape.

        Differentiable with respect to the trainable module; deterministic. `guidance_scale`
        overrides the adapter's for this call.
        """

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) float32 in [0, 1] from latents (B, ...); no gradient."""

    # ---- modules -----------------------------------------------------------------------
    @property
    def trainable_module(self) -> nn.Module:
        """The transformer (or whatever wraps it now: peft, DeepSpeed) velocity() calls."""
        assert self._transformer is not None, "adapter has no transformer loaded"
        return self._transformer

    def full_trainable(self, name: str) -> bool:
        """Whether full fine-tuning trains the trainable module's parameter `name` (a
        `named_parameters()` name of the unwrapped module). Default: every parameter; a family
        whose published full fine-tuning trains a subset (Bagel: the `moe_gen` expert) narrows
        it. LoRA ignores it (peft trains only the adapters)."""
        return True

    def set_trainable_module(self, module: nn.Module) -> None:
        """Make velocity() call `module` (e.g. a LoRA or DeepSpeed wrapper of the transformer).

        The module is called with the diffusers transformer's forward kwargs.
        """
        self._transformer = module

    def set_attention_backend(self, name: str) -> None:
        """Run the transformer's attention on backend `name` (model.attn_backend, which
        preflight has checked with `models.attention.attention_backend_problem`); call it
        before the engine wraps the module. Default: a diffusers transformer's own
        `set_attention_backend` (flowpo.models.attention.set_diffusers_backend)."""
        from flowpo.models.attention import set_diffusers_backend

        set_diffusers_backend(self.trainable_module, name)

    @abc.abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Text encoders and VAE: never trained, always in eval mode."""

    def freeze_frozen_parts(self) -> None:
        """Text encoders and VAE to eval mode and requires_grad False (the transformer's
        base weights are the engine's business: it decides LoRA or full fine-tuning)."""
        for m in self.frozen_modules().values():
            m.eval()
            m.requires_grad_(False)

    def to(self, device: torch.device | str) -> ModelAdapter:
        """Move every module and the prompt cache to `device`."""
        self.device = torch.device(device)
        for m in self.frozen_modules().values():
            m.to(self.device)
        if self._transformer is not None:
            self._transformer.to(self.device)
        for p, e in self._cache.items():
            self._cache[p] = e.to(self.device)
        if self._negative is not None:
            self._negative = self._negative.to(self.device)
        return self

    # ---- helpers for subclasses --------------------------------------------------------
    def _sigma_batch(self, sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
        """sigma as a (B,) float32 tensor (a scalar or (1,) is broadcast)."""
        s = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch)
        if s.shape != (batch,):
            raise ValueError(f"sigma has shape {tuple(s.shape)}; expected ({batch},) or a scalar")
        return s


MODEL_REGISTRY: dict[str, type[ModelAdapter]] = {}

# Families shipped with flowpo: imported on first lookup so that registering costs nothing
# until a model is loaded (and modules that are not written yet are skipped).
_BUILTIN_MODULES = (
    "flowpo.models.sd3",
    "flowpo.models.flux",
    "flowpo.models.qwen_image",
    "flowpo.models.bagel",
)


def register_model(name: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator: register an adapter under `name` (the recipe's `model.family`)."""

    def deco(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ValueError(f"model family '{name}' is registered twice")
        cls.name = name
        MODEL_REGISTRY[name] = cls
        return cls

    return deco


def _family_names() -> list[str]:
    """Registered families, built-ins in `_BUILTIN_MODULES` order (not import order, which
    depends on what was imported first), then any others by name."""

    def rank(name: str) -> tuple[int, str]:
        mod = MODEL_REGISTRY[name].__module__
        hits = [i for i, m in enumerate(_BUILTIN_MODULES) if mod == m or mod.startswith(m + ".")]
        return (hits[0] if hits else len(_BUILTIN_MODULES), name)

    return sorted(MODEL_REGISTRY, key=rank)


def _import_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class registered as `family` (the built-in families imported first)."""
    _import_builtins()
    return MODEL_REGISTRY[family]


def family_of(family: str, path: str) -> str | None:
    """The registered family a (model.family, model.path) pair loads, without loading it: the
    family itself, `tiny:FAMILY`'s, or the one detected from the directory under `auto`; None
    when that cannot be told yet (no such directory)."""
    _import_builtins()
    if family != "auto":
        return family if family in MODEL_REGISTRY else None
    if path.startswith("tiny:"):
        name = path[5:].replace("-", "_")
        return name if name in MODEL_REGISTRY else None
    if path == "shapes:base":
        return "sd3"
    return detect_family(path) if Path(path).is_dir() else None


def detect_family(model_dir: str) -> str:
    """The registered family whose pipeline class model_index.json names (`_class_name`), or
    whose `layout_files` are all in the directory (layouts without model_index.json)."""
    _import_builtins()
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        for name, cls in MODEL_REGISTRY.items():
            if cls.layout_files and all((Path(model_dir) / f).is_file() for f in cls.layout_files):
                return name
        raise ModelLoadError(
            f"model.path '{model_dir}' has no model_index.json; set model.family explicitly "
            f"(one of: {', '.join(_family_names())}) or point it at a diffusers model directory"
        )
    class_name = json.loads(index.read_text()).get("_class_name", "")
    for name, cls in MODEL_REGISTRY.items():
        if class_name in cls.pipeline_classes:
            return name
    raise ModelLoadError(
        f"model.path '{model_dir}' holds a '{class_name}', which no adapter loads; "
        f"set model.family to one of: {', '.join(_family_names())}"
    )


def _check_family_matches(family: str, model_dir: str) -> None:
    """Stop with the fix when model_index.json names a pipeline that another family loads
    (otherwise diffusers fails deep inside from_pretrained, listing missing components)."""
    cls = MODEL_REGISTRY[family]
    if not (cls.pipeline_classes or cls.layout_files):
        return  # an adapter that declares neither (e.g. a user's) says nothing to check against
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return
    class_name = json.loads(index.read_text()).get("_class_name", "")
    if class_name in cls.pipeline_classes:
        return
    owners = [n for n, c in MODEL_REGISTRY.items() if class_name in c.pipeline_classes]
    if owners:
        raise ModelLoadError(
            f"model.path '{model_dir}' holds a {class_name}, which model.family '{owners[0]}' "
            f"loads, but model.family is '{family}'; set model.family={owners[0]} (or auto)"
        )


def load_adapter(family: str, model_dir: str, **kw: Any) -> ModelAdapter:
    """Load `model_dir` with the adapter registered as `family` ("auto": from model_index.json).

    `kw` goes to the adapter constructor (device, dtype, resolution, guidance_scale, ...).
    """
    _import_builtins()
    if family != "auto" and family not in MODEL_REGISTRY:
        raise ModelLoadError(
            f"model.family '{family}' is unknown; choose one of: {', '.join(_family_names())}"
        )
    if not Path(model_dir).is_dir():
        raise ModelLoadError(
            f"model.path '{model_dir}' does not exist; run 'flowpo make-tiny sd3 {model_dir}' for "
            "a tiny test model or point it at a local diffusers model directory"
        )
    if family == "auto":
        family = detect_family(model_dir)
    cls = MODEL_REGISTRY[family]
    _check_family_matches(family, model_dir)
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in kw if k not in params]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
        raise ModelLoadError(
            f"model.options: '{unknown[0]}' is not an option of the {family} adapter; "
            f"it takes: {', '.join(options)}"
        )
    return cls(model_dir, **kw)
