"""`hetero launch --node`: two "nodes" on 127.0.0.2 and 127.0.0.3, one launcher each.

Island "wide" spans both nodes, so its world forms only if the two launchers'
agents meet; island "right" lives on the second node. The coordinator runs on
the first (the head).
"""

import json
import os

import pytest

from tests.hetero.launch.test_launch import WORKERS, alive, finish, launcher, prefixed_lines, write_cluster

pytestmark = pytest.mark.timeout(150)
TOKEN = "multinode-token-7d1e"
HEAD, OTHER = "127.0.0.2", "127.0.0.3"


def launch_both(cluster, *argv):
    env = {"HETERO_JOB_TOKEN": TOKEN}
    other = launcher(cluster, "--node", OTHER, *argv, env=env)   # before the head: it must wait for it
    head = launcher(cluster, "--node", HEAD, *argv, env=env)
    head_result = finish(head)
    other_result = finish(other)
    return head_result, other_result


def test_worlds_form_across_two_launchers(tmp_path):
    cluster = write_cluster(tmp_path, "two-node")
    out = tmp_path / "env"
    out.mkdir()
    (head_code, head_out, head_err), (other_code, other_out, other_err) = launch_both(
        cluster, os.path.join(WORKERS, "torchrun_allreduce.py"), str(out))
    assert head_code == 0, head_err
    assert other_code == 0, other_err
    # wide:0 runs on the head, wide:1 on the other node, and both see the sum over both (1 + 2).
    assert prefixed_lines(head_out) == [("wide", 0, "rank 0 of 2: sum 3")]
    assert sorted(prefixed_lines(other_out)) == [("right", 0, "rank 0 of 1: sum 1"), ("wide", 1, "rank 1 of 2: sum 3")]

    envs = {int(e["HETERO_GLOBAL_RANK"]): e for e in (json.loads(p.read_text()) for p in out.iterdir())}
    assert sorted(envs) == [0, 1, 2]
    assert [envs[r]["HETERO_NODE"] for r in range(3)] == [HEAD, OTHER, OTHER]
    assert {e["HETERO_COORDINATOR"].split(":")[0] for e in envs.values()} == {HEAD}
    assert envs[0]["MASTER_ADDR"] == envs[1]["MASTER_ADDR"] == HEAD
    assert envs[2]["MASTER_ADDR"] == OTHER
    assert all(e["HETERO_JOB_TOKEN"] == TOKEN and e["HETERO_WORLD_SIZE"] == "3" for e in envs.values())


def test_failure_on_one_node_restarts_the_job_on_both(tmp_path):
    cluster = write_cluster(tmp_path, "two-node")
    marks = tmp_path / "marks"
    marks.mkdir()
    # Global rank 2 (island "right", on the non-head node) fails on the first attempt.
    (head_code, head_out, head_err), (other_code, other_out, other_err) = launch_both(
        cluster, "--max-restarts", "1", os.path.join(WORKERS, "fail_first_attempt.py"), str(marks), "2")
    assert head_code == 0, head_err
    assert other_code == 0, other_err
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]
    assert "rank 2 on 127.0.0.3 exited with 7 (island right" in head_err
    assert "restarting the whole job from the start (restart 1 of 1): rank 2 on 127.0.0.3" in head_err + other_err
    done = [line[:2] for line in prefixed_lines(head_out) + prefixed_lines(other_out)
            if line[2].startswith("attempt 1 done")]
    assert sorted(done) == [("right", 0), ("wide", 0), ("wide", 1)]
    for mark in marks.iterdir():
        assert not alive(int(mark.read_text().split()[1])), mark.name


def test_head_fails_the_job_when_a_node_never_joins(tmp_path, capsys):
    from hetero.launch import launch_fleet

    cluster = write_cluster(tmp_path, "two-node")
    marks = tmp_path / "marks"
    marks.mkdir()
    code = launch_fleet(cluster, None, os.path.join(WORKERS, "record_and_sleep.py"), [str(marks)], node=HEAD,
                        env={**os.environ, "HETERO_JOB_TOKEN": TOKEN}, join_timeout=2, max_restarts=1)
    assert code == 1
    # Each attempt fails the same way until the restarts run out; the head does not wait for
    # an acknowledgement from a node that never came.
    err = capsys.readouterr().err
    assert "never joined attempt 0" in err and "job failed: node 127.0.0.3 never joined attempt 1" in err
    assert list(marks.iterdir()) == []   # island "wide" never formed: its other node was missing
