"""model.attn_backend: which backends may run where (one-line refusals at start), the diffusers
families switching through set_attention_backend, and Bagel's packed attention: the SDPA path
over the padded batch against each row alone without padding (the masks), and the flash-attn
varlen path against the SDPA path, with a torch stand-in for the kernel (no flash-attn or GPU
here). What a real flash-attn run adds is in scripts/gpu_check.sh."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import NO_EVAL, flowpo_main, tiny_model, train_rows

TINY_RUN = [
    "--rollout.batch_size=4",
    "--rollout.num_batches=1",
    "--rollout.group_size=4",
    "--sampling.num_steps=3",
    "--train.epochs=1",
    "--logging.wandb=off",
    "--logging.progress=false",
    *NO_EVAL,
]


def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's documented semantics in plain torch, for inputs (tokens, heads,
    head_dim): segment i's queries q[cu_q[i]:cu_q[i+1]] attend to its keys k[cu_k[i]:cu_k[i+1]];
    query head h reads kv head h // (heads / kv_heads); `causal` lets query r see key c when
    c <= r + (keys - queries) (aligned at the bottom right). It also checks what the kernel
    requires of its arguments: int32 offsets from 0, python int maxima bounding every segment."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert int(cu_q[0]) == 0 and int(cu_k[0]) == 0 and cu_q.shape == cu_k.shape
    assert int(cu_q[-1]) == q.shape[0] and int(cu_k[-1]) == k.shape[0]
    assert isinstance(max_q, int) and isinstance(max_k, int)
    heads, kv_heads = q.shape[1], k.shape[1]
    assert heads % kv_heads == 0
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros_like(q)
    for i in range(cu_q.shape[0] - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert 0 <= qe - qs <= max_q and 0 <= ke - ks <= max_k
        qi = q[qs:qe].transpose(0, 1)  # (heads, sq, hd)
        ki = k[ks:ke].repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        vi = v[ks:ke].repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        scores = qi @ ki.transpose(-1, -2) * scale
        if causal:
            sq, sk = qe - qs, ke - ks
            r = torch.arange(sq)[:, None]
            c = torch.arange(sk)[None, :]
            scores = scores.masked_fill(c > r + (sk - sq), float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vi).transpose(0, 1)
    return out


# -- which backends can run where ----------------------------------------------------------------
def test_refusals_name_the_backend_the_reason_and_the_fix(monkeypatch):
    from flowpo.models import attention as A

    problem = A.attention_backend_problem
    assert problem("native", "sd3", "float32", "cpu") is None
    assert problem("_native_math", "flux", "float32", "cpu") is None
    assert problem("native", "bagel", "float32", "cpu") is None
    msg = problem("flash", "sd3", "bfloat16", "cpu")  # flash-attn is not installed here
    assert "model.attn_backend=flash" in msg and "flash_attn" in msg and "pip install" in msg
    assert "not a backend of flowpo's Bagel" in problem("sage", "bagel", "bfloat16", "cuda")
    assert "choose one of" in problem("flash3", "sd3", "bfloat16", "cuda")
    assert "Hugging Face Hub" in problem("flash_hub", "flux", "bfloat16", "cuda")
    assert "needs a CUDA GPU" in problem("_native_cudnn", "sd3", "bfloat16", "cpu")
    # the branches after the package check, as on a GPU machine with the packages installed
    monkeypatch.setattr(A, "package_available", lambda module: True)
    assert "needs a CUDA GPU" in problem("flash", "sd3", "bfloat16", "cpu")
    msg = problem("flash", "qwen_image", "float32", "cuda", (9, 0))
    assert "bfloat16/float16" in msg and "model.dtype=bfloat16" in msg
    assert "compute capability 9.0" in problem("_flash_3", "flux", "bfloat16", "cuda", (8, 0))
    assert problem("flash", "flux", "bfloat16", "cuda", (8, 0)) is None
    assert problem("flash", "bagel", "bfloat16", "cuda", (9, 0)) is None


@pytest.mark.parametrize(
    "recipe, backend, words",
    [
        ("tiny_sd3_jpeg", "flash", ["model.attn_backend=flash", "flash_attn"]),
        ("tiny_bagel_jpeg", "flash", ["model.attn_backend=flash", "flash_attn"]),
        ("tiny_flux_jpeg", "_native_flash", ["needs a CUDA GPU", "native"]),
        ("tiny_bagel_jpeg", "sage", ["Bagel", "native, flash"]),
    ],
)
def test_train_stops_at_start_in_one_line(recipe, backend, words):
    out = flowpo_main("train", "-c", f"configs/{recipe}.yaml", f"--model.attn_backend={backend}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowpo: error: "), out.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "run directory" not in out.stdout  # nothing started


# -- diffusers transformers ----------------------------------------------------------------------
def _velocity(adapter, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = adapter.initial_noise(3, g)
    emb = adapter.encode_prompts(["a red circle", "two blue squares", "a cat"])
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([0.9, 0.5, 0.2]), emb)


def _backends(module) -> list:
    return [
        m.processor._attention_backend
        for m in module.modules()
        if hasattr(getattr(m, "processor", None), "_attention_backend")
    ]


def test_sd3_switches_through_the_dispatcher_with_the_same_numbers(tiny_dirs):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from flowpo.models.attention import JointDispatchProcessor
    from flowpo.models.base import load_adapter

    adapter = load_adapter("sd3", tiny_dirs["sd3"], guidance_scale=4.5)
    before = _velocity(adapter)
    active = _AttentionBackendRegistry._active_backend
    adapter.set_attention_backend("native")  # diffusers' processor -> the dispatching one
    procs = [m.processor for m in adapter.trainable_module.modules() if hasattr(m, "processor")]
    assert procs and all(isinstance(p, JointDispatchProcessor) for p in procs)
    torch.testing.assert_close(_velocity(adapter), before, atol=1e-6, rtol=1e-6)
    adapter.set_attention_backend("_native_math")
    assert _backends(adapter.trainable_module) == ["_native_math"] * len(procs)
    torch.testing.assert_close(_velocity(adapter), before, atol=1e-5, rtol=1e-5)
    assert _AttentionBackendRegistry._active_backend == active  # process default untouched


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_flux_and_qwen_image_switch_every_attention_module(family, tiny_cache, tmp_path):
    from flowpo.models.base import load_adapter

    adapter = load_adapter("auto", tiny_model(tiny_cache, family, tmp_path / family))
    before = _velocity(adapter)
    n = len(_backends(adapter.trainable_module))
    adapter.set_attention_backend("_native_math")
    assert n > 0 and _backends(adapter.trainable_module) == ["_native_math"] * n
    torch.testing.assert_close(_velocity(adapter), before, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_an_epoch_on_a_dispatcher_backend_keeps_the_first_ratio_exactly_one(tmp_path):
    out = flowpo_main(
        "train",
        "-c",
        "configs/tiny_sd3_jpeg.yaml",
        "--model.attn_backend=_native_math",
        "--sampling.guidance_scale=4.5",
        f"--logging.run_dir={tmp_path}",
        "--logging.run_name=math",
        *TINY_RUN,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = train_rows(tmp_path / "math")
    assert row["train/first_ratio_max_dev"] == 0.0


# -- Bagel: the packed sequence ------------------------------------------------------------------
def test_packed_mask_rows_follow_the_layout():
    """Row [text (lt, first n valid) | block]: valid text causal over valid text, the block over
    valid text and the whole block, never a padding key (written as loops here). Padding
    queries see themselves (no empty softmax row) and no block token; nothing reads them."""
    from flowpo.models.bagel.modeling import packed_mask

    lt, nb = 5, 4
    lens = torch.tensor([5, 2, 0])
    mask = packed_mask(lens, lt, nb)
    assert mask.shape == (3, 1, lt + nb, lt + nb) and mask.dtype == torch.bool
    for b, n in enumerate(lens.tolist()):
        for i in range(lt + nb):
            for j in range(lt + nb):
                got = bool(mask[b, 0, i, j])
                if n <= i < lt:  # a padding query
                    assert got if j == i else not (got and j >= lt), (b, i, j)
                    continue
                want = j <= i if i < n else (j < n or j >= lt)
                assert got == want, (b, i, j)


def test_varlen_packing_metadata_is_what_flash_attn_expects():
    from flowpo.models.bagel.modeling import varlen_packing

    lt, nb = 5, 4  # rows of L = 9
    pack = varlen_packing(torch.tensor([3, 0, 5]), lt, nb)
    for cu in (pack.cu_text, pack.cu_block, pack.cu_keys):
        assert cu.dtype == torch.int32 and int(cu[0]) == 0 and bool((cu[1:] >= cu[:-1]).all())
    # text call: only the rows with text, causal; the empty row has no segment
    assert pack.cu_text.tolist() == [0, 3, 8] and pack.max_text == 5
    assert pack.text_index.tolist() == [0, 1, 2] + [18, 19, 20, 21, 22]
    # block call: every row's block as queries, its valid text + block as keys
    assert pack.cu_block.tolist() == [0, 4, 8, 12] and pack.max_block == 4
    assert pack.block_index.tolist() == [5, 6, 7, 8, 14, 15, 16, 17, 23, 24, 25, 26]
    assert pack.cu_keys.tolist() == [0, 7, 11, 20] and pack.max_keys == 9
    assert pack.key_index.tolist() == [0, 1, 2, 5, 6, 7, 8, 14, 15, 16, 17] + list(range(18, 27))
    assert all(isinstance(m, int) for m in (pack.max_text, pack.max_block, pack.max_keys))
    # all rows unconditional: no text segment at all
    empty = varlen_packing(torch.tensor([0, 0]), 0, 3)
    assert empty.cu_text.tolist() == [0] and empty.text_index.numel() == 0
    assert empty.cu_keys.tolist() == [0, 3, 6] and empty.max_keys == 3


@pytest.fixture(scope="module")
def bagel64(tiny_cache, tmp_path_factory):
    """The tiny Bagel module in float64, and a batch: 3 prompts of different lengths and their
    unconditional rows (text length 0), padded to the longest."""
    from flowpo.models.base import load_adapter

    path = tiny_model(tiny_cache, "bagel", tmp_path_factory.mktemp("bagel") / "tiny")
    adapter = load_adapter("bagel", path, resolution=48)
    module = copy.deepcopy(adapter.trainable_module).double()
    emb = adapter.encode_prompts(["a red circle", "two yellow circles next to a small dog", "a"])
    lens = emb.extra["text_len"]
    ids = emb.prompt_embeds[:, : int(lens.max())]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, 64, generator=g, dtype=torch.float64)
    t = torch.tensor([0.95, 0.6, 0.2], dtype=torch.float64)
    batch = (x.repeat(2, 1, 1), t.repeat(2), ids.repeat(2, 1), torch.cat([lens, 0 * lens]))
    assert len(set(lens.tolist())) == 3
    return module, batch


def test_sdpa_padded_batch_equals_each_row_alone_unpadded(bagel64):
    module, (x, t, ids, lens) = bagel64
    with torch.no_grad():
        out = module(x, t, ids, lens, (3, 3))
        for b in range(x.shape[0]):
            n = int(lens[b])  # the row alone: its own text only, no padding, no mask holes
            alone = module(x[b : b + 1], t[b : b + 1], ids[b : b + 1, :n], lens[b : b + 1], (3, 3))
            torch.testing.assert_close(out[b : b + 1], alone, atol=1e-12, rtol=1e-12)


def test_flash_varlen_path_equals_the_sdpa_path_values_and_gradients(bagel64):
    module, (x, t, ids, lens) = bagel64
    flash = copy.deepcopy(module)
    flash.set_attention_backend("flash", kernel=varlen_reference)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for m in (module, flash):
        m.zero_grad()
        out = m(x, t, ids, lens, (3, 3))
        (out * w).sum().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    grads = dict(module.named_parameters())
    checked = 0
    for name, p in flash.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-11, rtol=1e-9)
            checked += 1
    assert checked > 20
    flash.set_attention_backend("native")  # and back
    with torch.no_grad():
        torch.testing.assert_close(flash(x, t, ids, lens, (3, 3)), outs[0], atol=0, rtol=0)


def test_bagel_flash_needs_flash_attn_and_a_gpu(bagel64):
    module, _ = bagel64
    m = copy.deepcopy(module)
    with pytest.raises(RuntimeError, match="model.attn_backend=flash needs"):
        m.set_attention_backend("flash")  # no flash_attn (and no CUDA) on this machine
    assert m.attn_backend == "native"
