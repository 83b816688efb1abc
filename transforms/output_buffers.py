"""Give back a finished step's output buffer, in every process that runs bundles.

Each fused step of a Beam pipeline writes what it sends on into an output stream whose buffer
doubles until a flush at 10 MB (``data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD``): up to 16 MB for
small elements. When the bundle finishes the stream is closed and its bytes handed to the
runner, but the step's operation keeps the stream, and Beam's SDK harness keeps the step's bundle
processor for reuse until it has been idle for 60 s (``BundleProcessorCache``). A batch pipeline
rarely runs a finished step again, so each of a run's ~100 steps holds the largest buffer it
filled: a native trace of a one-process ``minhash`` run named 148 MB of them at 100k documents
and 227 MB at 1M (a step sends more at 1M, up to the flush bound). That was the part of the
one-process peak that grew with the corpus.

A closed stream takes no more data (Beam gives the operation a new stream for its next bundle,
``BundleProcessor.process_bundle``), so the operation lets go of it once ``finish`` has closed
it. Installed when ``beamsift.transforms`` is imported, so on every worker that unpickles a
beamsift DoFn, for every step that finishes after that, beamsift's or not.
"""

from __future__ import annotations

import functools

_RELEASES = "_beamsift_releases_closed_stream"


def release_finished_output_buffers() -> None:
    try:
        from apache_beam.runners.worker.bundle_processor import DataOutputOperation
    except ImportError:  # a Beam without the Python SDK harness: nothing to release
        return
    finish = DataOutputOperation.finish
    # Only Beam's own finish, which closes the stream, is wrapped, and only once
    if getattr(finish, _RELEASES, False) or finish.__qualname__ != "DataOutputOperation.finish":
        return

    @functools.wraps(finish)
    def finish_and_release(self) -> None:
        finish(self)
        self.output_stream = None

    setattr(finish_and_release, _RELEASES, True)
    DataOutputOperation.finish = finish_and_release
