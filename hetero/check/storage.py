"""Is the checkpoint directory one shared folder for every node of the cluster?

A multi-node job writes its checkpoints (and run directory) under one path that every node must
see as the same folder: each rank writes its own shard there and the head seals them. `hetero
check` verifies it without any network of its own: the folder is the channel. Every node runs
`hetero check --node HOST` (or one process plays every node that is this machine):

- the head (the cluster's coordinator host) opens a round: DIR/.hetero-storage-check/round.json
  with a fresh nonce, and writes its own probe;
- every other node waits for an open round, then writes probe-<HOST>.json carrying the round's
  nonce and a random payload with its sha256 (a torn or stale file does not count);
- the head waits until it reads a good probe from every node (or `wait_s` passes), writes
  result-<nonce>.json (which nodes it saw) and closes the round; each node reads that result.

A node whose folder is not the head's never sees the round (or the head never sees its probe):
the check fails naming it. The files are a few hundred bytes and stay in the folder; each round
replaces the previous round's result.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
import socket
import time

from hetero.atomic import write_atomic
from hetero.check.items import Item, is_local

FOLDER = ".hetero-storage-check"
ROUND = "round.json"
POLL_S = 0.1
DEFAULT_DIR = "runs"          # where `hetero run` makes run directories (their checkpoints/ inside)
DEFAULT_WAIT_S = 60.0


def participants(cluster) -> list[str]:
    """The head (coordinator host) first, then every host that runs workers, each once."""
    hosts = [cluster.coordinator.host]
    for island in cluster.islands:
        hosts += [node.host for node in island.nodes]
    return list(dict.fromkeys(hosts))


def item(cluster, directory: str, wait_s: float = DEFAULT_WAIT_S) -> Item:
    hosts = participants(cluster)
    return Item("storage", f"storage {directory}", tuple(hosts), {"nodes": len(hosts)},
                {"dir": os.path.abspath(directory), "head": hosts[0], "wait_s": wait_s})


def run(probe: Item, this_node: str | None = None) -> tuple[dict | None, str | None]:
    """(measured, error) of the storage item for the node(s) this process plays: --node's host, else
    every participant that is this machine. The head's side decides; a member's reports the head's result."""
    hosts = list(probe.hosts)
    mine = [this_node] if this_node else [h for h in hosts if is_local(h)]
    if this_node and this_node not in hosts:
        return None, f"--node {this_node} is not a host of the cluster file"
    if not mine:
        return None, "no node of the cluster file is this machine (pass --node HOST)"
    folder = os.path.join(probe.spec["dir"], FOLDER)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        return None, f"cannot make {folder}: {exc.strerror or exc}"
    side = _head if probe.spec["head"] in mine else _member
    try:
        return side(folder, hosts, mine, probe.spec["head"], probe.spec["wait_s"]), None
    except OSError as exc:
        return None, f"{exc.filename or folder}: {exc.strerror or exc}"


def _head(folder: str, hosts: list, mine: list, head: str, wait_s: float) -> dict:
    started = time.monotonic()
    nonce = secrets.token_hex(8)
    for stale in glob.glob(os.path.join(folder, "result-*.json")):
        os.remove(stale)
    _write(folder, ROUND, {"nonce": nonce, "head": head, "open": True})
    for host in mine:
        write_probe(folder, host, nonce)
    seen = []
    while True:
        seen = [h for h in hosts if read_probe(folder, h, nonce)]
        if len(seen) == len(hosts) or time.monotonic() - started > wait_s:
            break
        time.sleep(POLL_S)
    result = {"dir": os.path.dirname(folder), "head": head, "seen": seen,
              "missing": [h for h in hosts if h not in seen], "seconds": time.monotonic() - started}
    _write(folder, f"result-{nonce}.json", result)
    _write(folder, ROUND, {"nonce": nonce, "head": head, "open": False})
    return result


def _member(folder: str, hosts: list, mine: list, head: str, wait_s: float) -> dict:
    """Follow the head's rounds: probe each open one; return the head's result of the round probed."""
    started = time.monotonic()
    probed = None
    while time.monotonic() - started <= wait_s + 5.0:      # the head waits wait_s for the last node
        current = _read(os.path.join(folder, ROUND)) or {}
        if current.get("open") and current.get("nonce") != probed:
            probed = current["nonce"]
            for host in mine:
                write_probe(folder, host, probed)
        result = _read(os.path.join(folder, f"result-{probed}.json")) if probed else None
        if result is not None:
            return dict(result, seconds=time.monotonic() - started)
        time.sleep(POLL_S)
    why = ("never saw the head's open round" if probed is None else "saw the head's round but not its result")
    return {"dir": os.path.dirname(folder), "head": head, "seen": list(mine), "missing": [head],
            "seconds": time.monotonic() - started, "member_view": why}


def write_probe(folder: str, host: str, nonce: str) -> None:
    payload = secrets.token_hex(32)
    _write(folder, f"probe-{host}.json", {"host": host, "nonce": nonce, "payload": payload,
                                          "sha256": hashlib.sha256(payload.encode()).hexdigest(),
                                          "machine": socket.gethostname()})


def read_probe(folder: str, host: str, nonce: str) -> bool:
    """Whether `host`'s probe of this round is there, whole."""
    probe = _read(os.path.join(folder, f"probe-{host}.json"))
    return (isinstance(probe, dict) and probe.get("nonce") == nonce and probe.get("host") == host
            and isinstance(probe.get("payload"), str)
            and hashlib.sha256(probe["payload"].encode()).hexdigest() == probe.get("sha256"))


def _write(folder: str, name: str, data: dict) -> None:
    """Atomically: a reader on another node sees the old file or the new one, never half of it."""
    write_atomic(os.path.join(folder, name), json.dumps(data), fsync=True)


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
