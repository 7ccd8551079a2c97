"""The background snapshot under ZeRO-1 (hetero.engine.checkpointing): on the emulated fleet, DP 2 with
ZeRO-1, each rank snapshots its own flat shard (weights, moments) beside the next step and the step's
update waits for it; the checkpoints equal, byte for byte, those of the same run copying synchronously
(HETERO_CHECKPOINT_SNAPSHOT picks the mode in the workers). In-process, the fp32 and bf16 cases force
the overlap (test_checkpoint_snapshot); across worker processes it is not forced, so this checks the
ZeRO-1 layout's snapshot, its seal and each rank's part, not the timing."""

import dataclasses

import pytest

from hetero.engine.checkpointing import SNAPSHOT_ENV
from tests.hetero.checkpoint.test_checkpoint_snapshot import files_by_step
from tests.hetero.engine.test_engine_fleet import fleet_job, last_attempt, make_plan, run_fleet

pytestmark = pytest.mark.slow


def test_zero1_snapshots_in_the_background_equal_a_synchronous_run_byte_for_byte(tmp_path, monkeypatch):
    cluster, job = fleet_job(tmp_path)
    zero = dataclasses.replace(make_plan(job, [("wide", 1, 2, (0, 3), 0)]), zero1=True)
    saved, losses = {}, {}
    for mode in ("sync", "background"):
        monkeypatch.setenv(SNAPSHOT_ENV, mode)          # the workers inherit it
        records, run_dir, log = run_fleet(tmp_path, zero, steps=4, name=mode, cluster_path=cluster)
        assert "ZeRO-1 over DP 2" in log
        saved[mode] = files_by_step(run_dir / "checkpoints")
        losses[mode] = [r["loss"] for r in last_attempt(records)]
    assert sorted(saved["background"]) == [2, 4]
    assert all(len(files) == 2 for files in saved["background"].values())     # a part per DP rank
    assert saved["background"] == saved["sync"] and losses["background"] == losses["sync"]
