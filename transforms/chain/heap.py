"""The memory a DoFn's work freed, given back to the system at the end of each bundle and, in a
long bundle, every few seconds between its elements.

glibc's malloc keeps what a process frees for its next allocations and returns only the top of
a heap by itself; Arrow's allocator (mimalloc in pyarrow's wheels) keeps freed pages of its own
for a while. A stage whose elements allocate arrays of many sizes (SemDeDup's groups, a shard's
write) leaves more of the heap in free holes the longer it runs, and the next stage starts from
that. Measured with ``semdedup.yaml`` in one process at 1M documents: the greedy's step began
at ~1,000 MB and ended at ~1,110 MB, 163 MB of which ``malloc_trim`` gave back at once; the run
peaked at 1,199 MB in the output's writing, against 1,025 MB at 100k, where each step is short.
Giving freed memory back after every element instead (a fixed mmap threshold: glibc then maps
and unmaps every large array) peaked at 976 MB at 1M and 985 MB at 100k, but ran 35% slower:
fresh pages cost more than reused ones, most of all on a VM whose host takes freed memory back.
So this gives back at most every ``EVERY_S`` seconds, and once at each bundle's end: 1,120 MB
at 1M against 979-985 MB at 100k (with Arrow on the system allocator, ``arrow_memory.py``:
1,034-1,066 against 924-962 MB; there, with the trims against without, 1,127 against 1,056 MB in
144.4 and 143.0 s: within the runs' spread, and no slower).
"""

from __future__ import annotations

import ctypes
import sys
import time

import pyarrow as pa

EVERY_S = 2.0


def glibc():
    """The C library where it is glibc's ``libc.so.6`` (Linux), else None (another system, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _malloc_trim():
    return getattr(glibc(), "malloc_trim", None)  # None where the C library has none


class FreedMemory:
    """``maybe()`` after an element (gives back if ``every_s`` has passed since the last time),
    ``now()`` at a bundle's end. One per DoFn instance: it holds no state of the data."""

    def __init__(self, every_s: float = EVERY_S):
        self.every_s = every_s
        # The first maybe() gives back at once: a DoFn whose one bundle is a whole stage (the local
        # runner's) otherwise never gave back the holes the steps before it left (the pointer
        # rounds' ~140 MB at 1M under the writer's peak)
        self.last = -float("inf")
        self._trim = _malloc_trim()

    def maybe(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.now()

    def now(self) -> None:
        if self._trim is not None:
            self._trim(0)
        pa.default_memory_pool().release_unused()
        self.last = time.monotonic()
