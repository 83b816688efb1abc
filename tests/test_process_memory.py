"""How a process that runs beamsift's stages holds memory: Arrow's allocator, and the freed heap
given back (``transforms/arrow_memory.py``, ``transforms/chain/heap.py``)."""

import os
import subprocess
import sys
import textwrap

import pytest


def _python(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


POOLS = """
    import os, subprocess, sys
    import apache_beam  # as a worker does: Beam (and with it pyarrow) before beamsift
    import beamsift.transforms
    import pyarrow as pa
    child = subprocess.run([sys.executable, "-c", "import pyarrow as pa; print(pa.default_memory_pool().backend_name)"],
                           capture_output=True, text=True).stdout.strip()
    print(pa.default_memory_pool().backend_name, child)
"""


def test_arrow_allocates_from_the_system_allocator_here_and_in_the_processes_started_from_here():
    assert _python(POOLS) == ["system", "system"]


def test_an_arrow_allocator_the_user_chose_is_kept():
    assert _python(POOLS, ARROW_DEFAULT_MEMORY_POOL="mimalloc") == ["mimalloc", "mimalloc"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_is_given_back_by_now_by_the_first_maybe_and_then_only_after_its_interval():
    # 100 KB arrays come from the heap (under glibc's mmap threshold); the last one pins the
    # heap's top, so that glibc gives nothing back by itself when the others are freed.
    out = _python("""
        import numpy as np
        from beamsift.transforms.chain.heap import FreedMemory

        def anon():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("RssAnon")) // 1024

        freed = FreedMemory(every_s=3600)
        freed.maybe()  # the first: at once (nothing to give back yet)
        arrays = [np.ones(100_000 // 8) for _ in range(1500)]
        held = anon()
        del arrays[:-1]
        after_free = anon()
        freed.maybe()  # the interval since the first has not passed
        after_maybe = anon()
        freed.now()
        print(held, after_free, after_maybe, anon())
        first = FreedMemory(every_s=3600)  # a DoFn's, made at its bundle's end after the holes
        arrays = [np.ones(100_000 // 8) for _ in range(1500)]
        del arrays[:-1]
        before = anon()
        first.maybe()
        print(before, anon())
    """)
    held, after_free, after_maybe, after_now, before, after_first = map(int, out)
    assert held - after_free < 50, "glibc gave the holes back by itself: the case shows nothing"
    assert after_free - after_maybe < 50
    assert after_maybe - after_now > 100  # ~146 MB of holes
    assert before - after_first > 100


def test_half_precision_conversions_while_another_thread_is_still_importing_torch():
    # SemDeDup's groups run side by side in one process; the first that takes torch's bfloat16
    # path imports it (~1 s) while the other converts: a partly imported torch is not torch yet.
    out = _python("""
        import threading
        import numpy as np
        from beamsift.transforms.stages.dedup import half_precision, single_precision

        x = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
        importing = threading.Thread(target=lambda: __import__("torch"))
        importing.start()
        calls = 0
        while importing.is_alive() or calls < 3:
            h = half_precision(x)
            assert np.array_equal(h, x.astype(np.float16))
            assert np.array_equal(single_precision(h), h.astype(np.float32))
            calls += 1
        print(calls)
    """)
    assert int(out[0]) >= 3
