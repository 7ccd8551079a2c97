"""Job-level control across nodes, through comm_bridge's coordinator.

The head node (the cluster's coordinator host; in local mode, this launcher)
runs a fresh coordinator for every attempt, so a new attempt never sees the
last one's registrations, failures or keys. The launchers talk through its
key-value store (the keys: hetero.launch.protocol; the other nodes' side:
hetero.launch.member).

The head decides: an attempt fails when an island on any node fails, when the
coordinator declares a registered worker failed for missed heartbeats (the
coordinator's failure notification: a hung worker, a lost node; workers that
finish call Leave, which is not a failure), or when a launcher is interrupted; it
succeeds when every island on every node has finished. The head publishes the
verdict, waits for every other node to stop its islands and acknowledge, and
then restarts the whole job (if restarts are left) or ends. A node that never
joins (within join_timeout) or stops beating (for lost_timeout) fails the attempt.

The head also runs the hang watchdog (hetero.launch.watchdog) on the workers' progress
reports: a hung job's culprit rank gets its stacks dumped and is killed (by the launcher on
its host), the user gets one line naming it, and the attempt fails with that line as its
reason, ahead of the failures the kill sets off (at once when that host's launcher has gone quiet too,
QUIET_S: a node lost with its rank has no one left to dump the stacks). What happens (start, hang, failure) goes
to <run dir>/events.jsonl (hetero.launch.events).

A failure every restart would repeat (a worker's JobFatalError, a full disk), on
any node, ends the job at once: the verdict is failed, fatal, with no restart, and
its reason is the fatal rank's line. Otherwise the reason names the most telling
failure (hetero.launch.agents: a worker that exited on its own before a peer that
stopped itself); a head whose only failures tell little waits SETTLE_S for a better one.

At the end of every attempt the head writes what its coordinators refused, summed
over the attempts so far, to <run dir>/metrics/coordinator.json:
{"refusals": {reason: count}, "refused_total": n}.
"""

from __future__ import annotations

import json
import os
import time

from comm_bridge.client import CoordinatorClient
from comm_bridge.coordinator import Coordinator
from comm_bridge.errors import AddressInUseError, AuthenticationError, CoordinatorError
from hetero.atomic import write_atomic
from hetero.errors import UserError
from hetero.launch import events, watchdog
from hetero.launch.agents import CRASHED, FATAL, SETTLE_S, STOPPED, LocalStatus
from hetero.launch.layout import LOCAL_HOST, FleetLayout
from hetero.launch.protocol import (BEAT_S, JOB_KEY, LEFT_REASON, MISSED_HEARTBEATS, STATE_KEY, LaunchAbort, Verdict,
                                    ack_key, hang_key, here_key, node_key, plan_key)

# A member whose report has not changed for this long has lost its launcher: it rewrites the report every
# BEAT_S, and dumping a hung rank's stacks holds it up DUMP_WAIT_S at most.
QUIET_S = watchdog.DUMP_WAIT_S + 2 * BEAT_S


class HeadControl:
    """Owns the coordinator and decides every attempt's outcome."""

    def __init__(self, layout: FleetLayout, token: str, members: list[str], max_restarts: int,
                 heartbeat_timeout: float, ack_timeout: float, join_timeout: float, lost_timeout: float,
                 run_dir: str | None = None, hang_timeout: float | None = None, rejoin_timeout: float | None = None,
                 say=None, announce: str | None = None):
        self.layout = layout
        self.run_dir = run_dir
        self.hang_timeout = hang_timeout      # None: no hang watchdog
        self.rejoin_timeout = rejoin_timeout  # recorded; the elastic re-plan will use it
        self.say = say or (lambda message: None)
        self._announce = announce             # said once the first coordinator holds its port
        self.watchdog: watchdog.Watchdog | None = None
        self.hang: tuple | None = None        # (Hang, its failure line, when the verdict may go out)
        self.refusals: dict = {}           # reason -> count, over every attempt's coordinator
        self._failing_since: float | None = None
        self.join_timeout = join_timeout
        self.lost_timeout = lost_timeout
        self._seen: dict = {}    # member -> (last value, when it last changed)
        self._silent: set = set()
        self.token = token
        self.members = members
        self.max_restarts = max_restarts
        self.heartbeat_timeout = heartbeat_timeout
        self.ack_timeout = ack_timeout
        self.coordinator: Coordinator | None = None
        self.client: CoordinatorClient | None = None
        self.attempt = 0
        self.restarts = 0                     # failures restarted so far (taking a node back is none)
        self.plan_text: str | None = None     # the plan this attempt runs (members adopt it)
        self.standby: set = set()             # hosts without workers now (lost, or left out): watched for
        self.checkpoint_step = lambda: 0      # the step `latest` names (the job sets it)
        self.share: dict | None = None        # hetero run --node: the job handed to member hosts (JOB_KEY)
        self._back: dict = {}                 # standby host -> the checkpoint step when it came back
        self._back_read_at = 0.0
        self._judged: set = set()             # coordinator failures the hang watchdog has looked at this attempt

    def begin(self, attempt: int) -> int:
        """Start a fresh coordinator for `attempt` and tell the other nodes to run it (and under
        which plan: `plan_text`, which a node that joins late or comes back adopts)."""
        self.attempt = attempt
        self._serve(max(1, self.layout.world_size))
        if self._announce:                 # after the port is ours: a refused start stays one line
            self.say(self._announce)
            self._announce = None
        self._store().kv_set(plan_key(attempt), json.dumps({"plan": self.plan_text}))
        if self.share is not None:
            self._store().kv_set(JOB_KEY, json.dumps({**self.share, "plan": self.plan_text}))
        self._back = {}
        for host_name in self.members:
            self._store().kv_set(node_key(attempt, host_name), json.dumps({"state": "pending"}))
            self._store().kv_set(ack_key(attempt, host_name), "")
        self._store().kv_set(STATE_KEY, Verdict(attempt, "running").to_json())
        self._seen = {h: ("", time.monotonic()) for h in self.members}
        self._silent = set()     # members given up on: end() does not wait for their ack
        self._failing_since = None
        self.hang = None
        self._judged = set()
        if self.hang_timeout:
            self.watchdog = watchdog.Watchdog(self.client, attempt, self.layout.world_size, self.hang_timeout)
        events.record(self.run_dir, "start", attempt=attempt, hang_timeout_s=self.hang_timeout,
                      rejoin_timeout_s=self.rejoin_timeout)
        return attempt

    def _serve(self, world_size: int) -> None:
        """A fresh coordinator on the cluster's port, and this launcher's client of it."""
        cluster = self.layout.cluster.coordinator
        host = LOCAL_HOST if self.layout.local else cluster.host
        coordinator = Coordinator(self.token, world_size, host=host,
                                  port=cluster.port, bind_all=cluster.bind_all and not self.layout.local,
                                  heartbeat_timeout=self.heartbeat_timeout)
        self.coordinator = coordinator
        try:
            address = coordinator.start()
        except AddressInUseError as exc:   # the user picks another port: bad input, not a fault
            self.coordinator = None        # never served: nothing to stop or count
            raise UserError(f"cannot start the job's coordinator: {exc}") from None
        except (OSError, RuntimeError) as exc:
            self.coordinator = None
            raise LaunchAbort(f"cannot start the coordinator on {host}:{cluster.port}: {exc}") from None
        self.client = CoordinatorClient(address, self.token, 0, timeout=10.0)

    def _store(self) -> CoordinatorClient:
        """This attempt's client of its coordinator (LaunchAbort when none runs)."""
        if self.client is None:
            raise LaunchAbort("the job's coordinator is not running")
        return self.client

    def _running(self) -> Coordinator:
        """This attempt's coordinator (LaunchAbort when none runs)."""
        if self.coordinator is None:
            raise LaunchAbort("the job's coordinator is not running")
        return self.coordinator

    def gather(self, attempt: int, wanted, timeout: float) -> set:
        """Before attempt `attempt` of an elastic job: call the nodes in (state `waiting`) and return
        those of `wanted` that answer within `timeout` seconds (all of them: at once)."""
        self.attempt = attempt
        self._serve(1)
        present: set = set()
        try:
            self._store().kv_set(STATE_KEY, Verdict(attempt, "waiting", restart=True).to_json())
            deadline = time.monotonic() + timeout
            while True:
                present |= {h for h in wanted if h not in present and self._has(here_key(attempt, h))}
                if present >= set(wanted) or time.monotonic() > deadline:
                    return present
                time.sleep(0.2)
        finally:
            self.close()

    def _has(self, key: str) -> bool:
        try:
            self._store().kv_get(key)
            return True
        except AuthenticationError as exc:
            raise LaunchAbort(f"the job's own coordinator refused its token: {exc}") from None
        except CoordinatorError:
            return False

    def step(self, local: LocalStatus, interrupted: str | None) -> Verdict | None:
        """The verdict once the attempt is over (published to every node), else None."""
        failures = []   # (priority, reason): the most telling first, then in this order
        if interrupted:
            failures.append((FATAL - 1, interrupted))
        elif self.hang is not None and time.monotonic() < self.hang[2] and not self._dumper_gone(self.hang[0].host):
            return None      # the hung rank's own node is dumping its stacks
        if self.hang is not None:
            failures.append((CRASHED, self.hang[1]))
        if local.state == "failed":
            failures.append((local.priority, local.reason))
        for rank, why in sorted(self._running().failed.items()):
            # A worker that leaves has finished (its agent reports how); one the watchdog has not looked at
            # yet may be a stopped process whose stacks it would dump: the next round, after watch().
            if why != LEFT_REASON and self._watched(rank):
                failures.append((CRASHED, f"the coordinator reports global rank {rank} failed: {why}"))
        members_done, members_running = True, False
        for host_name in self.members:
            status = self._member(host_name)
            if status["state"] == "failed":
                priority = FATAL if status.get("fatal") else _priority(status.get("priority"))
                if status.get("final"):   # that node's launcher was interrupted: the job stops
                    priority = FATAL - 1
                failures.append((priority, status.get("reason") or f"node {host_name} failed"))
                if status.get("final"):
                    interrupted = interrupted or failures[-1][1]
            members_done &= status["state"] == "done"
            members_running |= status["state"] == "running"
        if failures and not interrupted and min(f[0] for f in failures) > CRASHED and self.members:
            # Only failures that tell little (a peer that stopped itself): a moment for the node
            # where it started to say so.
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            if members_running and now - self._failing_since < SETTLE_S:
                return None
        if failures:
            priority, reason = min(enumerate(failures), key=lambda f: (f[1][0], f[0]))[1]
            fatal = priority == FATAL and not interrupted
            restart = not interrupted and not fatal and self.restarts < self.max_restarts
            self.restarts += restart
            verdict = Verdict(self.attempt, "failed", reason, restart, fatal)
            events.record(self.run_dir, "failure", attempt=self.attempt, reason=reason, restart=restart, fatal=fatal)
        elif local.state == "done" and members_done:
            verdict = Verdict(self.attempt, "done")
        else:
            back = self._take_back()
            if back is None:
                return None
            verdict = back
        self._store().kv_set(STATE_KEY, verdict.to_json())
        return verdict

    def _watched(self, rank: int) -> bool:
        """Whether the coordinator's failure of `rank` may fail the attempt now: the watchdog has judged
        it (a failure that lands between watch() and step() waits one round), or there is nothing to judge."""
        return self.watchdog is None or self.hang is not None or rank in self._judged

    def _take_back(self) -> Verdict | None:
        """Elastic: a standby host that came back (its launcher joined this attempt) is taken back at the
        next checkpoint: the attempt stops there (no restart spent) and the next one re-plans up."""
        now = time.monotonic()
        if not self.standby or now - self._back_read_at < BEAT_S:
            return None
        self._back_read_at = now
        step = self.checkpoint_step()
        for host_name in sorted(self.standby - set(self._back)):
            if self.came_back(host_name):
                self._back[host_name] = step
                self.say(f"node {host_name} is back: taking it back at the next checkpoint (after step {step})")
        ready = sorted(h for h, seen in self._back.items() if step > seen)
        if not ready:
            return None
        reason = f"node{'s' if len(ready) > 1 else ''} {', '.join(ready)} back: re-planning up at the checkpoint of step {step}"
        for host_name in ready:
            events.record(self.run_dir, "rejoin", attempt=self.attempt, host=host_name, at_step=step,
                          seen_at_step=self._back[host_name])
        return Verdict(self.attempt, "failed", reason, restart=True, regrow=True)

    def came_back(self, host_name: str) -> bool:
        """Whether the standby `host_name` is there again: its launcher joined this attempt."""
        return self._has(node_key(self.attempt, host_name))

    def runs_without(self, lost: set, hosts) -> None:
        """Elastic: from the next attempt on the job runs without the `lost` hosts (of `hosts`, the first
        plan's other nodes): no report is awaited from them, and they are watched for coming back."""
        self.members = [h for h in hosts if h not in lost]
        self.standby = set(lost)

    def watch(self) -> None:
        """Run the hang watchdog (the launcher calls it before it looks at its islands: a hung rank's
        stacks must be dumped before anything stops it). On a hang, have the rank's stacks dumped and
        the rank killed, and say so. A rank the coordinator gave up on for missed heartbeats whose
        progress reports stopped too is a stopped process: the same."""
        if self.hang is not None or self.watchdog is None or self.coordinator is None:
            return
        failed = {rank: why for rank, why in self._running().failed.items() if why != LEFT_REASON}
        self._judged = set(failed)
        hang = next((h for rank, why in sorted(failed.items()) if why.startswith(MISSED_HEARTBEATS)
                     for h in [self.watchdog.stopped(rank)] if h is not None and self._alive(h)), None)
        if hang is None and not failed:   # once a rank failed, the others stop on their own: not hung
            hang = self.watchdog.check(gone=set(self._running().failed) | set(self._running().finished))
        if hang is not None:
            self._on_hang(hang)

    def _alive(self, hang: watchdog.Hang) -> bool:
        """Whether the hung rank's process is still there (one on another host: assumed so)."""
        if not (self.layout.local or hang.host in (self.layout.head, "")):
            return True
        return watchdog.alive(hang.pid)

    def _on_hang(self, hang: watchdog.Hang) -> None:
        here = self.layout.local or hang.host in (self.layout.head, "")
        ready = time.monotonic()
        if here:
            watchdog.dump_and_kill(hang.pid, hang.stacks)
        else:
            self._store().kv_set(hang_key(self.attempt), json.dumps({"rank": hang.rank, "host": hang.host,
                                                                   "pid": hang.pid, "stacks": hang.stacks}))
            ready += QUIET_S
        line = hang.line()
        self.hang = (hang, line, ready)
        self.say(line)
        details = hang.to_dict()
        if self.run_dir and hang.stacks and hang.stacks.startswith(self.run_dir + os.sep):
            details["stacks"] = os.path.relpath(hang.stacks, self.run_dir)
        events.record(self.run_dir, "hang", attempt=self.attempt, timeout_s=self.hang_timeout, **details,
                      ranks=self.watchdog.summary() if self.watchdog is not None else {})

    def record(self, event: str, **details) -> None:
        """An event of the job (events.jsonl): the head keeps them."""
        events.record(self.run_dir, event, **details)

    def _report(self, host_name: str) -> tuple[str, float]:
        """A member's last report and for how many seconds it has not changed (every rewrite carries a
        new beat number, so a live launcher's report changes at least every BEAT_S)."""
        try:
            text = self._store().kv_get(node_key(self.attempt, host_name))
        except (CoordinatorError, AuthenticationError) as exc:
            raise LaunchAbort(f"the job's own coordinator stopped answering: {exc}") from None
        now = time.monotonic()
        last, since = self._seen[host_name]
        if text != last:
            self._seen[host_name] = (text, now)
            since = now
        return text, now - since

    def _dumper_gone(self, host_name: str) -> bool:
        """Whether the launcher that would dump a hung rank's stacks on `host_name` has stopped reporting
        for QUIET_S: the node was lost with its rank, so no stacks will come and the attempt need not wait
        (nor end() for that node's acknowledgement)."""
        gone = host_name in self._seen and self._report(host_name)[1] > QUIET_S
        if gone:
            self._silent.add(host_name)
        return gone

    def _member(self, host_name: str) -> dict:
        """A member's last report; a silent member counts as failed."""
        text, quiet = self._report(host_name)
        status = json.loads(text)
        if status["state"] == "pending" and quiet > self.join_timeout:
            self._silent.add(host_name)
            return {"state": "failed", "reason": f"node {host_name} never joined attempt {self.attempt} "
                                                 f"(is its launcher running?)"}
        if status["state"] in ("running", "done") and quiet > self.lost_timeout:
            self._silent.add(host_name)
            return {"state": "failed", "reason": f"node {host_name} stopped reporting for "
                                                 f"{quiet:.0f} s (its launcher died?)"}
        return status

    def end(self) -> None:
        """Wait until every other node has stopped and read the verdict, then stop the coordinator."""
        deadline = time.monotonic() + self.ack_timeout
        waiting = [h for h in self.members if h not in self._silent]
        while waiting and time.monotonic() < deadline:
            try:
                waiting = [h for h in waiting if self._store().kv_get(ack_key(self.attempt, h)) != "1"]
                for host_name in waiting:
                    self._member(host_name)   # one that stopped reporting is lost: not waited for
            except (CoordinatorError, AuthenticationError, LaunchAbort):
                break
            waiting = [h for h in waiting if h not in self._silent]
            if waiting:
                time.sleep(0.1)
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.coordinator is not None:
            self.coordinator.stop()
            self._count_refusals(self.coordinator)
            self.coordinator = None

    def _count_refusals(self, coordinator: Coordinator) -> None:
        """Add this attempt's refused calls to the totals and rewrite metrics/coordinator.json."""
        refusals = getattr(coordinator, "refusals", None)
        counts = dict(refusals) if isinstance(refusals, dict) else {"token": int(coordinator.refused)}
        for reason, count in counts.items():
            self.refusals[reason] = self.refusals.get(reason, 0) + int(count)
        if not self.run_dir:
            return
        path = os.path.join(self.run_dir, "metrics", "coordinator.json")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, json.dumps({"refusals": self.refusals,
                                           "refused_total": sum(self.refusals.values())}, indent=1))
        except OSError:
            pass   # a full disk: the job's own failure says so


def _priority(value) -> int:
    """A member's reported priority, if it is one (older or odd reports: the least telling)."""
    return value if isinstance(value, int) and FATAL <= value <= STOPPED else STOPPED
