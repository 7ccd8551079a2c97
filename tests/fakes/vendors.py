"""Recording fakes of torch_npu, torch_xmlir and kunlun_ops.

Each fake op records its exact call and computes what the vendor DOCUMENTS
(tuple returns, True = masked-out attention masks, beta powers of the previous
step, out-parameters), written independently of accelerators.ops.reference.
So a wrapper that forgets to normalise a difference gives a wrong answer, not
just a wrong call. Install them with monkeypatch (see install_ascend /
install_kunlun) so nothing leaks between tests.
"""

from __future__ import annotations

import math
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def add(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls.append((name, args, kwargs))

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]


def _module(name: str) -> ModuleType:
    module = ModuleType(name)
    module.__spec__ = ModuleSpec(name, None)  # find_spec() reads this from sys.modules
    return module


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def make_torch_npu(recorder: Recorder) -> ModuleType:
    npu = _module("torch_npu")

    def npu_rms_norm(self, gamma, epsilon=1e-6):
        recorder.add("npu_rms_norm", (self, gamma), {"epsilon": epsilon})
        rstd = torch.rsqrt(self.pow(2).mean(-1, keepdim=True) + epsilon)
        return self * rstd * gamma, rstd  # documented: (y, rstd)

    def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
        recorder.add("npu_rotary_mul", (input, r1, r2), {"rotary_mode": rotary_mode})
        assert input.dim() == 4, "npu_rotary_mul takes 4-D tensors"
        return r1 * input + r2 * _rotate_half(input)

    def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None,
                             padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0,
                             pre_tockens=2147483647, next_tockens=2147483647, inner_precise=0,
                             prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                             sparse_mode=0, gen_mask_parallel=True, sync=False):
        recorder.add("npu_fusion_attention", (query, key, value, head_num, input_layout),
                     {"atten_mask": atten_mask, "scale": scale, "keep_prob": keep_prob,
                      "sparse_mode": sparse_mode})
        assert input_layout == "BNSD"
        assert head_num == query.shape[1]
        # documented: query/key/value are float16 or bfloat16 only
        assert all(t.dtype in (torch.float16, torch.bfloat16) for t in (query, key, value)), \
            f"npu_fusion_attention takes fp16/bf16, got {query.dtype}"
        group = query.shape[1] // key.shape[1]
        k = key.float().repeat_interleave(group, dim=1)
        v = value.float().repeat_interleave(group, dim=1)
        scores = (query.float() @ k.transpose(-2, -1)) * scale  # documented default scale is 1.0
        if atten_mask is not None:
            assert atten_mask.dtype == torch.bool and atten_mask.dim() in (2, 4)
            scores = scores.masked_fill(atten_mask, float("-inf"))  # True = masked OUT
        probs = scores.softmax(-1)  # accumulates in fp32, returns the input dtype
        out = (probs @ v).to(query.dtype)
        return out, scores.amax(-1), probs.sum(-1), probs, 0, 0, 0

    def npu_swiglu(input, dim=-1):
        recorder.add("npu_swiglu", (input,), {"dim": dim})
        a, b = input.chunk(2, dim=dim)
        return a * torch.sigmoid(a) * b

    def npu_apply_adam_w(beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
                         max_grad_norm=None, amsgrad=None, maximize=None, *, out):
        recorder.add("npu_apply_adam_w",
                     (beta1_power, beta2_power, lr, weight_decay, beta1, beta2, epsilon, grad,
                      max_grad_norm, amsgrad, maximize), {"out": out})
        var, m, v = out
        g = -grad if maximize else grad
        m.mul_(beta1).add_(g * (1 - beta1))
        v.mul_(beta2).add_(g * g * (1 - beta2))
        denom = torch.sqrt(v / (1 - beta2_power * beta2)) + epsilon
        var.mul_(1 - lr * weight_decay).sub_(lr * (m / (1 - beta1_power * beta1)) / denom)
        return var, m, v

    for function in (npu_rms_norm, npu_rotary_mul, npu_fusion_attention, npu_swiglu,
                     npu_apply_adam_w):
        setattr(npu, function.__name__, function)
    return npu


def make_device_module(recorder: Recorder, device_name: str) -> SimpleNamespace:
    """A torch.npu-like device module that records set_device and answers queries."""
    state = {"device": 0}

    def set_device(index):
        recorder.add("set_device", (index,), {})
        state["device"] = index

    return SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 2,
        current_device=lambda: state["device"],
        set_device=set_device,
        get_device_name=lambda index=None: device_name,
        synchronize=lambda index=None: recorder.add("synchronize", (index,), {}),
        memory_allocated=lambda index=None: 1234,
        max_memory_allocated=lambda index=None: 2345,
        mem_get_info=lambda index=None: (1000, 4000),
        manual_seed_all=lambda seed: recorder.add("manual_seed_all", (seed,), {}),
        get_device_capability=lambda index=None: (9, 9),
        _is_in_bad_fork=lambda: False,  # torch.manual_seed asks every device module
    )


def install_ascend(monkeypatch, recorder: Recorder) -> ModuleType:
    """Fake torch_npu + torch.npu + a CANN location."""
    npu = make_torch_npu(recorder)
    # The real torch_npu also renames torch's privateuse1 backend to "npu" (so
    # torch.device("npu") parses); that cannot be undone, so the fake does not.
    monkeypatch.setitem(sys.modules, "torch_npu", npu)
    monkeypatch.setattr(torch, "npu", make_device_module(recorder, "Ascend910B (fake)"),
                        raising=False)
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", "/fake/cann")
    return npu


def make_kunlun_ops(recorder: Recorder) -> ModuleType:
    ops = _module("kunlun_ops")

    def rmsnorm(x, weight, out, eps):
        recorder.add("rmsnorm", (x, weight, out, eps), {})
        out.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight)

    def swiglu(x, y):
        recorder.add("swiglu", (), {"x": x, "y": y})
        a, b = x.chunk(2, dim=-1)
        y.copy_(F.silu(a) * b)

    ops.rmsnorm, ops.swiglu = rmsnorm, swiglu
    return ops


def install_kunlun(monkeypatch, recorder: Recorder, with_ops: bool = True) -> ModuleType | None:
    """Fake torch_xmlir (which takes over torch.cuda) and optionally kunlun_ops."""
    xmlir = _module("torch_xmlir")
    monkeypatch.setitem(sys.modules, "torch_xmlir", xmlir)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ops = None
    if with_ops:
        ops = make_kunlun_ops(recorder)
        monkeypatch.setitem(sys.modules, "kunlun_ops", ops)
    else:
        monkeypatch.delitem(sys.modules, "kunlun_ops", raising=False)
    return ops


def manual_attention(q, k, v, allowed=None):
    """Attention written out by hand (no reference code), for comparisons."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v
