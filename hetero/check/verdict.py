"""ok / slow / failed for one measured item, with the thresholds stated once.

- chips: achieved matmul FLOP/s against the expectation (catalog peak x the
  planner's matmul efficiency; emulated chips are charged exactly their spec,
  so anything well below it means the host cannot keep ahead of their clock;
  the catalog's cpu entry is only an estimate, so cpu gets a loose bound);
- links: bandwidth against the cluster file's figure, and latency against it
  with a floor, since one Python-driven round trip on a busy host costs
  hundreds of microseconds whatever the wire, and less than that is noise
  against a training step;
- storage: every node's probe read back through the checkpoint folder (hetero.check.storage),
  or failed naming the nodes that do not share it.
"""

from __future__ import annotations

CHIP_MIN = {"emulated": 0.9, "cpu": 0.25}      # share of the expectation below which a chip is slow
CHIP_MIN_DEFAULT = 0.8                         # vendor chips
BANDWIDTH_MIN = 0.5
LATENCY_MAX = 4.0
LATENCY_FLOOR_S = 500e-6

OK, SLOW, FAILED, SKIPPED = "ok", "slow", "failed", "not checked"


def judge(item, measured: dict | None, error: str | None = None) -> dict:
    """{verdict, why, measured, expected} for one item."""
    if error:
        return {"verdict": FAILED, "why": error}
    if measured is None:
        return {"verdict": SKIPPED, "why": "on " + " and ".join(sorted(set(item.hosts))) +
                ": run 'hetero check --node HOST' on that node"}
    if item.kind == "storage":
        return _storage(measured)
    if item.kind == "chip":
        share = measured["flops_per_s"] / item.expected["flops_per_s"]
        floor = CHIP_MIN.get(item.spec["accelerator"], CHIP_MIN_DEFAULT)
        why = f"{share:.0%} of expected (slow below {floor:.0%})"
        return {"verdict": OK if share >= floor else SLOW, "why": why, "share": share}
    problems = []
    bw = measured["bandwidth"] / item.expected["bandwidth"]
    if bw < BANDWIDTH_MIN:
        problems.append(f"bandwidth {bw:.0%} of expected (slow below {BANDWIDTH_MIN:.0%})")
    latency = measured["latency_s"]
    limit = max(LATENCY_MAX * item.expected["latency_s"], LATENCY_FLOOR_S)
    if latency > limit:
        problems.append(f"latency {latency * 1e6:.0f} us over {limit * 1e6:.0f} us")
    why = "; ".join(problems) or f"bandwidth {bw:.0%} of expected, latency within {limit * 1e6:.0f} us"
    return {"verdict": SLOW if problems else OK, "why": why, "share": bw}


def _storage(measured: dict) -> dict:
    if not measured["missing"]:
        return {"verdict": OK, "why": f"every node's probe read back through {measured['dir']}"}
    missing = ", ".join(measured["missing"])
    view = f" (this node {measured['member_view']})" if measured.get("member_view") else ""
    return {"verdict": FAILED, "why": f"{measured['dir']} is not one folder shared with {missing}{view}: no probe "
                                      f"of this check came through in {measured['seconds']:.0f} s; a multi-node job "
                                      "needs its checkpoint directory on storage every node mounts at the same path "
                                      "(or that node's `hetero check --node HOST` did not run)"}


def exit_code(results: list[dict]) -> int:
    return 1 if any(r["verdict"] in (SLOW, FAILED) for r in results) else 0
