"""A launcher that is not the head: it reports its islands to the head and follows its verdicts
(the keys it reads and writes: hetero.launch.protocol; the head's side: hetero.launch.control).

It waits for the head to run an attempt (saying it is here while an elastic head calls the nodes
in), adopts the plan the head runs it under, reports its islands' state at least every BEAT_S (the
head's liveness check), dumps and kills a hung worker on this host when the head names one, and
acknowledges each verdict once its islands are stopped. A head silent for lost_timeout ends the
attempt here.
"""

from __future__ import annotations

import json
import time

from comm_bridge.client import CoordinatorClient
from comm_bridge.errors import AuthenticationError, CoordinatorError
from hetero.launch import watchdog
from hetero.launch.agents import LocalStatus
from hetero.launch.layout import FleetLayout
from hetero.launch.protocol import (BEAT_S, STATE_KEY, LaunchAbort, Verdict, ack_key, hang_key, here_key, node_key,
                                    plan_key)


class MemberControl:
    """A node that is not the head: reports its islands, follows the head's verdicts."""

    def __init__(self, layout: FleetLayout, token: str, host: str, join_timeout: float, lost_timeout: float):
        self.layout = layout
        self.host = host
        self.join_timeout = join_timeout
        self.lost_timeout = lost_timeout
        self.client = CoordinatorClient(layout.coordinator_address, token, 0, timeout=5.0)
        self.attempt = 0
        self._reported = ""
        self._reported_at = 0.0
        self._beat = 0
        self._last_ok = time.monotonic()
        self._hang_read_at = 0.0
        self._hang_done = False
        self.plan_text: str | None = None   # the plan the head runs this attempt under (begin reads it)
        self.plan_known = False

    def begin(self, attempt: int) -> int:
        """Wait until the head runs attempt >= `attempt` (saying this node is here while an elastic head
        gathers the nodes); return the attempt to run."""
        deadline = time.monotonic() + self.join_timeout
        while True:
            state = self._read(1.0)
            if state is not None and state.attempt >= attempt:
                if state.state == "running":
                    self.attempt, self._reported, self._reported_at = state.attempt, "", 0.0
                    self._last_ok = time.monotonic()
                    self._hang_done = False
                    self.plan_text, self.plan_known = self._plan(state.attempt)
                    return state.attempt
                if state.state == "waiting":   # an elastic head calls the nodes in: say this one is here
                    self._say_here(state.attempt)
                    deadline = time.monotonic() + self.join_timeout
                elif not state.restart:
                    raise LaunchAbort(f"the job ended before this node joined: {state.reason or state.state}")
            if time.monotonic() > deadline:
                raise LaunchAbort(f"no coordinator running attempt {attempt} at {self.layout.coordinator_address} "
                                  f"after {self.join_timeout:.0f} s (is the head node's launcher running?)")
            time.sleep(0.2)

    def _say_here(self, attempt: int) -> None:
        try:
            self.client.kv_set(here_key(attempt, self.host), "1")
        except CoordinatorError:
            pass   # the next look

    def _plan(self, attempt: int) -> tuple[str | None, bool]:
        """(the plan text the head runs `attempt` under, whether the head said): None with True: no plan."""
        try:
            return json.loads(self.client.kv_get(plan_key(attempt), timeout=2.0)).get("plan"), True
        except (CoordinatorError, ValueError, AttributeError):
            return None, False

    def step(self, local: LocalStatus, interrupted: str | None) -> Verdict | None:
        if interrupted:
            self._report({"state": "failed", "reason": interrupted, "final": True})
        else:
            self._report({"state": local.state, "reason": local.reason, "fatal": local.fatal,
                          "priority": local.priority})
        state = self._read(0.0)
        if state is None:
            if time.monotonic() - self._last_ok > self.lost_timeout:
                return Verdict(self.attempt, "failed", f"lost the coordinator at {self.layout.coordinator_address}")
            return None
        self._last_ok = time.monotonic()
        if state.attempt == self.attempt and state.state != "running":
            return state
        if state.attempt > self.attempt:   # the head gave up on this node and moved on
            return Verdict(self.attempt, "failed", f"the head moved on to attempt {state.attempt}", restart=True)
        return None

    def watch(self) -> None:
        self._dump_if_asked()

    def _dump_if_asked(self) -> None:
        """The head named a hung worker on this host: dump its stacks and kill it (once per attempt)."""
        now = time.monotonic()
        if self._hang_done or now - self._hang_read_at < watchdog.READ_S:
            return
        self._hang_read_at = now
        try:
            asked = json.loads(self.client.kv_get(hang_key(self.attempt)))
        except (CoordinatorError, ValueError):
            return    # none named (or the store is busy: the next read)
        self._hang_done = True
        if asked.get("host") == self.host:
            watchdog.dump_and_kill(int(asked.get("pid", 0)), asked.get("stacks"))

    def record(self, event: str, **details) -> None:
        """Only the head keeps events."""

    def end(self) -> None:
        try:
            self.client.kv_set(ack_key(self.attempt, self.host), "1")
        except (CoordinatorError, AuthenticationError):
            pass   # the head gave up waiting; nothing left to tell it

    def close(self) -> None:
        self.client.close()

    def _report(self, status: dict) -> None:
        """Write this node's status when it changes, and at least every BEAT_S (the head's liveness check)."""
        text = json.dumps(status)
        now = time.monotonic()
        if text == self._reported and now - self._reported_at < BEAT_S:
            return
        self._beat += 1
        try:
            self.client.kv_set(node_key(self.attempt, self.host), json.dumps({**status, "beat": self._beat}))
            self._reported, self._reported_at = text, now
        except CoordinatorError:
            pass   # retried on the next step

    def _read(self, wait: float) -> Verdict | None:
        try:
            return Verdict.from_json(self.client.kv_get(STATE_KEY, timeout=wait))
        except AuthenticationError:
            raise LaunchAbort(f"the coordinator at {self.layout.coordinator_address} refused this node's "
                              f"job token (give every node the head's HETERO_JOB_TOKEN)") from None
        except CoordinatorError:
            return None
