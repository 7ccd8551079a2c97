"""comm_bridge.matching without sockets: matching order, budgets, sequence checks, failures."""

import collections
import threading

import pytest
import torch

from comm_bridge import frames as F
from comm_bridge.buffers import byte_view
from comm_bridge.errors import PeerFailedError, TransferMismatchError
from comm_bridge.handle import Handle
from comm_bridge.matching import Matcher
from comm_bridge.staging import Stager


class Driver:
    """Handles here are finished by the matcher itself: waiting never has to drive."""
    default_timeout = 1.0

    def __init__(self):
        self.lock = threading.RLock()

    def drive_until(self, handle, deadline):
        pass

    def to_device(self, tensor, device):
        return tensor


@pytest.fixture
def matcher():
    return Matcher(Stager(None), max_unexpected_bytes=1000, counters=collections.Counter())


def header(sender=0, tag=0, seq=0, shape=(4,), dtype=torch.float32):
    return F.Header(sender, tag, seq, dtype, shape, F.nbytes_for(dtype, shape))


def arrive(matcher, head, payload=None):
    """A whole message in one part, as a stream delivers it."""
    matcher.check_seq(head)
    transfer = matcher.begin(head, 1)
    if payload is not None:
        transfer.flat[:] = payload.view(-1).view(torch.uint8).numpy()
    matcher.part_arrived(transfer, (head.sender, head.seq), 0)
    return transfer


def receive(matcher, src=0, tag=0, out=None):
    handle = Handle(Driver(), src, tag, receiving=True)
    handle.out = out
    claimed, _resume = matcher.claim_unexpected(handle)
    if not claimed:
        matcher.post(handle)
    return handle


def test_messages_match_receives_per_source_and_tag_in_send_order(matcher):
    first, second = receive(matcher, tag=1), receive(matcher, tag=1)
    other = receive(matcher, tag=2)
    arrive(matcher, header(tag=1, seq=0), torch.full((4,), 1.0))
    arrive(matcher, header(tag=2, seq=1), torch.full((4,), 3.0))
    arrive(matcher, header(tag=1, seq=2), torch.full((4,), 2.0))
    assert first.wait()[0] == 1.0 and second.wait()[0] == 2.0 and other.wait()[0] == 3.0
    assert matcher.stats() == {"unexpected_bytes": 0, "inflight": 0, "parked": 0, "parked_bytes": 0,
                               "posted": 0}


def test_an_unexpected_message_waits_for_its_receive_within_the_budget(matcher):
    arrive(matcher, header(shape=(200,)), torch.arange(200.0))  # 800 bytes, nobody asked yet
    assert matcher.unexpected_bytes == 800 and matcher.may_read(0)
    arrive(matcher, header(seq=1, shape=(50,)))                 # 1000: the budget is full
    assert not matcher.may_read(0)
    assert matcher.may_read(1)  # other stripes finish what has started: pausing them would deadlock
    handle = receive(matcher)
    assert torch.equal(handle.wait(), torch.arange(200.0))
    claimed, resume = matcher.claim_unexpected(Handle(Driver(), 0, 0, receiving=True))
    assert claimed and not resume  # below the budget again after the first claim
    assert matcher.unexpected_bytes == 0 and matcher.may_read(0)


def test_a_claim_that_frees_a_full_budget_says_reading_may_resume(matcher):
    arrive(matcher, header(shape=(250,)))
    assert not matcher.may_read(0)
    claimed, resume = matcher.claim_unexpected(Handle(Driver(), 0, 0, receiving=True))
    assert claimed and resume


def test_a_replayed_sequence_number_is_refused_and_a_gap_counted(matcher):
    arrive(matcher, header(seq=0))
    with pytest.raises(F.FrameError, match="replayed") as info:
        matcher.check_seq(header(seq=0))
    assert info.value.reason == "replayed"
    matcher.check_seq(header(seq=5))
    assert matcher._counters["seq_gaps"] == 1
    assert matcher.is_finished(0, 5) and not matcher.is_finished(0, 6)


def test_a_receive_posted_with_the_wrong_dtype_fails_with_a_mismatch(matcher):
    handle = receive(matcher, out=torch.empty(4, dtype=torch.int32))
    arrive(matcher, header())
    with pytest.raises(TransferMismatchError, match="float32"):
        handle.wait()


def test_parked_chunks_count_against_their_own_budget(matcher):
    matcher.park((0, 0), "chunk", b"x" * 600, 600)
    matcher.park((0, 0), "chunk", b"x" * 400, 400)
    assert not matcher.may_read(1) and matcher.may_read(0)
    assert len(matcher.release_parked((0, 0))) == 2
    assert matcher.parked_bytes == 0 and matcher.may_read(1)


def test_failing_a_peer_fails_its_posted_and_half_arrived_messages(matcher):
    posted = receive(matcher, src=3, tag=9)
    head = header(sender=3, tag=1, shape=(8,))
    matcher.check_seq(head)
    matcher.begin(head, 2)  # one of two chunks in; nobody asked for it yet
    late = receive(matcher, src=3, tag=1)
    bystander = receive(matcher, src=4)
    matcher.fail_peer(3, PeerFailedError(3, "gone"))
    for handle in (posted, late):
        with pytest.raises(PeerFailedError, match="gone"):
            handle.wait()
    assert not bystander.done() and matcher.stats()["inflight"] == 0


def test_the_small_lane_takes_only_a_receive_whose_landing_fits(matcher):
    out = torch.empty(4)
    handle = receive(matcher, out=out)
    assert matcher.take_posted_small(header()) is None  # no landing: the general path
    handle.landing = byte_view(out)
    assert matcher.take_posted_small(header(shape=(5,))) is None  # wrong size
    taken = matcher.take_posted_small(header())
    assert taken is not None and taken[0] is handle and taken[1] is handle.landing
    assert matcher.stats()["posted"] == 0
