"""The engine under NCCL's and HCCL's rules, checked on CPU.

- island collectives get device tensors (device memory: what the accelerator's copy API made);
- 1F1B never issues a receive while its own unmatched send to that peer is queued ahead
  of it (NCCL runs a pair's operations in order): sends and the next receive go out batched;
- the hetero-DP gradient sum streams fixed-size buckets (exact fp32 sum, no buffer over
  the bucket size);
- bridge sends stage device->host copies through the accelerator, non-blocking.
"""

import contextlib
import threading
import types

import pytest
import torch
import torch.distributed as dist

from comm_bridge.allreduce import lane_all_reduce
from comm_bridge.channel import Endpoint
from hetero.engine import buckets as buckets_module
from hetero.engine.comms import Comms
from hetero.engine.metrics import ChipClock, MetricsRecorder
from hetero.engine.precision import LossScaler
from hetero.engine.schedule import one_f_one_b
from hetero.engine.topology import Topology
from hetero.engine.buckets import GradBuckets, GradShard, grad_bucket_elements
from hetero.engine.trainer import Trainer
from hetero.engine.transport import BridgeTransport, NativeTransport, StageLink
from hetero.errors import UserError
from hetero.model import layout
from hetero.config.model import ModelConfig
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan

pytestmark = pytest.mark.timeout(60)
TOKEN = "nccl-rules-token"


def dp2_plan() -> Plan:
    """Two ranks of one island, DP 2: a fleet-wide sum runs on the island's backend alone."""
    stage = StagePlan(0, 0, "wide", "cpu", 1, 2, (0, 1), "none", 0, 0.1, 0.0)
    return Plan(kind="pipeline", cluster="c", model="m", dtype="fp32", layers=1, heads=1, kv_heads=1,
                global_batch=4, micro_batch=1, num_micro_batches=2, recompute="none", zero1=False,
                stages=(stage,), pipelines=(PipelinePlan(0, (0,), 2, 1, 2),),
                ranks=tuple(RankPlan(r, "wide", r, 0, 0, 0, 0, r) for r in range(2)),
                predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


@pytest.fixture
def one_rank_world():
    """A gloo world of one process (in-memory store): the island collectives run for real."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------- 1. device tensors
class DeviceMemory:
    """An accelerator stand-in whose device memory is what its copy API made (like the emulated
    chip's ledger, without its start-up cost). `float64` says whether the device computes in it."""
    device_type = "cpu"

    def __init__(self, float64=True):
        self.float64 = float64
        self.storages = set()

    def device(self, index=None):
        return torch.device("cpu")

    def holds(self, tensor):
        return tensor.untyped_storage().data_ptr() in self.storages

    def to_device(self, tensor, non_blocking=False):
        copy = tensor.clone()
        self.storages.add(copy.untyped_storage().data_ptr())
        return copy

    def to_host(self, tensor, non_blocking=False):
        assert self.holds(tensor), "to_host of a tensor that is not in device memory"
        return tensor.clone()

    def supports_dtype(self, dtype):
        return self.float64 or dtype != torch.float64


@pytest.mark.parametrize("float64", [True, False])
def test_fleet_sum_hands_the_island_backend_device_tensors_only(one_rank_world, monkeypatch, float64):
    chip = DeviceMemory(float64)
    comms = Comms(Topology(dp2_plan()), 0, chip.device(0), chip)
    seen = []
    real = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):   # NCCL/HCCL refuse host memory
        seen.append((chip.holds(tensor), tensor.dtype))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    total = comms.fleet_sum(torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert seen == [(True, torch.float64 if float64 else torch.float32)]
    assert total.dtype == torch.float64 and total.tolist() == [1.5, 2.0]
    assert not chip.holds(total)                      # the caller gets host memory back


# ------------------------------------------------------------- 2. batched point-to-point
class RecordingP2P:
    """Stands in for torch.distributed's point-to-point, one rank's view, with NCCL's pair rule:
    a pair's operations run in issue order, and the ops of one batch run together. It records
    every receive that must wait on an earlier, still unmatched send of this rank to the same peer."""

    def __init__(self):
        self.units = []          # [(kind, peer)] per issued unit
        self.open_sends = {}     # peer -> number of sends in units not yet known complete
        self.violations = []
        self.tags = []           # every tag this rank passed

    class Work:
        def __init__(self, owner, unit):
            self.owner, self.unit = owner, unit

        def wait(self):
            for kind, peer in self.unit:     # a batch completes as a whole (NCCL group)
                if kind == "send":
                    self.owner.open_sends[peer] -= 1

    def _issue(self, unit, blocking=False):
        sends_here = {peer for kind, peer in unit if kind == "send"}
        for kind, peer in unit:
            if kind == "recv" and self.open_sends.get(peer, 0) and peer not in sends_here:
                self.violations.append(f"recv from {peer} issued behind an unmatched send to {peer}")
        self.units.append(unit)
        for kind, peer in unit:
            if kind == "send":
                self.open_sends[peer] = self.open_sends.get(peer, 0) + 1
        work = self.Work(self, unit)
        if blocking:
            work.wait()
        return work

    def install(self, monkeypatch):
        def isend(tensor, dst, group=None, tag=0):
            self.tags.append(tag)
            return self._issue([("send", dst)])

        def irecv(tensor, src=None, group=None, tag=0):
            self.tags.append(tag)
            return self._issue([("recv", src)])

        def recv(tensor, src=None, group=None, tag=0):
            self.tags.append(tag)
            self._issue([("recv", src)], blocking=True)
            return src

        def batch_isend_irecv(ops):
            work = self._issue([("send" if op.op is isend else "recv", op.peer) for op in ops])
            return [work] * len(ops)

        recorder = self

        class P2POp:
            def __init__(self, op, tensor, peer, group=None, tag=0):
                recorder.tags.append(tag)
                self.op = isend if op is dist.isend else irecv
                self.tensor, self.peer = tensor, peer

        for name, fn in (("isend", isend), ("irecv", irecv), ("recv", recv),
                         ("batch_isend_irecv", batch_isend_irecv), ("P2POp", P2POp)):
            monkeypatch.setattr(dist, name, fn)


class Doubler(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return x * self.scale


def middle_stage(num_stages=4, position=1, micro_batches=4):
    """A Trainer reduced to what one step of 1F1B needs, for a middle stage whose neighbours share
    its island (ranks position-1 and position+1 of an identity topology)."""
    config = types.SimpleNamespace(seq_len=3, hidden=2)
    native = NativeTransport(types.SimpleNamespace(world_rank=lambda r: r), torch.device("cpu"))
    trainer = object.__new__(Trainer)
    trainer.place = types.SimpleNamespace(micro_batch=1, micro_batch_size=lambda mb: 1, first_sample=0, is_first=False,
                                          is_last=False, tp_rank=0)
    trainer.model_config = config
    trainer.train = types.SimpleNamespace(global_batch=micro_batches)
    trainer.schedule = one_f_one_b(position, num_stages, micro_batches)
    trainer.prev = StageLink(native, 0, 1, None, [position - 1])
    trainer.next = StageLink(native, 0, 1, None, [position + 1])
    trainer.comms = types.SimpleNamespace(device=torch.device("cpu"), batch=native.batch, flush=native.flush)
    trainer.accel = types.SimpleNamespace(synchronize=lambda: None)
    trainer.model = Doubler()
    trainer.dtype = torch.float32
    trainer.clock = ChipClock()
    trainer.metrics = MetricsRecorder(None, 0, trainer.clock)
    trainer.scaler = LossScaler(enabled=False)
    return trainer, native


def test_1f1b_never_receives_behind_its_own_unmatched_send(monkeypatch):
    p2p = RecordingP2P()
    p2p.install(monkeypatch)
    trainer, native = middle_stage()
    trainer._step_compute(0)
    native.flush()
    assert p2p.units, "the stage exchanged nothing"
    assert p2p.violations == []
    # every send to the next stage that precedes a receive from it travels in one batch with it
    paired = [u for u in p2p.units if ("send", 2) in u and ("recv", 2) in u]
    assert paired, p2p.units


def test_tied_gradient_swap_is_one_batch(monkeypatch):
    p2p = RecordingP2P()
    p2p.install(monkeypatch)
    native = NativeTransport(types.SimpleNamespace(world_rank=lambda r: r), torch.device("cpu"))
    link = StageLink(native, 0, 1, None, [5])
    got = link.exchange(torch.ones(4, 4), tag=7)
    native.flush()
    assert p2p.units == [[("recv", 5), ("send", 5)]]
    assert p2p.violations == [] and tuple(got.shape) == (4, 4)


def test_native_point_to_point_ignores_tags(monkeypatch):
    p2p = RecordingP2P()
    p2p.install(monkeypatch)
    native = NativeTransport(types.SimpleNamespace(world_rank=lambda r: r), torch.device("cpu"))
    native.isend(torch.ones(2), 1, tag=41)
    native.irecv((2,), torch.float32, 1, tag=42).wait()
    native.flush()
    assert p2p.tags == [0, 0]    # NCCL matches in issue order; so must gloo here


# ------------------------------------------------------------- 3. gradient buckets
def micro_config(**extra):
    return ModelConfig(name="micro", layers=2, hidden=8, heads=2, kv_heads=1, ffn_hidden=16, vocab=12,
                       seq_len=4, **extra)


def replica_grads(config, seed):
    gen = torch.Generator().manual_seed(seed)
    return {hf: torch.randn(layout.full_shape(config, hf), generator=gen) for hf in layout.model_names(config)}


def tp_shards(config, full, tp):
    """Every TP rank's GradShard dict for a replica holding `full` split `tp` ways."""
    ranks = []
    for rank in range(tp):
        shards = {}
        for hf, grad in full.items():
            dim = layout.split_dim(hf)
            if dim is None or tp == 1:
                shards[hf] = [GradShard(grad.clone(), None, rank == 0)]
                continue
            each = grad.shape[dim] // tp
            piece = grad.narrow(dim, rank * each, each).clone()
            shards[hf] = [GradShard(piece, (dim, rank * each, (rank + 1) * each), True)]
        ranks.append(shards)
    return ranks


def run_buckets(config, ranks, capacity):
    """Every rank cuts the same buckets and sums them through a shared, thread-barrier fleet sum."""
    buckets = GradBuckets(config, capacity)
    barrier = threading.Barrier(len(ranks))
    posted, sizes, errors = {}, [], []

    def member(index, shards):
        def sum_bucket(bucket, number):
            sizes.append(bucket.numel())
            posted[index] = bucket.clone()
            barrier.wait(10)
            total = posted[0].clone()
            for other in range(1, len(ranks)):
                total += posted[other]
            barrier.wait(10)
            bucket.copy_(total)
        try:
            buckets.all_reduce(shards, sum_bucket, torch.device("cpu"))
        except BaseException as exc:   # surfaces in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=member, args=(i, s)) for i, s in enumerate(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    return buckets, sizes


@pytest.mark.parametrize("capacity", [16, 100, 10_000_000])
def test_gradient_buckets_sum_exactly_what_a_full_vector_would(capacity):
    config = micro_config()
    first, second = replica_grads(config, 1), replica_grads(config, 2)
    ranks = tp_shards(config, first, 2) + tp_shards(config, second, 1)   # islands of 2 and 1
    buckets, sizes = run_buckets(config, ranks, capacity)
    widest_row = max(torch.Size(layout.full_shape(config, hf))[1:].numel() for hf in layout.model_names(config))
    assert max(sizes) <= max(capacity, widest_row)
    if capacity < 1000:
        assert len(buckets.buckets) > 5
    for rank in ranks:
        for hf, shards in rank.items():
            want = first[hf] + second[hf]      # what one full-model fp32 vector summed
            shard = shards[0]
            if shard.part is not None:
                dim, start, stop = shard.part
                want = want.narrow(dim, start, stop - start)
            assert torch.equal(shard.grad, want), hf


def test_tied_lm_head_is_a_second_copy_of_the_embedding_in_the_buckets():
    config = micro_config(tie_embeddings=True)
    grads = [replica_grads(config, s) for s in (3, 4)]
    ranks = []
    for full in grads:
        shards = {hf: [GradShard(g.clone(), None, True)] for hf, g in full.items()}
        shards[layout.EMBED].append(GradShard(torch.zeros_like(full[layout.EMBED]), None, False))  # tied head
        ranks.append(shards)
    run_buckets(config, ranks, 40)
    want = grads[0][layout.EMBED] + grads[1][layout.EMBED]
    for shards in ranks:
        assert all(torch.equal(s.grad, want) for s in shards[layout.EMBED])


def test_bucket_size_comes_from_the_environment_and_bad_values_are_one_line():
    assert grad_bucket_elements({}) == 25_000_000 // 4
    assert grad_bucket_elements({"HETERO_GRAD_BUCKET_MB": "0.004"}) == 1000
    with pytest.raises(UserError, match="HETERO_GRAD_BUCKET_MB='lots'.*positive number of MB"):
        grad_bucket_elements({"HETERO_GRAD_BUCKET_MB": "lots"})
    with pytest.raises(UserError):
        grad_bucket_elements({"HETERO_GRAD_BUCKET_MB": "-1"})


class StagedSum:
    """A two-phase bucket sum (like Comms.bucket_sum): `start` takes the bucket's bytes at once
    (its island phase and staging), `finish` returns the fleet total. Records the order of the
    calls, the storage each started bucket lived in, and how many were in flight at most."""

    def __init__(self, index, ranks, posted, barrier, log):
        self.index, self.ranks, self.posted, self.barrier, self.log = index, ranks, posted, barrier, log
        self.storages, self.in_flight, self.most_in_flight = set(), 0, 0

    def start(self, bucket, number):
        self.storages.add(bucket.untyped_storage().data_ptr())
        self.posted[(self.index, number)] = bucket.clone()   # what staging to host memory copies
        self.log.append(("start", number))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return types.SimpleNamespace(finish=lambda out: self._finish(number, out))

    def _finish(self, number, out):
        self.log.append(("finish", number))
        self.in_flight -= 1
        self.barrier.wait(10)
        total = sum(self.posted[(r, number)] for r in range(self.ranks))
        out.copy_(total)    # the island gather lands in the caller's buffer
        return out


def test_bucket_rounds_overlap_next_buckets_are_started_before_one_is_finished():
    """The pipelined rounds: buckets k+1.. are filled and started in the same device buffer before
    bucket k is finished (double buffering through its staged copy), at most BUCKETS_AHEAD + 1 in
    flight, and the sums stay exact."""
    config = micro_config()
    first, second = replica_grads(config, 1), replica_grads(config, 2)
    ranks = tp_shards(config, first, 2) + tp_shards(config, second, 1)
    buckets = GradBuckets(config, 100)
    count = len(buckets.buckets)
    assert count > buckets_module.BUCKETS_AHEAD + 2
    posted, barrier, errors = {}, threading.Barrier(len(ranks)), []
    logs = [[] for _ in ranks]
    summers = [StagedSum(i, len(ranks), posted, barrier, logs[i]) for i in range(len(ranks))]

    def member(index, shards):
        try:
            buckets.all_reduce(shards, summers[index], torch.device("cpu"))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=member, args=(i, s)) for i, s in enumerate(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    ahead = buckets_module.BUCKETS_AHEAD
    for log, summer in zip(logs, summers):
        assert sorted(log) == sorted([("start", k) for k in range(count)] + [("finish", k) for k in range(count)])
        assert [k for op, k in log if op == "finish"] == list(range(count))
        assert log.index(("start", 1)) < log.index(("finish", 0))          # bucket 1 filled while 0 is out
        assert log.index(("start", ahead + 1)) > log.index(("finish", 0))  # no further than BUCKETS_AHEAD
        assert summer.most_in_flight == ahead + 1
        assert len(summer.storages) == 1                                   # one device buffer
    expected = {hf: first[hf] + second[hf] for hf in first}
    for rank_shards in ranks:
        for hf, shard_list in rank_shards.items():
            for shard in shard_list:
                full = expected[hf]
                if shard.part is not None:
                    dim, lo, hi = shard.part
                    full = full.narrow(dim, lo, hi - lo)
                assert torch.allclose(shard.grad, full, atol=1e-6), hf


def test_pipelined_bucket_sums_over_the_bridge_refill_the_buffer_safely():
    """Three one-rank islands sum buckets through the real bridge ring, started ahead (start_lane):
    a started bucket's buffer is refilled at once, so staging must copy it out, never alias it."""
    from comm_bridge.allreduce import start_lane

    config = micro_config()
    grads = [replica_grads(config, seed) for seed in (1, 2, 3)]
    ranks = [tp_shards(config, g, 1)[0] for g in grads]
    buckets = GradBuckets(config, 100)
    endpoints = [Endpoint(r, TOKEN, shm=False, default_timeout=20) for r in range(3)]
    try:
        for endpoint in endpoints:
            endpoint.add_peers([e.address() for e in endpoints])
        copies = [HostCopies(), HostCopies(), None]    # None: plain torch, whose .to("cpu") aliases
        errors = []

        def member(r):
            summer = types.SimpleNamespace(start=lambda bucket, index: start_lane(
                bucket, endpoints[r], [0, 1, 2], 0, timeout=20, accelerator=copies[r]))
            try:
                buckets.all_reduce(ranks[r], summer, torch.device("cpu"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        for shards in ranks:
            for hf, (shard,) in shards.items():
                assert torch.allclose(shard.grad, grads[0][hf] + grads[1][hf] + grads[2][hf], atol=1e-5), hf
        assert all(len(c.sizes) == len(buckets.buckets) for c in copies[:2])   # one staging per bucket
    finally:
        for endpoint in endpoints:
            endpoint.close()


class HostCopies:
    """An accelerator stand-in that records every device->host staging it is asked for."""
    device_type = "cpu"

    def __init__(self):
        self.sizes = []
        self.lock = threading.Lock()

    def to_host(self, tensor, non_blocking=False):
        with self.lock:
            self.sizes.append(tensor.numel())
        return tensor.detach().clone()


def test_islands_of_different_sizes_ring_only_the_bucket_through_host_memory():
    """Three one-rank islands (no native world): each holder stages exactly its bucket, no more."""
    endpoints = [Endpoint(r, TOKEN, shm=False, default_timeout=20) for r in range(3)]
    try:
        for endpoint in endpoints:
            endpoint.add_peers([e.address() for e in endpoints])
        buckets = [torch.full((50,), float(r + 1)) for r in range(3)]
        copies = [HostCopies() for _ in range(3)]
        errors = []

        def member(r):
            try:
                lane_all_reduce(buckets[r], endpoints[r], [0, 1, 2], 0, timeout=20, accelerator=copies[r])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=member, args=(r,)) for r in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        assert all(torch.equal(b, torch.full((50,), 6.0)) for b in buckets)
        assert [c.sizes for c in copies] == [[50], [50], [50]]
    finally:
        for endpoint in endpoints:
            endpoint.close()


# ------------------------------------------------------------- 4. bridge staging
class StreamRecorder:
    """An accelerator with streams and events, recording how a send is staged to host."""
    device_type = "cpu"

    def __init__(self):
        self.calls = []
        self.active = None

    def new_stream(self, priority=0):
        return types.SimpleNamespace(name="side", wait_stream=lambda other: None)

    def current_stream(self, index=None):
        return types.SimpleNamespace(name="compute", wait_stream=lambda other: None)

    def stream(self, stream):
        recorder = self

        class Scope:
            def __enter__(self):
                recorder.active = stream.name

            def __exit__(self, *exc):
                recorder.active = None
        return Scope()

    def to_host(self, tensor, non_blocking=False):
        self.calls.append(("to_host", non_blocking, self.active))
        return tensor.detach().clone()

    def new_event(self, enable_timing=True):
        recorder = self

        class Event:
            def record(self, stream=None):
                recorder.calls.append(("event", getattr(stream, "name", None)))

            def query(self):
                return True

            def synchronize(self):
                pass
        return Event()

    def to_device(self, tensor, non_blocking=False):
        self.calls.append(("to_device", tuple(tensor.shape)))
        return tensor.clone()


def test_bridge_sends_stage_through_the_accelerator_without_a_blocking_copy(monkeypatch):
    sender_accel, receiver_accel = StreamRecorder(), StreamRecorder()
    sender = Endpoint(0, TOKEN, shm=False, default_timeout=20, accelerator=sender_accel)
    receiver = Endpoint(1, TOKEN, shm=False, default_timeout=20, accelerator=receiver_accel)
    try:
        for endpoint in (sender, receiver):
            endpoint.add_peers([sender.address(), receiver.address()])
        outgoing = BridgeTransport(sender, torch.device("cpu"), 20, sender_accel)
        incoming = BridgeTransport(receiver, torch.device("cpu"), 20, receiver_accel)
        ahead = [incoming.irecv((3, 4), torch.float32, 0, tag=mb) for mb in range(2)]   # posted before any send

        def no_blocking_copy(self, *args, **kwargs):
            raise AssertionError("a synchronous .cpu() copy in the bridge's send path")

        monkeypatch.setattr(torch.Tensor, "cpu", no_blocking_copy)
        payloads = [torch.arange(12.0).view(3, 4) * (mb + 1) for mb in range(2)]
        for mb, payload in enumerate(payloads):
            outgoing.isend(payload, 1, tag=mb)
        got = [pending.wait() for pending in ahead]
        outgoing.flush()
        assert all(torch.equal(g, p) for g, p in zip(got, payloads))
        assert sender_accel.calls[:2] == [("to_host", True, "side"), ("event", "side")]
        assert receiver_accel.calls == [("to_device", (3, 4))] * 2
    finally:
        sender.close()
        receiver.close()


def test_bucket_layout_is_the_same_on_every_rank_and_covers_the_model_once():
    config = micro_config()
    a, b = GradBuckets(config, 37), GradBuckets(config, 37)
    assert a.buckets == b.buckets
    covered = {}
    for bucket in a.buckets:
        for piece in bucket:
            covered.setdefault(piece.hf, []).append((piece.start, piece.stop))
    for hf in layout.model_names(config):
        rows = layout.full_shape(config, hf)[0]
        spans = sorted(covered[hf])
        assert spans[0][0] == 0 and spans[-1][1] == rows
        assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    assert buckets_module.DEFAULT_GRAD_BUCKET_MB >= 10


def test_the_bucket_shrinks_to_fit_the_tightest_rank_and_every_rank_agrees():
    """A 25 MB bucket on a 20 MB emulated chip would be an out-of-memory error: the bucket halves
    until it takes at most half of the free memory of the tightest rank, the same on every rank."""
    import torch

    from hetero.engine.buckets import fitting_bucket_elements

    wanted = 6_250_000                      # 25 MB of fp32
    free = {"roomy": 80 << 30, "tight": 6_100_000}
    alone = {rank: fitting_bucket_elements(wanted, nbytes, lambda v: v) for rank, nbytes in free.items()}
    assert alone["roomy"] == wanted and 4 * alone["tight"] <= free["tight"] // 2 < 8 * alone["tight"]

    def vote(nbytes):                        # a rank's one-hot vote, as fitting_bucket_elements casts it
        seen = []
        fitting_bucket_elements(wanted, nbytes, lambda v: seen.append(v) or v)
        return seen[0]

    fleet = sum(vote(nbytes) for nbytes in free.values())   # what Comms.fleet_sum returns on every rank
    agreed = {rank: fitting_bucket_elements(wanted, nbytes, lambda v: fleet) for rank, nbytes in free.items()}
    assert agreed["roomy"] == agreed["tight"] == alone["tight"]
    assert torch.equal(fleet, vote(free["roomy"]) + vote(free["tight"]))


class LoopTransport:
    """Point-to-point stand-in: records what each rank sends and serves receives from it."""

    def __init__(self):
        self.sent, self.device, self.accelerator = [], torch.device("cpu"), None

    def batch(self):
        return contextlib.nullcontext()

    def isend(self, tensor, dst, tag):
        self.sent.append((dst, tensor.clone()))

    def irecv(self, shape, dtype, src, tag):
        self.posted = (src, tuple(shape))
        return types.SimpleNamespace(wait=lambda: torch.arange(float(shape[0])))


def test_a_small_boundary_tensor_goes_whole_to_each_receiving_tp_rank(monkeypatch):
    """Below WHOLE_MAX_BYTES a TP1 sender ships the whole activation to both TP2 receivers and each
    receiver takes it as it is: no all-gather (a collective round per micro-batch) on the critical
    path. Above it, the overlap mapping's shares go out and the receivers would all-gather."""
    from hetero.engine import transport as transport_module

    full = torch.arange(12.0).view(3, 4)
    sender = LoopTransport()
    StageLink(sender, 0, 1, None, [10, 11]).send(full, tag=3)
    assert [(dst, t.numel()) for dst, t in sender.sent] == [(10, 12), (11, 12)]
    receiver = LoopTransport()
    got = StageLink(receiver, 1, 2, None, [20]).recv((3, 4), torch.float32, tag=3)   # tp_group None: no gather
    assert receiver.posted == (20, (12,)) and torch.equal(got, full)

    monkeypatch.setattr(transport_module, "WHOLE_MAX_BYTES", 16)
    sender = LoopTransport()
    StageLink(sender, 0, 1, None, [10, 11]).send(full, tag=3)
    assert [(dst, t.numel()) for dst, t in sender.sent] == [(10, 6), (11, 6)]
