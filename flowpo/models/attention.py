"""Attention backends (`model.attn_backend`): which ones can run where, and switching a diffusers
transformer to one.

Names are diffusers' own (`diffusers.models.attention_dispatch.AttentionBackendName`: `native`,
`flash`, `flash_varlen`, `_flash_3`, `sage`, `xformers`, `_native_math`, ...). The diffusers
families (SD3, FLUX, Qwen-Image) switch through `ModelMixin.set_attention_backend`; Bagel,
flowpo's own implementation, knows `native` (torch SDPA over the padded packed batch) and
`flash` (flash-attn's variable-length kernel over the unpadded packed sequence).

`attention_backend_problem` is what `trainer/preflight.py` and `flowpo doctor` ask before any
model loads: one line naming the backend, why it cannot run here and the fix, or None.
The requirements below are diffusers' own constraints (device, q/k/v dtype) plus what the
kernels need (package, GPU generation); none of the GPU ones was exercised on a GPU here.
"""

from __future__ import annotations

import difflib
import importlib.util
from typing import Any

import torch

# Backends that need a package beyond torch: the module diffusers imports for them
_PACKAGE = {
    "flash": ("flash_attn", "pip install 'flash-attn>=2.6.3' (flowpo's [gpu] extra)"),
    "flash_varlen": ("flash_attn", "pip install 'flash-attn>=2.6.3' (flowpo's [gpu] extra)"),
    "_flash_3": ("flash_attn_interface", "build FlashAttention-3 (hopper/) from source"),
    "_flash_varlen_3": ("flash_attn_interface", "build FlashAttention-3 (hopper/) from source"),
    "sage": ("sageattention", "pip install 'sageattention>=2.1.1'"),
    "sage_varlen": ("sageattention", "pip install 'sageattention>=2.1.1'"),
    "xformers": ("xformers", "pip install 'xformers>=0.0.29'"),
    "_native_npu": ("torch_npu", "install torch_npu (Ascend NPUs)"),
    "_native_xla": ("torch_xla", "install torch_xla (TPUs)"),
}
# Backends whose kernels run on CPU as well (every other one needs a CUDA device)
_CPU_OK = ("native", "_native_math", "flex")
# diffusers' `_check_qkv_dtype_bf16_or_fp16` constraint
_HALF_ONLY = ("flash", "flash_varlen", "_flash_3", "_flash_varlen_3", "sage", "sage_varlen")
_HALF_ONLY += ("_native_flash", "_native_cudnn")
# Lowest CUDA compute capability of the kernels (flash-attn 2: Ampere; FlashAttention-3: Hopper)
_MIN_CAPABILITY = {"flash": (8, 0), "flash_varlen": (8, 0), "_flash_3": (9, 0)}
_MIN_CAPABILITY |= {"_flash_varlen_3": (9, 0), "sage": (8, 0), "sage_varlen": (8, 0)}

BAGEL_BACKENDS = ("native", "flash")  # flowpo's Bagel: SDPA (padded) or flash-attn varlen


def diffusers_backends() -> list[str]:
    """Every backend name the installed diffusers' attention dispatcher knows."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def known_backends(family: str | None) -> list[str]:
    """The names `model.attn_backend` accepts for a model family."""
    return list(BAGEL_BACKENDS) if family == "bagel" else diffusers_backends()


def package_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def attention_backend_problem(
    name: str,
    family: str | None,
    dtype: str,
    device_type: str,
    capability: tuple[int, int] | None = None,
) -> str | None:
    """Why `model.attn_backend=name` cannot run for `family` with `model.dtype=dtype` on a
    `device_type` ("cuda" | "cpu") device of compute `capability`, as one line with the fix;
    None when it can. `family` None (not known before loading): the diffusers names apply."""
    key = f"model.attn_backend={name}"
    if name == "native":
        return None
    known = known_backends(family)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        where = "flowpo's Bagel" if family == "bagel" else "the installed diffusers"
        return f"{key} is not a backend of {where}; {hint}choose one of: {', '.join(known)}"
    if name.endswith("_hub"):
        return (
            f"{key} downloads its kernels from the Hugging Face Hub at run time, which flowpo "
            "never does; install the kernel package and use the name without _hub"
        )
    if family == "bagel" and name == "flash":
        name_pkg = ("flash_attn", _PACKAGE["flash"][1])
    else:
        name_pkg = _PACKAGE.get(name)
    if name_pkg and not package_available(name_pkg[0]):
        return f"{key} needs the {name_pkg[0]} package, which is not installed; {name_pkg[1]}"
    if name not in _CPU_OK and device_type != "cuda":
        return (
            f"{key} needs a CUDA GPU and this machine has none (device {device_type}); "
            "use model.attn_backend=native here"
        )
    if name in _HALF_ONLY and dtype not in ("bfloat16", "float16"):
        return (
            f"{key} runs on bfloat16/float16 inputs only, but model.dtype={dtype}; set "
            "model.dtype=bfloat16 with engine.precision=bf16, or use model.attn_backend=native"
        )
    need = _MIN_CAPABILITY.get(name)
    if need and capability is not None and tuple(capability) < need:
        return (
            f"{key} needs a GPU of compute capability {need[0]}.{need[1]} or newer; this one "
            f"has {capability[0]}.{capability[1]}; use model.attn_backend=native "
            "(or flash on Ampere and newer)"
        )
    return None


# -- diffusers transformers ---------------------------------------------------------------------
class JointDispatchProcessor:
    """SD3's joint attention (the image and text streams attend as one sequence) through
    diffusers' attention dispatcher, so `set_attention_backend` reaches it: diffusers'
    `JointAttnProcessor2_0` calls torch SDPA directly and has no backend to set. The same
    computation otherwise; the dispatcher takes q, k, v as (B, S, heads, head_dim)."""

    _attention_backend = None  # set by ModelMixin.set_attention_backend
    _parallel_config = None

    def __call__(
        self,
        attn: Any,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        *args,
        **kwargs,
    ):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        def split_heads(x):  # (B, S, heads·hd) -> (B, S, heads, hd)
            return x.unflatten(-1, (attn.heads, -1))

        n_image = hidden_states.shape[1]
        q = split_heads(attn.to_q(hidden_states))
        k = split_heads(attn.to_k(hidden_states))
        v = split_heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:  # RMS over head_dim: the layout does not matter
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if encoder_hidden_states is not None:
            cq = split_heads(attn.add_q_proj(encoder_hidden_states))
            ck = split_heads(attn.add_k_proj(encoder_hidden_states))
            cv = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            # image tokens first, then text, as SD3 concatenates them
            q, k, v = (torch.cat(t, dim=1) for t in ((q, cq), (k, ck), (v, cv)))
        out = dispatch_attention_fn(q, k, v, backend=self._attention_backend)
        out = out.flatten(2).to(q.dtype)
        image = out[:, :n_image]
        image = attn.to_out[1](attn.to_out[0](image))  # projection, dropout
        if encoder_hidden_states is None:
            return image
        text = out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


def set_diffusers_backend(transformer: Any, name: str) -> int:
    """Switch a diffusers transformer's attention to backend `name` with its
    `set_attention_backend`; SD3's joint processors are first replaced by
    `JointDispatchProcessor`, which the dispatcher reaches. Returns the number of attention
    modules now on `name`. diffusers also makes `name` its process-wide default; that default
    is put back, so models loaded later in the process keep theirs."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    kinds = (Attention, AttentionModuleMixin)  # the classes set_attention_backend visits
    attention_modules = [m for m in transformer.modules() if isinstance(m, kinds)]
    for module in attention_modules:
        if isinstance(module, Attention) and isinstance(module.processor, JointAttnProcessor2_0):
            module.set_processor(JointDispatchProcessor())
    previous = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
    # AttentionBackendName is a str enum: a member equals its name string
    backends = [getattr(m.processor, "_attention_backend", None) for m in attention_modules]
    switched = [b for b in backends if b == name]
    if not switched:
        raise RuntimeError(
            f"model.attn_backend={name}: no attention module of {type(transformer).__name__} "
            "takes a backend; use model.attn_backend=native for this model"
        )
    return len(switched)
