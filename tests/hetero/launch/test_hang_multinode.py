"""The hang watchdog across launchers (`hetero launch --node`, two "nodes" on 127.0.0.2 and
127.0.0.3, the head on the first): a rank on the other node stops moving; the head names it,
the other node's launcher dumps its stacks and kills it, and the job restarts on both."""

import os

import pytest

from hetero.engine import progress
from hetero.launch import events
from tests.hetero.launch.test_launch import WORKERS, finish, launcher, prefixed_lines, write_cluster

pytestmark = [pytest.mark.timeout(150), pytest.mark.slow]   # about a minute on a loaded 2-core host
TOKEN = "hang-multinode-token-4c2a"
HEAD, OTHER = "127.0.0.2", "127.0.0.3"


def test_a_hung_rank_on_another_node_is_dumped_there_and_the_job_restarts(tmp_path):
    cluster = write_cluster(tmp_path, "two-node")
    run_dir = tmp_path / "run"
    env = {"HETERO_JOB_TOKEN": TOKEN, progress.HANG_HOOK: f"2:5:{tmp_path / 'hung-once'}"}
    argv = ["--max-restarts", "1", "--hang-timeout", "3", "--run-dir", str(run_dir),
            os.path.join(WORKERS, "hang_loop.py"), "2"]
    other = launcher(cluster, "--node", OTHER, *argv, env=env)
    head = launcher(cluster, "--node", HEAD, *argv, env=env)
    head_code, head_out, head_err = finish(head, timeout=120)
    other_code, other_out, other_err = finish(other, timeout=60)
    assert head_code == 0, head_err
    assert other_code == 0, other_err
    assert "hang timeout 3 s (--hang-timeout)" in head_err
    assert "rank 2 (island right, host 127.0.0.3) hung in forward" in head_err
    found = events.read(str(run_dir))
    hang = next(e for e in found if e["event"] == "hang")
    assert hang["rank"] == 2 and hang["host"] == OTHER and not hang["silent"] and hang["step"] == 6
    dump = (run_dir / hang["stacks"]).read_text()       # written by the other node's launcher's signal
    assert "hang_loop.py" in dump and "_hang_here" in dump
    assert [e["event"] for e in found].count("restart") == 1
    done = [line[:2] for line in prefixed_lines(head_out) + prefixed_lines(other_out) if line[2] == "attempt 1 done"]
    assert sorted(done) == [("right", 0), ("wide", 0), ("wide", 1)]
