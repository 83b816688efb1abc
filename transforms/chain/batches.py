"""A DoFn that gathers what its elements give and sends it on in batches.

A local runner keeps a bundle's outputs in memory, element by element, and pickles each on its
own: many small elements (a shard's piece of every partition, a pair, a dropped document) cost
more there than the rows they carry. These DoFns hold rows and send them on together, every
``BATCH_ROWS`` rows (a bound, so that what is held never grows with the bundle) and at the
bundle's end.
"""

from __future__ import annotations

import apache_beam as beam
from beamsift.transforms.chain.side_by_side import windowed


class BatchedOutputs(beam.DoFn):
    """Subclasses hold rows in ``process`` and call ``held(rows)`` after each element (yielding
    from it); ``_flush()`` gives the outputs of what is held and empties it."""

    BATCH_ROWS = 1 << 16

    def start_bundle(self):
        self._held_rows = 0
        self._clear()

    def held(self, rows: int):
        self._held_rows += rows
        if self._held_rows >= self.BATCH_ROWS:
            self._held_rows = 0
            yield from self._flush()

    def finish_bundle(self):
        self._held_rows = 0
        for output in self._flush():
            yield windowed(output)

    def _clear(self) -> None:
        raise NotImplementedError

    def _flush(self):
        raise NotImplementedError
