"""The environment each island's workers start with (on top of the launcher's own).

torch elastic adds torchrun's variables per worker (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, GROUP_RANK, ...), all
island-local; the worker bootstrap adds HETERO_GLOBAL_RANK. This module adds
the rest, the same for every worker of one island on one node.
"""

from __future__ import annotations

import json

from hetero.errors import UserError
from hetero.launch.layout import FleetLayout, IslandLayout, NodeWorkers

# Internal: island-local rank -> global rank, read by hetero.launch.bootstrap.
RANK_TABLE_ENV = "HETERO_RANK_TABLE"
# Variables a stale parent launch (e.g. a launcher started from a worker) must not leak.
_OWNED = ("HETERO_PLAN", "HETERO_EMULATED_CHIP", "HETERO_GLOBAL_RANK",
          "HETERO_EMULATED_VISIBLE_DEVICES")   # emulated chips have no host list to narrow


def island_env(layout: FleetLayout, island: IslandLayout, node: NodeWorkers, *, attempt: int,
               token: str, run_dir: str, plan_path: str | None, cluster_path: str | None,
               base: dict) -> dict:
    """The full environment of one island agent (its workers inherit it)."""
    from accelerators.registry import accelerator_class

    env = {k: v for k, v in base.items() if k not in _OWNED}
    env.update({
        "HETERO_ACCELERATOR": island.accelerator,   # accelerators.get_accelerator() picks it
        "HETERO_ISLAND": island.name,
        "HETERO_ISLAND_INDEX": str(island.index),
        "HETERO_CHIP": island.chip,
        "HETERO_BACKEND": island.backend,
        "HETERO_WORLD_SIZE": str(layout.world_size),
        "HETERO_NODE": node.host,
        "HETERO_COORDINATOR": layout.coordinator_address,
        "HETERO_JOB_TOKEN": token,
        "HETERO_RUN_DIR": run_dir,
        "HETERO_RESTART_COUNT": str(attempt),
        RANK_TABLE_ENV: ",".join(str(r) for r in island.rank_table),
    })
    if plan_path:
        env["HETERO_PLAN"] = plan_path
    if cluster_path:
        env["HETERO_CLUSTER"] = cluster_path
    chip = layout.cluster.chip(island.chip)
    if chip.emulated or island.accelerator == "emulated":
        env["HETERO_EMULATED_CHIP"] = json.dumps(chip.to_dict())
    visible = accelerator_class(island.accelerator).visible_devices_env
    if visible:
        env[visible] = ",".join(_device_ids(visible, base.get(visible), node.devices, island.name))
    # Prefixed log lines need whole lines as they happen, not a block at exit.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _device_ids(var: str, given: str | None, devices: tuple, island: str) -> list[str]:
    """The island's devices on this node, as ids of `var`; a list the user already set in
    `var` restricts the host first (device i is then the i-th id in it)."""
    if given is None or not given.strip():
        return [str(d) for d in devices]
    ids = [part.strip() for part in given.split(",") if part.strip()]
    if max(devices) >= len(ids):
        raise UserError(f"{var}={given} leaves {len(ids)} device(s) on this host, but island {island} "
                        f"uses device {max(devices)} here (devices {', '.join(map(str, devices))})")
    return [ids[d] for d in devices]
