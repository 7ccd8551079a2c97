"""How long the real check of a cluster would take, without contacting any host.

The model (every node runs its own `hetero check --node HOST`, all at once):
  start-up   per node, in parallel: start the process and the vendor runtime
             (each accelerator's startup_seconds; chips of a node start together);
  chips      per node, in parallel, the node's chips in parallel: one warm-up and
             MATMUL_ROUNDS x MATMUL_REPS matmuls at the expected speed;
  intra-node per node, in parallel: chip pairs in two rounds (0-1, 2-3, ...; then
             1-2, 3-4, ...), each a process-group set-up plus PINGS small
             all-reduces and LINK_ROUNDS + 1 large ones at the expected figures;
  inter-node per island, in parallel: node pairs in two rounds, as above;
  bridge     island pairs in round-robin rounds (K-1 for K even islands, else K),
             each round's pairs in parallel, each pair's node pairs in parallel;
  gather     the head collects one small result per node (GATHER_PER_NODE_S each).
Phases run one after another; the total is their sum.
"""

from __future__ import annotations

from accelerators.registry import accelerator_class
from hetero.check import probes

GROUP_SETUP_S = 1.0           # rendezvous and process-group creation for one link test
GATHER_PER_NODE_S = 0.01
GOAL_S = 120.0


def link_s(expected: dict, nbytes: int) -> float:
    pings = (probes.PINGS + 3) * 2 * expected["latency_s"]
    payload = (probes.LINK_ROUNDS + 1) * (nbytes / expected["bandwidth"] + 2 * expected["latency_s"])
    return GROUP_SETUP_S + pings + payload


def estimate(cluster, items, link_bytes: int, bridge_bytes: int) -> dict:
    """{total_s, phases: {name: s}, model, goal_s, within_goal}."""
    startup = max(accelerator_class(i.accelerator).startup_seconds for i in cluster.islands)
    chip_s = 0.0
    for item in (i for i in items if i.kind == "chip"):
        flops = item.expected["flops_per_s"]
        n = probes.matmul_size(flops)
        chip_s = max(chip_s, (1 + probes.MATMUL_ROUNDS * probes.MATMUL_REPS) * 2.0 * n ** 3 / flops)
    intra = max((2 * link_s(i.expected, link_bytes) for i in items if i.kind == "intra-node"), default=0.0)
    inter = max((2 * link_s(i.expected, link_bytes) for i in items if i.kind == "inter-node"), default=0.0)
    bridges = [i for i in items if i.kind == "bridge"]
    k = len(cluster.islands)
    rounds = 0 if k < 2 else (k - 1 if k % 2 == 0 else k)
    bridge = rounds * max((link_s(i.expected, bridge_bytes) for i in bridges), default=0.0)
    nodes = sum(len(i.nodes) for i in cluster.islands)
    phases = {"start-up": startup, "chips": chip_s, "intra-node links": intra, "inter-node links": inter,
              "bridge links": bridge, "gather": GATHER_PER_NODE_S * nodes}
    total = sum(phases.values())
    return {"total_s": total, "phases": phases, "goal_s": GOAL_S, "within_goal": total <= GOAL_S,
            "nodes": nodes, "chips": cluster.total_chips, "islands": k, "bridge_rounds": rounds,
            "model": "nodes in parallel; chips of a node in parallel; pairs in two rounds; "
                     "bridge island pairs in round-robin rounds (see hetero/check/simulate.py)"}
