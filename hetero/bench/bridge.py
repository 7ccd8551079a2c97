"""`hetero bench bridge`: the cross-island bridge against what a user would pick instead.

Every transport moves the same tensor sizes between two processes on this host
(memcpy stays in one process: it is the ceiling for the shared-memory path).
One iteration sends the tensor and waits for the reply: for small tensors the
reply echoes the payload (a true round trip), for large ones it is a one-byte
ack. gbps = bytes / p50 iteration time, in GB/s. The anchors (memcpy, raw TCP,
gloo, gRPC) are measured in the same run, so the goals compare like with like;
the transports take turns over several rounds and each p50 pools all rounds, so
a burst of load from elsewhere on a shared host does not land on one transport.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

HELP = "bridge throughput/latency vs memcpy, raw TCP, gloo and gRPC (4 KiB, 4 MiB, 64 MiB)"

SIZES = (4 << 10, 4 << 20, 64 << 20)
TRANSPORTS = ("memcpy", "raw_tcp", "gloo", "grpc_unary", "bridge_tcp", "bridge_shm")
ECHO_LIMIT = 64 << 10     # at or below: the reply echoes the payload
HOST = "127.0.0.1"
BENCH_TOKEN = "hetero-bench-bridge"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (for smoke tests)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times each transport is measured, in turns (default 3, --quick 1)")
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help=f"comma-separated subset of {','.join(TRANSPORTS)}")


def _iterations(nbytes: int, quick: bool) -> tuple[int, int]:
    """(warm-up, measured) iterations for one size."""
    if nbytes <= ECHO_LIMIT:
        # Small round trips take a thousand or so to settle (sockets, caches, the
        # interpreter's specialisation) and cost ~0.1 ms each: warm up long, sample many.
        return (20, 100) if quick else (1000, 2000)
    if nbytes <= 8 << 20:
        return (2, 8) if quick else (5, 30)
    return (1, 3) if quick else (3, 20)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- transports
# Each `_serve_X(conn, sizes, quick)` runs in a spawned child; each `_drive_X`
# in the parent returns {nbytes: [seconds per iteration]}.

def _drive_memcpy(sizes, quick):
    import numpy as np
    out = {}
    for nbytes in sizes:
        src = np.ones(nbytes, dtype=np.uint8)
        dst = np.empty_like(src)
        warm, iters = _iterations(nbytes, quick)
        times = []
        for i in range(warm + iters):
            start = time.perf_counter()
            np.copyto(dst, src)  # one thread, like each side of the bridge
            if i >= warm:
                times.append(time.perf_counter() - start)
        out[nbytes] = times
    return out


def _recv_exact(sock, view) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


# The raw TCP anchor is what a careful user writes with plain sockets: sendall of
# a memoryview (no copy in Python), recv_into a preallocated buffer, TCP_NODELAY.
# Socket buffers stay kernel-autotuned: fixing SO_SNDBUF/SO_RCVBUF (1 or 4 MiB)
# measured slower on loopback here, as it turns autotuning off.
def _serve_raw_tcp(conn, sizes, quick):
    import numpy as np
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(1)
    conn.send(listener.getsockname()[1])
    sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for nbytes in sizes:
        buf = np.empty(nbytes, dtype=np.uint8)
        view = buf.data   # the array's own memoryview (no copy)
        warm, iters = _iterations(nbytes, quick)
        for _ in range(warm + iters):
            _recv_exact(sock, view)
            sock.sendall(view if nbytes <= ECHO_LIMIT else b"k")
    sock.close()
    listener.close()


def _drive_raw_tcp(conn, sizes, quick):
    import numpy as np
    sock = socket.create_connection((HOST, conn.recv()))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = {}
    for nbytes in sizes:
        data = np.ones(nbytes, dtype=np.uint8).data
        reply = memoryview(bytearray(nbytes if nbytes <= ECHO_LIMIT else 1))
        warm, iters = _iterations(nbytes, quick)
        times = []
        for i in range(warm + iters):
            start = time.perf_counter()
            sock.sendall(data)
            _recv_exact(sock, reply)
            if i >= warm:
                times.append(time.perf_counter() - start)
        out[nbytes] = times
    sock.close()
    return out


def _gloo_init(rank: int, port: int):
    import torch.distributed as dist

    from hetero.launch.store import loopback_store

    dist.init_process_group("gloo", store=loopback_store(port, rank, 2), rank=rank, world_size=2)
    return dist


def _serve_gloo(conn, sizes, quick):
    import torch
    dist = _gloo_init(1, conn.recv())
    try:
        for nbytes in sizes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            ack = torch.ones(1, dtype=torch.uint8)
            warm, iters = _iterations(nbytes, quick)
            for _ in range(warm + iters):
                dist.recv(buf, 0)
                dist.send(buf if nbytes <= ECHO_LIMIT else ack, 0)
    finally:
        dist.destroy_process_group()


def _drive_gloo(conn, sizes, quick):
    import torch
    port = _free_port()
    conn.send(port)
    dist = _gloo_init(0, port)
    out = {}
    try:
        for nbytes in sizes:
            data = torch.ones(nbytes, dtype=torch.uint8)
            reply = torch.empty(nbytes if nbytes <= ECHO_LIMIT else 1, dtype=torch.uint8)
            warm, iters = _iterations(nbytes, quick)
            times = []
            for i in range(warm + iters):
                start = time.perf_counter()
                dist.send(data, 1)
                dist.recv(reply, 1)
                if i >= warm:
                    times.append(time.perf_counter() - start)
            out[nbytes] = times
    finally:
        dist.destroy_process_group()
    return out


_GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def _serve_grpc_unary(conn, sizes, quick):
    from concurrent import futures

    import grpc

    def echo(request, context):
        return request if len(request) <= ECHO_LIMIT else b"k"

    handler = grpc.method_handlers_generic_handler("bench.Bridge", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=_GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    conn.send(port)
    conn.recv()  # the driver says when it is done
    server.stop(0)


def _drive_grpc_unary(conn, sizes, quick):
    import grpc
    import numpy as np
    channel = grpc.insecure_channel(f"{HOST}:{conn.recv()}", options=_GRPC_OPTIONS)
    call = channel.unary_unary("/bench.Bridge/Echo")
    out = {}
    for nbytes in sizes:
        array = np.ones(nbytes, dtype=np.uint8)
        warm, iters = _iterations(nbytes, quick)
        times = []
        for i in range(warm + iters):
            start = time.perf_counter()
            call(array.tobytes())  # gRPC messages are bytes: the copy is part of its cost
            if i >= warm:
                times.append(time.perf_counter() - start)
        out[nbytes] = times
    channel.close()
    conn.send("done")
    return out


def _bridge_endpoint(rank: int, shm: bool):
    from comm_bridge.channel import Endpoint
    return Endpoint(rank, BENCH_TOKEN, host=HOST, shm=shm)


def _serve_bridge(conn, sizes, quick, shm):
    import torch
    endpoint = _bridge_endpoint(1, shm)
    conn.send(endpoint.address())
    endpoint.add_peers([conn.recv()])
    try:
        ack = torch.ones(1, dtype=torch.uint8)
        for nbytes in sizes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            warm, iters = _iterations(nbytes, quick)
            for _ in range(warm + iters):
                endpoint.irecv(0, 0, out=buf).wait(60)
                endpoint.isend(buf if nbytes <= ECHO_LIMIT else ack, 0, 1)
        conn.recv()
    finally:
        endpoint.close()


def _drive_bridge(conn, sizes, quick, shm):
    import torch
    endpoint = _bridge_endpoint(0, shm)
    endpoint.add_peers([conn.recv()])
    conn.send(endpoint.address())
    out = {}
    try:
        for nbytes in sizes:
            data = torch.ones(nbytes, dtype=torch.uint8)
            reply = torch.empty(nbytes if nbytes <= ECHO_LIMIT else 1, dtype=torch.uint8)
            warm, iters = _iterations(nbytes, quick)
            times = []
            for i in range(warm + iters):
                start = time.perf_counter()
                pending = endpoint.irecv(1, 1, out=reply)
                endpoint.isend(data, 1, 0)
                pending.wait(60)
                if i >= warm:
                    times.append(time.perf_counter() - start)
            out[nbytes] = times
        conn.send("done")
    finally:
        endpoint.close()
    return out


def _serve_bridge_tcp(conn, sizes, quick):
    _serve_bridge(conn, sizes, quick, shm=False)


def _serve_bridge_shm(conn, sizes, quick):
    _serve_bridge(conn, sizes, quick, shm=True)


def _drive_bridge_tcp(conn, sizes, quick):
    return _drive_bridge(conn, sizes, quick, shm=False)


def _drive_bridge_shm(conn, sizes, quick):
    return _drive_bridge(conn, sizes, quick, shm=True)


def _child(name, conn, sizes, quick):
    # One thread of intra-op parallelism each, so the two processes share 2 cores fairly.
    import torch
    torch.set_num_threads(1)
    globals()[f"_serve_{name}"](conn, sizes, quick)


def measure(name: str, sizes=SIZES, quick: bool = False, timeout: float = 120.0) -> dict:
    """{nbytes: [seconds per iteration]} for one transport."""
    if name == "memcpy":
        return _drive_memcpy(sizes, quick)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(name, child, sizes, quick), daemon=True)
    proc.start()
    try:
        return globals()[f"_drive_{name}"](parent, sizes, quick)
    finally:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()


# ------------------------------------------------------------------- report
def summarize(name: str, times: dict) -> list[dict]:
    rows = []
    for nbytes, samples in sorted(times.items()):
        p50 = statistics.median(samples)
        rows.append({"transport": name, "bytes": nbytes, "gbps": round(nbytes / p50 / 1e9, 4),
                     "p50_us": round(p50 * 1e6, 1)})
    return rows


def goals(results: list[dict]) -> list[dict]:
    def at(transport, nbytes, field):
        for row in results:
            if row["transport"] == transport and row["bytes"] == nbytes:
                return row[field]
        return None

    big, small = 64 << 20, 4 << 10
    checks = [
        ("bridge_tcp >= 1.0x gloo at 64 MiB", at("bridge_tcp", big, "gbps"), at("gloo", big, "gbps"), 1.0),
        ("bridge_tcp >= 0.9x raw_tcp at 64 MiB", at("bridge_tcp", big, "gbps"), at("raw_tcp", big, "gbps"), 0.9),
        ("bridge_shm >= 0.5x memcpy at 64 MiB", at("bridge_shm", big, "gbps"), at("memcpy", big, "gbps"), 0.5),
    ]
    out = []
    for text, value, anchor, factor in checks:
        ok = None if value is None or anchor is None else value >= factor * anchor
        out.append({"goal": text, "measured_gbps": value, "anchor_gbps": anchor,
                    "ratio": None if ok is None else round(value / anchor, 3),
                    "verdict": "N/A" if ok is None else ("PASS" if ok else "MISS")})
    for transport in ("bridge_tcp", "bridge_shm"):
        p50 = at(transport, small, "p50_us")
        out.append({"goal": f"{transport} 4 KiB round-trip p50 <= 100 us", "measured_us": p50, "limit_us": 100,
                    "verdict": "N/A" if p50 is None else ("PASS" if p50 <= 100 else "MISS")})
    return out


def _size_name(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def run(args) -> int:
    names = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSPORTS]
    if unknown:
        from hetero.errors import UserError
        raise UserError(f"--transports: unknown transport(s) {', '.join(unknown)}; known: {', '.join(TRANSPORTS)}")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        from hetero.errors import UserError
        raise UserError(f"--rounds: must be at least 1, got {rounds}")
    samples: dict[str, dict[int, list]] = {name: {} for name in names}
    failures = {}
    started = time.perf_counter()
    for round_index in range(rounds):
        for name in names:
            if name in failures:
                continue
            if not args.json:
                print(f"measuring {name} (round {round_index + 1}/{rounds}) ...", file=sys.stderr, flush=True)
            try:
                for nbytes, times in measure(name, quick=args.quick).items():
                    samples[name].setdefault(nbytes, []).extend(times)
            except Exception as exc:  # one broken anchor must not hide the others
                failures[name] = f"{type(exc).__name__}: {exc}"
    results = []
    for name in names:
        if name not in failures:
            results += summarize(name, samples[name])
    verdicts = goals(results)
    report = {"results": results, "goals": verdicts, "errors": failures,
              "seconds": round(time.perf_counter() - started, 1), "rounds": rounds,
              "host": {"cpus": os.cpu_count()}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(results, verdicts, failures, report["seconds"])
    return 1 if failures else 0


def _print_table(results, verdicts, failures, seconds) -> None:
    print(f"{'transport':<12} {'size':>7} {'GB/s':>9} {'p50 us':>10}")
    for row in results:
        print(f"{row['transport']:<12} {_size_name(row['bytes']):>7} {row['gbps']:>9.3f} {row['p50_us']:>10.1f}")
    print("\ngoals (anchors measured in this run):")
    for goal in verdicts:
        if "ratio" in goal:
            detail = (f"{goal['measured_gbps']} GB/s vs {goal['anchor_gbps']} GB/s, ratio {goal['ratio']}"
                      if goal["ratio"] is not None else "not measured")
        else:
            detail = f"{goal['measured_us']} us" if goal["measured_us"] is not None else "not measured"
        print(f"  {goal['verdict']:<4} {goal['goal']}: {detail}")
    for name, error in failures.items():
        print(f"  ERROR {name}: {error}")
    print(f"\n({seconds:.0f} s; small sizes: echo round trip, large: send + 1-byte ack)")
