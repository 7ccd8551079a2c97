"""The island agents this launcher runs: one `hetero.launch.island_agent` process per (island, node).

Each agent gets its own session so a terminal's Ctrl-C reaches only the
launcher, which then stops every agent the same way (SIGTERM; the agent stops
its workers, escalating to SIGKILL after its shutdown timeout).

An agent's exit status: 0 done, 1 failed, FATAL_EXIT_CODE (hetero.errors) when a
worker stopped on a failure every restart would repeat, 128 + signal when stopped.
Which rank failed, and how, the agent records in its outcome file
(hetero.launch.logs.agent_outcome_path); a fatal worker leaves its own line
(hetero.launch.logs.fatal_path). From both, LocalIslands names the failure that
tells the most: the fatal line, else the first worker that exited on its own, not a
peer that stopped itself after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Protocol

# Imported here, not when needed: the agent calls remove_rings from its parent-watch thread
# too, and an import racing the main thread's can see a half-initialised module.
from comm_bridge.shm import job_hex_of, remove_job_rings
from hetero.atomic import write_atomic
from hetero.errors import FATAL_EXIT_CODE, PEER_STOPPED_EXIT_CODE
from hetero.launch.layout import IslandLayout, NodeWorkers
from hetero.launch.logs import agent_outcome_path, fatal_path


# How telling a failure is about the job's trouble, most telling first: the line of a
# failure every restart would repeat; a worker that exited on its own; an agent's own
# error (rendezvous timeout, ...); a worker that stopped because a peer failed or was
# killed by a signal; an agent stopped by a signal.
FATAL, CRASHED, AGENT_ERROR, FOLLOWED, STOPPED = range(5)
SETTLE_S = 3.0   # after a failure, how long agents get to stop on their own and say why


class AgentHandle(Protocol):
    """What the launcher needs of an island agent: subprocess.Popen's, or hetero.launch.ray_actors.AgentProc's
    for an agent in a Ray actor."""

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


@dataclass
class AgentProcess:
    island: IslandLayout
    node: NodeWorkers
    proc: AgentHandle
    log_dir: str
    exited_at: float | None = None   # time.time() when this launcher first saw it exit

    @property
    def label(self) -> str:
        return f"island {self.island.name} on {self.node.host}"


@dataclass(frozen=True)
class LocalStatus:
    state: str              # running | done | failed
    reason: str = ""
    fatal: bool = False     # failed in a way every restart would repeat: no restart
    priority: int = STOPPED  # failed: how telling the reason is (FATAL .. STOPPED)


@dataclass(frozen=True)
class Failure:
    """One failed worker (or agent), ranked by how telling it is, then by time."""

    priority: int
    time: float
    reason: str


class LocalIslands:
    def __init__(self, agents: list[AgentProcess], shutdown_timeout: float, run_dir: str | None = None):
        self.agents = agents
        self.shutdown_timeout = shutdown_timeout
        self.run_dir = run_dir

    @classmethod
    def start(cls, work: list[tuple[IslandLayout, NodeWorkers, dict, dict]], shutdown_timeout: float,
              stdout=None, stderr=None, run_dir: str | None = None) -> "LocalIslands":
        """Start one agent per (island, node, spec, env). `run_dir`: where workers leave the
        line of a failure every restart would repeat (<run_dir>/fatal/); stale ones are removed."""
        agents = []
        for island, node, spec, env in work:
            if run_dir:
                for rank in node.global_ranks:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(fatal_path(run_dir, rank))
            spec = {**spec, "parent_pid": os.getpid()}
            proc = subprocess.Popen([sys.executable, "-m", "hetero.launch.island_agent", json.dumps(spec)],
                                    env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    start_new_session=True)
            agents.append(AgentProcess(island, node, proc, spec["log_dir"]))
        return cls(agents, shutdown_timeout, run_dir)

    def status(self) -> LocalStatus:
        """Failed as soon as one agent failed (naming the most telling failure seen so far,
        see first_failure); done when all succeeded."""
        running = failed = False
        for agent in self.agents:
            code = agent.proc.poll()
            if code is not None and agent.exited_at is None:
                agent.exited_at = time.time()
            running |= code is None
            failed |= code not in (None, 0)
        if failed:
            return self.first_failure()
        return LocalStatus("running" if running else "done")

    def settle(self, grace: float = SETTLE_S) -> None:
        """Give agents whose workers failed up to `grace` seconds to stop on their own (and
        record why) before anyone is stopped: the first failure is then the one named."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(a.proc.poll() is None for a in self.agents):
            if self.first_failure().priority <= CRASHED:
                return
            time.sleep(0.05)

    def first_failure(self) -> LocalStatus:
        """The failed status naming the most telling failure: a fatal line first, then a worker
        that exited on its own (the earliest), then the rest (a peer that stopped itself, a signal)."""
        failures = [f for agent in self.agents for f in self._failures(agent)]
        if not failures:
            return LocalStatus("failed", "an island agent failed", priority=STOPPED)
        first = min(failures, key=lambda f: (f.priority, f.time))
        return LocalStatus("failed", first.reason, fatal=first.priority == FATAL, priority=first.priority)

    def _failures(self, agent: AgentProcess) -> list[Failure]:
        code = agent.proc.poll()
        if code in (None, 0):
            return []
        seen = agent.exited_at or time.time()
        failures = [f for rank in agent.node.global_ranks if (f := self._fatal_line(agent, rank, seen)) is not None]
        for worker in _recorded_failures(agent):
            rank, exitcode = worker["rank"], worker["exitcode"]
            log = os.path.join(agent.log_dir, f"{agent.island.name}.{worker['island_rank']}")
            if exitcode == FATAL_EXIT_CODE:
                priority, what = FATAL, "a failure every restart would repeat"
            elif exitcode > 0 and exitcode != PEER_STOPPED_EXIT_CODE:
                priority, what = CRASHED, ""
            else:
                priority, what = FOLLOWED, "stopped because a peer failed" if exitcode > 0 else ""
            detail = f"{what}; " if what else ""
            failures.append(Failure(priority, float(worker["time"]), f"rank {rank} on {agent.node.host} exited with "
                                    f"{exitcode} ({detail}island {agent.island.name}, log: {log})"))
        if not failures:
            if code == FATAL_EXIT_CODE:
                priority = FATAL
            elif 0 < code < 128:
                priority = AGENT_ERROR
            else:
                priority = STOPPED
            failures.append(Failure(priority, seen, f"{agent.label} failed ({_describe_exit(code)})"))
        return failures

    def _fatal_line(self, agent: AgentProcess, rank: int, seen: float) -> Failure | None:
        if not self.run_dir:
            return None
        path = fatal_path(self.run_dir, rank)
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                line = handle.readline().strip()
            when = os.path.getmtime(path)
        except OSError:
            return None
        line = line[len("hetero: "):] if line.startswith("hetero: ") else line
        return Failure(FATAL, min(when, seen), line or f"rank {rank} on {agent.node.host}: failed (see {path})")

    def stop(self) -> None:
        """SIGTERM every live agent, wait for its workers to stop, SIGKILL what is left."""
        for agent in self.agents:
            if agent.proc.poll() is None:
                _signal(agent.proc, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout + 5.0
        for agent in self.agents:
            try:
                agent.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Workers carry PDEATHSIG, so they get SIGTERM when their agent dies.
                _signal(agent.proc, signal.SIGKILL)
                agent.proc.wait()


def remove_rings(token: str) -> int:
    """Unlink the job's shared-memory bridge rings left in /dev/shm on this host (a job
    stopped before its receivers mapped them); returns how many. Jobs are told apart by
    their token, so another job's rings are never touched."""
    try:
        return remove_job_rings(job_hex_of(token))
    except OSError:
        return 0


def write_outcome(path: str, failures: list[dict]) -> None:
    """The agent's side: record its failed workers for the launcher (best effort: a full
    disk leaves the launcher the agent's exit status alone)."""
    try:
        write_atomic(path, json.dumps({"failures": failures}))
    except OSError:
        pass


def _recorded_failures(agent: AgentProcess) -> list[dict]:
    path = agent_outcome_path(agent.log_dir, agent.island.name, agent.node.group_rank)
    try:
        with open(path, encoding="utf-8") as handle:
            failures = json.load(handle)["failures"]
        return [f for f in failures if isinstance(f.get("rank"), int) and isinstance(f.get("exitcode"), int)
                and isinstance(f.get("island_rank"), int) and isinstance(f.get("time"), (int, float))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _signal(proc: AgentHandle, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        return f"stopped by {signal.Signals(code - 128).name}"
    return f"exit code {code}"
