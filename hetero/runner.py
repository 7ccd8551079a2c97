"""Plan -> launch -> train, as a function: what `hetero run` and the runtime and
efficiency benchmarks share.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hetero import resume
from hetero.commands.flags import add_job_files
from hetero.config.model import model_text
from hetero.errors import UserError
from hetero.launch import events

if TYPE_CHECKING:
    from partitioner.plan import Plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"cluster": "emulated-mixed.yaml", "model": "llama-tiny.yaml", "train": "train-tiny.yaml"}
MAX_STEPS = 10 ** 9
KINDS = {"auto": ("pipeline", "replicas", "hybrid"), "pipeline": ("pipeline",), "replicas": ("replicas",),
         "hybrid": ("hybrid",)}


@dataclass
class RunResult:
    code: int
    run_dir: str
    plan: Plan                                     # the plan it was launched with (elastic re-plans: run events)
    records: list = field(default_factory=list)    # metrics/steps.jsonl, last attempt per step
    resumed_from: int | None = None                # --resume: the checkpoint step it went on from

    @property
    def steady_step_s(self) -> float | None:
        """Mean step time without the first step (start-up: allocation, first touch).
        In the chips' time: a dilated emulation's workers record it so."""
        steady = self.records[1:] or self.records
        return sum(r["step_s"] for r in steady) / len(steady) if steady else None


def add_job_arguments(parser, train_default: str = DEFAULTS["train"]) -> None:
    """--cluster/--model/--train (defaults: the embedded example) and --kind, shared by
    `hetero run` and the benchmarks that train."""
    add_job_files(parser, defaults=dict(DEFAULTS, train=train_default))
    parser.add_argument("--kind", choices=sorted(KINDS), default="auto",
                        help="plan hetero-PP (pipeline across islands), hetero-DP (replicas, one per island), "
                             "hetero-DP of hetero-PP pipelines (hybrid: several pipelines, some over several "
                             "islands, the batch split between them) or let the planner pick (auto, the default)")


def default_paths(**given) -> dict:
    return {kind: given.get(kind) or os.path.join(ROOT, "configs", name) for kind, name in DEFAULTS.items()}


def search_plan(job, kind: str = "auto", profile=None):
    """The planner's best plan among those this engine runs (hetero.engine.support: every
    recompute mode it implements; ZeRO-1 only once it has it); `kind` narrows hetero-PP vs
    hetero-DP."""
    from hetero.engine import support
    from hetero.planning import plan_job

    _hybrid_fits(job.cluster, kind)
    return plan_job(job, profile=profile, modes=KINDS[kind], recompute_modes=support.RECOMPUTE_MODES,
                    zero1=None if support.ZERO1 else False).best


def hybrid_possible(cluster) -> bool:
    """Whether a hybrid plan can exist: two pipelines, one over two islands, need three islands with chips."""
    return sum(1 for island in cluster.islands if island.size > 0) >= 3


def _hybrid_fits(cluster, kind: str) -> None:
    """--kind hybrid on a cluster of fewer than three islands with chips: no hybrid plan exists (two
    pipelines, one over two islands at least), so say so in one line instead of searching (also what an
    elastic re-plan says when lost nodes took islands)."""
    if kind == "hybrid" and not hybrid_possible(cluster):
        islands = [i.name for i in cluster.islands if i.size > 0]
        raise UserError(f"--kind hybrid: a hybrid plan needs at least three islands (two pipelines, one over "
                        f"two islands); cluster '{cluster.name}' has {len(islands)} ({', '.join(islands)}); "
                        "use --kind pipeline, replicas or auto")


def train_fleet(job, paths: dict, run_dir: str, steps: int, plan_file: str | None = None, max_restarts: int = 0,
                progress: bool = True, say=None, kind: str = "auto", target=None, elastic: bool = True,
                node: str | None = None, token_file: str | None = None, **timeouts) -> RunResult:
    """Plan (unless given a plan file), launch every planned worker, train `steps` steps.

    `target`: a hetero.launch.targets.Target (`--on ray`), or None: every island on this
    machine, which refuses a cluster file naming other hosts. Every input is checked (the plan
    file against the job: hetero.plan_check) before the run directory is made; a UserError
    raised before any worker starts leaves nothing behind. `timeouts`: hang_timeout and
    rejoin_timeout, for the launcher (hetero.launch.fleet.launch_fleet); `elastic`: a lost node's
    chips are re-planned around (the same search, `kind`) instead of waited for. `node` (the
    coordinator's host): this machine is the head of a job started host by host (`hetero run --node`):
    it runs its own share and hands the members the job (hetero.launch.join); `token_file`: the job token."""
    launch = _launcher(target, job.cluster, node, token_file)
    say = say or _say
    _check_counts(steps, max_restarts, timeouts)
    run_dir = os.path.abspath(run_dir)
    check_run_dir(run_dir)
    plan = choose_plan(job, plan_file, kind, say)
    try:
        made = RunDir(run_dir)
    except OSError as exc:
        raise UserError(f"--out {run_dir}: cannot make the run directory: {exc.strerror or exc}") from None
    made.claim(resume.LOCK)
    try:
        with resume.RunLock(run_dir):
            _fill(made, job, paths, plan, steps)
            say(f"run directory: {run_dir}")
            worker_paths = {part: os.path.abspath(paths[part]) for part in DEFAULTS}
            settings = dict(timeouts, **_elastic(job, kind, elastic))
            if node is not None:
                from hetero.launch.join import share_of

                settings["share"] = share_of(run_dir, steps)
            return _launch(launch, job, worker_paths, run_dir, plan, steps, max_restarts, progress,
                           made=made, timeouts=settings)
    except UserError:
        if made.only_ours():
            made.undo()      # refused before any worker started: leave nothing behind
        raise


def _fill(made: "RunDir", job, paths: dict, plan, steps: int) -> None:
    """What a fresh run keeps in its directory: the plan, its job files (hetero.resume.portable_text)
    and run.json, which `--resume` reads."""
    try:
        made.folder("metrics")
        made.write("plan.json", plan.to_json())
        for part, path in paths.items():   # a model from a HF directory: its architecture and source, not weights
            made.write(f"{part}.yaml", model_text(job.model, job.pretrained) if part == "model" and job.pretrained
                       else resume.portable_text(path, job.train.data.path))
        made.claim(resume.RUN_JSON)
        resume.write_record(made.path, {"steps": steps, "resumes": [],
                                        "sources": {part: os.path.abspath(path) for part, path in paths.items()}})
    except OSError as exc:
        raise UserError(f"--out {made.path}: cannot write the run directory: {exc.strerror or exc}") from None


def resume_fleet(stopped, steps: int | None = None, plan_file: str | None = None, max_restarts: int = 0,
                 progress: bool = True, say=None, kind: str | None = None, target=None, elastic: bool = True,
                 **timeouts) -> RunResult:
    """Continue the stopped run `stopped` (hetero.resume.open_run) from its checkpoint to `steps` in all
    (None: the run's own total), with the run directory's own files and plan; `plan_file` or `kind`
    re-plans (said in one line). Its metrics and logs go on in the same directory: the records after
    the checkpoint step are dropped before any worker starts, each step is in steps.jsonl once at the end."""
    from hetero.launch.targets import launcher_for

    job, run_dir = stopped.job, stopped.run_dir
    launch = launcher_for(target, job.cluster)
    say = say or _say
    total = stopped.total(steps)
    _check_counts(total, max_restarts, timeouts)
    with resume.RunLock(run_dir):
        plan = _resume_plan(stopped, plan_file, kind)
        offset = resume.reopen(stopped)
        if plan_file or kind:
            say(_replace_plan(run_dir, plan, stopped.step))
        record = resume.read_record(run_dir)
        record.setdefault("resumes", []).append({"from_step": stopped.step, "steps": total,
                                                 "replanned": bool(plan_file or kind)})
        resume.write_record(run_dir, dict(record, steps=total))
        say(f"resuming {run_dir} from step {stopped.step} to step {total}")
        events.record(run_dir, "resume", from_step=stopped.step, steps=total, replanned=bool(plan_file or kind))
        try:
            result = _launch(launch, job, stopped.paths, run_dir, plan, total, max_restarts, progress,
                             first_step=stopped.step, offset=offset,
                             timeouts=dict(timeouts, **_elastic(job, kind or "auto", elastic)))
        finally:
            resume.last_attempts(os.path.join(run_dir, "metrics", "steps.jsonl"))
    result.resumed_from = stopped.step
    return result


def _resume_plan(stopped, plan_file: str | None, kind: str | None):
    """The plan the rest of a resumed run trains under: the run's own plan.json (checked against its
    files), unless --plan or --kind asks to re-plan."""
    if plan_file or kind:
        return choose_plan(stopped.job, plan_file, kind or "auto", say=lambda message: None)
    plan_path = os.path.join(stopped.run_dir, "plan.json")
    if not os.path.isfile(plan_path):
        raise UserError(f"--resume {stopped.run_dir}: no plan.json; pass --kind or --plan to plan the rest of the run")
    from hetero.plan_check import load_checked_plan

    return load_checked_plan(plan_path, stopped.job, engine=True)


def _replace_plan(run_dir: str, plan, step: int) -> str:
    """Write the new plan.json, keeping the old one beside it; returns the line that says so."""
    old = _old_plan(os.path.join(run_dir, resume.PLAN_JSON))
    kept = resume.keep_replaced_plan(run_dir, step) or resume.kept_plan_name(step)
    resume.write_plan(run_dir, plan.to_json())
    return (f"re-planned from step {step}: {plan.summary()}; predicted {plan.predicted_step_s:.3f} s/step "
            f"(the run had {old}; its plan kept as {kept})")


def choose_plan(job, plan_file: str | None, kind: str, say):
    """The plan file, checked against the job and `kind`; else the planner's best of `kind`."""
    if plan_file:
        from hetero.plan_check import load_checked_plan

        plan = load_checked_plan(plan_file, job, engine=True)
        if plan.kind not in KINDS[kind]:
            raise UserError(f"--kind {kind}: the plan {plan_file} is a '{plan.kind}' plan")
        return plan
    from hetero.plan_check import check_supported

    # What the search cannot choose around (the train file's dtype) is the train file's to fix.
    plan = check_supported(search_plan(job, kind), dict(job.sources).get("train", "the train file"))
    say(f"plan: {plan.summary()}; predicted {plan.predicted_step_s:.3f} s/step")
    return plan


def _launch(launch, job, paths: dict, run_dir: str, plan: Plan, steps: int, max_restarts: int,
            progress: bool, made=None, first_step: int = 0, offset: int = 0, timeouts: dict | None = None) -> RunResult:
    """Start every worker of plan.json in run_dir and follow metrics/steps.jsonl from byte `offset` (the
    records before it are the run's earlier steps) until the launcher returns."""
    plan_path = os.path.join(run_dir, "plan.json")
    # Checkpoints live in the run directory, so a run only ever resumes its own.
    worker_args = ["--plan", plan_path, "--steps", str(steps), "--checkpoint-dir", os.path.join(run_dir, "checkpoints")]
    worker_args += [arg for kind in DEFAULTS for arg in (f"--{kind}", paths[kind])]
    # The launcher keeps the main thread (it owns SIGINT/SIGTERM and stops every
    # island on them); a follower thread prints progress from metrics/steps.jsonl.
    steps_path = os.path.join(run_dir, "metrics", "steps.jsonl")
    records = _read_records(steps_path, offset)
    stop = threading.Event()
    follower = threading.Thread(target=_follow, name="hetero-progress", daemon=True,
                                args=(steps_path, (first_step, steps), stop, records, progress, offset))
    follower.start()
    log_path = made.claim("launcher.log") if made else os.path.join(run_dir, "launcher.log")
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            code = launch(job.cluster, plan_path, "-m hetero.engine.worker", worker_args,
                          max_restarts=max_restarts, run_dir=run_dir, stdout=log, stderr=log,
                          **{k: v for k, v in (timeouts or {}).items() if v is not None})
    finally:
        stop.set()
        follower.join()
    return RunResult(code, run_dir, plan, records)


def _launcher(target, cluster, node: str | None, token_file: str | None):
    """The launch function: hetero.launch.targets.launcher_for's, or with `node` this host's launcher of a
    job started host by host (the head's: `node` must be the coordinator's host)."""
    if node is None:
        from hetero.launch.targets import launcher_for

        return launcher_for(target, cluster)
    import functools

    from hetero.launch.fleet import launch_fleet

    if target is not None:
        raise UserError(f"--node and --on {target.engine} exclude each other")
    if node != cluster.coordinator.host:
        raise UserError(f"--node {node}: with --model and --train this host is the head, which must be the "
                        f"coordinator's host {cluster.coordinator.host}; member hosts take only --cluster, "
                        "--node and --token-file")
    return functools.partial(launch_fleet, node=node, token_file=token_file)


def _elastic(job, kind: str, elastic: bool) -> dict:
    """The launcher's elastic settings: on, with this job's planner (hetero.launch.elastic), or off."""
    from hetero.launch.elastic import Replanner

    return {"elastic": True, "replan": Replanner(job, kind)} if elastic else {"elastic": False}


def _check_counts(steps: int, max_restarts: int, timeouts: dict | None = None) -> None:
    from hetero.launch.fleet import check_timeout

    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"--steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    for name, value in (timeouts or {}).items():
        if name not in ("hang_timeout", "rejoin_timeout"):
            raise TypeError(f"unexpected keyword argument {name!r}")
        check_timeout("--" + name.replace("_", "-"), value)


def _say(message: str) -> None:
    print(f"hetero run: {message}", file=sys.stderr, flush=True)


def _old_plan(plan_path: str) -> str:
    """The run's plan, described for the re-plan line."""
    from partitioner.plan import Plan

    try:
        with open(plan_path, encoding="utf-8") as handle:
            return Plan.from_json(handle.read()).summary()
    except Exception:  # pylint: disable=broad-except  # only words for a message: any unreadable plan will do
        return "an unreadable plan.json"


def _read_records(path: str, until: int) -> list[dict]:
    """The records in the first `until` bytes of metrics/steps.jsonl (a resumed run's earlier steps)."""
    if not until:
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle.read(until).splitlines() if line.strip()]


def check_run_dir(run_dir: str) -> None:
    """A UserError unless `run_dir` can become a fresh run directory."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--out {run_dir}: is a file, not a directory; pass another --out")
    marks = (os.path.join("metrics", "steps.jsonl"), resume.RUN_JSON, os.path.join("checkpoints", "latest"))
    if any(os.path.lexists(os.path.join(run_dir, mark)) for mark in marks):
        raise UserError(f"{run_dir} already holds a run; pass another --out, or continue it with --resume {run_dir}")
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--out {run_dir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {run_dir}: cannot write in {parent}")


class RunDir:
    """The run directory this invocation fills, and how to take back what it made (folders it
    created, files it wrote) when the run is refused before any worker starts."""

    def __init__(self, path: str):
        self.path = path
        self.made: list[str] = []
        missing = path
        while not os.path.exists(missing):
            self.made.insert(0, missing)      # outermost first: undo removes it whole
            missing = os.path.dirname(missing)
        os.makedirs(path, exist_ok=True)
        self.before = set(os.listdir(path))

    def claim(self, relative: str) -> str:
        """The path of `relative`, which this invocation is about to make (unless it exists)."""
        target = os.path.join(self.path, relative)
        if not os.path.lexists(target):
            self.made.append(target)
        return target

    def folder(self, relative: str) -> None:
        os.makedirs(self.claim(relative), exist_ok=True)

    def write(self, relative: str, text: str) -> None:
        with open(self.claim(relative), "w", encoding="utf-8") as handle:
            handle.write(text)

    def copy(self, source: str, relative: str) -> None:
        shutil.copyfile(source, self.claim(relative))

    def only_ours(self) -> bool:
        """Nothing but what this invocation made has appeared (no worker logs, no metrics)."""
        ours = {os.path.basename(p) for p in self.made if os.path.dirname(p) == self.path}
        metrics = os.path.join(self.path, "metrics")
        return (set(os.listdir(self.path)) <= self.before | ours
                and (not os.path.isdir(metrics) or not os.listdir(metrics)))

    def undo(self) -> None:
        for target in reversed(self.made):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                try:
                    os.remove(target)
                except OSError:
                    pass
        self.made.clear()


def _follow(path: str, span: tuple, stop: threading.Event, records: list, show: bool, offset: int = 0) -> None:
    """Print a progress line per finished step until `stop`; collect the records. `span`: (the step the
    workers start after, the last step); `offset`: where in the file this invocation's records begin."""
    first, steps = span
    started = time.monotonic()
    tty = sys.stderr.isatty()
    while True:
        finished = stop.is_set()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                handle.seek(offset)
                for line in handle:
                    if not line.endswith("\n"):
                        break
                    offset += len(line.encode())
                    record = json.loads(line)
                    records[:] = [r for r in records if r["step"] < record["step"]] + [record]  # a restart rewinds
                    if show:
                        done = max(1, record["step"] - first)
                        eta = (time.monotonic() - started) / done * (steps - record["step"])
                        text = (f"step {record['step']}/{steps}  loss {record['loss']:.4f}  "
                                f"{record['tokens_per_s']:.0f} tokens/s  {record['step_s']:.2f} s/step  ETA {eta:.0f}s")
                        if record.get("time_dilation"):
                            text += f"  (chip time; wall x{record['time_dilation']:g})"
                        print(("\r" + text.ljust(78)) if tty else text, end="" if tty else "\n",
                              file=sys.stderr, flush=True)
        if finished:
            if show and tty and records:
                print(file=sys.stderr)
            return
        time.sleep(0.2)
