"""The island agents this launcher runs: one `hetero.launch.island_agent` process per (island, node).

Each agent gets its own session so a terminal's Ctrl-C reaches only the
launcher, which then stops every agent the same way (SIGTERM; the agent stops
its workers, escalating to SIGKILL after its shutdown timeout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from hetero.launch.layout import IslandLayout, NodeWorkers


@dataclass
class AgentProcess:
    island: IslandLayout
    node: NodeWorkers
    proc: subprocess.Popen

    @property
    def label(self) -> str:
        return f"island {self.island.name} on {self.node.host}"


@dataclass(frozen=True)
class LocalStatus:
    state: str            # running | done | failed
    reason: str = ""


class LocalIslands:
    def __init__(self, agents: list[AgentProcess], shutdown_timeout: float):
        self.agents = agents
        self.shutdown_timeout = shutdown_timeout

    @classmethod
    def start(cls, work: list[tuple[IslandLayout, NodeWorkers, dict, dict]], shutdown_timeout: float,
              stdout=None, stderr=None) -> "LocalIslands":
        """Start one agent per (island, node, spec, env)."""
        agents = []
        for island, node, spec, env in work:
            spec = {**spec, "parent_pid": os.getpid()}
            proc = subprocess.Popen([sys.executable, "-m", "hetero.launch.island_agent", json.dumps(spec)],
                                    env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                    start_new_session=True)
            agents.append(AgentProcess(island, node, proc))
        return cls(agents, shutdown_timeout)

    def status(self) -> LocalStatus:
        """Failed as soon as one agent failed; done when all succeeded."""
        running = False
        for agent in self.agents:
            code = agent.proc.poll()
            if code is None:
                running = True
            elif code != 0:
                return LocalStatus("failed", f"{agent.label} failed ({_describe_exit(code)})")
        return LocalStatus("running" if running else "done")

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


def _signal(proc: subprocess.Popen, sig: int) -> None:
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
