"""Two stages of one island, two processes on the strict NCCL-rules backend (hetero-strict):
1F1B and a tied-gradient swap, where both stages send to each other at once, complete and
carry the right numbers (the old isend + blocking recv order is reported as a deadlock there).
Spawned, not forked: a fork after torch's thread pools started can hang in the child."""

import datetime
import multiprocessing
import os
import queue
import types

import pytest
import torch
from tests.conftest import free_port

pytestmark = pytest.mark.timeout(120)
MICRO_BATCHES, SEQ, HIDDEN = 4, 16, 4096        # 256 KiB messages: past any eager-send buffer


class Scale(torch.nn.Module):
    """y = s * x; loss = sum(y * labels). With x = labels = 1 and s = 2 on both stages, each
    scale's gradient is 2 * HIDDEN: the numbers only come out if activations and gradients
    crossed intact."""

    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.s

    @staticmethod
    def loss(out, labels, reduction="sum"):
        return (out * labels).sum()


def two_stage_trainer(rank: int):
    from hetero.engine.schedule import one_f_one_b
    from hetero.engine.metrics import ChipClock, MetricsRecorder
    from hetero.engine.precision import LossScaler
    from hetero.engine.trainer import Trainer
    from hetero.engine.transport import NativeTransport, StageLink

    native = NativeTransport(types.SimpleNamespace(world_rank=lambda r: r), torch.device("cpu"))
    trainer = object.__new__(Trainer)
    trainer.place = types.SimpleNamespace(micro_batch=1, micro_batch_size=lambda mb: 1, first_sample=0,
                                          is_first=rank == 0, is_last=rank == 1, tp_rank=0)
    trainer.model_config = types.SimpleNamespace(seq_len=SEQ, hidden=HIDDEN)
    trainer.train = types.SimpleNamespace(global_batch=MICRO_BATCHES)
    trainer.schedule = one_f_one_b(rank, 2, MICRO_BATCHES)
    link = StageLink(native, 0, 1, None, [1 - rank])
    trainer.prev, trainer.next = (None, link) if rank == 0 else (link, None)
    trainer.comms = types.SimpleNamespace(device=torch.device("cpu"), batch=native.batch, flush=native.flush)
    trainer.accel = types.SimpleNamespace(synchronize=lambda: None)
    trainer.data = types.SimpleNamespace(batch=lambda step, first, size: (torch.ones(size, SEQ, HIDDEN),
                                                                         torch.ones(size, SEQ, HIDDEN)))
    trainer.model = Scale()
    trainer.dtype = torch.float32
    trainer.clock = ChipClock()
    trainer.metrics = MetricsRecorder(None, 0, trainer.clock)
    trainer.scaler = LossScaler(enabled=False)
    return trainer, native, link


def member(rank: int, port: int, results) -> None:
    """Child: join a world of 2 on loopback, run one 1F1B step and a tied swap, report numbers."""
    import torch.distributed as dist

    from hetero.launch.store import loopback_store

    import accelerators.strict_backend as strict

    os.environ["HETERO_STRICT_TIMEOUT"] = "60"     # a stuck pair is reported well within the test's wait
    strict.register()
    strict.set_device_tensor_predicate(lambda tensor: True)   # host tensors are this test's device
    dist.init_process_group(strict.BACKEND_NAME, store=loopback_store(port, rank, 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        trainer, native, link = two_stage_trainer(rank)
        loss = trainer._step_compute(0)
        native.flush()
        mine = torch.full((1 << 18,), float(rank + 1))
        other = link.exchange(mine, tag=99)          # both ranks send to each other at once
        native.flush()
        results.put((rank, float(trainer.model.s.grad), loss, float(other.min()), float(other.max())))
    except BaseException as exc:   # the parent reports it
        results.put((rank, repr(exc)))
        raise
    finally:
        dist.destroy_process_group()


def test_two_stages_exchange_both_ways_without_deadlock():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=member, args=(rank, port, results), daemon=True) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        got = {}
        for _ in range(2):
            item = results.get(timeout=90)
            got[item[0]] = item[1:]
    except queue.Empty:
        pytest.fail("the two stages did not finish: a deadlock")
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert all(len(v) == 4 for v in got.values()), got
    (grad0, _, lo0, hi0), (grad1, loss1, lo1, hi1) = got[0], got[1]
    assert grad0 == grad1 == 2.0 * HIDDEN
    assert loss1 == pytest.approx(MICRO_BATCHES * 4.0 * SEQ * HIDDEN)
    assert (lo0, hi0, lo1, hi1) == (2.0, 2.0, 1.0, 1.0)
