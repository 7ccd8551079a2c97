"""Run the items on this machine: chips in parallel (one process each), then links one at a
time (they share this host's memory bus and loopback, so running them together would measure
each other). Each probe runs in a worker of a spawned pool and is bounded by a timeout."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time

from hetero.check import probes

PROBE_TIMEOUT_S = 60.0
LINK_BYTES = 16 << 20
BRIDGE_BYTES = 64 << 20


def run(items, progress=None) -> dict:
    """{item name: (measured dict | None, error | None)} for the local items."""
    chips = [i for i in items if i.local and i.kind == "chip"]
    links = [i for i in items if i.local and i.kind != "chip"]
    if not chips and not links:
        return {}
    out = {}
    workers = max(2, len(chips))
    pool = _pool(workers)
    try:
        cores = os.cpu_count() or 1
        host_chips = sum(1 for i in chips if i.spec["accelerator"] in ("cpu", "emulated"))
        pending = []
        for item in chips:
            n = probes.matmul_size(item.expected["flops_per_s"])
            # Host-run chips share this host's cores; emulated ones are paced by their clock anyway.
            threads = max(1, cores // max(1, host_chips)) if item.spec["accelerator"] == "cpu" else 1
            pending.append((item, pool.apply_async(probes.matmul, (
                item.spec["accelerator"], item.spec["chip"], item.spec["device_index"], item.spec["dtype"], n,
                threads))))
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        stuck = False
        for item, job in pending:
            out[item.name] = _result(job, deadline)
            stuck |= _timed_out(out[item.name])
            if progress:
                progress(item, out[item.name])
        for item in links:
            if stuck:                     # a hung probe still holds a worker: start afresh
                pool.terminate()
                pool = _pool(workers)
            out[item.name] = _pair(pool, item)
            stuck = _timed_out(out[item.name])
            if progress:
                progress(item, out[item.name])
    finally:
        pool.terminate()
    return out


def _pool(workers: int):
    return mp.get_context("spawn").Pool(workers)


def _pair(pool, item):
    port = _free_port()
    if item.kind == "bridge":
        jobs = [pool.apply_async(probes.bridge_pair, (rank, port, BRIDGE_BYTES, item.spec["transport"]))
                for rank in (0, 1)]
    else:
        jobs = [pool.apply_async(probes.allreduce_pair, (rank, port, LINK_BYTES, item.spec["accelerator"],
                                                         item.spec["backend"], rank, item.spec.get("chip")))
                for rank in (0, 1)]
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    results = [_result(job, deadline) for job in jobs]
    errors = [error for _, error in results if error]
    if errors:
        return None, errors[0]
    return results[0][0], None       # both ends saw the same exchange; rank 0's timing stands


def _timed_out(result) -> bool:
    return bool(result[1] and result[1].startswith("no answer"))


def _result(job, deadline: float):
    try:
        return job.get(max(0.1, deadline - time.monotonic())), None
    except mp.TimeoutError:
        return None, f"no answer in {PROBE_TIMEOUT_S:.0f} s"
    except Exception as exc:   # the probe's own failure: device missing, rendezvous refused, ...
        first = (str(exc).splitlines() or [""])[0][:160]
        return None, f"{type(exc).__name__}: {first}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
