"""Checkpoints that never resume wrong: a tampered or damaged checkpoint is skipped for
the previous good one (one line on the log), none left is a JobFatalError; a `latest`
pointer cannot lead outside the checkpoint directory; a non-finite loss or gradient
norm stops the job before anything is checkpointed; a full disk while saving leaves
`latest` as it was. Single process throughout (the solo trainer)."""

import dataclasses
import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetero.atomic import temporary_path
from hetero.checkpoint import seal, writer

import accelerators
from hetero.config import load_job
from hetero.config.train import CheckpointConfig
from hetero.engine import checkpoint as ckpt
from hetero.engine.comms import Comms
from hetero.engine.solo import single_chip_plan, train_solo
from hetero.engine.topology import Topology
from hetero.engine.gradients import GradientSync
from hetero.engine.trainer import Trainer
from hetero.errors import ConfigError, JobFatalError
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")
WEIGHT = "model.layers.0.mlp.up_proj.weight"
CPU = accelerators.get_accelerator("cpu")
FILE = "rank-00000.safetensors"          # the solo rank's part: every chunk of every tensor


@pytest.fixture(scope="module")
def job():
    return load_job(model=CONFIG, train=CONFIG)


@pytest.fixture(scope="module")
def pristine(job, tmp_path_factory):
    """Checkpoints of steps 1, 2 and 3 of a solo run; tests tamper with copies."""
    root = tmp_path_factory.mktemp("pristine")
    train_solo(CPU, job.model, with_checkpoints(job, root / "checkpoints", 1), str(root / "run"), steps=3)
    return root / "checkpoints"


@pytest.fixture
def root(pristine, tmp_path):
    copy = tmp_path / "checkpoints"
    shutil.copytree(pristine, copy, symlinks=True)
    return copy


def with_checkpoints(job, directory, every, **changes):
    return dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(directory), every), **changes)


def load(job, root):
    """(the checkpoint load() picks, its log lines)."""
    lines = []
    return ckpt.load(str(root), job.model, log=lines.append), lines


def trainer(job, train, run_dir, steps):
    """A solo Trainer whose log lines are kept in .lines (resumes in its constructor)."""
    lines = []
    comms = Comms.solo(Topology(single_chip_plan(job.model, train)), CPU.device(0))
    made = Trainer(comms, CPU, job.model, train, str(run_dir), steps=steps, log=lines.append)
    made.lines = lines
    return made


def edit_state(directory, **changes):
    path = directory / "state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def rehash(directory, file):
    """Recompute the hash of `file` in state.json, as a careful forger would."""
    path = directory / file
    edit_state(directory, files={**json.loads((directory / "state.json").read_text())["files"],
                                 file: {"bytes": path.stat().st_size, "sha256": ckpt.sha256(str(path))}})


def fallback_line(bad, good, why):
    return f"checkpoint {bad} is corrupt ({why}); resuming from {good}"


# -- tampered checkpoints fall back to the previous good one -------------------------

def test_edited_step_resumes_from_the_previous_checkpoint_with_its_weights(job, root, tmp_path):
    edit_state(root / "step-00000003", step=2)     # step 3's weights claiming to be step 2
    made = trainer(job, with_checkpoints(job, root, 1), tmp_path / "run", steps=4)
    assert made.start_step == 2
    assert made.lines[0] == fallback_line("step-00000003", "step-00000002",
                                          "state.json: step 2 does not match its folder step-00000003")
    step2 = ckpt.Checkpoint(str(root / "step-00000002"), job.model).tensor(WEIGHT)
    module_name = next(n for n in made.params if made.model.hf_name(n) == WEIGHT)
    assert torch.equal(made.params[module_name].detach(), step2)
    assert made.optimizer.steps == 2


@pytest.mark.parametrize("value", ["3", "abc", 3.0, True, None, 0, -1, 1 << 40])
def test_step_that_is_not_an_integer_in_range_falls_back(job, root, value):
    edit_state(root / "step-00000003", step=value)
    saved, lines = load(job, root)
    assert saved.step == 2
    assert lines == [fallback_line("step-00000003", "step-00000002",
                                   f"state.json: step is {value!r}, not an integer from 1 to {1 << 30}")]


def test_state_json_that_is_not_json_falls_back(job, root):
    (root / "step-00000003" / "state.json").write_text('{"step": 3,')
    saved, lines = load(job, root)
    assert saved.step == 2 and "state.json: not a readable checkpoint" in lines[0]


@pytest.mark.parametrize("forged_hash", [False, True])
def test_corrupt_safetensors_header_falls_back(job, root, forged_hash):
    folder = root / "step-00000003"
    target = folder / FILE
    data = bytearray(target.read_bytes())
    data[8:24] = b"{not a header!!!"              # the JSON header starts after its 8-byte length
    target.write_bytes(bytes(data))
    if forged_hash:
        rehash(folder, FILE)
    saved, lines = load(job, root)
    assert saved.step == 2 and len(lines) == 1
    why = "unreadable safetensors" if forged_hash else "checksum mismatch (corrupt or edited)"
    assert lines[0].startswith(f"checkpoint step-00000003 is corrupt ({FILE}: {why}")
    assert lines[0].endswith("; resuming from step-00000002")


@pytest.mark.parametrize("name,bad", [(WEIGHT, float("nan")), (f"exp_avg_sq.{WEIGHT}", float("inf"))])
def test_non_finite_tensor_with_a_valid_hash_falls_back(job, root, name, bad):
    file = FILE
    folder = root / "step-00000003"
    tensors = load_file(str(folder / file))
    tensors[name][0, 0] = bad
    save_file(tensors, str(folder / file))
    rehash(folder, file)
    saved, lines = load(job, root)
    assert saved.step == 2
    assert lines == [fallback_line("step-00000003", "step-00000002",
                                   f"{file}: {name} holds 1 non-finite value (nan or inf)")]


@pytest.mark.parametrize("change,why", [
    (lambda t: t.pop(WEIGHT), f"{FILE}: has no tensor {WEIGHT} (state.json lists it)"),
    (lambda t: t.update({WEIGHT: t[WEIGHT][:, :8].contiguous()}),
     f"{FILE}: {WEIGHT} has shape (128, 8), state.json says (128, 64)"),
    (lambda t: t.update({WEIGHT: t[WEIGHT].double()}), f"{FILE}: {WEIGHT} is torch.float64, state.json says "
                                                       "torch.float32"),
])
def test_tensor_of_the_wrong_name_shape_or_dtype_falls_back(job, root, change, why):
    folder = root / "step-00000003"
    tensors = load_file(str(folder / FILE))
    change(tensors)
    save_file(tensors, str(folder / FILE))
    rehash(folder, FILE)
    saved, lines = load(job, root)
    assert saved.step == 2
    assert lines == [fallback_line("step-00000003", "step-00000002", why)]


def _edit_tensor_meta(folder, name, **changes):
    tensors = json.loads((folder / "state.json").read_text())["tensors"]
    entry = tensors.pop(name)
    entry.update(changes.get("entry", {}))
    tensors[changes.get("rename", name)] = entry
    edit_state(folder, tensors=tensors)


@pytest.mark.parametrize("changes,why", [
    ({"rename": "model.layers.9.mlp.up_proj.weight"},
     "state.json: lists 'model.layers.9.mlp.up_proj.weight', which the model does not have"),
    ({"entry": {"shape": [128, 8]}}, f"state.json: {WEIGHT} has shape (128, 8), the model needs (128, 64)"),
    ({"entry": {"dtype": "float64"}}, f"state.json: {WEIGHT} is torch.float64, expected torch.float32 or "
                                      "torch.bfloat16 or torch.float16"),
    ({"entry": {"chunks": [{"offsets": [0, 0], "lengths": [64, 64], "file": FILE, "key": WEIGHT}]}},
     f"state.json: {WEIGHT}: its chunks do not cover it exactly"),
    ({"entry": {"chunks": [{"offsets": [0, 0], "lengths": [128, 64], "file": "rank-00007.safetensors",
                            "key": WEIGHT}]}}, f"state.json: {WEIGHT} has a chunk in a file it does not list"),
])
def test_metadata_of_the_wrong_name_shape_dtype_or_chunks_falls_back(job, root, changes, why):
    _edit_tensor_meta(root / "step-00000003", WEIGHT, **changes)
    saved, lines = load(job, root)
    assert saved.step == 2
    assert lines == [fallback_line("step-00000003", "step-00000002", why)]


def test_every_corrupt_checkpoint_is_skipped_and_each_named(job, root):
    edit_state(root / "step-00000003", step="x")
    (root / "step-00000002" / FILE).unlink()
    saved, lines = load(job, root)
    assert saved.step == 1
    assert lines == [
        fallback_line("step-00000003", "step-00000001", "state.json: step is 'x', not an integer from 1 to "
                                                        f"{1 << 30}"),
        fallback_line("step-00000002", "step-00000001", f"{FILE}: missing"),
    ]


def test_no_good_checkpoint_left_is_a_job_fatal_error(job, root):
    edit_state(root / "step-00000003", step="x")
    (root / "step-00000002" / "state.json").unlink()
    (root / "step-00000001" / FILE).write_bytes(b"\0" * 16)
    with pytest.raises(JobFatalError) as caught:
        load(job, root)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{root}: no good checkpoint left to resume from: ")
    assert "checkpoint step-00000003 is corrupt (state.json: step is 'x'" in message
    assert "checkpoint step-00000002 is corrupt (state.json: not a readable checkpoint" in message
    assert f"checkpoint step-00000001 is corrupt ({FILE}: checksum mismatch" in message
    assert message.endswith(f"remove {root / 'latest'} to start afresh")


def test_checkpoint_of_another_model_is_fatal_not_skipped(job, root):
    with pytest.raises(JobFatalError, match=r"step-00000003: checkpoint is for another model \(differs in hidden\)"):
        ckpt.load(str(root), dataclasses.replace(job.model, hidden=128), log=print)


def test_newer_folders_than_latest_are_not_considered(job, root):
    """A step folder beyond `latest` (renamed into place, pointer never written) is not resumed from,
    and the fallback only goes back in time."""
    (root / "latest").write_text(json.dumps({"step": 2, "dir": "step-00000002"}))
    saved, lines = load(job, root)
    assert saved.step == 2 and lines == []


# -- the latest pointer stays inside the checkpoint directory --------------------------

@pytest.mark.parametrize("pointer,why", [
    ({"step": 3, "dir": "../x"}, "names '../x', outside the checkpoint directory"),
    ({"step": 3, "dir": "step-00000003/../../x"}, "names 'step-00000003/../../x', outside the checkpoint directory"),
    ({"step": 3, "dir": "/etc"}, "names an absolute path '/etc', outside the checkpoint directory"),
    ({"step": 3, "dir": "step-00000002"}, "corrupt checkpoint pointer (step 3 does not match step-00000002)"),
    ({"step": 7, "dir": "step-00000007"}, "names step-00000007, which does not exist"),
    ({"dir": "step-00000003"}, 'corrupt checkpoint pointer (expected {"step": N, "dir": "step-NNNNNNNN"})'),
    ([3], 'corrupt checkpoint pointer (expected {"step": N, "dir": "step-NNNNNNNN"})'),
])
def test_pointer_outside_the_directory_is_refused(job, root, pointer, why):
    (root / "latest").write_text(json.dumps(pointer))
    saved, lines = load(job, root)
    assert saved.step == 3 and saved.directory == str(root / "step-00000003")
    assert lines == [f"checkpoint pointer {root / 'latest'} is invalid ({why}); resuming from step-00000003"]


def test_pointer_to_a_symlink_escaping_the_directory_is_refused(job, root, tmp_path, pristine):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(pristine / "step-00000003", elsewhere)
    edit_state(elsewhere, step=9)
    os.symlink(elsewhere, root / "step-00000009")
    (root / "latest").write_text(json.dumps({"step": 9, "dir": "step-00000009"}))
    saved, lines = load(job, root)
    assert saved.step == 3
    assert lines == [f"checkpoint pointer {root / 'latest'} is invalid (names step-00000009, which is a symbolic "
                     f"link (to {elsewhere})); resuming from step-00000003",
                     fallback_line("step-00000009", "step-00000003", f"is a symbolic link (to {elsewhere})")]


def test_symlinked_step_folder_is_skipped_in_the_fallback(job, root, tmp_path):
    shutil.move(str(root / "step-00000002"), str(tmp_path / "moved"))
    os.symlink(tmp_path / "moved", root / "step-00000002")
    edit_state(root / "step-00000003", step=1)
    saved, lines = load(job, root)
    assert saved.step == 1
    assert lines[1] == fallback_line("step-00000002", "step-00000001", f"is a symbolic link (to {tmp_path / 'moved'})")


def test_no_pointer_starts_afresh(job, root):
    (root / "latest").unlink()
    assert load(job, root) == (None, [])


# -- a non-finite loss or gradient norm stops before checkpointing ------------------------

def poison_loss(monkeypatch, at_step, value):
    """Make this rank's summed loss `value` at the 1-based step `at_step`."""
    original = Trainer._step_compute

    def patched(self, step, *args, **kwargs):        # the trainer also passes the backward's hook
        loss = original(self, step, *args, **kwargs)
        return value if step + 1 == at_step else loss

    monkeypatch.setattr(Trainer, "_step_compute", patched)


@pytest.mark.parametrize("value,what", [(float("nan"), "loss is nan"), (float("inf"), "loss is inf")])
def test_non_finite_loss_stops_before_the_checkpoint(job, tmp_path, monkeypatch, value, what):
    poison_loss(monkeypatch, 2, value)
    train = with_checkpoints(job, tmp_path / "checkpoints", 1)
    with pytest.raises(JobFatalError) as caught:
        train_solo(CPU, job.model, train, str(tmp_path / "run"), steps=3)
    assert str(caught.value) == f"step 2: {what}; stopping before checkpointing (train.on_nan: stop)"
    assert ckpt.latest(str(tmp_path / "checkpoints")).endswith("step-00000001")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000001"]


def test_non_finite_gradient_norm_stops_before_the_checkpoint(job, tmp_path, monkeypatch):
    original = GradientSync.local_sq_norm
    calls = []

    def patched(self):
        calls.append(1)
        return float("inf") if len(calls) == 2 else original(self)

    monkeypatch.setattr(GradientSync, "local_sq_norm", patched)
    train = with_checkpoints(job, tmp_path / "checkpoints", 1)
    with pytest.raises(JobFatalError, match=r"^step 2: gradient norm is inf; stopping before checkpointing "
                                            r"\(train.on_nan: stop\)$"):
        train_solo(CPU, job.model, train, str(tmp_path / "run"), steps=3)
    assert ckpt.latest(str(tmp_path / "checkpoints")).endswith("step-00000001")


def test_on_nan_skip_drops_that_steps_update_and_goes_on(job, tmp_path, monkeypatch):
    original = Trainer._step_compute

    def patched(self, step, *args, **kwargs):        # the trainer also passes the backward's hook
        loss = original(self, step, *args, **kwargs)
        if step + 1 == 2:
            self.params[next(iter(self.params))].grad.fill_(float("nan"))
        return loss

    monkeypatch.setattr(Trainer, "_step_compute", patched)
    train = with_checkpoints(job, tmp_path / "checkpoints", 2, on_nan="skip")
    made = trainer(job, train, tmp_path / "run", steps=4)
    made.run()
    assert "step 2: gradient norm is nan; skipping this step's update (train.on_nan: skip)" in made.lines
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3, 4]
    saved = ckpt.Checkpoint(ckpt.latest(str(tmp_path / "checkpoints")), job.model)   # finite, or it would raise
    assert saved.step == 4 and saved.optimizer_steps == 3
    resumed = trainer(job, train, tmp_path / "run", steps=5)
    assert resumed.start_step == 4 and resumed.optimizer.steps == 3


def test_non_finite_weights_are_never_checkpointed(job, tmp_path, monkeypatch):
    """Belt and braces: weights gone non-finite despite a finite loss still stop the save."""
    from hetero.engine.optimizer import AdamW

    original = AdamW.step

    def patched(self, grads, lr=None):
        original(self, grads, lr)
        if self.steps == 2:
            with torch.no_grad():
                self.params["model.norm.weight"][0] = float("nan")

    monkeypatch.setattr(AdamW, "step", patched)
    train = with_checkpoints(job, tmp_path / "checkpoints", 1)
    with pytest.raises(JobFatalError, match=r"^step 2: weights are not finite \(model.norm.weight on rank 0\); "
                                            r"stopping before checkpointing$"):
        train_solo(CPU, job.model, train, str(tmp_path / "run"), steps=3)
    assert ckpt.latest(str(tmp_path / "checkpoints")).endswith("step-00000001")


# -- a full disk while saving ------------------------------------------------------------

def full_disk(monkeypatch, code, target):
    """Make checkpoint writes raise OSError(code): `target` is "stage" (a rank's safetensors file,
    on its writer thread) or the name of the JSON file whose write fails (state.json, latest): that write
    leaves half a temporary file beside it, as a full disk would."""
    if target == "stage":
        def failing_save(path, chunks, hook=None):
            raise OSError(code, os.strerror(code), path)
        monkeypatch.setattr(writer, "write_safetensors", failing_save)
        return
    original = seal.write_json

    def failing_json(path, data):
        if os.path.basename(path) == target:
            with open(temporary_path(path), "w") as handle:
                handle.write("{half")
            raise OSError(code, os.strerror(code), path)
        original(path, data)

    monkeypatch.setattr(seal, "write_json", failing_json)


@pytest.mark.parametrize("code,target,what", [
    (errno.ENOSPC, "stage", "no space left on device"),
    (errno.ENOSPC, "state.json", "no space left on device"),
    (errno.ENOSPC, "latest", "no space left on device"),
    (errno.EDQUOT, "stage", "disk quota exceeded"),
])
def test_full_disk_while_saving_is_fatal_and_keeps_latest(job, root, tmp_path, monkeypatch, code, target, what):
    pointer_before = (root / "latest").read_text()
    made = trainer(job, with_checkpoints(job, root, 1), tmp_path / "run", steps=5)
    assert made.start_step == 3
    full_disk(monkeypatch, code, target)
    with pytest.raises(JobFatalError) as caught:
        made.run()
    assert str(caught.value) == (f"{root}: {what} while writing checkpoint step-00000004 (latest is still step 3); "
                                 "free space there and restart")
    assert (root / "latest").read_text() == pointer_before
    assert sorted(os.listdir(root)) == ["latest", "step-00000001", "step-00000002", "step-00000003"]


def test_other_write_errors_still_propagate(job, root, tmp_path, monkeypatch):
    made = trainer(job, with_checkpoints(job, root, 1), tmp_path / "run", steps=4)
    full_disk(monkeypatch, errno.EIO, "stage")
    with pytest.raises(OSError) as caught:
        made.run()
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, JobFatalError)


# -- train.on_nan ------------------------------------------------------------------------

def train_file(tmp_path, extra):
    path = tmp_path / "train.yaml"
    path.write_text("train:\n  global_batch: 8\n  micro_batch: 2\n  steps: 3\n  lr: 0.01\n" + extra)
    return str(path)


def test_on_nan_defaults_to_stop_and_accepts_skip(tmp_path):
    assert load_job(train=train_file(tmp_path, "")).train.on_nan == "stop"
    assert load_job(train=train_file(tmp_path, "  on_nan: skip\n")).train.on_nan == "skip"


@pytest.mark.parametrize("line,message", [
    ("  on_nan: skp\n", "train.on_nan (line 6): expected one of stop, skip, got 'skp' (a string); did you mean 'skip'?"),
    ("  on_nan: true\n", "train.on_nan (line 6): expected one of stop, skip, got true (a boolean)"),
    ("  on_nam: skip\n", "unknown field 'on_nam'; did you mean 'on_nan'?"),
])
def test_on_nan_typos_name_the_field(tmp_path, line, message):
    path = train_file(tmp_path, line)
    with pytest.raises(ConfigError) as caught:
        load_job(train=path)
    assert str(caught.value).startswith(f"{path}: ") and str(caught.value).endswith(message)
