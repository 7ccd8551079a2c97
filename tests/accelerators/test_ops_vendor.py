"""Ascend and Kunlun op adapters against recording fakes of torch_npu / kunlun_ops.

The fakes compute what the vendors document (see tests/fakes/vendors.py), so
these tests check both the exact calls and that the adapters normalise the
differences: tuple returns, True = masked-out masks, layout and head_num,
scale, previous-step beta powers and out-parameters, out-tensor kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import accelerators
from accelerators import ops
from accelerators.ops import reference, vendor
from tests.fakes.vendors import Recorder, install_ascend, install_kunlun, make_kunlun_ops, make_torch_npu

f64 = torch.float64


@pytest.fixture
def npu():
    recorder = Recorder()
    return recorder, vendor.ascend_kernels(make_torch_npu(recorder))


def rand(*shape, grad=False):
    return torch.randn(*shape, dtype=f64, requires_grad=grad)


# Ascend ---------------------------------------------------------------------------------

def test_rms_norm_returns_only_y(npu):
    recorder, kernels = npu
    x, w = rand(2, 3, 8), rand(8)
    y = kernels["rms_norm"](x, w, 1e-5)
    assert isinstance(y, torch.Tensor)  # not the (y, rstd) tuple
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-5))
    (args, kwargs), = recorder.named("npu_rms_norm")
    assert args[0] is x and args[1] is w and kwargs == {"epsilon": 1e-5}


def test_rotary_uses_npu_rotary_mul_for_4d_only(npu):
    recorder, kernels = npu
    x, cos, sin = rand(1, 2, 3, 8), rand(1, 1, 3, 8), rand(1, 1, 3, 8)
    torch.testing.assert_close(kernels["rotary"](x, cos, sin), reference.rotary(x, cos, sin))
    (args, kwargs), = recorder.named("npu_rotary_mul")
    assert args == (x, cos, sin) and kwargs == {"rotary_mode": "half"}
    x3 = rand(2, 3, 8)
    torch.testing.assert_close(kernels["rotary"](x3, cos[0], sin[0]), reference.rotary(x3, cos[0], sin[0]))
    assert len(recorder.named("npu_rotary_mul")) == 1  # 3-D went to the reference


def half(*shape):
    """bf16 inputs: the only dtypes (with fp16) npu_fusion_attention takes."""
    return torch.randn(*shape, dtype=torch.bfloat16)


def assert_close_bf16(out, q, k, v, causal, mask):
    """The kernel against the reference run in fp32 on the same bf16 inputs."""
    expected = reference.attention(q.float(), k.float(), v.float(), causal, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_causal_mask_polarity_layout_and_scale(npu, kv_heads):
    recorder, kernels = npu
    q, k, v = half(2, 4, 5, 8), half(2, kv_heads, 5, 8), half(2, kv_heads, 5, 8)
    out = kernels["attention"](q, k, v, True, None)
    assert_close_bf16(out, q, k, v, True, None)
    (args, kwargs), = recorder.named("npu_fusion_attention")
    assert args[0] is q and args[1] is k and args[2] is v  # no cast on the way in
    assert args[3:] == (4, "BNSD")  # head_num = q heads, layout named
    assert kwargs["scale"] == pytest.approx(1 / math.sqrt(8))
    assert kwargs["keep_prob"] == 1.0
    expected_mask = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = masked OUT
    assert torch.equal(kwargs["atten_mask"], expected_mask)


def test_attention_user_bool_mask_is_inverted_and_lifted_to_4d(npu):
    recorder, kernels = npu
    q, k, v = half(2, 2, 4, 8), half(2, 2, 4, 8), half(2, 2, 4, 8)
    allowed = torch.rand(2, 4, 4) > 0.4  # (batch, q, kv): 3-D, not accepted as is
    allowed[..., 0] = True
    out = kernels["attention"](q, k, v, False, allowed)
    assert_close_bf16(out, q, k, v, False, allowed)
    (_args, kwargs), = recorder.named("npu_fusion_attention")
    assert kwargs["atten_mask"].shape == (1, 2, 4, 4)
    assert torch.equal(kwargs["atten_mask"], ~allowed.reshape(1, 2, 4, 4))


def test_attention_without_mask_passes_none(npu):
    recorder, kernels = npu
    q = half(1, 2, 3, 4)
    assert_close_bf16(kernels["attention"](q, q, q, False, None), q, q, q, False, None)
    (_args, kwargs), = recorder.named("npu_fusion_attention")
    assert kwargs["atten_mask"] is None


def test_attention_float_mask_falls_back_to_reference(npu):
    recorder, kernels = npu
    q, bias = half(1, 2, 3, 4), half(3, 3)  # a dtype the kernel takes, but a float mask
    torch.testing.assert_close(kernels["attention"](q, q, q, True, bias),
                               reference.attention(q, q, q, True, bias))
    assert recorder.named("npu_fusion_attention") == []


def test_swiglu_concatenates_gate_then_up(npu):
    recorder, kernels = npu
    gate, up = rand(3, 6), rand(3, 6)
    torch.testing.assert_close(kernels["swiglu"](gate, up), reference.swiglu(gate, up))
    (args, kwargs), = recorder.named("npu_swiglu")
    assert torch.equal(args[0], torch.cat((gate, up), dim=-1)) and kwargs == {"dim": -1}


def test_adamw_passes_previous_step_powers_and_updates_in_place(npu):
    recorder, kernels = npu
    torch.manual_seed(1)
    param = torch.randn(8, dtype=f64)
    m, v = torch.zeros_like(param), torch.zeros_like(param)
    ref_param, ref_m, ref_v = param.clone(), m.clone(), v.clone()
    for step in (1, 2, 3):
        grad = torch.randn(8, dtype=f64)
        kernels["adamw_step"](param, grad, m, v, step=step, lr=0.01, beta1=0.8, beta2=0.9,
                              eps=1e-6, weight_decay=0.1, maximize=False)
        reference.adamw_step(ref_param, grad, ref_m, ref_v, step=step, lr=0.01, beta1=0.8,
                             beta2=0.9, eps=1e-6, weight_decay=0.1)
        torch.testing.assert_close(param, ref_param)
        torch.testing.assert_close((m, v), (ref_m, ref_v))
    args, kwargs = recorder.named("npu_apply_adam_w")[2]
    assert args[:7] == pytest.approx((0.8 ** 2, 0.9 ** 2, 0.01, 0.1, 0.8, 0.9, 1e-6))
    assert args[8:] == (None, False, False)  # max_grad_norm, amsgrad, maximize
    assert all(a is b for a, b in zip(kwargs["out"], (param, m, v)))


def test_ascend_ops_dispatch_end_to_end(monkeypatch):
    recorder = Recorder()
    install_ascend(monkeypatch, recorder)
    accelerators.reset_accelerator()
    try:
        assert accelerators.get_accelerator().vendor == "ascend"
        assert set(ops.kernel_sources().values()) == {"ascend"}
        x, w = rand(2, 4), rand(4)
        ops.rms_norm(x, w, 1e-6)
        assert len(recorder.named("npu_rms_norm")) == 1
        monkeypatch.setenv(ops.REFERENCE_ENV, "rms_norm")
        ops.rms_norm(x, w, 1e-6)
        assert len(recorder.named("npu_rms_norm")) == 1  # switched to the reference
    finally:
        accelerators.reset_accelerator()


# Kunlun ---------------------------------------------------------------------------------

def test_kunlun_kernels_fill_out_tensors_when_no_grad():
    recorder = Recorder()
    kernels = vendor.kunlun_kernels(make_kunlun_ops(recorder))
    x, w = rand(3, 8), rand(8)
    y = kernels["rms_norm"](x, w, 1e-6)
    torch.testing.assert_close(y, reference.rms_norm(x, w, 1e-6))
    (args, _), = recorder.named("rmsnorm")
    assert args[0] is x and args[1] is w and args[2] is y and args[3] == 1e-6
    gate, up = rand(3, 4), rand(3, 4)
    out = kernels["swiglu"](gate, up)
    torch.testing.assert_close(out, reference.swiglu(gate, up))
    (_, kwargs), = recorder.named("swiglu")
    assert torch.equal(kwargs["x"], torch.cat((gate, up), -1)) and kwargs["y"] is out


def test_kunlun_kernels_defer_to_reference_when_grad_is_needed():
    recorder = Recorder()
    kernels = vendor.kunlun_kernels(make_kunlun_ops(recorder))
    x, w = rand(3, 8, grad=True), rand(8)
    y = kernels["rms_norm"](x, w, 1e-6)
    y.sum().backward()  # the reference has autograd; kunlun_ops has none
    assert x.grad is not None and recorder.calls == []


def test_kunlun_without_kunlun_ops_uses_reference_but_blocked_attention(monkeypatch):
    install_kunlun(monkeypatch, Recorder(), with_ops=False)
    accelerators.reset_accelerator()
    try:
        assert accelerators.get_accelerator("kunlun").kunlun_ops is None
        sources = ops.kernel_sources()
        assert sources.pop("attention") == "kunlun"  # accelerators.ops.blocked
        assert set(sources.values()) == {"reference"}
    finally:
        accelerators.reset_accelerator()


def test_kunlun_dispatch_end_to_end(monkeypatch):
    recorder = Recorder()
    install_kunlun(monkeypatch, recorder)
    accelerators.reset_accelerator()
    try:
        accelerators.get_accelerator()
        assert ops.kernel_sources()["swiglu"] == "kunlun"
        with torch.no_grad():
            ops.swiglu(rand(2, 2), rand(2, 2))
        assert len(recorder.named("swiglu")) == 1
    finally:
        accelerators.reset_accelerator()


# torch's fused AdamW (CUDA; the emulated chips run it too) -------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_fused_adamw_is_the_reference_math(dtype, monkeypatch):
    calls = []
    fused = vendor._FUSED_ADAMW
    monkeypatch.setattr(vendor, "_FUSED_ADAMW", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    kernel = vendor.cuda_kernels()["adamw_step"]
    torch.manual_seed(0)
    ours = [torch.randn(1000, dtype=dtype)] + [torch.zeros(1000, dtype=dtype) for _ in range(2)]
    theirs = [t.clone() for t in ours]
    for step in range(1, 6):
        grad = torch.randn(1000, dtype=dtype)
        kernel(ours[0], grad, ours[1], ours[2], step=step, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6,
               weight_decay=0.1)
        reference.adamw_step(theirs[0], grad, theirs[1], theirs[2], step=step, lr=1e-2, beta1=0.8, beta2=0.95,
                             eps=1e-6, weight_decay=0.1)
    assert len(calls) == 5                   # torch's kernel ran, not the reference
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_torch_fused_adamw_takes_mixed_dtypes_through_the_reference_and_refuses_step_zero():
    kernel = vendor.cuda_kernels()["adamw_step"]
    param, grad = torch.ones(8), torch.full((8,), 0.5, dtype=torch.bfloat16)
    m, v = torch.zeros(8), torch.zeros(8)
    expected = [t.clone() for t in (param, m, v)]
    kernel(param, grad, m, v, step=1, lr=0.1, maximize=True)          # the kernel wants one dtype
    reference.adamw_step(expected[0], grad, expected[1], expected[2], step=1, lr=0.1, maximize=True)
    for a, b in zip((param, m, v), expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="from 1"):
        kernel(param, param, m, v, step=0, lr=0.1)


def test_the_cost_model_knows_which_accelerators_fuse_adamw():
    """partitioner.inputs.REFERENCE_ADAMW (the planner charges the reference's passes and temporaries
    there, one pass and none elsewhere) names exactly the ops tables without an adamw_step."""
    from accelerators.cpu import CpuAccelerator
    from accelerators.emulated import EmulatedAccelerator
    from partitioner.inputs import REFERENCE_ADAMW

    tables = {"cuda": vendor.cuda_kernels(), "ascend": vendor.ascend_kernels(make_torch_npu(Recorder())),
              "kunlun": vendor.kunlun_kernels(make_kunlun_ops(Recorder())),
              "emulated": vendor.emulated_kernels(EmulatedAccelerator({"name": "c", "tflops": {"fp32": 1e-3},
                                                                       "memory_gb": 0.01,
                                                                       "memory_bandwidth_gbps": 1.0})),
              "cpu": CpuAccelerator().kernels()}
    assert {name for name, table in tables.items() if "adamw_step" not in table} == set(REFERENCE_ADAMW)
