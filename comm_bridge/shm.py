"""Same-host shared-memory ring: fixed slots in a file under /dev/shm.

The sender owns the ring (creates, writes); the receiver maps it read-only,
copies a slot out and hands the slot back with a credit message over zmq. zmq
carries only the tiny doorbells; the bytes move by two memcpys. The file name is
derived from the job tag and the two ranks, so a receiver never opens a path a
frame told it to.

The receiver unlinks the file as soon as it has mapped it: from then on both
ends hold the mapping (valid after unlink) and nothing is left in /dev/shm
however the job ends. A ring created but never mapped (a job killed before its
first doorbell landed) is the launcher's to sweep: `remove_job_rings`.
"""

from __future__ import annotations

import mmap
import os
import platform
import re
import struct

import numpy as np

from comm_bridge.frames import auth_tag

_RING_MAGIC = b"HBRGRING"
_RING_HEADER = struct.Struct("<8sII")  # magic, slots, slot_bytes
_DATA_OFFSET = 64  # keep slot data aligned


def shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def host_id() -> str:
    """Two endpoints with the same host id share /dev/shm."""
    boot = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        pass
    return f"{platform.node()}/{boot}"


RING_PREFIX = "hetero-bridge-"
JOB_HEX_CHARS = 12
_JOB_HEX = re.compile(f"[0-9a-f]{{{JOB_HEX_CHARS}}}")


def job_hex_of(token: str | bytes | None) -> str:
    """The job's part of its ring names: the first 12 hex digits of the job tag the
    bridge derives from the job token (frames.auth_tag)."""
    return auth_tag(token).hex()[:JOB_HEX_CHARS]


def ring_path(job_hex: str, sender: int, receiver: int) -> str:
    return os.path.join(shm_dir() or "/dev/shm", f"{RING_PREFIX}{job_hex}-{sender}-{receiver}")


def remove_job_rings(job_hex: str) -> int:
    """Unlink every ring file of job `job_hex` left in /dev/shm (a job killed before its
    receivers mapped them); returns how many were removed. Other jobs' rings, and
    files that only look alike, are left alone."""
    if not _JOB_HEX.fullmatch(job_hex):
        raise ValueError(f"job_hex must be {JOB_HEX_CHARS} lowercase hex digits (job_hex_of(token)), got {job_hex!r}")
    directory = shm_dir()
    if directory is None:
        return 0
    ours = re.compile(re.escape(f"{RING_PREFIX}{job_hex}-") + r"\d+-\d+")
    removed = 0
    for name in os.listdir(directory):
        if ours.fullmatch(name):
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except (FileNotFoundError, PermissionError):
                pass  # gone meanwhile, or another user's
    return removed


# What a closed ring's array becomes: no view of the mapping, and any use is an error
# (a slice of it holds no bytes).
_CLOSED = np.empty(0, dtype=np.uint8)


class ShmRing:
    """Sender side: `slots` buffers of `slot_bytes`, each free or lent to the receiver."""

    def __init__(self, path: str, slots: int, slot_bytes: int):
        self.path = path
        self.slots = slots
        self.slot_bytes = slot_bytes
        size = _DATA_OFFSET + slots * slot_bytes
        try:
            os.unlink(path)  # a stale ring from a dead run of the same job
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._map[:_RING_HEADER.size] = _RING_HEADER.pack(_RING_MAGIC, slots, slot_bytes)
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.free = list(range(slots))

    def write(self, slot: int, data: np.ndarray) -> None:
        start = _DATA_OFFSET + slot * self.slot_bytes
        self._array[start:start + data.nbytes] = data

    def close(self) -> None:
        self._array = _CLOSED   # drop the view of the mapping, so the mapping can close
        try:
            self._map.close()
        except BufferError:
            pass  # a numpy view still alive; the mapping goes with the process
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _unlink_if_same(path: str, stat: os.stat_result) -> None:
    """Unlink `path` if it still names the file `stat` describes (not a newer ring made since)."""
    try:
        now = os.stat(path)
        if (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino):
            os.unlink(path)
    except OSError:
        pass  # gone already, or not ours to unlink: the sender's close or the launcher's sweep removes it


class ShmReader:
    """Receiver side: map the sender's ring, unlink its file, and copy slots out."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            size = stat.st_size
            if size < _DATA_OFFSET:
                raise ValueError(f"{path}: {size} bytes is too small for a ring")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, slots, slot_bytes = _RING_HEADER.unpack(self._map[:_RING_HEADER.size])
        if magic != _RING_MAGIC or size != _DATA_OFFSET + slots * slot_bytes:
            self._map.close()
            raise ValueError(f"{path}: not a bridge ring")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        _unlink_if_same(path, stat)  # both ends hold the mapping now: the name has done its job

    def read_into(self, slot: int, length: int, out: np.ndarray) -> None:
        start = _DATA_OFFSET + slot * self.slot_bytes
        out[:] = self._array[start:start + length]

    def close(self) -> None:
        self._array = _CLOSED   # drop the view of the mapping, so the mapping can close
        try:
            self._map.close()
        except BufferError:
            pass
