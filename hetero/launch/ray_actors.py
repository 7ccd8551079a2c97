"""The Ray actors of a job (they run on the Ray nodes) and the driver's handle on each.

`ChipHolder` holds one chip's bundle and tells which device Ray gave it (for
accelerators Ray assigns ids to: GPU, NPU). `AgentHost` holds a node share's first
bundle and runs that island's torch elastic agent on its node, exactly as the local
launcher does (`python -m hetero.launch.island_agent SPEC`), with the environment the
driver computed plus the visible-devices list of Ray's assignment. The agent's output
(worker lines already prefixed `[island:rank]`) is kept in the actor and drained by
the driver, which writes it where the local launcher's goes; per-rank logs go to the
run directory on the node, as today.

`AgentProc` is the driver's view of one AgentHost with subprocess.Popen's poll /
send_signal / wait, so hetero.launch.agents.LocalIslands judges Ray agents like local
ones. An actor that dies (killed, its node lost) reads as an agent killed by SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque

import ray

CALL_TIMEOUT_S = 30.0   # a live actor answers a poll long before this
LOST_EXIT = -signal.SIGKILL


class _Chip:
    def accelerator_ids(self, resource: str) -> list[str]:
        return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get(resource, [])]


class _Agent(_Chip):
    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lines: deque = deque()

    def start(self, spec: dict, hetero_env: dict, visible: tuple[str, str] | None) -> int:
        """Start the island agent; returns its pid. `visible`: (variable, ids) from Ray's assignment."""
        env = dict(os.environ)
        env.update(hetero_env)
        if visible:
            env[visible[0]] = visible[1]
        spec = {**spec, "parent_pid": os.getpid()}
        os.makedirs(spec["log_dir"], exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "hetero.launch.island_agent", json.dumps(spec)],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.proc = proc
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()
        return proc.pid

    def _read(self, output) -> None:
        for raw in output:
            self.lines.append(raw.decode("utf-8", errors="replace"))

    def poll(self) -> tuple[int | None, list[str]]:
        """(the agent's exit status or None while it runs, its output since the last poll)."""
        if self.proc is None:
            raise RuntimeError("poll before start")   # the driver polls only once start has answered
        code = self.proc.poll()
        if code is not None:
            time.sleep(0.05)   # let the reader take the last lines
        lines = []
        while self.lines:
            lines.append(self.lines.popleft())
        return code, lines

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)


ChipHolder = ray.remote(_Chip)
AgentHost = ray.remote(_Agent)


class AgentProc:
    """Popen's poll / send_signal / wait for an island agent in an AgentHost actor."""

    def __init__(self, actor, started, label: str, out):
        self.actor = actor
        self.started = started      # ObjectRef of AgentHost.start
        self.label = label
        self.out = out or sys.stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            ray.get(self.started, timeout=CALL_TIMEOUT_S)
            code, lines = ray.get(self.actor.poll.remote(), timeout=CALL_TIMEOUT_S)
        except Exception as exc:   # noqa: BLE001 - RayActorError, a lost node, a failed start: all end the agent
            self._say(f"hetero launch: {self.label}: its Ray actor is gone ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''})\n")
            self.returncode = LOST_EXIT
            return self.returncode
        for line in lines:
            self._say(line)
        self.returncode = code
        return code

    def _say(self, line: str) -> None:
        try:
            self.out.write(line)
            self.out.flush()
        except (OSError, ValueError):
            pass

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            self.actor.signal.remote(int(signum))

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if timeout is not None and deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.label, timeout)
            time.sleep(0.1)
        return code

    def kill(self) -> None:
        """End the actor (and so its agent: the agent watches its parent)."""
        ray.kill(self.actor, no_restart=True)
        if self.returncode is None:
            self.returncode = LOST_EXIT
