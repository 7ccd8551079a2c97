"""`hetero run --resume RUN_DIR`: refusals (one line, exit 2), what a resume does to the run
directory before any worker starts, and end to end on the default emulated fleet: a short run,
resumed to a larger total, stopped with SIGINT after a checkpoint, resumed again (re-planned)
to the end; steps.jsonl holds each step once and the losses are an uninterrupted run's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from tests.conftest import CONFIGS, ROOT, free_port, hetero_subprocess

from hetero import resume
from hetero.engine import checkpoint as ckpt

MODEL = """name: llama-mini
layers: 4
hidden: 64
heads: 4
kv_heads: 2
ffn_hidden: 176
vocab: 256
seq_len: 32
"""
TRAIN = """global_batch: 4
micro_batch: 2
dtype: fp32
steps: 8
lr: 1.0e-3
seed: 7
checkpoint: {dir: checkpoints, every: 2}
"""


def _job_files(folder) -> dict:
    """The default fleet on a free coordinator port, a small model, checkpoints every 2 steps."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(CONFIGS, "emulated-mixed.yaml"), encoding="utf-8") as handle:
        cluster = handle.read().replace("port: 29400", f"port: {free_port()}")
    paths = {}
    for part, text in (("cluster", cluster), ("model", MODEL), ("train", TRAIN)):
        paths[part] = os.path.join(folder, f"{part}.yaml")
        with open(paths[part], "w", encoding="utf-8") as handle:
            handle.write(text)
    return paths


def _stopped_run(tmp_path, step=4, steps=None):
    """A run directory as `hetero run` leaves it, with an (empty) checkpoint of `step` and no worker needed."""
    run_dir = tmp_path / "run"
    _job_files(run_dir)
    root = run_dir / "checkpoints"
    os.makedirs(ckpt.step_dir(str(root), step))
    (root / ckpt.LATEST).write_text(json.dumps({"step": step, "dir": f"step-{step:08d}"}))
    if steps:
        resume.write_record(str(run_dir), {"steps": steps})
    return run_dir


def _one_line(code, out, err, *fragments):
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_refusals_are_one_line(hetero_cli, tmp_path):
    _one_line(*hetero_cli("run", "--resume", str(tmp_path / "nope")), "no such run directory")
    (tmp_path / "empty").mkdir()
    _one_line(*hetero_cli("run", "--resume", str(tmp_path / "empty")), "not a run directory", "cluster.yaml")
    bare = tmp_path / "bare"
    _job_files(bare)
    _one_line(*hetero_cli("run", "--resume", str(bare)), "no checkpoint to resume from")
    run_dir = _stopped_run(tmp_path, step=4, steps=4)
    _one_line(*hetero_cli("run", "--resume", str(run_dir)), "already reached its 4 steps", "--steps")
    _one_line(*hetero_cli("run", "--resume", str(run_dir), "--steps", "4"), "--steps 4", "more than", "step 4")
    _one_line(*hetero_cli("run", "--resume", str(run_dir), "--model", "m.yaml"), "drop --model")
    _one_line(*hetero_cli("run", "--resume", str(run_dir), "--out", "x"), "drop --out")
    with resume.RunLock(str(run_dir)):
        _one_line(*hetero_cli("run", "--resume", str(run_dir), "--steps", "6"), "in use by another hetero run",
                  f"pid {os.getpid()}")
    _one_line(*hetero_cli("run", "--out", str(run_dir)), "--resume")      # a fresh run there says how to go on


def test_without_run_json_the_train_files_steps_are_the_total(tmp_path):
    stopped = resume.open_run(str(_stopped_run(tmp_path, step=4)))
    assert (stopped.step, stopped.steps, stopped.total(None), stopped.total(9)) == (4, 8, 8, 9)


def test_reopen_keeps_each_step_until_the_checkpoint_and_sets_logs_aside(tmp_path):
    run_dir = _stopped_run(tmp_path, step=4)
    metrics = run_dir / "metrics"
    metrics.mkdir()
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4, 5, 6, 3, 4, 5)]
    (metrics / "steps.jsonl").write_text("".join(lines) + '{"step": 6, "lo')          # torn by the kill
    (metrics / "rank00001.jsonl").write_text("".join(json.dumps({"step": s, "mb": 0}) + "\n" for s in (4, 5)))
    (run_dir / "logs" / "attempt_0").mkdir(parents=True)
    (run_dir / "logs" / "attempt_1").mkdir()
    (run_dir / "logs" / "previous-1").mkdir()
    offset = resume.reopen(resume.open_run(str(run_dir)))
    kept = (metrics / "steps.jsonl").read_text()
    assert [json.loads(line)["step"] for line in kept.splitlines()] == [1, 2, 3, 4, 3, 4]
    assert offset == len(kept.encode())
    assert [json.loads(line)["step"] for line in (metrics / "rank00001.jsonl").read_text().splitlines()] == [4]
    assert sorted(os.listdir(run_dir / "logs")) == ["previous-1", "previous-2"]
    assert sorted(os.listdir(run_dir / "logs" / "previous-2")) == ["attempt_0", "attempt_1"]
    resume.last_attempts(str(metrics / "steps.jsonl"))
    assert [json.loads(line)["loss"] for line in (metrics / "steps.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_kept_job_files_stand_on_their_own(tmp_path):
    data = tmp_path / "data" / "tokens.bin"
    data.parent.mkdir()
    data.write_bytes(b"\0" * 64)
    job = tmp_path / "job.yaml"
    job.write_text("# mine\ntrain:\n  steps: 2\n  data: {kind: tokens, path: data/tokens.bin}\n")
    text = resume.portable_text(str(job), str(data))
    assert f"path: {data}" in text and "steps: 2" in text
    plain = tmp_path / "plain.yaml"
    plain.write_text("# mine\nsteps: 2\ndata: synthetic\n")
    assert resume.portable_text(str(plain), None) == plain.read_text()


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics", "steps.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_resume_after_a_short_run_and_after_ctrl_c(tmp_path):
    paths = _job_files(tmp_path / "job")
    flags = [arg for part, path in paths.items() for arg in (f"--{part}", path)]
    total = 20
    reference = tmp_path / "uninterrupted"
    done = hetero_subprocess("run", *flags, "--out", str(reference), "--steps", str(total), "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    want = json.loads(done.stdout)["losses"]

    run_dir = tmp_path / "run"
    short = hetero_subprocess("run", *flags, "--out", str(run_dir), "--steps", "3", timeout=300)
    assert short.returncode == 0, short.stderr[-2000:]
    assert ckpt.pointed_step(str(run_dir / "checkpoints")) == 3           # the last step is always saved

    # Resumed to a larger total, then Ctrl-C once a checkpoint past the resume is sealed.
    command = [sys.executable, "-m", "hetero", "run", "--resume", str(run_dir), "--steps", str(total)]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 300
        while (ckpt.pointed_step(str(run_dir / "checkpoints")) or 0) < 6 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint past step 5 in 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]                            # stopped before the end
    assert "resuming" in err and "from step 3 to step 20" in err
    stopped_at = ckpt.pointed_step(str(run_dir / "checkpoints"))
    assert 6 <= stopped_at < total

    # Then to the end, re-planned as a pipeline across both islands.
    final = hetero_subprocess("run", "--resume", str(run_dir), "--kind", "pipeline", "--json", timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"re-planned from step {stopped_at}" in final.stderr
    summary = json.loads(final.stdout)
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == total
    records = _losses(run_dir)
    assert [r["step"] for r in records] == list(range(1, total + 1))    # each step once
    got = [r["loss"] for r in records]
    assert summary["losses"] == got
    assert got[:stopped_at] == want[:stopped_at]                         # same plan: bit for bit
    for step, (a, b) in enumerate(zip(got, want), start=1):              # another plan: within fp32 parity
        assert abs(a - b) <= 1e-5 * abs(b), (step, got, want)
    assert json.loads((run_dir / "plan.json").read_text())["kind"] == "pipeline"
    assert (run_dir / f"plan-until-step-{stopped_at}.json").exists()
    assert len(os.listdir(run_dir / "logs")) == 3                       # attempt_0, previous-1, previous-2
    shutil.rmtree(reference, ignore_errors=True)
