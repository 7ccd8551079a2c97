"""accelerators.ops: each op matches an independent definition in values and gradients
(float64, gradcheck), the CUDA adapter (torch SDPA, which also runs on CPU) matches
the reference, and ops switch to the reference by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import accelerators
from accelerators import ops
from accelerators.cpu import CpuAccelerator
from accelerators.ops import reference, vendor
from tests.fakes.vendors import manual_attention

f64 = torch.float64


@pytest.fixture(autouse=True)
def cpu_selected(monkeypatch):
    monkeypatch.delenv(ops.REFERENCE_ENV, raising=False)
    accelerators.reset_accelerator()
    accelerators.get_accelerator("cpu")
    yield
    accelerators.reset_accelerator()


def rand(*shape, grad=True):
    return torch.randn(*shape, dtype=f64, requires_grad=grad)


def rope_tables(seq, dim):
    """NeoX-layout cos/sin: each frequency repeated in both halves."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=f64) / dim))
    angles = torch.outer(torch.arange(seq, dtype=f64), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


# Values against independent definitions ---------------------------------------------

def test_rms_norm_matches_torch():
    x, w = rand(3, 5, 16), rand(16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, eps=1e-5))


def test_rms_norm_low_precision_normalises_in_fp32():
    x = (torch.randn(4, 32) * 100).to(torch.bfloat16)
    w = torch.ones(32, dtype=torch.bfloat16)
    y = ops.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16
    expected = F.rms_norm(x.float(), (32,), eps=1e-6).to(torch.bfloat16)
    torch.testing.assert_close(y, expected)


def test_rotary_is_half_rotation_layout():
    seq, dim = 6, 8
    x = rand(2, 3, seq, dim, grad=False)
    cos, sin = rope_tables(seq, dim)
    # Independent definition: pair element i with i + dim/2 as a complex number, rotate it.
    half = dim // 2
    z = torch.complex(x[..., :half], x[..., half:])
    rotated = z * torch.polar(torch.ones_like(cos[:, :half]), torch.atan2(sin[:, :half], cos[:, :half]))
    expected = torch.cat((rotated.real, rotated.imag), dim=-1)
    torch.testing.assert_close(ops.rotary(x, cos, sin), expected)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_torch_sdpa(kv_heads, causal):
    q, k, v = rand(2, 4, 5, 8, grad=False), rand(2, kv_heads, 5, 8, grad=False), rand(2, kv_heads, 5, 8, grad=False)
    group = 4 // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=causal)
    torch.testing.assert_close(ops.attention(q, k, v, causal=causal), expected)


def test_attention_bool_mask_true_means_attend():
    q, k, v = (rand(1, 2, 4, 8, grad=False) for _ in range(3))
    allowed = torch.rand(1, 1, 4, 4) > 0.4
    allowed[..., 0] = True  # every query keeps at least one key
    out = ops.attention(q, k, v, causal=False, mask=allowed)
    torch.testing.assert_close(out, manual_attention(q, k, v, allowed))
    both = ops.attention(q, k, v, causal=True, mask=allowed)
    torch.testing.assert_close(both, manual_attention(q, k, v, allowed & torch.ones(4, 4, dtype=torch.bool).tril()))


def test_attention_float_mask_is_added():
    q, k, v = (rand(1, 2, 4, 8, grad=False) for _ in range(3))
    bias = torch.randn(4, 4, dtype=f64)
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) + bias
    torch.testing.assert_close(ops.attention(q, k, v, causal=False, mask=bias), scores.softmax(-1) @ v)


def test_swiglu():
    gate, up = rand(3, 8, grad=False), rand(3, 8, grad=False)
    torch.testing.assert_close(ops.swiglu(gate, up), gate * torch.sigmoid(gate) * up)


@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.1, False), (0.01, True)])
def test_adamw_step_matches_torch_optim(weight_decay, maximize):
    torch.manual_seed(0)
    theirs = torch.nn.Parameter(torch.randn(10, dtype=f64))
    ours = theirs.detach().clone()
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    optimizer = torch.optim.AdamW([theirs], lr=0.01, betas=(0.8, 0.95), eps=1e-6,
                                  weight_decay=weight_decay, maximize=maximize)
    for step in range(1, 5):
        grad = torch.randn(10, dtype=f64)
        theirs.grad = grad.clone()
        optimizer.step()
        ops.adamw_step(ours, grad, m, v, step=step, lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6,
                       weight_decay=weight_decay, maximize=maximize)
        torch.testing.assert_close(ours, theirs.detach())
    state = optimizer.state[theirs]
    torch.testing.assert_close(m, state["exp_avg"])
    torch.testing.assert_close(v, state["exp_avg_sq"])


def test_adamw_step_rejects_step_zero():
    p = torch.zeros(2)
    with pytest.raises(ValueError, match="from 1"):
        ops.adamw_step(p, p, p.clone(), p.clone(), step=0, lr=0.1)


# Gradients -------------------------------------------------------------------------------

def test_rms_norm_gradients():
    x, w = rand(2, 6), rand(6)
    assert gradcheck(lambda a, b: ops.rms_norm(a, b, 1e-5), (x, w))
    expected = torch.autograd.grad(F.rms_norm(x, (6,), w, eps=1e-5).sum(), (x, w))
    torch.testing.assert_close(torch.autograd.grad(ops.rms_norm(x, w, 1e-5).sum(), (x, w)), expected)


def test_rotary_gradients():
    cos, sin = rope_tables(3, 4)
    x = rand(1, 2, 3, 4)
    assert gradcheck(lambda a, c, s: ops.rotary(a, c, s), (x, cos.requires_grad_(), sin.requires_grad_()))


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_attention_gradients(kv_heads):
    q, k, v = rand(1, 2, 3, 4), rand(1, kv_heads, 3, 4), rand(1, kv_heads, 3, 4)
    assert gradcheck(lambda a, b, c: ops.attention(a, b, c, causal=True), (q, k, v))


def test_swiglu_gradients():
    assert gradcheck(ops.swiglu, (rand(2, 5), rand(2, 5)))


# The CUDA adapter: torch SDPA runs on CPU too, so it is checked for real. ----------------

@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_sdpa_adapter_matches_reference(kv_heads, mask_kind, causal):
    attention = vendor.cuda_kernels()["attention"]
    q, k, v = rand(1, 4, 5, 8, grad=False), rand(1, kv_heads, 5, 8, grad=False), rand(1, kv_heads, 5, 8, grad=False)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(5, 5) > 0.3
        mask[:, 0] = True
    elif mask_kind == "float":
        mask = torch.randn(5, 5, dtype=f64)
    torch.testing.assert_close(attention(q, k, v, causal, mask), reference.attention(q, k, v, causal, mask))


def test_cuda_sdpa_adapter_gradients_match_reference():
    attention = vendor.cuda_kernels()["attention"]
    q, k, v = rand(1, 4, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    assert gradcheck(lambda a, b, c: attention(a, b, c, True, None), (q, k, v))
    theirs = torch.autograd.grad(attention(q, k, v, True, None).sum(), (q, k, v))
    ours = torch.autograd.grad(reference.attention(q, k, v, True, None).sum(), (q, k, v))
    torch.testing.assert_close(theirs, ours)


# Dispatch and the reference switch ----------------------------------------------------------

class _VendorWithKernels(CpuAccelerator):
    vendor = "fakevendor"

    def kernels(self):
        return {"rms_norm": lambda x, w, eps: torch.full_like(x, 42.0),
                "swiglu": lambda g, u: torch.full_like(g, 7.0)}


def test_vendor_kernel_is_used_and_switchable_by_name(monkeypatch):
    accelerators.set_accelerator(_VendorWithKernels())
    x = torch.randn(2, 4)
    assert ops.rms_norm(x, torch.ones(4)).eq(42).all()
    assert ops.kernel_sources()["rms_norm"] == "fakevendor"
    assert ops.kernel_sources()["rotary"] == "reference"  # vendor has none
    monkeypatch.setenv(ops.REFERENCE_ENV, "rms_norm")
    torch.testing.assert_close(ops.rms_norm(x, torch.ones(4)), reference.rms_norm(x, torch.ones(4)))
    assert ops.swiglu(x, x).eq(7).all()  # not named: still the vendor's
    monkeypatch.setenv(ops.REFERENCE_ENV, "all")
    assert set(ops.kernel_sources().values()) == {"reference"}


def test_unknown_reference_override_is_an_error(monkeypatch):
    monkeypatch.setenv(ops.REFERENCE_ENV, "rms_norm,flash")
    with pytest.raises(ValueError, match="flash"):
        ops.rms_norm(torch.ones(2, 2), torch.ones(2))
