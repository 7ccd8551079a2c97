"""Measurement for `hetero profile`: time one Llama layer per (chip, TP, micro-batch), and the bridge.

One TP shard of a layer (heads, kv_heads and ffn_hidden divided by t) runs on this
host's accelerator for each island whose accelerator is present here; the TP
all-reduces are left to the planner's link model. Emulated chips are timed on
their virtual clock (events), so their numbers do not depend on the host.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def island_available(accelerator: str) -> tuple[bool, str]:
    """Can this host run the island's accelerator? (emulated and cpu always can.)"""
    if accelerator in ("emulated", "cpu"):
        return True, "runs on any host"
    try:
        from accelerators.registry import accelerator_class
        result = accelerator_class(accelerator).probe()
    except Exception as exc:  # a plugin that cannot even be imported is simply absent
        return False, f"cannot probe: {exc}"
    return bool(result.available), result.reason


def make_accelerator(accelerator: str, chip_spec):
    import accelerators
    if accelerator == "emulated":
        return accelerators.get_accelerator("emulated", chip=chip_spec.to_dict())
    return accelerators.get_accelerator(accelerator)


def measure_layer(accel, model, t: int, b: int, dtype: str, reps: int = 3) -> dict:
    """Forward and backward seconds (median of `reps`) and peak bytes of one TP shard of a layer."""
    import torch
    import accelerators

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    ops = accelerators.ops
    h, s = model.hidden, model.seq_len
    d = model.head_dim
    aq, akv, f = model.heads // t, model.kv_heads // t, model.ffn_hidden // t
    device = accel.device()
    scope = accel.device_scope() if hasattr(accel, "device_scope") else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)

    def param(*shape):
        w = (torch.randn(*shape, generator=gen) * 0.02).to(device=device, dtype=torch_dtype)
        return w.requires_grad_(True)

    with scope:
        w_norm1, w_norm2 = param(h), param(h)
        wq, wk, wv, wo = param(h, aq * d), param(h, akv * d), param(h, akv * d), param(aq * d, h)
        wg, wu, wd = param(h, f), param(h, f), param(f, h)
        pos = torch.arange(s, device=device, dtype=torch.float32)
        inv = 1.0 / (model.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
        freqs = torch.outer(pos, inv)
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1).to(torch_dtype)
        sin = torch.cat((freqs.sin(), freqs.sin()), dim=-1).to(torch_dtype)

        def forward(x):
            hn = ops.rms_norm(x, w_norm1, model.norm_eps)
            q = (hn @ wq).view(b, s, aq, d).transpose(1, 2)
            k = (hn @ wk).view(b, s, akv, d).transpose(1, 2)
            v = (hn @ wv).view(b, s, akv, d).transpose(1, 2)
            q, k = ops.rotary(q, cos, sin), ops.rotary(k, cos, sin)
            o = ops.attention(q, k, v, causal=True).transpose(1, 2).reshape(b, s, aq * d)
            x2 = x + o @ wo
            hn2 = ops.rms_norm(x2, w_norm2, model.norm_eps)
            return x2 + ops.swiglu(hn2 @ wg, hn2 @ wu) @ wd

        fwd_times, bwd_times, peak = [], [], 0
        for rep in range(reps + 1):      # the first run warms up
            x = torch.randn(b, s, h, generator=gen).to(device=device, dtype=torch_dtype).requires_grad_(True)
            grad = torch.randn(b, s, h, generator=gen).to(device=device, dtype=torch_dtype)
            accel.synchronize()
            with contextlib.suppress(Exception):
                accel.reset_peak_memory_stats()
            e0, e1, e2 = accel.new_event(), accel.new_event(), accel.new_event()
            e0.record()
            y = forward(x)
            e1.record()
            y.backward(grad)
            e2.record()
            e2.synchronize()
            if rep:
                fwd_times.append(e0.elapsed_time(e1) / 1e3)
                bwd_times.append(e1.elapsed_time(e2) / 1e3)
            with contextlib.suppress(Exception):
                peak = max(peak, int(accel.max_memory_allocated()))
            for w in (w_norm1, w_norm2, wq, wk, wv, wo, wg, wu, wd):
                w.grad = None
    return {"forward_s": statistics.median(fwd_times), "backward_s": statistics.median(bwd_times),
            "memory_bytes": peak or None}


def islands_all_local(cluster) -> bool:
    return all(node.host in LOCAL_HOSTS for island in cluster.islands for node in island.nodes)


def measure_loopback_bridge(total_bytes: int = 64 << 20, pings: int = 200) -> tuple[float, float]:
    """(bytes/s, one-way latency s) of a TCP stream over loopback, the path the bridge takes
    between islands on one host."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    chunk = 4 << 20
    done = threading.Event()

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(pings):
                conn.sendall(conn.recv(1))
            got = 0
            while got < total_bytes:
                data = conn.recv(chunk)
                if not data:
                    break
                got += len(data)
            conn.sendall(b"k")
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for _ in range(pings):
            client.sendall(b"p")
            client.recv(1)
        latency = (time.perf_counter() - t0) / pings / 2
        payload = bytes(chunk)
        t0 = time.perf_counter()
        sent = 0
        while sent < total_bytes:
            client.sendall(payload)
            sent += len(payload)
        client.recv(1)
        bandwidth = sent / (time.perf_counter() - t0)
    finally:
        client.close()
        server.close()
        done.wait(5)
    return bandwidth, latency
