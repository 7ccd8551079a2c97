"""`hetero check`: preflight of a cluster before a job (like PAI's health check).

items (what to measure and expect) -> local (probes on this machine, in processes)
or simulate (how long the real check would take) -> verdict (ok / slow / failed).
"""

from __future__ import annotations

import time

from hetero.check import items as items_mod
from hetero.check import local, simulate, storage, verdict


def check(cluster, this_node: str | None = None, simulate_only: bool = False, progress=None,
          storage_dir: str | None = None, storage_wait_s: float = storage.DEFAULT_WAIT_S,
          storage_only: bool = False) -> dict:
    """Check a loaded ClusterConfig; returns the JSON-ready result (see hetero/commands/check.py).

    The shared-storage item (hetero.check.storage) is checked when the cluster has more than one
    host (then `storage_dir` defaults to runs/) or `storage_dir` is given; it runs after the probes,
    so that nodes whose probes take longer still meet the head's round."""
    items = [] if storage_only else items_mod.build(cluster, this_node)
    if storage_dir or storage_only or len(storage.participants(cluster)) > 1:
        items.append(storage.item(cluster, storage_dir or storage.DEFAULT_DIR, storage_wait_s))
    hosts = sorted({h for i in cluster.islands for h in (n.host for n in i.nodes)})
    documentation = [h for h in hosts if items_mod.is_documentation(h)]
    estimate = simulate.estimate(cluster, items, local.LINK_BYTES, local.BRIDGE_BYTES)
    result = {"cluster": cluster.name, "nodes": estimate["nodes"], "chips": cluster.total_chips,
              "simulated": bool(simulate_only or documentation), "estimate": estimate, "items": []}
    if result["simulated"]:
        result["why_simulated"] = ("--simulate" if simulate_only else
                                   f"hosts are documentation addresses (RFC 5737: {documentation[0]} ...); "
                                   "nothing was contacted")
        result["exit_code"] = 0
        return result
    started = time.monotonic()
    measured = local.run([i for i in items if i.kind != "storage"], progress)
    for item in (i for i in items if i.kind == "storage"):
        measured[item.name] = storage.run(item, this_node)
        if progress:
            progress(item, measured[item.name])
    result["elapsed_s"] = time.monotonic() - started
    for item in items:
        got, error = measured.get(item.name, (None, None))
        judged = verdict.judge(item, got, error)
        result["items"].append({"kind": item.kind, "name": item.name, "hosts": list(item.hosts),
                                "expected": item.expected, "measured": got, **judged,
                                **({"emulated": bool(item.spec["chip"].get("emulated"))} if item.kind == "chip" else {})})
    result["counts"] = {v: sum(1 for r in result["items"] if r["verdict"] == v)
                        for v in (verdict.OK, verdict.SLOW, verdict.FAILED, verdict.SKIPPED)}
    result["exit_code"] = verdict.exit_code(result["items"])
    return result
