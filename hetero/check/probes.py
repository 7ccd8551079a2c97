"""The measurements `hetero check` runs, each in its own process (so probes of different
chips run in parallel and a stuck one can be killed). Every function takes and
returns plain data; link probes come in pairs that meet through a torch TCPStore
on loopback.
"""

from __future__ import annotations

import json
import statistics
import time

MATMUL_TARGET_S = 0.02        # one matmul at the expected speed takes about this long
MATMUL_REPS, MATMUL_ROUNDS = 4, 3
PINGS = 50
LINK_ROUNDS = 3


def matmul_size(expected_flops: float) -> int:
    """Square matmul side n (a multiple of 64, 64..8192) that takes ~MATMUL_TARGET_S at the expected speed."""
    n = (MATMUL_TARGET_S * expected_flops / 2.0) ** (1.0 / 3.0)
    return int(min(8192, max(64, round(n / 64) * 64)))


def matmul(accelerator: str, chip: dict, device_index: int, dtype: str, n: int, threads: int) -> dict:
    """Achieved FLOP/s of n x n x n matmuls on one chip: best of a few rounds of back-to-back products.
    The operands are allocated on the chip (an emulated chip's device memory), n shrunk to fit."""
    import contextlib

    import torch

    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    accel = _select(accelerator, chip, device_index)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    n = _fitting_side(accel, n, torch_dtype.itemsize)
    device = accel.device(device_index if accelerator not in ("cpu", "emulated") else None)
    best = float("inf")
    with _device_scope(accel):
        a = torch.randn(n, n, device=device, dtype=torch_dtype)
        b = torch.randn(n, n, device=device, dtype=torch_dtype)
        (a @ b).sum()                       # warm-up: kernels, allocator, first touch
        accel.synchronize()
        init_s = time.perf_counter() - started
        for _ in range(MATMUL_ROUNDS):
            t0 = time.perf_counter()
            for _ in range(MATMUL_REPS):
                c = a @ b
            accel.synchronize()
            best = min(best, time.perf_counter() - t0)
    del a, b, c
    memory = None
    with contextlib.suppress(Exception):
        memory = int(accel.total_memory())
    return {"flops_per_s": 2.0 * n ** 3 * MATMUL_REPS / best, "n": n, "dtype": dtype,
            "seconds": time.perf_counter() - started, "init_s": init_s, "memory_bytes": memory}


def _select(accelerator: str, chip: dict | None, device_index: int):
    """The process's accelerator for a probe, selected as a worker's (vendor chips: set_device first)."""
    import accelerators

    accel = (accelerators.get_accelerator("emulated", chip=chip) if accelerator == "emulated"
             else accelerators.get_accelerator(accelerator))
    if accelerator not in ("cpu", "emulated"):
        accel.set_device(device_index)
    return accel


def _device_scope(accel):
    """Where device work runs: the emulated chip's scope (its allocations are device memory)."""
    import contextlib

    scope = getattr(accel, "device_scope", None)
    return scope() if scope else contextlib.nullcontext()


def _free_bytes(accel) -> int | None:
    """Free device memory, where the accelerator can say (None: unknown)."""
    try:
        return int(accel.free_memory())
    except Exception:   # pylint: disable=broad-except  # a vendor without the query
        return None


def _fitting_side(accel, n: int, itemsize: int) -> int:
    """n, halved (not below 64) until four n x n operands fit in half the chip's free memory."""
    free = _free_bytes(accel)
    while free is not None and n > 64 and 4 * n * n * itemsize > free // 2:
        n //= 2
    return n


def _store(port: int, rank: int):
    from hetero.launch.store import loopback_store

    return loopback_store(port, rank, 2)


def allreduce_pair(rank: int, port: int, nbytes: int, accelerator: str = "cpu", backend: str = "gloo",
                   device_index: int = 0, chip: dict | None = None) -> dict:
    """One side of a two-process all-reduce on the island's backend: latency (per ring hop) and
    bus bandwidth. The buffers are device memory, as a worker's (an emulated chip's: at most half
    its free memory, so `nbytes` may shrink); `chip` is the emulated chip's spec."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    accel = _select(accelerator, chip, device_index)
    device = accel.device(device_index if accelerator not in ("cpu", "emulated") else None)
    free = _free_bytes(accel) if accelerator == "emulated" else None
    if free is not None:
        nbytes = max(4, min(nbytes, free // 2))
    store = _store(port, rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=timedelta(seconds=30))
    try:
        with _device_scope(accel):
            small = torch.ones(1, device=device)
            big = torch.ones(nbytes // 4, device=device)
            for _ in range(3):
                dist.all_reduce(small)
            dist.all_reduce(big)
            times = []
            for _ in range(PINGS):
                t0 = time.perf_counter()
                dist.all_reduce(small)
                accel.synchronize()
                times.append(time.perf_counter() - t0)
            best = float("inf")
            for _ in range(LINK_ROUNDS):
                t0 = time.perf_counter()
                dist.all_reduce(big)
                accel.synchronize()
                best = min(best, time.perf_counter() - t0)
    finally:
        dist.destroy_process_group()
    nbytes = big.nbytes
    # Two ranks: a ring all-reduce is 2 hops and moves 2(n-1)/n = 1x the buffer per rank.
    return {"latency_s": statistics.median(times) / 2, "bandwidth": nbytes / best, "bytes": nbytes}


def bridge_pair(rank: int, port: int, nbytes: int, transport: str) -> dict:
    """One side of a comm_bridge Endpoint pair, opened as the engine opens it for the cluster's
    bridge `transport`: one-way latency of a 1-element ping-pong and the bandwidth of one large
    message (timed from send to the receiver's acknowledgement)."""
    import torch

    from comm_bridge.channel import Endpoint, transport_options

    torch.set_num_threads(1)
    store = _store(port, rank)
    options = transport_options(transport)
    endpoint = Endpoint(rank, "hetero-check", host="127.0.0.1", default_timeout=60.0, **options)
    try:
        store.set(f"addr{rank}", json.dumps(endpoint.address()))
        endpoint.add_peers([json.loads(store.get(f"addr{1 - rank}"))])
        peer = 1 - rank
        tiny = torch.ones(1)
        big = torch.ones(nbytes // 4)

        def round_trip(payload, tag: int) -> float:
            """Rank 0 sends `payload`, rank 1 answers with `tiny`; seconds on this side."""
            t0 = time.perf_counter()
            if rank == 0:
                endpoint.send(payload, peer, tag)
                endpoint.recv(peer, tag + 1)
            else:
                endpoint.recv(peer, tag)
                endpoint.send(tiny, peer, tag + 1)
            return time.perf_counter() - t0

        times = [round_trip(tiny, 1) for _ in range(PINGS + 3)][3:]
        best = min(round_trip(big, 3) for _ in range(LINK_ROUNDS + 1))
        store.set(f"done{rank}", "1")
        store.get(f"done{peer}")            # keep both ends open until both are finished
    finally:
        endpoint.close()
    return {"latency_s": statistics.median(times) / 2, "bandwidth": nbytes / best, "bytes": nbytes,
            "transport": "shm" if options["shm"] else "tcp"}
