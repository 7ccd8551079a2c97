"""Checkpoint retention (hetero.engine.retention.prune) and its config field train.checkpoint.keep."""

import json
import os

import pytest

from hetero.config import load_job
from hetero.engine import checkpoint as ckpt
from hetero.engine.retention import prune

TRAIN = """global_batch: 4
micro_batch: 2
steps: 3
lr: 0.001
checkpoint: {dir: ck, every: 1%s}
"""


def _folders(root, sealed=(), partial=(), latest=None):
    """A checkpoint directory with empty step folders and a `latest` pointer (prune reads no tensors)."""
    os.makedirs(root, exist_ok=True)
    for step in sealed:
        os.makedirs(ckpt.step_dir(root, step))
        (open(os.path.join(ckpt.step_dir(root, step), ckpt.STATE), "w")).close()
    for step in partial:
        os.makedirs(ckpt.step_dir(root, step) + ".partial")
    if latest is not None:
        with open(os.path.join(root, ckpt.LATEST), "w") as handle:
            json.dump({"step": latest, "dir": os.path.basename(ckpt.step_dir(root, latest))}, handle)
    return root


def test_keeps_the_newest_and_never_a_partial(tmp_path):
    root = _folders(str(tmp_path / "ck"), sealed=(2, 4, 6, 8), partial=(10,), latest=8)
    assert prune(root, 2) == [4, 2]
    assert ckpt.sealed_steps(root) == [8, 6]
    assert os.path.isdir(ckpt.step_dir(root, 10) + ".partial")
    assert ckpt.pointed_step(root) == 8
    assert prune(root, 2) == []                       # nothing more to remove


def test_never_removes_the_one_latest_names(tmp_path):
    # `latest` names an older step (a newer one was sealed by hand, or the pointer was rolled back)
    root = _folders(str(tmp_path / "ck"), sealed=(3, 6, 9), latest=3)
    assert prune(root, 1) == [6]
    assert ckpt.sealed_steps(root) == [9, 3]


def test_keep_none_keeps_all_and_no_pointer_keeps_all(tmp_path):
    root = _folders(str(tmp_path / "ck"), sealed=(1, 2, 3), latest=3)
    assert prune(root, None) == [] and ckpt.sealed_steps(root) == [3, 2, 1]
    bare = _folders(str(tmp_path / "bare"), sealed=(1, 2, 3))
    assert prune(bare, 1) == [] and ckpt.sealed_steps(bare) == [3, 2, 1]
    assert prune(str(tmp_path / "missing"), 1) == []


@pytest.mark.parametrize("keep", [0, -1, True, 1.5])
def test_prune_refuses_a_bad_keep(tmp_path, keep):
    with pytest.raises(ValueError, match="keep"):
        prune(str(tmp_path), keep)


def test_config_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN % ", keep: 3")
    assert load_job(train=str(path)).train.checkpoint.keep == 3
    path.write_text(TRAIN % "")
    assert load_job(train=str(path)).train.checkpoint.keep is None


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "true"])
def test_config_refuses_a_bad_keep_in_one_line(hetero_cli, tmp_path, value):
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN % f", keep: {value}")
    code, out, err = hetero_cli("validate", str(path))
    assert code == 2, out + err
    assert "checkpoint.keep" in err and str(path) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
