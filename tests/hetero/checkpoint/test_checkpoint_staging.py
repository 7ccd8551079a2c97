"""Staging buffers (hetero.checkpoint.staging): a save copies into the same host buffers every time
(no fresh pages to fault in while training waits), never while a writer still streams them; and a
checkpoint loaded under another layout then saved again by it is the same checkpoint, bit for bit
(the state a resume under another plan starts from is exactly the state that was saved)."""

import os
import threading

import pytest
import torch

from hetero.bench.checkpoint import random_state, rank_optimizer
from hetero.checkpoint import writer
from hetero.config import load_job
from hetero.engine import checkpoint as ckpt
from hetero.model import TensorParallel, layout
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")


@pytest.fixture(scope="module")
def model():
    return load_job(model=CONFIG, train=CONFIG).model


@pytest.fixture(scope="module")
def full(model):
    return random_state(model, seed=11)


def save(root, model, ranks, step, staging=None):
    """Checkpoint `step` from {rank: optimizer} through `staging` ({rank: Staging}, fresh if None)."""
    staging = staging or {rank: ckpt.Staging() for rank in ranks}
    ckpt.prepare(str(root), step)
    for rank, made in ranks.items():
        chunks = made.own_chunks(staging[rank].begin().copy, list(made.params))
        staging[rank].finish()
        write = ckpt.AsyncWrite(ckpt.partial_dir(str(root), step), rank, step, chunks, staging=staging[rank])
        assert write.start().wait() is None
    ckpt.seal(str(root), step, model, {"optimizer_steps": step}, sorted(ranks))
    return ckpt.Checkpoint(ckpt.latest(str(root)), model)


def test_saves_reuse_the_buffers_and_write_what_the_state_is_at_each(model, full, tmp_path):
    names = layout.model_names(model)
    ranks = {2 * d + t: rank_optimizer(model, full, names, TensorParallel(2, t), 2, d, zero=True)
             for d in range(2) for t in range(2)}
    staging = {rank: ckpt.Staging() for rank in ranks}
    first = save(tmp_path, model, ranks, 1, staging)
    buffers = [b.data_ptr() for b in staging[3]._buffers]
    data = os.path.getsize(os.path.join(first.directory, ckpt.data_file(3))) - _header(first)
    assert data <= staging[3].nbytes < data * 1.02      # about the shard (flat vectors hold its padding too)
    with torch.no_grad():
        ranks[3].exp_avg.add_(1.0)                       # training moves on
    second = save(tmp_path, model, ranks, 2, staging)
    assert [b.data_ptr() for b in staging[3]._buffers] == buffers       # the same pages, no new ones
    name, box = next((name, (o, n)) for name in first.names() if name.startswith("exp_avg.")
                     for where, o, n in first.tensors_meta[name][2] if where["file"] == ckpt.data_file(3))
    assert torch.equal(second.read(name, *box), first.read(name, *box) + 1.0)   # step 1's file kept its bits
    assert torch.equal(first.tensor(name), full[name])


def _header(saved) -> int:
    with open(os.path.join(saved.directory, ckpt.data_file(3)), "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_buffers_are_not_reused_while_a_writer_streams_them(model, full, tmp_path, monkeypatch):
    made = rank_optimizer(model, full, layout.model_names(model), TensorParallel())
    staging = ckpt.Staging()
    chunks = made.own_chunks(staging.begin().copy, list(made.params))
    staging.finish()
    streaming, go_on = threading.Event(), threading.Event()
    real = writer.write_safetensors

    def slow(*args, **kwargs):
        streaming.set()
        go_on.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "write_safetensors", slow)
    write = ckpt.AsyncWrite(str(tmp_path / "part"), 0, 1, chunks, staging=staging).start()
    assert streaming.wait(30)
    with pytest.raises(ckpt.StagingBusy, match="still being written"):
        staging.begin()
    go_on.set()
    assert write.wait() is None
    staging.begin()                                       # the writer is done: the buffers are free


def test_a_shape_change_remakes_only_that_buffer_and_unused_ones_go():
    staging = ckpt.Staging()
    for tensor in (torch.ones(4), torch.ones(2, 3), torch.ones(5)):
        staging.copy(tensor)
    staging.finish()
    kept = staging._buffers[0].data_ptr()
    staging.begin()
    assert torch.equal(staging.copy(torch.full((4,), 7.0)), torch.full((4,), 7.0))
    assert staging._buffers[0].data_ptr() == kept
    assert staging.copy(torch.zeros(3, 2, dtype=torch.float64)).dtype == torch.float64
    staging.finish()
    assert [tuple(b.shape) for b in staging._buffers] == [(4,), (3, 2)]


@pytest.mark.parametrize("reader_layout", ["tp1-two-stages", "tp1-zero3-bf16-master"])
def test_loaded_under_another_layout_and_saved_again_is_the_same_checkpoint(model, full, tmp_path, reader_layout):
    names = layout.model_names(model)
    saver = {2 * d + t: rank_optimizer(model, full, names, TensorParallel(2, t), 2, d, zero=True)
             for d in range(2) for t in range(2)}
    original = save(tmp_path / "tp2-zero", model, saver, 4)
    if reader_layout == "tp1-two-stages":        # TP 2 -> 1, ZeRO-1 on -> off, pipeline of two stages
        readers = {0: rank_optimizer(model, full, names[:10], TensorParallel()),
                   1: rank_optimizer(model, full, names[10:], TensorParallel())}
    else:                                        # ZeRO-1 over 3, bf16 weights, fp32 master shards
        readers = {d: rank_optimizer(model, full, names, TensorParallel(), 3, d, zero=True, dtype=torch.bfloat16)
                   for d in range(3)}
    other = random_state(model, seed=12)         # the readers start from other numbers: all must be loaded
    for made in readers.values():
        made.load_part(_part(made, other), 0, lambda t: t, _Nothing)
        made.load_part(made.read_part(original), original.optimizer_steps, lambda t: t, _Nothing)
        assert made.steps == 4
    again = save(tmp_path / "reader", model, readers, 4)
    assert sorted(again.names()) == sorted(original.names())
    for name in original.names():
        assert again.tensors_meta[name][:2] == original.tensors_meta[name][:2], name      # shape, dtype
        assert torch.equal(again.tensor(name), original.tensor(name)), name


def _part(made, state) -> dict:
    """`made`'s part of a full state {name: tensor}, in read_part's form (TP slices; flat pieces)."""
    class Full:
        @staticmethod
        def read(name, offsets, lengths):
            return state[name][tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
    return made.read_part(Full)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_copies_inside_a_device_scope_stay_host_memory_outside_its_modes():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Device(TorchDispatchMode):      # an emulated chip's scope: every op inside it is the chip's
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            raise AssertionError(f"{func} ran as a device op")

    staging, source = ckpt.Staging(), torch.arange(6.0).reshape(2, 3)
    with Device():
        copied = staging.begin().copy(source)
    assert torch.equal(copied, source) and copied.data_ptr() != source.data_ptr()
