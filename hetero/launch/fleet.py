"""launch_fleet: run a worker script over a mixed fleet, island by island, with job-wide restarts."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import threading
import time

from hetero.errors import JobFatalError, UserError
from hetero.launch import inputs, watchdog
from hetero.launch.agents import LocalIslands, LocalStatus, remove_rings
from hetero.launch.control import HeadControl
from hetero.launch.member import MemberControl
from hetero.launch.protocol import LaunchAbort
from hetero.launch.environment import island_env
from hetero.launch.layout import FleetLayout, build_layout
from hetero.launch.logs import attempt_log_dir

POLL_S = 0.1


def launch_fleet(cluster, plan_path: str | None, entrypoint: str, args=(), node: str | None = None,
                 max_restarts: int = 0, run_dir: str | None = None, env: dict | None = None, *,
                 token_file: str | None = None, rdzv_timeout: float = 300.0, join_timeout: float = 300.0,
                 shutdown_timeout: float = 15.0, heartbeat_timeout: float = 5.0,
                 stdout=None, stderr=None, checkpoint_dir: str | None = None,
                 hang_timeout: float | None = None, rejoin_timeout: float | None = None,
                 elastic: bool = True, replan=None, share: dict | None = None) -> int:
    """Run `entrypoint` on this node's share of the fleet (all of it when `node` is None).

    cluster:      path of a cluster YAML, or a loaded hetero.config.ClusterConfig.
    plan_path:    a Plan JSON (`hetero plan --out`): which chips run a worker and their global
                  ranks; None: every chip runs one, global ranks island by island.
    entrypoint:   a script path, or "-m package.module"; `args` are passed to it.
    node:         the host (as written in the cluster file) this launcher runs; the head node
                  (the coordinator's host) also runs the coordinator. None: the whole fleet here.
    max_restarts: when any island fails, every island on every node is stopped and the whole
                  job starts again, at most this many times; workers see HETERO_RESTART_COUNT.
    run_dir:      HETERO_RUN_DIR for the workers, and where per-rank logs go
                  (<run_dir>/logs/attempt_<k>/<island>.<rank>/); None: a fresh temporary folder.
    env:          base environment of the workers (default os.environ); HETERO_* is added on top.
    token_file:   file holding the job token; else HETERO_JOB_TOKEN from `env`; else (head
                  node only) a fresh random token, written to <run_dir>/job-token for other nodes.
    stdout/stderr: files (with a fileno) the agents write the prefixed worker lines to; None: inherit.
                  Restarts and the job's end are also announced on this process's own stderr
                  (the console) when `stderr` is another file.
    checkpoint_dir: where the workers keep checkpoints (default <run_dir>/checkpoints): a restart
                  is announced as resuming from its `latest` step.
    rdzv_timeout: seconds an island's agents wait for all its nodes; join_timeout: seconds a
                  non-head node waits for the head's coordinator; shutdown_timeout: seconds workers
                  get between SIGTERM and SIGKILL; heartbeat_timeout: the coordinator's.
    hang_timeout: seconds without progress in any rank's training loop before the head declares
                  the job hung (hetero.launch.watchdog), dumps the stuck rank's stacks into
                  <run_dir>/stacks/, kills it and fails the attempt; None: the larger of 60 s and
                  5 x the plan's predicted step time (said at start).
    elastic:      (head node, with other nodes) before a restart, the head calls every node in and
                  waits up to `rejoin_timeout` seconds (default 60) for them; the nodes that do not
                  answer are lost, and the job is re-planned on the chips that remain by `replan`
                  (hetero.launch.elastic.Replanner: `replan(cluster, lost_hosts)` -> Plan; None: the
                  job cannot be re-planned and restarts on the same fleet). The new plan goes to
                  <run_dir>/plan.json (the old one kept as plan-until-step-N.json, N the checkpoint it
                  resumes from), every node is handed it through the coordinator, and an argument of
                  the entrypoint naming the old plan file names the new one. A lost node whose
                  launcher is started again is taken back at the next checkpoint (the job re-plans up
                  to its first plan; no restart is spent on it). Events: replan, rejoin.
                  False (--no-elastic): every restart waits for the same fleet.
    share:        (head) a JSON-able dict the head hands every node through the coordinator with
                  the current plan (`hetero run --node`: the job files and run settings; see
                  hetero.launch.join).

    Every node must be given the same cluster, plan, entrypoint and token; the head's
    max_restarts is the one that counts. SIGINT/SIGTERM (handled when called from the main
    thread) stop every island on every node.

    Returns 0 when every worker of the last attempt succeeded, 1 when the job failed,
    128 + signal number when interrupted by SIGINT/SIGTERM. Raises UserError on bad input, and
    JobFatalError (a UserError: the CLI prints it as one line and exits 2) when a worker stopped
    on a failure every restart would repeat (hetero.errors.FATAL_EXIT_CODE), naming its rank,
    host and file; no restart is spent on it. The head writes the coordinator's refused calls
    to <run_dir>/metrics/coordinator.json after every attempt. The job's shared-memory rings
    are removed from this host when the job ends, however it ends (and on the head, before it starts).
    """
    base_env = dict(os.environ if env is None else env)
    config, cluster_path = inputs.load_cluster(cluster)
    plan = inputs.load_plan(plan_path, config) if plan_path else None
    layout = build_layout(config, plan, node)
    entry = inputs.entry_command(entrypoint, args)
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    for flag, value in (("--hang-timeout", hang_timeout), ("--rejoin-timeout", rejoin_timeout)):
        check_timeout(flag, value)
    is_head = node is None or node == layout.head
    token, generated = inputs.job_token(token_file, base_env, needed=not is_head)
    run_dir = os.path.abspath(run_dir) if run_dir else tempfile.mkdtemp(prefix="hetero-run-")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--run-dir {run_dir}: cannot create: {exc.strerror or exc}") from None
    members = [h for h in layout.hosts if h != layout.head] if node is not None and is_head else []
    if generated and members:
        _write_token(run_dir, token, stderr)
    job = FleetJob(layout, node, entry, token, run_dir, os.path.abspath(plan_path) if plan_path else None,
                    cluster_path, base_env, rdzv_timeout, shutdown_timeout, stdout, stderr,
                    os.path.abspath(checkpoint_dir) if checkpoint_dir else os.path.join(run_dir, "checkpoints"))
    job.plan, job.plan_text = plan, read_text(plan_path)
    job.first = (plan, job.plan_text)
    if is_head and members and elastic:
        job.elastic = ElasticState(config, replan, watchdog.rejoin_or_default(rejoin_timeout), members)
    job.agent_work(0)   # every per-island input checked before anything starts
    lost_timeout = max(10.0, 2 * heartbeat_timeout)   # a silent node (or head) counts as lost
    control: HeadControl | MemberControl
    if is_head:
        # Only the head: a member's workers may meet the head's on this host once its coordinator runs.
        remove_rings(token)
        predicted = plan.predicted_step_s if plan is not None else None
        hang = hang_timeout or watchdog.default_timeout(predicted)
        control = HeadControl(layout, token, members, max_restarts, heartbeat_timeout,
                              ack_timeout=shutdown_timeout + 30.0, join_timeout=join_timeout,
                              lost_timeout=lost_timeout, run_dir=run_dir, hang_timeout=hang,
                              rejoin_timeout=watchdog.rejoin_or_default(rejoin_timeout),
                              say=lambda line: job.say(line, console=True),
                              announce=watchdog.describe_timeout(hang, hang_timeout is not None, predicted))
        control.plan_text, control.checkpoint_step, control.share = job.plan_text, job.resume_step, share
    else:
        assert node is not None   # without --node this launcher is the head
        control = MemberControl(layout, token, node, join_timeout, lost_timeout)
    try:
        with Interrupts() as interrupts:
            return job.run(control, interrupts, max_restarts)
    finally:
        remove_rings(token)


class FleetJob:
    def __init__(self, layout: FleetLayout, node, entry, token, run_dir, plan_path, cluster_path, base_env,
                 rdzv_timeout, shutdown_timeout, stdout, stderr, checkpoint_dir):
        self.layout = layout
        self.checkpoint_dir = checkpoint_dir
        self.node = node
        self.entry = entry
        self.token = token
        self.run_dir = run_dir
        self.plan_path = plan_path
        self.cluster_path = cluster_path
        self.base_env = base_env
        self.rdzv_timeout = rdzv_timeout
        self.shutdown_timeout = shutdown_timeout
        self.stdout = stdout
        self.stderr = stderr
        # Same on every node (all share the token), different for every job: the
        # islands' rendezvous run ids, which must agree across nodes.
        self.job_id = "hetero-" + hashlib.sha256(token.encode()).hexdigest()[:12]
        self.plan = None                      # the Plan this node runs now (None: every chip)
        self.plan_text: str | None = None
        self.first: tuple = (None, None)      # the job's first (Plan, text): what re-planning up returns to
        self.elastic: ElasticState | None = None  # the head's elastic re-plan (with other nodes, not --no-elastic)

    def say(self, message: str, console: bool = False) -> None:
        """A line for the launcher's log (`stderr`); `console`: also for the person at the
        terminal, when the log is a file of its own (hetero run's launcher.log)."""
        line = f"hetero launch: {message}"
        print(line, file=self.stderr or sys.stderr, flush=True)
        if console and self.stderr is not None and self.stderr is not sys.stderr:
            print(line, file=sys.stderr, flush=True)

    def run(self, control, interrupts: "Interrupts", max_restarts: int) -> int:
        attempt = 0
        try:
            while True:
                if attempt and self.elastic is not None:
                    self.regroup(control, attempt, self.elastic)
                attempt = control.begin(attempt)   # a late member joins the head's current attempt
                if isinstance(control, MemberControl) and control.plan_known and control.plan_text != self.plan_text:
                    self.adopt(control.plan_text, control)
                verdict = self.run_attempt(control, attempt, interrupts)
                if verdict.state == "done":
                    return 0
                if interrupts.signum:
                    self.say(f"job stopped: {verdict.reason}", console=True)
                    return 128 + interrupts.signum
                if verdict.fatal:
                    # The CLI prints it as the last line (exit 2); the log keeps it too.
                    self.say(f"job failed, not restarted (it would fail the same way): {verdict.reason}")
                    raise JobFatalError(verdict.reason)
                if not verdict.restart:
                    self.say(f"job failed: {verdict.reason}", console=True)
                    return 1
                attempt += 1
                if verdict.regrow:
                    self.say(f"stopping the job to take nodes back {self.resume_point()}: {verdict.reason}",
                             console=True)
                    continue
                restarts = getattr(control, "restarts", attempt)
                self.say(f"restarting the whole job {self.resume_point()} (restart {restarts} of {max_restarts}): "
                         f"{verdict.reason}", console=True)
                control.record("restart", attempt=attempt, from_step=self.resume_step())
        except LaunchAbort as exc:
            self.say(f"job failed: {exc}", console=True)
            return 128 + interrupts.signum if interrupts.signum else 1
        finally:
            control.close()

    def regroup(self, control, attempt: int, elastic: "ElasticState") -> None:
        """Elastic, on the head before a restart: call the nodes in; when the nodes that answer differ
        from those the job runs on, re-plan on them (down when nodes are lost, up to the first plan when
        they are all back), say the old and new plan, record a replan event."""
        started = time.monotonic()
        present = control.gather(attempt, elastic.hosts, elastic.rejoin_timeout)
        lost = sorted(set(elastic.hosts) - present)
        waited = time.monotonic() - started
        if set(lost) == elastic.lost:
            return
        if lost and elastic.replan is None:
            self.say(f"node{'s' if len(lost) > 1 else ''} {', '.join(lost)} not back after {waited:.0f} s; the job "
                     f"cannot be re-planned without its model and train files: restarting on the same fleet",
                     console=True)
            return
        from hetero.launch.elastic import summary

        try:
            plan = elastic.replan(elastic.config, lost) if lost else self.first[0]
        except UserError as exc:
            raise LaunchAbort(f"cannot re-plan on the chips that remain: {exc}") from None
        old = summary(self.plan)
        step = self.resume_step()
        kept = self.adopt(self.first[1] if not lost else plan.to_json(), control, step)
        new = summary(plan)
        gone, back = sorted(set(lost) - elastic.lost), sorted(elastic.lost - set(lost))
        elastic.lost = set(lost)
        control.runs_without(elastic.lost, elastic.hosts)
        why = (f"node{'s' if len(gone) > 1 else ''} {', '.join(gone)} not back after {waited:.0f} s" if gone
               else f"node{'s' if len(back) > 1 else ''} {', '.join(back)} back")
        self.say(f"re-planned ({why}), resuming from step {step}:", console=True)
        for label, plan_summary in (("old", old), ("new", new)):
            speed = (f"; predicted {plan_summary['predicted_step_s']:.3g} s/step, "
                     f"{plan_summary['tokens_per_s']:.0f} tokens/s" if "predicted_step_s" in plan_summary else "")
            self.say(f"  {label} plan: {plan_summary['plan']}{speed}", console=True)
        control.record("replan", attempt=attempt, from_step=step, lost=sorted(elastic.lost), gone=gone, back=back,
                       waited_s=round(waited, 3), old=old, new=new, kept=kept)

    def adopt(self, text: str | None, control, step: int | None = None) -> str | None:
        """Run under the plan `text` from now on: it becomes <run_dir>/plan.json (on the head the plan it
        replaces is kept as plan-until-step-<step>.json; returns that name), the layout follows it, and
        the entrypoint's arguments and HETERO_PLAN name the new file."""
        from hetero.launch.inputs import load_plan
        from hetero.resume import PLAN_JSON, keep_replaced_plan, write_plan

        path = os.path.join(self.run_dir, PLAN_JSON)
        kept = None
        if step is not None and self.plan_text is not None:
            kept = keep_replaced_plan(self.run_dir, step, self.plan_text)
        if text is not None and read_text(path) != text:
            write_plan(self.run_dir, text)   # whole or not at all: another launcher may read it
        plan = load_plan(path, self.layout.cluster) if text is not None else None
        if text is not None and self.plan_path is not None:
            self.entry = [path if _same_file(arg, self.plan_path) else arg for arg in self.entry]
        self.plan, self.plan_text = plan, text
        self.plan_path = path if text is not None else None
        self.layout = self.layout_for(plan)
        control.layout = self.layout
        control.plan_text = text
        return kept

    def layout_for(self, plan) -> FleetLayout:
        """The layout this launcher runs `plan` under (hetero.launch.ray_fleet's driver runs no node of its own)."""
        return build_layout(self.layout.cluster, plan, self.node)

    def resume_point(self) -> str:
        """Where a restart resumes: the step the checkpoint directory's `latest` names."""
        step = self.resume_step()
        return f"from step {step}" if step else "from the start"

    def resume_step(self) -> int:
        """The step the checkpoint directory's `latest` names (0: none)."""
        from hetero.engine.checkpoint import pointed_step

        return (pointed_step(self.checkpoint_dir) if os.path.isdir(self.checkpoint_dir) else None) or 0

    def run_attempt(self, control, attempt: int, interrupts: "Interrupts"):
        islands = self.start_islands(attempt)
        final = None   # this node's status once its islands are stopped
        try:
            while True:
                control.watch()   # a hung rank's stacks are dumped before anything stops it
                interrupted = interrupts.reason()
                if interrupted and (final is None or final.reason != interrupted):
                    islands.stop()   # at once: the user asked to stop
                    final = LocalStatus("failed", interrupted)
                status = final or islands.status()
                if status.state == "failed" and final is None:
                    # Name the failure that came first, not a peer that stopped itself after it:
                    # let the failing islands finish saying why, stop the rest, then look again.
                    control.watch()   # a stopped rank the coordinator gave up on: its stacks first
                    islands.settle()
                    islands.stop()
                    final = status = islands.first_failure()
                verdict = control.step(status, interrupted)
                if verdict is not None:
                    break
                time.sleep(POLL_S)
            if status.state == "failed" and verdict.reason != status.reason:
                self.say(status.reason)
            if verdict.state == "failed" and status.state == "running":
                self.say(f"stopping this node's islands: {verdict.reason}")
        finally:
            islands.stop()
            watchdog.remove_empty_stacks(self.run_dir, attempt)
        control.end()
        return verdict

    def start_islands(self, attempt: int):
        """This node's island agents for `attempt`, started (hetero.launch.ray_fleet starts them in Ray actors)."""
        return LocalIslands.start(self.agent_work(attempt), self.shutdown_timeout, self.stdout, self.stderr,
                                  run_dir=self.run_dir)

    def agent_work(self, attempt: int) -> list:
        log_dir = attempt_log_dir(self.run_dir, attempt)
        work = []
        for island, node in self.layout.on_host(self.node):
            spec = {
                "island": island.name, "host": node.host, "group_rank": node.group_rank,
                "nnodes": len(island.nodes), "nproc": node.nproc, "master_addr": island.master_addr,
                "rdzv_port": island.rdzv_port, "run_id": f"{self.job_id}-{island.name}-{attempt}",
                "entry": self.entry, "log_dir": log_dir, "rdzv_timeout": self.rdzv_timeout,
                "shutdown_timeout": self.shutdown_timeout,
            }
            env = island_env(self.layout, island, node, attempt=attempt, token=self.token, run_dir=self.run_dir,
                             plan_path=self.plan_path, cluster_path=self.cluster_path, base=self.base_env)
            work.append((island, node, spec, env))
        return work


def check_timeout(flag: str, value: float | None) -> None:
    """A UserError unless `value` is None or a finite number of seconds > 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"{flag} must be a number of seconds > 0, got {value!r}")


class ElasticState:
    """The head's elastic re-plan settings and state."""

    def __init__(self, config, replan, rejoin_timeout: float, hosts):
        self.config = config                # the whole cluster (re-plans are numbered in it)
        self.replan = replan                # hetero.launch.elastic.Replanner, or None
        self.rejoin_timeout = rejoin_timeout
        self.hosts = list(hosts)            # the other nodes of the first plan: called in before every restart
        self.lost: set = set()              # those the job runs without now


def read_text(path: str | None) -> str | None:
    """A file's text, or None when there is no path or it cannot be read (a plan file compared across
    attempts: a missing one reads as changed)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def _same_file(arg: str, path: str) -> bool:
    return not arg.startswith("-") and os.path.abspath(arg) == os.path.abspath(path)


class Interrupts:
    """SIGINT/SIGTERM to the launcher: remember it; the job loop stops every island.

    Only the main thread can install handlers: called from another thread,
    launch_fleet leaves signals to its caller."""

    def __init__(self):
        self.signum = 0
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def reason(self) -> str | None:
        return f"interrupted by {signal.Signals(self.signum).name}" if self.signum else None


def _write_token(run_dir: str, token: str, stderr) -> None:
    path = os.path.join(run_dir, "job-token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    print(f"hetero launch: job token written to {path}; start the other nodes with --token-file {path} "
          f"(or HETERO_JOB_TOKEN)", file=stderr or sys.stderr, flush=True)
