"""Arrow's buffers from the C library's allocator in every process that runs beamsift's stages.

pyarrow's wheels default to mimalloc, whose freed pages stay with the thread that freed them a
while; beamsift's stages free what a shard or a group allocated as soon as it is done, on a few
threads, so with mimalloc the memory of a long run piles up. Measured with ``semdedup.yaml`` in
one process (peak RSS, ``benchmarks/scale.py``'s way): at 1M documents 1,199 MB with mimalloc,
1,072 MB with the system allocator and 1,122 MB with jemalloc, in 150, 145 and 144 s; at 100k
1,023, 952 and 961 MB. With two worker processes the three ran as fast (semdedup at 1M:
120.7 / 122.6 s mimalloc, 120.4 / 127.6 s system, 123.9 / 128.5 s jemalloc), so the allocator
every platform has is used; beamsift's ``FreedMemory`` gives back what it frees with glibc's
other memory. A choice the user made (``ARROW_DEFAULT_MEMORY_POOL``) is kept.

Arrow reads the variable once, when pyarrow is imported, and Beam imports pyarrow before
beamsift: so where beamsift's transforms are imported (the CLI, every worker that unpickles a
beamsift DoFn) the process sets pyarrow's default pool itself, and the variable is set for the
processes it starts (a local runner's workers).
"""

from __future__ import annotations

import os

VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"


def use_system_allocator() -> None:
    if os.environ.setdefault(VARIABLE, "system") == "system":
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
