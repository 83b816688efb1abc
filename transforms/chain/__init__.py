"""The stage chain's plumbing: what a stage reads and writes for each staged shard.

A run stages the pool once (``staging.py``); every stage after that works shard by shard. A stage
writes its columns for a shard to ``_staging/<stage>/<shard>.arrow``, row-aligned with the staged
shard, together with ``_reason``: why each document is out of the running after this stage
(null while it is still in). A scorer adds columns and copies the reasons; a filter or the
selector only adds reasons. A later stage reads the columns it needs from the stage that wrote
them and the reasons from the stage just before it, never the input again.

What travels between stages is a ``StageShard``: the shard's reference and how many of its
documents are still in the running, so that a stage whose rule is a share ("keep the top 40%")
knows the total before it ranks.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain.duplicate_ids import NO_DUPLICATES, DuplicateIds
from beamsift.transforms.chain.meter import MeteredDoFn, StageMeter
from beamsift.transforms.chain.staging import ShardRef, on_local_disk, read_staging, write_staging

REASON = "_reason"
DUPLICATE = "duplicate id"
STAGED = "docs"  # the staged documents: _staging/docs/<shard>.arrow
START = "start"  # who is in the running before the first stage: _staging/start/<shard>.arrow
REPEATS = "repeats"  # a shard's records that repeat an earlier id, and the first record of each
STAGED_COLUMNS = ("n_tokens",)


@dataclass(frozen=True)
class Chain:
    """The stages of a run, in order, and the columns each writes (a picklable value)."""

    staging_dir: str
    stages: tuple[str, ...]
    columns: dict = field(default_factory=dict)  # stage -> tuple of (column, arrow type as str)

    def producer(self, column: str) -> str:
        """The stage that writes ``column`` (the latest one, if several do); the staged documents
        (``docs``) for the columns that staging writes, such as ``n_tokens``."""
        if column in STAGED_COLUMNS:
            return STAGED
        for stage in reversed(self.stages):
            if column in dict(self.columns.get(stage, ())):
                return stage
        known = sorted({c for cols in self.columns.values() for c, _ in cols})
        raise KeyError(f"no stage writes a column {column!r}; the stages write {known}")

    def before(self, stage: str) -> str:
        """The stage whose reasons ``stage`` starts from (``start`` for the first)."""
        i = self.stages.index(stage)
        return self.stages[i - 1] if i else START

    def path(self, stage: str, shard: str, suffix: str = ".arrow") -> str:
        return FileSystems.join(self.staging_dir, stage, shard + suffix)

    def on_local_disk(self) -> bool:
        """Whether staging is a local folder (Beam's local file system), where any step reads a
        few rows of a shard for the price of their pages; on an object store a read downloads."""
        return on_local_disk(self.staging_dir)

    def read(self, stage: str, shard: str, columns: list[str] | None = None) -> pa.Table:
        return read_staging(self.path(stage, shard), columns)

    def write(self, stage: str, shard: str, table: pa.Table) -> None:
        write_staging(table, self.path(stage, shard))

    def duplicates(self, item) -> DuplicateIds:
        """The records of a shard (a StageShard) that repeat an earlier id, with the first of each."""
        if not getattr(item, "duplicates", 0):
            return NO_DUPLICATES
        table = self.read(REPEATS, shard_of(item).name)
        return DuplicateIds(
            losers=np.asarray(table.column("loser").combine_chunks(), np.int64),
            winners=np.asarray(table.column("winner").combine_chunks(), np.int64),
        )

    def reasons(self, stage: str, shard: ShardRef) -> np.ndarray:
        """Why each document of ``shard`` is out of the running before ``stage`` (None: in it)."""
        return self.reasons_after(self.before(stage), shard)

    def reasons_after(self, stage: str, shard: ShardRef) -> np.ndarray:
        """Why each document of ``shard`` is out of the running after ``stage`` (None: in it)."""
        table = self.read(stage, shard.name, [REASON])
        return reason_values(table.column(REASON))

    def running(self, stage: str, item) -> tuple[ShardRef, np.ndarray]:
        """The shard behind ``item`` and which of its documents are in the running before ``stage``."""
        shard = shard_of(item)
        return shard, running_mask(self.reasons(stage, shard))

    def column(self, name: str, shard: str) -> np.ndarray:
        """A column written by an earlier stage, as float64 (NaN where it is null)."""
        values = self.read(self.producer(name), shard, [name]).column(name).combine_chunks()
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


@dataclass(frozen=True)
class StageShard:
    """A shard after a stage: its reference, and how many documents are still in the running."""

    ref: ShardRef
    running: int
    duplicates: int = 0  # records of the shard that repeat an earlier id (chain.duplicates reads them)


def shard_of(item) -> ShardRef:
    """The shard behind a stage's input (a StageShard) or a staged shard's reference."""
    return item.ref if isinstance(item, StageShard) else item


class MarkDuplicateIds(beam.DoFn):
    """(a staged shard, its repeated ids) -> who starts in the running: every document but the
    repeats of an id (reason ``duplicate id``), written as the chain's ``start``, so that no stage
    needs the duplicate ids again; the repeats themselves are kept beside it for the writer."""

    def __init__(self, chain: Chain):
        self.chain = chain

    def process(self, item):
        ref, duplicates = item
        orders = np.asarray(read_staging(ref.path, ["_order"]).column(0).combine_chunks(), np.int64)
        reasons = np.where(duplicates.mask(orders), DUPLICATE, None)
        self.chain.write(START, ref.name, pa.table({REASON: pa.array(list(reasons), pa.string())}))
        if len(duplicates.losers):
            self.chain.write(REPEATS, ref.name, pa.table({"loser": duplicates.losers, "winner": duplicates.winners}))
        yield StageShard(ref, int(running_mask(reasons).sum()), len(duplicates.losers))


def reason_values(column: pa.ChunkedArray) -> np.ndarray:
    """A ``_reason`` column as an object array (None: in the running); Arrow makes the strings
    10x as fast as ``to_pylist``."""
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)


def running_mask(reasons: np.ndarray) -> np.ndarray:
    return np.equal(np.asarray(reasons, dtype=object), None)


def stage_summary(stage: str, before: np.ndarray, after: np.ndarray) -> dict:
    """What a stage did to a shard: documents in, out, and taken out by reason (for the manifest)."""
    in_before = running_mask(before)
    taken = in_before & ~running_mask(after)
    by_reason = collections.Counter(after[taken].tolist())
    return {"stages": {stage: {"in": int(in_before.sum()), "out": int(in_before.sum() - taken.sum()), **by_reason}}}


# A ranking column's distinct values are counted by hashing them into this many buckets: exact for
# a few dozen values (what "too few to rank" is about), a lower bound past that; fixed-size, so
# that the per-shard parts add up (SumSummaries) to a whole that does not grow with the corpus.
SPREAD_BUCKETS = 1024


def column_spread(values: np.ndarray) -> dict:
    """A shard's part of a column's spread over the documents in the running: n, Σx, Σx², and
    which hash buckets its values fall in (summed over the shards, then ``spread_of``)."""
    x = values[np.isfinite(values)] + 0.0  # + 0.0: -0.0 and 0.0 are one value
    bucket = (x.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(54)
    return {
        "n": int(len(x)),
        "sum": float(x.sum()),
        "sum_sq": float((x * x).sum()),
        "buckets": np.bincount(bucket.astype(np.int64), minlength=SPREAD_BUCKETS).astype(np.int64),
    }


def spread_of(part: dict) -> dict:
    """The summed parts as documents, mean, standard deviation, coefficient of variation
    (std / |mean|; None where the mean is 0) and distinct values (see SPREAD_BUCKETS)."""
    n = part["n"]
    if not n:
        return {"documents": 0, "mean": None, "std": None, "cv": None, "distinct_values": 0}
    mean = part["sum"] / n
    std = max(part["sum_sq"] / n - mean * mean, 0.0) ** 0.5
    return {
        "documents": n,
        "mean": float(f"{mean:.6g}"),
        "std": float(f"{std:.4g}"),
        "cv": float(f"{std / abs(mean):.4g}") if mean else None,
        "distinct_values": int(np.count_nonzero(part["buckets"])),
    }


class ShardStageFn(MeteredDoFn):
    """Base of a stage's per-shard DoFn: progress and timing, and the bookkeeping of reasons.

    A subclass implements ``score(shard, reasons, **side_inputs) -> (columns: dict, reasons[, counts])``,
    where the side inputs come by the names ``ApplyStage`` gives them, ``columns`` maps each of its
    column names to an array aligned with the shard's rows, and ``counts`` are other per-shard
    counts for the manifest (e.g. documents truncated).
    """

    rank_column: str | None = None  # a filter's or the selector's ranking column: its spread is summed

    def __init__(self, name: str, chain: Chain, progress_dir: str | None = None, meter_stage: str | None = None):
        self.name = name
        self.chain = chain
        self.meter = StageMeter(meter_stage or name, progress_dir)  # the progress display's name

    def process(self, item, **side_inputs):
        shard = shard_of(item)
        started = self.meter.start()
        before = self.chain.reasons(self.name, shard)
        columns, after, *extra = self.score(shard, before.copy(), **side_inputs)
        arrays = {REASON: pa.array(list(after), pa.string())}
        for name, type_str in self.chain.columns.get(self.name, ()):
            arrays[name] = _arrow(columns[name], type_str)
        self.chain.write(self.name, shard.name, pa.table(arrays))
        self.meter.done(started, docs=shard.num_rows)
        summary = stage_summary(self.name, before, after)
        if extra and extra[0]:  # other counts a stage reports (documents truncated, ...)
            summary["stages"][self.name]["notes"] = dict(extra[0])
        if self.rank_column is not None:
            values = self.chain.column(self.rank_column, shard.name)[running_mask(before)]
            summary["spread"] = {self.name: {self.rank_column: column_spread(values)}}
        yield beam.pvalue.TaggedOutput("summary", summary)
        yield StageShard(shard, int(running_mask(after).sum()), item.duplicates if isinstance(item, StageShard) else 0)

    def score(self, shard: ShardRef, reasons: np.ndarray, **side_inputs):
        raise NotImplementedError


# The Arrow types of stage columns, by the names the stages declare them with.
ARROW_TYPES = {
    "double": pa.float64(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


def _arrow(values, type_str: str) -> pa.Array:
    if isinstance(values, pa.Array):
        return values
    t = ARROW_TYPES[type_str]
    if isinstance(values, np.ndarray) and values.dtype.kind == "f" and t == pa.float64():
        return pa.array(values, t, mask=np.isnan(values))  # NaN: not computed for this document
    return pa.array(values, t)


class ApplyStage(beam.PTransform):
    """Run a ShardStageFn over the shards, with side inputs by name; (StageShards, per-stage
    summaries)."""

    def __init__(self, fn: ShardStageFn, **side_inputs):
        super().__init__()
        self.fn = fn
        # Not `side_inputs`: Beam reads an attribute of that name of any transform as a list.
        self.named_inputs = side_inputs

    def expand(self, shards):
        out = shards | beam.ParDo(self.fn, **self.named_inputs).with_outputs("summary", main="shards")
        return out.shards, out.summary


def running_total(shards, label: str):
    """The number of documents still in the running over all shards (one element, 0 if none)."""
    return shards | f"{label}Running" >> beam.Map(lambda s: s.running) | f"{label}Total" >> beam.CombineGlobally(sum)
