"""How far each stage has got: Beam metrics for the manifest, and live progress on local runs.

Each DoFn that does a stage's work holds a ``StageMeter`` and wraps each unit of work in
``meter.start()`` / ``meter.done(...)``. Two things come of it:

- Beam metrics (a distribution of start and end times, counters of busy time and documents),
  which every runner reports after the run: the manifest's per-stage wall and busy times;
- on a local run whose driver shows progress, small files in a local folder, one per DoFn
  instance, rewritten at most a few times a second with the instance's running totals. Beam's
  local runners give the driver no metrics until the end, and the workers of the multi-process
  and portable runners are other processes, so a shared folder is the channel. On a distributed
  runner ``progress_dir`` is None and nothing is written.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import apache_beam as beam
from beamsift.transforms.chain.heap import FreedMemory

NAMESPACE = "beamsift"
STAGING_READ = "staging_read_bytes_"  # + the staging table read: bytes of the columns read
FLUSH_EVERY_S = 0.25


class StageMeter:
    def __init__(self, stage: str, progress_dir: str | None = None):
        self.stage = stage
        self.progress_dir = progress_dir

    def setup(self) -> None:
        m = beam.metrics.Metrics
        self._start = m.distribution(NAMESPACE, f"stage_{self.stage}_start_ms")
        self._end = m.distribution(NAMESPACE, f"stage_{self.stage}_end_ms")
        self._busy = m.counter(NAMESPACE, f"stage_{self.stage}_busy_ms")
        self._docs = m.counter(NAMESPACE, f"stage_{self.stage}_docs")
        self._totals = {"docs": 0, "bytes": 0}
        self._file = None
        if self.progress_dir is not None:
            self._file = os.path.join(self.progress_dir, f"{self.stage}.{os.getpid()}.{uuid.uuid4().hex[:8]}.json")
        self._flushed = 0.0

    def start(self) -> float:
        now = time.time()
        self._start.update(int(now * 1000))
        return now

    def done(self, started: float, docs: int = 0, nbytes: int = 0, busy: bool = True) -> None:
        """``busy=False`` where the unit's time includes other stages' (a reader that yields its
        batches to the stages fused after it)."""
        self._finish(started, time.time(), docs, nbytes, busy)

    def record(self, started: float, ended: float, docs: int = 0) -> None:
        """A unit of work timed on another thread (a DoFn's own pool): Beam counts metrics only on
        the bundle's thread, so the times travel back and are recorded there."""
        self._start.update(int(started * 1000))
        self._finish(started, ended, docs, 0, True)

    def _finish(self, started: float, ended: float, docs: int, nbytes: int, busy: bool) -> None:
        self._end.update(int(ended * 1000))
        if busy:
            self._busy.inc(int((ended - started) * 1000))
        if docs:
            self._docs.inc(docs)
        self.progress(docs, nbytes)

    def progress(self, docs: int = 0, nbytes: int = 0) -> None:
        """Count work done inside a unit (e.g. bytes of a file being read) for the live display."""
        if self._file is None:
            return
        self._totals["docs"] += docs
        self._totals["bytes"] += nbytes
        if time.time() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def status(self, **state) -> None:
        """What a long unit of work is doing now (a model's training: model, seed, epoch, loss),
        for the live display, which shows it while the stage has no documents to count yet;
        no keywords: done (written at once, so that the display stops showing it)."""
        if self._file is None:
            return
        if state:
            self._totals["state"] = state
        else:
            self._totals.pop("state", None)
        if not state or time.time() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self._file is None:
            return
        self._flushed = time.time()
        tmp = self._file + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self._totals, f)
            os.replace(tmp, self._file)
        except OSError:
            self._file = None  # the driver has gone (and removed the folder): stop reporting


class Metered:
    """``fn`` timed as part of ``stage``'s work in the run's metrics: for the fits that run in a
    Map step or a combine's output (the SVD, k-means, a proxy's training), outside the stage's
    per-shard DoFn, so that the manifest's ``wall_s`` and ``busy_s`` include them."""

    def __init__(self, stage: str, fn):
        self.stage, self.fn = stage, fn

    def __call__(self, element, *args, **kwargs):
        meter = StageMeter(self.stage)
        meter.setup()
        started = meter.start()
        try:
            return self.fn(element, *args, **kwargs)
        finally:
            meter.done(started)


class MeteredDoFn(beam.DoFn):
    """A DoFn whose units of work ``self.meter`` (a StageMeter, set in ``__init__``) times."""

    def setup(self):
        self.meter.setup()

    def finish_bundle(self):
        self.meter.flush()
        # a stage's bundle leaves the heap as it found it, not full of its own freed holes
        if "_freed" not in self.__dict__:
            self._freed = FreedMemory()
        self._freed.maybe()


def stage_timings(metrics: dict) -> dict:
    """{stage: {wall_s, busy_s, docs}} from the run's metrics results (see ``query_metrics``)."""
    out: dict[str, dict] = {}
    for name, value in metrics.items():
        if not name.startswith("stage_"):
            continue
        stage, _, what = name[len("stage_") :].rpartition("_")
        if what == "ms":  # start_ms / end_ms / busy_ms
            stage, _, what = stage.rpartition("_")
        entry = out.setdefault(stage, {})
        entry[what] = value
    timings = {}
    for stage, e in out.items():
        t = {}
        if "start" in e and "end" in e:
            t["wall_s"] = round((e["end"][1] - e["start"][0]) / 1000, 3)
        if "busy" in e:
            t["busy_s"] = round(e["busy"] / 1000, 3)
        if "docs" in e:
            t["docs"] = e["docs"]
        timings[stage] = t
    return timings
