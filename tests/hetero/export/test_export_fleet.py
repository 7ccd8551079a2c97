"""The user path of `hetero export`: `hetero run` trains llama-tiny (configs/llama-tiny.yaml) for two steps
on the default emulated fleet under a pipeline plan that shards (a TP 2 stage on one island, TP 1 stages on
the other); `hetero export RUN_DIR --hf OUT` of its checkpoint loads in transformers with no missing or
unexpected keys, and transformers' logits equal hetero's own forward of the same checkpoint within 1e-5."""

import json
import os

import pytest
from tests.conftest import CONFIGS, free_port, hetero_subprocess

from tests.hetero.export.test_export import assert_transformers_matches, read_exported

pytestmark = pytest.mark.slow


def test_a_pipeline_run_on_the_emulated_fleet_exports_to_transformers(tmp_path, hetero_cli):
    with open(os.path.join(CONFIGS, "emulated-mixed.yaml")) as handle:
        cluster = handle.read().replace("port: 29400", f"port: {free_port()}")
    (tmp_path / "cluster.yaml").write_text(cluster)
    run_dir = tmp_path / "run"
    done = hetero_subprocess("run", "--cluster", str(tmp_path / "cluster.yaml"),
                             "--model", os.path.join(CONFIGS, "llama-tiny.yaml"),
                             "--train", os.path.join(CONFIGS, "train-tiny.yaml"),
                             "--kind", "pipeline", "--steps", "2", "--out", str(run_dir), "--json", timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert len(plan["stages"]) > 1 and max(stage["tp"] for stage in plan["stages"]) == 2     # the plan shards
    code, out, err = hetero_cli("export", str(run_dir), "--hf", str(tmp_path / "hf"), "--shard-size", "2MB", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["step"] == 2 and summary["shards"] >= 3 and summary["tensors"] == 8 * 9 + 3
    assert len(read_exported(tmp_path / "hf")) == summary["tensors"]
    worst = assert_transformers_matches(summary["checkpoint"], str(tmp_path / "hf"), 1024)
    print(f"exported llama-tiny: worst relative logit difference to hetero's forward {worst:.2e}")
