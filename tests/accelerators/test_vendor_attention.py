"""Vendor attention paths of issue 13: Ascend's fused attention only sees the
dtypes it takes (fp32 runs the reference), and Kunlun's attention is blocked
over queries: equal to the reference forward and backward, and never holding
the full seq x seq scores of a head at once."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import accelerators
from accelerators import ops
from accelerators.ops import blocked, reference, vendor
from tests.fakes.vendors import Recorder, install_ascend, install_kunlun, make_torch_npu


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    monkeypatch.delenv(ops.REFERENCE_ENV, raising=False)
    accelerators.reset_accelerator()
    yield
    accelerators.reset_accelerator()


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# Ascend: fp32 never reaches npu_fusion_attention ------------------------------------------

def test_ascend_fp32_attention_runs_the_reference_exactly():
    recorder = Recorder()
    attention = vendor.ascend_kernels(make_torch_npu(recorder))["attention"]
    q, k, v = rand(2, 4, 6, 8), rand(2, 2, 6, 8), rand(2, 2, 6, 8)
    out = attention(q, k, v, True, None)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference.attention(q, k, v, True, None))  # bit for bit
    assert recorder.named("npu_fusion_attention") == []


def test_ascend_bf16_attention_reaches_the_kernel_normalised_through_dispatch(monkeypatch):
    recorder = Recorder()
    install_ascend(monkeypatch, recorder)
    assert accelerators.get_accelerator().vendor == "ascend"
    q, k, v = (rand(1, 2, 4, 8, dtype=torch.bfloat16) for _ in range(3))
    out = ops.attention(q, k, v, causal=True)
    (args, kwargs), = recorder.named("npu_fusion_attention")
    assert args[0] is q and args[3:] == (2, "BNSD")
    assert torch.equal(kwargs["atten_mask"], torch.ones(4, 4, dtype=torch.bool).triu(1))
    expected = reference.attention(q.float(), k.float(), v.float(), True, None)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    ops.attention(q.float(), k.float(), v.float(), causal=True)  # fp32 through the same dispatch
    assert len(recorder.named("npu_fusion_attention")) == 1


# Kunlun: blocked attention ------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [True, False])
def test_blocked_attention_matches_reference_forward_and_backward(kv_heads, mask_kind, causal):
    torch.manual_seed(0)
    q, k, v = rand(2, 4, 11, 8, grad=True), rand(2, kv_heads, 11, 8, grad=True), rand(2, kv_heads, 11, 8, grad=True)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(11, 11) > 0.3
        mask[:, 0] = True  # every query keeps a key
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 11, 11)
    grad_out = torch.randn(2, 4, 11, 8)
    ours = blocked.attention(q, k, v, causal, mask, query_block=4)  # 11 = 4 + 4 + 3
    theirs = reference.attention(q, k, v, causal, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad_out)
    torch.testing.assert_close(ours_grads, theirs_grads, rtol=1e-5, atol=1e-5)


def test_blocked_attention_gradcheck_float64():
    q, k, v = (rand(1, 2, 5, 4, dtype=torch.float64, grad=True) for _ in range(3))
    assert gradcheck(lambda a, b, c: blocked.attention(a, b, c, True, None, query_block=2), (q, k, v))


def test_blocked_attention_bf16_matches_reference():
    q, k, v = (rand(1, 2, 9, 8, dtype=torch.bfloat16, grad=True) for _ in range(3))
    ours = blocked.attention(q, k, v, True, None, query_block=4)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference.attention(q, k, v, True, None), rtol=2e-2, atol=2e-2)
    ours.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op produced (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return result


def test_blocked_attention_never_builds_full_scores():
    batch, heads, seq, dim, block = 1, 2, 64, 4, 8
    q, k, v = (rand(batch, heads, seq, dim, grad=True) for _ in range(3))
    full_scores = batch * heads * seq * seq
    with _LargestTensor() as blocked_run:
        blocked.attention(q, k, v, True, None, query_block=block).sum().backward()
    assert blocked_run.largest <= batch * heads * block * seq < full_scores
    with _LargestTensor() as reference_run:  # the check itself can fail: the reference does
        reference.attention(q, k, v, True, None).sum().backward()
    assert reference_run.largest >= full_scores


def test_blocked_attention_refuses_a_bad_block():
    q = rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="query_block"):
        blocked.attention(q, q, q, True, None, query_block=0)


def test_kunlun_training_dispatches_to_blocked_attention(monkeypatch):
    recorder = Recorder()
    install_kunlun(monkeypatch, recorder)
    assert accelerators.get_accelerator().vendor == "kunlun"
    assert ops.kernel_sources()["attention"] == "kunlun"
    calls = []
    real = blocked.attention
    monkeypatch.setattr(blocked, "attention",
                        lambda *a, **kw: calls.append((a[3], a[4])) or real(*a, **kw))
    accelerators.reset_accelerator()  # rebuild the dispatch table over the spy
    accelerators.get_accelerator()
    q, k, v = (rand(1, 2, 5, 4, grad=True) for _ in range(3))
    out = ops.attention(q, k, v, causal=True)
    out.sum().backward()
    assert calls == [(True, None)]
    assert q.grad is not None
    assert recorder.calls == []  # kunlun_ops has no attention: nothing vendor was called
