"""The cuda accelerator and accelerators.ops on a real NVIDIA GPU (scripts/gpu-check.sh).

Skipped where torch has no CUDA or sees no GPU (CI, this 2-core box): these are
the tests that need the device itself.
"""

from __future__ import annotations

import pytest
import torch

import accelerators
from accelerators import ops
from accelerators.ops import blocked, reference

pytestmark = pytest.mark.skipif(torch.version.cuda is None or not torch.cuda.is_available(),
                                reason="needs torch with CUDA and an NVIDIA GPU")


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.delenv(ops.REFERENCE_ENV, raising=False)
    accelerators.reset_accelerator()
    accelerator = accelerators.get_accelerator("cuda")
    accelerator.set_device(0)
    yield accelerator
    accelerator.synchronize()
    accelerators.reset_accelerator()


def host_and_device(*shapes, dtype=torch.float32, grad=False):
    host = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    device = [t.to("cuda", dtype).requires_grad_(grad) for t in host]
    return [t.requires_grad_(grad) for t in host], device


def test_accelerator_surface_on_the_device(cuda):
    assert cuda.vendor == "cuda" and cuda.dist_backend == "nccl"
    assert cuda.device(0) == torch.device("cuda", 0) and cuda.current_device() == 0
    assert cuda.device_count() >= 1 and cuda.device_name(0)
    before = cuda.memory_allocated()
    cuda.reset_peak_memory_stats()
    block = torch.empty(64 << 20, dtype=torch.uint8, device=cuda.device(0))
    assert cuda.memory_allocated() - before >= 64 << 20
    assert cuda.max_memory_allocated() >= cuda.memory_allocated()
    assert 0 < cuda.free_memory() < cuda.total_memory()
    del block
    assert torch.bfloat16 in cuda.supported_dtypes() or not torch.cuda.is_bf16_supported()


def test_streams_events_and_host_copies(cuda):
    x = torch.randn(1024, 1024, device=cuda.device(0))
    side = cuda.new_stream()
    start, end = cuda.new_event(), cuda.new_event()
    with cuda.stream(side):
        start.record()
        y = x @ x
        end.record()
    end.synchronize()
    assert start.elapsed_time(end) >= 0.0
    cuda.synchronize()
    host = cuda.to_host(y)
    assert host.device.type == "cpu"
    torch.testing.assert_close(host, (x.cpu() @ x.cpu()), rtol=1e-3, atol=1e-2)
    pinned = cuda.pin_memory(torch.zeros(16))
    assert pinned.is_pinned()


def test_rng_is_reproducible_on_the_device(cuda):
    cuda.manual_seed(7)
    a = torch.randn(8, device=cuda.device(0))
    cuda.manual_seed(7)
    assert torch.equal(a, torch.randn(8, device=cuda.device(0)))


def test_cuda_dispatch_uses_sdpa_and_matches_the_reference(cuda):
    assert ops.kernel_sources()["attention"] == "cuda"
    host, dev = host_and_device((2, 8, 64, 32), (2, 4, 64, 32), (2, 4, 64, 32), grad=True)
    out = ops.attention(*dev, causal=True)
    expected = reference.attention(*host, True, None)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-4, atol=1e-4)
    seed = torch.randn_like(expected)
    got = torch.autograd.grad(out, dev, seed.to("cuda", torch.float32))
    want = torch.autograd.grad(expected, host, seed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["rms_norm", "swiglu", "rotary"])
def test_other_ops_on_the_device_match_the_host(cuda, name):
    x, w = torch.randn(4, 16, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    args = {"rms_norm": (x, w), "swiglu": (x, x), "rotary": (x.reshape(4, 1, 16, 64), w[None], w[None])}[name]
    got = getattr(ops, name)(*(a.to("cuda", torch.float32) for a in args))
    torch.testing.assert_close(got.double().cpu(), getattr(reference, name)(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_attention_on_the_device(cuda, dtype):
    host, dev = host_and_device((1, 4, 300, 64), (1, 2, 300, 64), (1, 2, 300, 64), dtype=dtype, grad=True)
    out = blocked.attention(*dev, True, None, query_block=128)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double().cpu(), reference.attention(*host, True, None),
                               rtol=tolerance, atol=tolerance)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad.float()).all() for t in dev)


def test_adamw_on_the_device_matches_the_host(cuda):
    param, grad = torch.randn(256, dtype=torch.float64), torch.randn(256, dtype=torch.float64)
    host = [param.clone(), grad, torch.zeros(256, dtype=torch.float64), torch.zeros(256, dtype=torch.float64)]
    dev = [t.to("cuda", torch.float32) for t in host]
    for step in (1, 2):
        ops.adamw_step(*dev, step=step, lr=1e-2, weight_decay=0.1)
        reference.adamw_step(*host, step=step, lr=1e-2, weight_decay=0.1)
    torch.testing.assert_close(dev[0].double().cpu(), host[0], rtol=1e-5, atol=1e-5)
