"""Kernels: the per-size plan, each weight format against the dense product it stands for, and
the plan measured on a real (tiny) model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.model.kernel_bench import Timings, candidates, load_or_measure, measure
from services.worker.model.kernels import (
    GROUP,
    Kernel,
    KernelPlan,
    Projection,
    Q4Groups,
    int4_available,
    quantize_q4,
)
from services.worker.model.llama import LlamaModel
from tests.unit.worker.test_model import model

__all__ = ["model"]  # the module-scoped tiny random model, shared with test_model

FP32 = Kernel("dense", torch.float32)
BF16 = Kernel("dense", torch.bfloat16)
INT4_BF16 = Kernel("int4", torch.bfloat16)
INT4_FP32 = Kernel("int4", torch.float32)
INT8_BF16 = Kernel("int8", torch.bfloat16)
CPU = torch.device("cpu")

needs_int4 = pytest.mark.skipif(not int4_available(CPU), reason="torch has no CPU 4-bit kernel")


def test_names_round_trip_and_bad_ones_are_refused() -> None:
    for kernel in (FP32, BF16, INT4_BF16, INT4_FP32, INT8_BF16):
        assert Kernel.parse(kernel.name) == kernel
    with pytest.raises(ValueError, match="int3-bf16"):
        Kernel.parse("int3-bf16")
    with pytest.raises(ValueError, match="weights='q4'"):
        Kernel("q4", torch.float32)


def test_plan_picks_by_rows_and_says_so() -> None:
    plan = KernelPlan.from_fastest([(1, INT4_BF16), (4, INT4_BF16), (16, FP32), (64, FP32)])
    assert plan == KernelPlan((4,), (INT4_BF16, FP32))
    assert [plan.kernel_for(n).name for n in (1, 4, 5, 16, 10_000)] == ["int4-bf16"] * 2 + ["fp32"] * 3
    assert plan.describe() == "int4-bf16 <=4, fp32 above"
    assert KernelPlan.single(FP32).describe() == "fp32"
    with pytest.raises(ValueError, match="increasing"):
        KernelPlan((8, 4), (FP32, BF16, INT4_BF16))


def test_timings_give_each_kernel_one_range_through_noise() -> None:
    """int4 wins small and fp32 large, with one noisy size (16) where int4 looks faster again:
    the plan does not flip back for it, and never picks the kernel that is slow everywhere."""
    timings = Timings(
        (1, 8, 16, 32, 64, 128),
        {
            "fp32": {1: 83, 8: 240, 16: 279, 32: 258, 64: 510, 128: 790},
            "int4-bf16": {1: 37, 8: 113, 16: 301, 32: 350, 64: 650, 128: 1134},
            "bf16": {1: 66, 8: 255, 16: 461, 32: 1305},
        },
    )
    plan = timings.plan([FP32, INT4_BF16, BF16])
    assert plan == KernelPlan((8,), (INT4_BF16, FP32))


def test_candidates_follow_the_settings() -> None:
    names = lambda ks: sorted(k.name for k in ks)  # noqa: E731
    assert names(candidates(CPU, "float32", "dense", "int4")) == ["fp32"]
    assert names(candidates(CPU, "auto", "dense", None)) == ["bf16", "fp32"]
    expected_auto = ["bf16", "fp32"] + (["int4-bf16"] if int4_available(CPU) else [])
    assert names(candidates(CPU, "auto", "auto", "int4")) == expected_auto
    # float32 asked for: the 4-bit kernel would need bfloat16 inputs to be worth it, so none.
    assert names(candidates(CPU, "float32", "auto", "int4")) == ["fp32"]
    # Both named: what was asked, however slow.
    assert names(candidates(CPU, "float32", "int4", "int4")) == ["int4-fp32"]
    # Nothing shipped quantised: auto stays dense.
    assert names(candidates(CPU, "bfloat16", "auto", None)) == ["bf16"]
    assert names(candidates(CPU, "bfloat16", "int8", None)) == ["int8-bf16"]


def random_q4(rows: int, cols: int) -> Q4Groups:
    torch.manual_seed(1)
    return Q4Groups(
        torch.randint(0, 16, (rows, cols), dtype=torch.uint8),
        torch.rand(rows, cols // GROUP) * 0.02,
        -torch.rand(rows, cols // GROUP) * 0.1,
    )


def projection(q4: Q4Groups | None, bias: bool = False) -> Projection:
    source = q4 or random_q4(96, 64)
    layer = Projection(source.q.shape[1], source.q.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(source.dequantize())
        if layer.bias is not None:
            layer.bias.normal_()
    layer.q4 = q4
    return layer


@needs_int4
def test_int4_runs_the_shipped_groups_exactly() -> None:
    """Q4_1's (scale, min) map onto torch's (scale, zero): with float32 activations the 4-bit
    kernel gives the dense product of the dequantised weight to float32 rounding."""
    layer = projection(random_q4(96, 64), bias=True)
    layer.pack(frozenset({INT4_FP32, INT4_BF16}))
    x = torch.randn(3, 5, 64)
    dense = layer(x)
    torch.testing.assert_close(layer(x, INT4_FP32), dense, atol=1e-5, rtol=1e-5)
    got = layer(x.bfloat16(), INT4_BF16).float()
    assert ((got - dense).abs().max() / dense.abs().max()).item() < 2e-2
    assert layer.uses(INT4_FP32) == "int4"


def test_a_weight_not_shipped_quantised_runs_dense_unless_asked_to_quantise() -> None:
    layer = projection(None)
    x = torch.randn(4, 64)
    layer.pack(frozenset({INT4_BF16, INT8_BF16}))
    assert (layer.uses(INT4_BF16), layer.uses(INT8_BF16)) == ("dense", "dense")
    torch.testing.assert_close(layer(x.bfloat16(), INT4_BF16), layer(x).bfloat16(), atol=0.05, rtol=0.02)
    layer.pack(frozenset({INT8_BF16}), quantize=True)
    assert layer.uses(INT8_BF16) == "int8"
    dense = layer(x)
    got = layer(x.bfloat16(), INT8_BF16).float()
    assert ((got - dense).abs().max() / dense.abs().max()).item() < 2e-2


def test_q4_quantisation_of_a_dense_weight_is_within_half_a_step() -> None:
    torch.manual_seed(2)
    weight = torch.randn(8, 64)
    groups = quantize_q4(weight)
    step = groups.scale.repeat_interleave(GROUP, dim=1)
    assert ((groups.dequantize() - weight).abs() <= step / 2 + 1e-6).all()
    assert int(groups.q.max()) <= 15


def test_measured_plan_covers_every_size_with_a_candidate(model: LlamaModel, tmp_path: Path) -> None:
    kernels = [FP32, BF16]
    model.pack(frozenset(kernels))
    timings = measure(model, kernels, max_rows=48, max_sampled_rows=8)
    assert timings.rows == (1, 2, 4, 8, 16, 32, 48)
    # Every size has a time from some kernel (a kernel far behind may stop being timed).
    assert all(any(rows in t for t in timings.seconds.values()) for rows in timings.rows)
    assert all(s > 0 for t in timings.seconds.values() for s in t.values())
    plan = load_or_measure(model, kernels, max_rows=48, max_sampled_rows=8, cache_dir=tmp_path)
    assert set(plan.kernels) <= set(kernels)
    # Kept on disk: the next start reads it instead of timing again.
    (saved,) = tmp_path.glob("kernel-plan-*.json")
    assert load_or_measure(model, kernels, max_rows=48, max_sampled_rows=8, cache_dir=tmp_path) == plan
    saved.write_text('{"bounds": [], "kernels": ["bf16"]}')
    assert load_or_measure(model, kernels, max_rows=48, max_sampled_rows=8, cache_dir=tmp_path) == (
        KernelPlan.single(BF16)
    )


def test_logits_come_from_the_model_dtype_head_whatever_kernel_ran_the_layers(model: LlamaModel) -> None:
    # A bfloat16 head rounded logits near 25 to steps of 0.125: a near-tie became an exact tie
    # and argmax took the lower token id (the packaged model answered "L'Étoile" for the capital
    # of France). The head is the tied embedding here; its float32 product is the reference.
    model.pack(frozenset([FP32, BF16]))
    hidden = torch.randn(4, model.args.hidden_size) * 3
    want = hidden @ model.embed_tokens.weight.t()
    with torch.inference_mode():
        got = model.compute_logits(hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
