"""What the launchers of one job say to each other, through the head's coordinator (comm_bridge's
key-value store): the keys, the head's verdict on an attempt, and the error that ends a launcher.

    hetero.launch/state                    head: {"attempt", "state": running|waiting|done|failed, "restart",
                                           "reason", "fatal", "regrow"} (Verdict)
    hetero.launch/<attempt>/node/<host>    each other node: {"state": pending|running|done|failed, "reason",
                                           "fatal", "priority", "beat"}
    hetero.launch/<attempt>/ack/<host>     each other node, once it has read the verdict and stopped
    hetero.launch/<attempt>/here/<host>    each other node, while an elastic head calls the nodes in
    hetero.launch/<attempt>/plan           head: {"plan": the plan text the attempt runs under, or null}
    hetero.launch/<attempt>/hang           head: {"rank", "host", "pid", "stacks"}: the node on that host
                                           dumps that worker's stacks and kills it
    hetero.launch/job                      head (hetero run --node): the job member hosts run (hetero.launch.join)
    hetero.progress/<attempt>/<rank>       each worker: its progress stamps (hetero.launch.progress_report)

The head's side is hetero.launch.control, a member's hetero.launch.member.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

STATE_KEY = "hetero.launch/state"
BEAT_S = 1.0   # a non-head node rewrites its status at least this often
# The reason comm_bridge's coordinator records when a worker calls Leave (a clean exit).
LEFT_REASON = "left the job"
# How that reason begins when a worker stopped heartbeating.
MISSED_HEARTBEATS = "no heartbeat"


def node_key(attempt: int, host: str) -> str:
    return f"hetero.launch/{attempt}/node/{host}"


def ack_key(attempt: int, host: str) -> str:
    return f"hetero.launch/{attempt}/ack/{host}"


def hang_key(attempt: int) -> str:
    return f"hetero.launch/{attempt}/hang"


def here_key(attempt: int, host: str) -> str:
    return f"hetero.launch/{attempt}/here/{host}"


def plan_key(attempt: int) -> str:
    return f"hetero.launch/{attempt}/plan"


JOB_KEY = "hetero.launch/job"   # head (hetero run --node): what member hosts need to run the job


class LaunchAbort(Exception):
    """The job cannot go on (coordinator lost, token refused); the message says why."""


@dataclass(frozen=True)
class Verdict:
    attempt: int
    state: str              # running | done | failed
    reason: str = ""
    restart: bool = False   # failed, and the whole job starts again
    fatal: bool = False     # failed in a way every restart would repeat (never restarts)
    regrow: bool = False    # stopped to take a node back (elastic): no restart is spent on it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Verdict":
        data = json.loads(text)
        return cls(int(data["attempt"]), str(data["state"]), str(data.get("reason", "")),
                   bool(data.get("restart", False)), bool(data.get("fatal", False)), bool(data.get("regrow", False)))
