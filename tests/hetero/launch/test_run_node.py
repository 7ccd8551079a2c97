"""`hetero run --node`: a job started host by host on two loopback "hosts" (127.0.0.1 the head,
127.0.0.2 a member that is given only the cluster file, its host and the token); the head plans
and hands the member the plan, the job files and the steps; both run their share and finish."""

import json
import os
import signal
import subprocess
import sys

import pytest

from hetero.config import load_job
from hetero.launch.loopback import loopback_cluster_yaml
from tests.hetero.engine.test_engine_fleet import CONFIG, last_attempt, make_plan
from tests.hetero.launch.test_launch import ROOT, free_port_block

STEPS = 3


def _files(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(loopback_cluster_yaml("run-node-two", 2, free_port_block(4)))
    token = tmp_path / "token"
    token.write_text("run-node-token-81b2\n")
    return str(cluster), str(token)


def _hetero(*argv):
    return subprocess.Popen([sys.executable, "-m", "hetero", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_job_started_host_by_host_runs_the_heads_plan_on_both_hosts(tmp_path):
    cluster, token = _files(tmp_path)
    job = load_job(cluster=cluster, model=CONFIG, train=CONFIG)
    plan = tmp_path / "plan.json"
    plan.write_text(make_plan(job, [("a", 1, 1, (0, 2), 0), ("b", 1, 1, (2, 3), 0)]).to_json())
    member = _hetero("run", "--node", "127.0.0.2", "--cluster", cluster, "--token-file", token,
                     "--out", str(tmp_path / "member"))
    head = _hetero("run", "--node", "127.0.0.1", "--cluster", cluster, "--model", CONFIG, "--train", CONFIG,
                   "--plan", str(plan), "--steps", str(STEPS), "--token-file", token, "--out", str(tmp_path / "head"),
                   "--json")
    try:
        head_out, head_err = head.communicate(timeout=240)
        _, member_err = member.communicate(timeout=60)
    finally:
        for proc in (head, member):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert head.returncode == 0, head_err[-3000:]
    assert member.returncode == 0, member_err[-3000:]
    summary = json.loads(head_out)
    assert summary["ok"] and summary["steps"] == STEPS
    assert "joined: 3 steps" in member_err
    member_dir = tmp_path / "member"
    assert (member_dir / "plan.json").read_text() == (tmp_path / "head" / "plan.json").read_text()
    assert (member_dir / "model.yaml").read_text() == (tmp_path / "head" / "model.yaml").read_text()
    assert os.listdir(member_dir / "logs" / "attempt_0") == ["b.0"]        # the member ran island b's worker
    with open(tmp_path / "head" / "metrics" / "steps.jsonl") as handle:
        assert [r["step"] for r in last_attempt([json.loads(line) for line in handle])] == [1, 2, 3]


def test_a_member_takes_no_job_files_and_needs_the_token(tmp_path, hetero_cli):
    cluster, token = _files(tmp_path)
    code, _, err = hetero_cli("run", "--node", "127.0.0.2", "--cluster", cluster, "--model", CONFIG,
                              "--token-file", token)
    assert code == 2 and "member host: the head hands it the job; drop --model" in err
    code, _, err = hetero_cli("run", "--node", "127.0.0.2", "--cluster", cluster)
    assert code == 2 and "give the head's job token with --token-file" in err
    code, _, err = hetero_cli("run", "--node", "127.0.0.1", "--model", CONFIG, "--train", CONFIG, "--token-file",
                              token)
    assert code == 2 and "--node needs --cluster" in err
