"""Recovery from a lost node and from a stopped worker (issue 18 item 5), measured on this machine.

Two scenarios, each a micro Llama (3 layers, hidden 64) training on a loopback fleet of emulated
chips, one island per "node" (127.0.0.1, 127.0.0.2, 127.0.0.3), checkpointing every CHECKPOINT_EVERY
steps, with `hetero launch` (hetero.launch.fleet), its watchdog and its elastic re-plan:

- node: one launcher per node (`hetero launch --node HOST`); mid-run, after a checkpoint, every process
  of 127.0.0.3 (launcher, island agent, worker) is SIGKILLed and not started again. The head declares
  the attempt failed, waits --rejoin-timeout for the node, re-plans on the two that remain and resumes
  from the last checkpoint.
- stop: the whole fleet under one launcher; the worker of the third island is SIGSTOPped mid-run. The
  hang watchdog names it, its stacks are dumped into the run directory, it is killed, and the job
  restarts on the same fleet from the last checkpoint.

Reported per scenario (seconds from the kill or stop): detection (the failure or hang event),
re-plan (the replan event; node only), first step after resume (the first step record past the
checkpoint written after the fault), and steps lost (steps trained past the checkpoint the job
resumed from, trained again). The anchor is torchft's published configuration, not measured here:
100 ms heartbeats and a 5 s timeout, so a lost replica is noticed within about 5.1 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import yaml

from hetero.errors import UserError
from hetero.launch import events, loopback
from hetero.runner import ROOT

HELP = ("recovery times on a three-node loopback fleet: a node SIGKILLed (detection, re-plan, first step "
        "after resume, steps lost) and a worker SIGSTOPped, beside torchft's published figures")
HOSTS = loopback.hosts(3)
STEPS = 10
CHECKPOINT_EVERY = 2
FAULT_AFTER_STEP = 3       # the fault comes once this many steps are recorded (and a checkpoint sealed)
REJOIN_TIMEOUT_S = 5.0
HANG_TIMEOUT_S = 5.0
WAIT_S = 600.0
ANCHOR = {"source": "torchft (published, not measured here)", "heartbeat_interval_s": 0.1, "timeout_s": 5.0,
          "detection_s": 5.1}

MODEL = {"name": "micro-llama", "layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn_hidden": 128, "vocab": 128,
         "seq_len": 16}


def job_text(port: int) -> str:
    """The scenarios' job file: the three-node loopback cluster (hetero.launch.loopback), the micro Llama and its
    training (checkpoint every CHECKPOINT_EVERY steps)."""
    train = {"global_batch": 8, "micro_batch": 2, "steps": STEPS, "lr": 0.01, "seed": 11, "grad_clip": 1.0,
             "checkpoint": {"dir": "checkpoints", "every": CHECKPOINT_EVERY}}
    return yaml.safe_dump({"cluster": loopback.loopback_cluster("recovery-three", len(HOSTS), port), "model": MODEL,
                           "train": train}, sort_keys=False)


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def run(args) -> int:
    result = measure()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in lines(result):
            print(line)
    return 0 if all(s.get("ok") for s in result["scenarios"].values()) else 1


def measure() -> dict:
    """Both scenarios, each in a fresh temporary folder: {"scenarios": {"node": ..., "stop": ...}, "anchor"}."""
    with tempfile.TemporaryDirectory(prefix="hetero-bench-recovery-") as folder:
        scenarios = {"node": _node_scenario(os.path.join(folder, "node")),
                     "stop": _stop_scenario(os.path.join(folder, "stop"))}
    return {"scenarios": scenarios, "anchor": ANCHOR}


def lines(result: dict) -> list[str]:
    anchor = result["anchor"]
    out = [f"anchor: {anchor['source']}: {anchor['heartbeat_interval_s'] * 1000:.0f} ms heartbeats, "
           f"{anchor['timeout_s']:g} s timeout: a lost replica noticed within ~{anchor['detection_s']:g} s"]
    for name, label in (("node", "node SIGKILLed (127.0.0.3, every process)"), ("stop", "worker SIGSTOPped")):
        s = result["scenarios"][name]
        if not s.get("ok"):
            out.append(f"{label}: failed: {s.get('error')}")
            continue
        replan = f", re-planned after {s['replan_s']:.1f} s" if s.get("replan_s") is not None else ""
        out.append(f"{label}: detected after {s['detection_s']:.1f} s{replan}, first step after resume "
                   f"{s['first_step_s']:.1f} s after the fault ({s['first_step_after_detection_s']:.1f} s after "
                   f"detection), {s['steps_lost']} step(s) lost, {s['steps_done']}/{STEPS} steps done")
    return out


def timings(found: list[dict], records: list[dict], fault_at: float, last_step_before: int) -> dict:
    """The numbers of one scenario from its events.jsonl and steps.jsonl (records in file order)."""
    detected = next((e for e in found if e["event"] in ("failure", "hang") and e["time"] >= fault_at), None)
    replan = next((e for e in found if e["event"] == "replan" and e["time"] >= fault_at), None)
    restart = next((e for e in found if e["event"] == "restart" and e["time"] >= fault_at), None)
    resumed_from = restart["from_step"] if restart else (replan["from_step"] if replan else None)
    if detected is None or resumed_from is None:
        return {"ok": False, "error": "no failure and resume recorded after the fault"}
    after = [r for r in records if r["step"] == resumed_from + 1 and r["time"] >= detected["time"]]
    if not after:
        return {"ok": False, "error": f"no step {resumed_from + 1} recorded after the fault"}
    first = min(r["time"] for r in after)
    return {"detection_s": detected["time"] - fault_at,
            "replan_s": replan["time"] - fault_at if replan else None,
            "first_step_s": first - fault_at, "first_step_after_detection_s": first - detected["time"],
            "resumed_from_step": resumed_from, "steps_lost": max(0, last_step_before - resumed_from),
            "steps_done": len({r["step"] for r in records})}


def _prepare(folder: str) -> tuple[str, str]:
    """(the job file, the run directory) of a scenario."""
    os.makedirs(folder)
    job = os.path.join(folder, "job.yaml")
    with open(job, "w", encoding="utf-8") as handle:
        handle.write(job_text(loopback.free_port_block(len(HOSTS) + 1)))
    return job, os.path.join(folder, "run")


def _launcher(folder: str, job: str, run_dir: str, token: str, *extra: str) -> subprocess.Popen:
    name = extra[1] if extra[:1] == ("--node",) else "local"
    log = open(os.path.join(folder, f"launcher-{name}.log"), "w", encoding="utf-8")  # pylint: disable=consider-using-with
    argv = [sys.executable, "-m", "hetero", "launch", "--cluster", job, "--model", job, "--train", job,
            "--max-restarts", "1", "--rejoin-timeout", str(REJOIN_TIMEOUT_S), "--hang-timeout", str(HANG_TIMEOUT_S),
            "--plan", os.path.join(folder, "plan.json"),
            "--run-dir", run_dir, *extra, "-m", "hetero.engine.worker", "--plan", os.path.join(folder, "plan.json"),
            "--cluster", job, "--model", job, "--train", job, "--checkpoint-dir", os.path.join(run_dir, "checkpoints")]
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "HETERO_JOB_TOKEN": token}, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _plan(folder: str, job: str) -> None:
    """A three-stage pipeline over the three islands (one stage each): every node carries a stage."""
    from hetero.config import load_job
    from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan

    loaded = load_job(cluster=job, model=job, train=job).require("model", "train")
    stages = tuple(StagePlan(i, 0, name, "fleet-chip", 1, 1, (i, i + 1), "none", 0, 0.1, 0.0)
                   for i, name in enumerate("abc"))
    ranks = tuple(RankPlan(i, name, 0, 0, 0, i, 0, 0) for i, name in enumerate("abc"))
    model, train = loaded.model, loaded.train
    assert model is not None and train is not None   # required above
    plan = Plan(kind="pipeline", cluster="recovery-three", model=model.name, dtype="fp32", layers=model.layers,
                heads=model.heads, kv_heads=model.kv_heads, global_batch=train.global_batch, micro_batch=2,
                num_micro_batches=4, recompute="none", zero1=False, stages=stages,
                pipelines=(PipelinePlan(0, (0, 1, 2), 1, 2, 4),), ranks=ranks, predicted_step_s=0.1,
                tokens_per_s=1.0, mfu={})
    with open(os.path.join(folder, "plan.json"), "w", encoding="utf-8") as handle:
        handle.write(plan.validate().to_json())


def _node_scenario(folder: str) -> dict:
    job, run_dir = _prepare(folder)
    _plan(folder, job)
    token = f"bench-recovery-node-{os.getpid()}"
    procs = {host: _launcher(folder, job, run_dir, token, "--node", host) for host in reversed(HOSTS)}
    try:
        last = _wait_for_fault_point(run_dir, procs.values())
        fault_at = time.time()
        for pid in [procs[HOSTS[2]].pid, *_processes(token, HOSTS[2])]:
            _kill(pid, signal.SIGKILL)
        return _finish(run_dir, [procs[h] for h in HOSTS[:2]], fault_at, last)
    finally:
        _stop_all(procs.values())


def _stop_scenario(folder: str) -> dict:
    job, run_dir = _prepare(folder)
    _plan(folder, job)
    token = f"bench-recovery-stop-{os.getpid()}"
    proc = _launcher(folder, job, run_dir, token)
    try:
        last = _wait_for_fault_point(run_dir, [proc])
        workers = [pid for pid in _processes(token, None, island="c") if _is_worker(pid)]
        if not workers:
            return {"ok": False, "error": "the worker of island c was not found"}
        fault_at = time.time()
        _kill(workers[0], signal.SIGSTOP)
        result = _finish(run_dir, [proc], fault_at, last)
        hang = next((e for e in events.read(run_dir) if e["event"] == "hang"), None)
        stacks = os.path.join(run_dir, hang["stacks"]) if hang and hang.get("stacks") else None
        result["stacks"] = hang.get("stacks") if hang else None
        result["stacks_dumped"] = bool(stacks and os.path.isfile(stacks) and os.path.getsize(stacks) > 0)
        return result
    finally:
        _stop_all([proc])


def _wait_for_fault_point(run_dir: str, procs) -> int:
    """Wait until FAULT_AFTER_STEP steps are recorded and a checkpoint is sealed; the last step recorded."""
    from hetero.engine.checkpoint import pointed_step

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        records = _records(run_dir)
        if len(records) >= FAULT_AFTER_STEP and pointed_step(os.path.join(run_dir, "checkpoints")):
            return max(r["step"] for r in records)
        if any(p.poll() is not None for p in procs):
            raise UserError(f"hetero bench recovery: a launcher ended before the fault (see {run_dir})")
        time.sleep(0.1)
    raise UserError(f"hetero bench recovery: no step {FAULT_AFTER_STEP} within {WAIT_S:.0f} s (see {run_dir})")


def _finish(run_dir: str, procs, fault_at: float, last_step_before: int) -> dict:
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(WAIT_S))
        except subprocess.TimeoutExpired:
            codes.append(None)
    result = timings(events.read(run_dir), _records(run_dir), fault_at, last_step_before)
    if any(code != 0 for code in codes):
        result.update(ok=False, error=f"launcher exit codes {codes} (see {run_dir})")
    else:
        result.setdefault("ok", True)
    return result


def _records(run_dir: str) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "metrics", "steps.jsonl"), encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.endswith("\n")]
    except (OSError, ValueError):
        return []


def _processes(token: str, host: str | None, island: str | None = None) -> list[int]:
    """This job's island agents and workers (on `host`; of `island`), by their environment."""
    wanted = {f"HETERO_JOB_TOKEN={token}"} | ({f"HETERO_NODE={host}"} if host else set()) \
        | ({f"HETERO_ISLAND={island}"} if island else set())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as handle:
                    environ = set(handle.read().decode(errors="replace").split("\0"))
            except OSError:
                continue
            if wanted <= environ:
                found.append(int(entry))
    return found


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().decode(errors="replace")
    except OSError:
        return False
    return "hetero.engine.worker" in cmdline and "island_agent" not in cmdline


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_all(procs) -> None:
    """End what the bench started (each launcher's process group; its agents stop their workers)."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
