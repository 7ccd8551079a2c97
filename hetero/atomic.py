"""Writing a file whole or not at all: a reader (another rank, another node on shared storage, the
next run after a crash) sees the old file or the new one, never half of one.

The bytes go to a temporary file in the same folder (so the rename stays on one file system), then
`os.replace` puts it in place. `fsync=True` makes the contents durable before the rename, for the
files a crash must not lose (checkpoint pointers and reports, storage probes); the others (metrics
rewrites, sidecars, plan files) trade that for speed, as they always did. A failed write removes
its temporary file; one a kill leaves behind is named `<name>.<pid>.tmp`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO, Any


def temporary_path(path: str) -> str:
    """Where the write of `path` goes before the rename (one per process: two writers do not mix)."""
    return f"{path}.{os.getpid()}.tmp"


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", *, fsync: bool = False) -> Iterator[IO[Any]]:
    """`with atomic_file(path, "wb") as handle:` write through `handle`; `path` appears when the block
    ends without an exception (and never holds part of what was written)."""
    temporary = temporary_path(path)
    try:
        with open(temporary, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_atomic(path: str, data: str | bytes, *, fsync: bool = False) -> None:
    """Write `data` (text as UTF-8, or bytes) to `path` whole or not at all."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as handle:
        handle.write(data)
