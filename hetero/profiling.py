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


def _dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)


def _layer(accel, model, t: int, b: int, dtype: str):
    """(forward, weights, new_input) of one TP shard of a Llama layer on the accelerator's device
    (call inside its device scope)."""
    import torch
    import accelerators

    torch_dtype = _dtype(dtype)
    ops = accelerators.ops
    h, s = model.hidden, model.seq_len
    d = model.head_dim
    aq, akv, f = model.heads // t, model.kv_heads // t, model.ffn_hidden // t
    device = accel.device()
    gen = torch.Generator().manual_seed(0)

    def param(*shape):
        w = (torch.randn(*shape, generator=gen) * 0.02).to(device=device, dtype=torch_dtype)
        return w.requires_grad_(True)

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

    def new_input(requires_grad: bool = True):
        x = torch.randn(b, s, h, generator=gen).to(device=device, dtype=torch_dtype)
        return x.requires_grad_(requires_grad)

    return forward, [w_norm1, w_norm2, wq, wk, wv, wo, wg, wu, wd], new_input


def measure_layer(accel, model, t: int, b: int, dtype: str, reps: int = 3) -> dict:
    """Forward and backward seconds (median of `reps`) and peak bytes of one TP shard of a layer."""
    scope = accel.device_scope() if hasattr(accel, "device_scope") else contextlib.nullcontext()
    with scope:
        forward, weights, new_input = _layer(accel, model, t, b, dtype)
        fwd_times, bwd_times, peak = [], [], 0
        for rep in range(reps + 1):      # the first run warms up
            x, grad = new_input(), new_input(False)
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
            for w in weights:
                w.grad = None
    return {"forward_s": statistics.median(fwd_times), "backward_s": statistics.median(bwd_times),
            "memory_bytes": peak or None}


def measure_host_costs(accel, model, b: int, dtype: str, reps: int = 5):
    """The fixed host costs of a stage on this chip (partitioner.profile.HostCost), in the chip's
    time (wall seconds / the accelerator's time dilation).

    The engine synchronizes after every forward and every backward, so each starts on an idle
    queue: an action of n layers lasts W(n) = fixed + n * per-layer, and the fixed part is
    2 W(1) - W(2), measured for forward and backward alike (each W the least of `reps`: on a busy
    host the least disturbed run, the fixed cost's own). synchronize on an
    idle queue is timed alone; the hand-off is the fixed part of a device -> host plus a
    host -> device copy of one micro-batch's activation (sizes 1x and 2x: the bytes are the link
    model's); the optimizer step's fixed part is AdamW over one layer's weights against two."""
    from partitioner.profile import HostCost

    k = float(getattr(accel, "time_dilation", 1.0) or 1.0)
    scope = accel.device_scope() if hasattr(accel, "device_scope") else contextlib.nullcontext()
    with scope:
        forward, weights, new_input = _layer(accel, model, 1, b, dtype)
        sync = _least_wall(accel, lambda: None, reps * 4)
        fwd, bwd = _action_fixed(accel, forward, weights, new_input, reps)
        handoff = _fixed_part(lambda n: _least_wall(accel, _copies(accel, new_input, n), reps))
        step = _fixed_part(lambda n: _least_wall(accel, _adamw(weights, n), reps))
    return HostCost(launch_s=max(0.0, fwd + bwd - 2 * sync) / k, sync_s=2 * sync / k,
                    handoff_s=max(0.0, handoff) / k, optimizer_step_s=max(0.0, step) / k)


def _least_wall(accel, work, reps: int) -> float:
    """Least wall seconds from an idle queue through `work()` to its synchronize (one warm-up)."""
    times = []
    for rep in range(reps + 1):
        accel.synchronize()
        t0 = time.perf_counter()
        work()
        accel.synchronize()
        if rep:
            times.append(time.perf_counter() - t0)
    return min(times)


def _fixed_part(wall_of) -> float:
    """The intercept of a cost linear in n, from n = 1 and n = 2."""
    return 2 * wall_of(1) - wall_of(2)


def _action_fixed(accel, forward, weights, new_input, reps: int) -> tuple[float, float]:
    """Fixed wall seconds of a forward action and of a backward action (each from an idle queue)."""
    fwd, bwd = {}, {}
    for n in (1, 2):
        f_times, b_times = [], []
        for rep in range(reps + 1):
            x, grad = new_input(), new_input(False)
            accel.synchronize()
            t0 = time.perf_counter()
            y = x
            for _ in range(n):
                y = forward(y)
            accel.synchronize()
            t1 = time.perf_counter()
            y.backward(grad)
            accel.synchronize()
            t2 = time.perf_counter()
            if rep:
                f_times.append(t1 - t0)
                b_times.append(t2 - t1)
            for w in weights:
                w.grad = None
        fwd[n], bwd[n] = min(f_times), min(b_times)
    return 2 * fwd[1] - fwd[2], 2 * bwd[1] - bwd[2]


def _copies(accel, new_input, n: int):
    """A micro-batch's activation (n times its size) out to the host and back, as the bridge stages it."""
    import torch

    x = torch.cat([new_input(False)] * n)

    def work():
        accel.to_device(accel.to_host(x))
    return work


def _adamw(weights, n: int):
    """The engine's AdamW (accelerators.ops.adamw_step, one call per tensor) over n layers' weights."""
    import torch
    import accelerators

    tensors = [w.detach() for w in weights] * n
    state = [(torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(w)) for w in tensors]

    def work():
        for w, (g, m, v) in zip(tensors, state):
            accelerators.ops.adamw_step(w, g, m, v, step=1, lr=1e-4)
    return work


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
