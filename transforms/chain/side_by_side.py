"""A DoFn's elements worked on side by side, on threads of its own.

For one process given several cores (a local runner without worker processes), where a bundle
holds every shard and each element's work is mostly numpy, Arrow and file I/O, which release the
GIL: one element at a time left the other cores idle (the writer of 1M documents took ~10 s in one
process, ~5 s with two worker processes). Elsewhere a DoFn runs its elements in turn, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.worker import statesampler
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from beamsift.transforms.chain.heap import FreedMemory


class SideBySide:
    """``submit(fn, *args)`` starts ``fn(*args)`` on one of ``threads`` threads and yields the
    outputs of the elements done so far, in the order they were submitted: ``done(result)`` (a
    list of the DoFn's outputs), called on the bundle's thread (where a ``StageMeter`` records);
    ``rest()``, from ``finish_bundle``, yields the others. At most ``threads`` elements are in
    hand at once (one on each thread): the memory of that many elements.

    With ``threads`` 1 (worker processes, a distributed runner) each element is worked on at
    once on the bundle's thread, as a DoFn without the helper would.

    Beam counts metrics only on the bundle's thread: each element's thread counts them as the
    bundle's (its state tracker), so the staging bytes it reads are in the run's metrics."""

    def __init__(self, threads: int, name: str, done: Callable = list):
        self.threads, self.done = threads, done
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix=name) if threads > 1 else None
        self.pending: list = []
        self.freed = FreedMemory()  # what the elements freed, given back now and then

    def submit(self, fn: Callable, *args) -> Iterator:
        if self.pool is None:
            yield from self.done(fn(*args))
            self.freed.maybe()
            return
        self.pending.append(self.pool.submit(_in_bundle, statesampler.get_current_tracker(), fn, *args))
        while self.pending and (self.pending[0].done() or len(self.pending) > self.threads):
            yield from self.done(self.pending.pop(0).result())
            self.freed.maybe()

    def rest(self) -> Iterator:
        """The outputs of the elements still running, windowed (as ``finish_bundle`` must)."""
        try:
            for future in self.pending:
                for output in self.done(future.result()):
                    yield windowed(output)
        finally:
            self.pending = []
            self.freed.now()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _in_bundle(tracker, fn: Callable, *args) -> list:
    statesampler.set_current_tracker(tracker)
    try:
        return fn(*args)
    finally:
        statesampler.set_current_tracker(None)


def windowed(output):
    """An output of ``finish_bundle`` (a TaggedOutput too) in the global window, as Beam needs it there."""
    if isinstance(output, TaggedOutput):
        return TaggedOutput(output.tag, WindowedValue(output.value, MIN_TIMESTAMP, [GlobalWindow()]))
    return WindowedValue(output, MIN_TIMESTAMP, [GlobalWindow()])
