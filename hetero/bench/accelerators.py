"""`hetero bench accelerators`: does the emulated chip's virtual clock, not the host, set its speed?

Runs the same matmul workload on two emulated chips (emu-fast, emu-slow) while
busy-loop processes load the host CPU, and prints the measured wall-time ratio
beside its anchor: the chips' fp32 TFLOP/s ratio from the catalog. It also
times the workload on the plain host (unpaced) under the same load, to show
the host is not what decides. Last, it measures what `accelerators.ops` adds
per call over calling the reference implementation directly.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time

HELP = "emulated-chip fidelity (fast/slow speed ratio under CPU load) and ops dispatch overhead"
TOLERANCE = 0.05

def add_arguments(parser) -> None:
    parser.add_argument("--fast", default="emu-fast", metavar="CHIP", help="fast emulated chip")
    parser.add_argument("--slow", default="emu-slow", metavar="CHIP", help="slow emulated chip")
    parser.add_argument("--size", type=int, default=256, help="matmul dimension (default 256)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="virtual seconds of work on the fast chip per repeat (default 1.0)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats per chip (default 2)")
    parser.add_argument("--load", type=int, default=2,
                        help="busy-loop processes loading the CPU during the measurement (default 2)")
    parser.add_argument("--calls", type=int, default=2000,
                        help="calls per op for the dispatch-overhead measurement (default 2000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    import torch

    chips, source = _chip_specs(args.fast, args.slow)
    flops_per_matmul = 2 * args.size ** 3
    fast_rate = chips[args.fast]["tflops"]["fp32"] * 1e12
    matmuls = max(1, round(args.seconds * fast_rate / flops_per_matmul))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed, modest host: the busy loops compete with one thread
    try:
        with CpuLoad(args.load):
            fidelity = _fidelity(chips, args, matmuls)
        overhead = _dispatch_overhead(args.calls)
    finally:
        torch.set_num_threads(threads)

    anchor = fidelity["anchor_ratio"]
    measured = fidelity["measured_ratio"]
    error = abs(measured - anchor) / anchor
    report = {
        "emulated": True,
        "chip_source": source,
        "workload": {"matmuls": matmuls, "size": args.size, "dtype": "fp32",
                     "gflop_per_chip": matmuls * flops_per_matmul / 1e9, "repeats": args.repeats,
                     "busy_processes": args.load},
        **fidelity,
        "ratio_error": error,
        "within_tolerance": error <= TOLERANCE,
        "tolerance": TOLERANCE,
        "dispatch_overhead": overhead,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
    return 0 if report["within_tolerance"] else 1


def _chip_specs(fast: str, slow: str) -> tuple[dict, str]:
    """Chip dicts from the catalog."""
    from hetero.config.catalog import load_catalog
    from hetero.errors import UserError

    catalog = load_catalog()
    missing = [name for name in (fast, slow) if name not in catalog or not catalog[name].emulated]
    if missing:
        emulated = ", ".join(n for n, c in catalog.items() if c.emulated)
        raise UserError(f"not an emulated catalog chip: {', '.join(missing)} (emulated chips: {emulated})")
    return {name: catalog[name].to_dict() for name in (fast, slow)}, "catalog"


def _fidelity(chips: dict, args, matmuls: int) -> dict:
    import torch

    import accelerators

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    w = torch.randn(args.size, args.size) / args.size ** 0.5  # keeps the chain's values bounded

    def workload(x, w) -> None:
        y = x
        for _ in range(matmuls):
            y = y @ w

    rows = {}
    for name in (args.fast, args.slow):
        accel = accelerators.get_accelerator("emulated", chip=chips[name])
        on_chip = accel.to_device(x), accel.to_device(w)   # device memory, copied in before the clock starts
        walls, busy = [], []
        for _ in range(args.repeats):
            busy_before = accel.clock.busy_seconds
            accel.synchronize()
            start = time.perf_counter()
            with accel.device_scope():
                workload(*on_chip)
            issued = time.perf_counter() - start
            accel.synchronize()
            walls.append(time.perf_counter() - start)
            busy.append(accel.clock.busy_seconds - busy_before)
        rows[name] = {"tflops_fp32": chips[name]["tflops"]["fp32"], "wall_s": statistics.median(walls),
                      "virtual_s": statistics.median(busy), "host_issue_s": issued}
    accelerators.reset_accelerator()

    host = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        workload(x, w)
        host.append(time.perf_counter() - start)

    fast, slow = rows[args.fast], rows[args.slow]
    return {
        "chips": rows,
        "host_unpaced_s": statistics.median(host),
        "anchor_ratio": fast["tflops_fp32"] / slow["tflops_fp32"],
        "measured_ratio": slow["wall_s"] / fast["wall_s"],
    }


def _dispatch_overhead(calls: int) -> dict:
    """Per-call cost of accelerators.ops over the reference it dispatches to (cpu accelerator)."""
    import torch

    import accelerators
    from accelerators.ops import reference

    accelerators.get_accelerator("cpu")
    ops = accelerators.ops
    x = torch.randn(4, 64)
    weight = torch.ones(64)
    q = torch.randn(1, 2, 8, 16)
    cos, sin = torch.randn(8, 16), torch.randn(8, 16)
    param, grad, m, v = (torch.randn(64) for _ in range(4))
    cases = {
        "rms_norm": ((x, weight, 1e-6), {}),
        "rotary": ((q, cos, sin), {}),
        "attention": ((q, q, q, True, None), {}),
        "swiglu": ((x, x), {}),
        "adamw_step": ((param, grad, m, v), {"step": 1, "lr": 1e-3}),
    }
    results = {}
    for name, (call_args, call_kwargs) in cases.items():
        via_ops = _best_per_call(getattr(ops, name), call_args, call_kwargs, calls)
        direct = _best_per_call(getattr(reference, name), call_args, call_kwargs, calls)
        results[name] = {"ops_us": via_ops * 1e6, "reference_us": direct * 1e6,
                         "overhead_us": (via_ops - direct) * 1e6}
    accelerators.reset_accelerator()
    return results


def _best_per_call(function, call_args, call_kwargs, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            function(*call_args, **call_kwargs)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _print_text(report: dict) -> None:
    work = report["workload"]
    print("emulated-chip fidelity (EMULATED chips; specs from the " + report["chip_source"] + ")")
    print(f"  workload: {work['matmuls']} x fp32 matmul {work['size']}^3 "
          f"({work['gflop_per_chip']:.2f} GFLOP) per chip, median of {work['repeats']}, "
          f"{work['busy_processes']} busy-loop process(es) loading the CPU")
    print(f"  {'chip':<10} {'fp32 TFLOP/s':>12} {'virtual s':>10} {'wall s':>8} {'host issue s':>13}")
    for name, row in report["chips"].items():
        print(f"  {name:<10} {row['tflops_fp32']:>12g} {row['virtual_s']:>10.3f} {row['wall_s']:>8.3f} "
              f"{row['host_issue_s']:>13.3f}")
    print(f"  host CPU, unpaced, same load: {report['host_unpaced_s']:.3f} s")
    verdict = "yes" if report["within_tolerance"] else "NO"
    print(f"  slow/fast time ratio: measured {report['measured_ratio']:.3f}   "
          f"anchor (spec fp32 ratio) {report['anchor_ratio']:.3f}   "
          f"error {report['ratio_error'] * 100:.1f}%   within {report['tolerance'] * 100:.0f}%: {verdict}")
    print("ops dispatch overhead (cpu accelerator; accelerators.ops.X vs reference.X, best of 3)")
    print(f"  {'op':<11} {'ops us':>8} {'reference us':>13} {'overhead us':>12}")
    for name, row in report["dispatch_overhead"].items():
        print(f"  {name:<11} {row['ops_us']:>8.2f} {row['reference_us']:>13.2f} {row['overhead_us']:>12.2f}")


class CpuLoad:
    """Busy-loop processes that compete with the measurement for the CPU."""

    def __init__(self, processes: int):
        self.count = processes
        self._processes: list = []

    def __enter__(self) -> "CpuLoad":
        context = multiprocessing.get_context("spawn")
        started = context.Event()
        stop = context.Event()
        self._stop = stop
        for _ in range(self.count):
            process = context.Process(target=_busy_loop, args=(started, stop), daemon=True)
            process.start()
            self._processes.append(process)
        if self.count:
            started.wait(timeout=30)
            time.sleep(0.2)  # let every spinner reach its loop
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def _busy_loop(started, stop) -> None:
    started.set()
    counter = 0
    while not stop.is_set():
        for _ in range(100_000):
            counter += 1
