"""The memory model (flowpo/memory.py): ZeRO accounting, real parameter counts, LoRA counts,
and (slow) the measured per-rank partition of flowpo's DeepSpeed engine against the model."""

import sys

import pytest
import torch

from flowpo import memory
from flowpo.memory import GIB, STRATEGIES, ModelCounts, Strategy, estimate, zero_numels
from tests.conftest import ROOT, as_fresh_process, two_rank_group

N = 8
UNIFORM = (1024,) * 64  # 64 equal tensors: no tensor straddles a ZeRO-2 boundary at N = 8
PSI = sum(UNIFORM)


def _counts(trainable=UNIFORM, frozen=()) -> ModelCounts:
    return ModelCounts(
        name="synthetic",
        policy=tuple(trainable) + tuple(frozen),
        full_trainable=tuple(trainable),
        lora=(8, 8),
        lora_rank=1,
        lora_targets=("x",),
        buffers=0,
    )


def _zero_buffers() -> dict[str, int]:
    return dict(z2_reduce=0, z2_allgather=0, z3_reduce=0, z3_prefetch=0, z3_persistence=0)


def test_zero_paper_bytes_per_rank_for_stages_0_2_3():
    # Rajbhandari et al. 2020 §5.1: (2+2+K)Ψ, 2Ψ + (2+K)Ψ/N, (2+2+K)Ψ/N with K = 12
    c, bufs = _counts(), _zero_buffers()
    want = {0: 16 * PSI, 2: 2 * PSI + 14 * PSI / N, 3: 16 * PSI / N}
    for stage, bytes_ in want.items():
        e = estimate(c, lora=False, beta=0.0, strategy=Strategy("s", stage), world=N, buffers=bufs)
        assert e.params + e.grads + e.optimizer == pytest.approx(bytes_), stage


def test_stage3_params_per_rank_are_total_over_world():
    z = zero_numels(UNIFORM, UNIFORM, stage=3, world=N)
    assert z["params"] == PSI // N and z["grads"] == PSI // N and z["master"] == PSI // N
    assert zero_numels(UNIFORM, UNIFORM, stage=2, world=N)["params"] == PSI  # replicated


def test_stage3_splits_each_tensor_with_padding_and_keeps_small_ones_whole():
    sizes = (10, 7, 1000)
    z = zero_numels(sizes, sizes, stage=3, world=4, persistence_threshold=9)
    assert z["params"] == (3 + 2 + 250) + 7  # ceil(n/4) each, plus the 7-element tensor whole


def test_stage2_rank_holds_whole_gradient_of_a_straddling_tensor():
    # flat buffer [10 | 15 | 15], N = 2, slices of 20: rank 0's [0, 20) overlaps tensors 1-2
    # (25 elements), rank 1's [20, 40) tensors 2-3 (30): the fullest rank holds 30
    assert zero_numels((10, 15, 15), (10, 15, 15), stage=2, world=2)["grads"] == 30
    assert zero_numels((10, 10, 10, 10), (10, 10, 10, 10), stage=2, world=2)["grads"] == 20


def test_offload_moves_optimizer_grads_and_param_partitions_to_host():
    c, bufs = _counts(), _zero_buffers()
    z3 = estimate(c, lora=False, beta=0.0, strategy=STRATEGIES[1], world=N, buffers=bufs)
    off = estimate(c, lora=False, beta=0.0, strategy=STRATEGIES[2], world=N, buffers=bufs)
    assert off.optimizer == off.grads == off.params == 0
    assert off.cpu == pytest.approx(z3.params + z3.grads + z3.optimizer)


def test_reference_policy_only_for_full_fine_tuning_with_beta_and_sharded_by_zero3():
    c, bufs = _counts(frozen=(4096,)), _zero_buffers()
    z2, z3 = STRATEGIES[0], STRATEGIES[1]
    assert estimate(c, lora=True, beta=0.04, strategy=z3, world=N, buffers=bufs).reference == 0
    assert estimate(c, lora=False, beta=0.0, strategy=z3, world=N, buffers=bufs).reference == 0
    ref2 = estimate(c, lora=False, beta=0.04, strategy=z2, world=N, buffers=bufs).reference
    ref3 = estimate(c, lora=False, beta=0.04, strategy=z3, world=N, buffers=bufs).reference
    assert ref2 == 2 * PSI and ref3 == 2 * PSI / N  # a copy of the trained weights, bf16


def test_lora_base_is_frozen_weight_and_only_adapters_carry_optimizer_state():
    c, bufs = _counts(frozen=(4096,)), _zero_buffers()
    e = estimate(c, lora=True, beta=0.0, strategy=STRATEGIES[0], world=N, buffers=bufs)
    assert e.params == 2 * (PSI + 4096 + 16)  # base + frozen + LoRA, replicated under ZeRO-2
    assert e.optimizer == 12 * 16 / N


@pytest.mark.parametrize(
    "model, published, rel",
    [
        # Stability's model card: 2.5B (parameters + the persistent 384² positional table)
        ("SD3.5-M", 2.5e9, 0.02),
        # BFL: "a 12 billion parameter rectified flow transformer" (11.90B counted)
        ("FLUX.1-dev", 11.9e9, 0.01),
        # Qwen-Image technical report: a 20B MMDiT
        ("Qwen-Image", 20e9, 0.03),
        # docs/bagel.md §1: ema.safetensors ≈ 14.17B (T2I tree, no ViT)
        ("Bagel-7B-MoT", 14.17e9, 0.005),
    ],
)
def test_real_parameter_counts_match_published(model, published, rel):
    c = memory.count_model(model)
    assert (c.policy_total + c.buffers) == pytest.approx(published, rel=rel)


def test_bagel_tree_matches_spec_and_active_params_are_qwen2_7b():
    c = memory.count_model("Bagel-7B-MoT")
    assert len(c.policy) == 28 * 28 + 13  # docs/bagel.md §2: 797 LLM and generation tensors
    assert c.trainable_full_total == pytest.approx(6.53e9, rel=0.005)  # docs/bagel.md §9
    # per token one expert is active: total minus the generation copies ≈ Qwen2.5-7B (7.6B)
    assert c.policy_total - c.trainable_full_total == pytest.approx(7.6e9, rel=0.02)


def test_frozen_encoder_counts_match_published():
    sd3, qwen = memory.count_model("SD3.5-M"), memory.count_model("Qwen-Image")
    assert sd3.encoders["t5_xxl"] == pytest.approx(4.76e9, rel=0.01)  # T5-XXL encoder
    assert sd3.encoders["clip_g"] == pytest.approx(695e6, rel=0.01)  # OpenCLIP bigG text
    assert qwen.encoders["qwen2.5_vl_7b"] == pytest.approx(8.29e9, rel=0.01)  # Qwen2.5-VL-7B


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_count_equals_peft_on_a_tiny_model(family):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig

    from flowpo.models.flux import FluxAdapter
    from flowpo.models.sd3 import SD3Adapter
    from flowpo.models.tiny import TINY_CONFIGS

    cls, adapter = {
        "sd3": (SD3Transformer2DModel, SD3Adapter),
        "flux": (FluxTransformer2DModel, FluxAdapter),
    }[family]
    model = cls(**TINY_CONFIGS[family]["transformer"])
    want = sum(memory.lora_numels(model, adapter.lora_targets, 4))
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=adapter.lora_targets))
    got = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert got == want


def test_fit_table_covers_every_model_mode_and_strategy_and_zero3_saves_memory():
    rows = memory.fit_table()
    assert len(rows) == len(memory.MODELS) * 3
    for r in rows:
        z2, z3, off = (r[s.name]["gpu_gib"] for s in STRATEGIES)
        assert off <= z3 <= z2, r["model"]
        assert all(isinstance(r[s.name]["fits"], bool) for s in STRATEGIES)
    # e.g. full fine-tuning of the 20B Qwen-Image does not fit with ZeRO-2 on 8 × 80 GiB
    qwen = next(r for r in rows if r["model"] == "Qwen-Image" and r["mode"] == "full, β=0")
    assert not qwen["ZeRO-2"]["fits"] and qwen["ZeRO-3"]["fits"]
    assert "| Qwen-Image |" in memory.format_fit_table(rows)
    assert GIB == 2**30


# bench_memory's 2-rank measurement (its worker's rows), in the session's one 2-rank launch
MEASURE_TWO = two_rank_group("bench_memory", kind="bench_memory")


@pytest.mark.slow
@pytest.mark.two_rank(MEASURE_TWO)
def test_measured_zero_partitions_match_the_model(two_rank):
    """flowpo's Engine on 1 (this process) and 2 gloo ranks (torchrun), tiny SD3 transformer,
    bf16: per-rank gradients and optimizer state as predicted; ZeRO-3 parameters within the
    persistence bound; the frozen KL reference of full fine-tuning replicated under ZeRO 0/2,
    sharded under ZeRO-3."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_memory

    from flowpo.trainer.engine import init_distributed

    torch.set_num_threads(1)
    # bench_memory.measure(), its one-rank worker run here instead of under torchrun
    with as_fresh_process():
        init_distributed()
        one = [
            bench_memory.measure_one(lora, case, 0, 1)
            for lora in (True, False)
            for case in bench_memory.CASES
        ]
    one = json.loads(json.dumps(one))  # as the worker's file gives them
    two = two_rank.rows(MEASURE_TWO)  # bench_memory.run_ranks(2, ...)'s rows
    rows = {(r["mode"], r["zero"], r["world"]): r for r in bench_memory.summarise(one + two)}
    for (mode, zero, world), r in rows.items():
        if world == 1:  # one rank: nothing to partition, every case holds what ZeRO-0 holds
            for cat, value in r["measured_bytes"].items():
                assert value == pytest.approx(r["predicted_bytes"][cat], rel=1e-3), (mode, zero)
    for mode in ("lora", "full"):
        for zero in ("2", "3", "3+offload"):
            r = rows[(mode, zero, 2)]
            meas, pred = r["measured_bytes"], r["predicted_bytes"]
            assert meas["grads"] == pytest.approx(pred["grads"], rel=1e-3), (mode, zero)
            assert meas["optimizer"] == pytest.approx(pred["optimizer"], rel=1e-3), (mode, zero)
            assert r["measured_ratio"]["optimizer"] == pytest.approx(0.5, abs=1e-3)
        for zero in ("3", "3+offload"):
            r = rows[(mode, zero, 2)]
            # parameters really partitioned: at least half, at most the persistence bound
            assert 0.5 <= r["measured_ratio"]["params"] <= r["predicted_ratio"]["params"] + 1e-6
    # the frozen reference of full fine-tuning with KL: whole on every rank under ZeRO 0/2,
    # sharded like the policy under ZeRO-3 (its own inference engine)
    for (mode, zero, world), r in rows.items():
        ref, n = r["reference_elements"], r["wrapped"]
        if mode == "lora":
            continue  # LoRA's reference is the base with adapters disabled: no copy to count
        if world == 1 or zero in ("0", "2"):
            assert ref["measured"] == ref["predicted"] == n, (zero, world)
        else:
            assert 0.5 * n <= ref["measured"] <= ref["predicted"] < n, (zero, world)
