"""Writing the outputs: selected documents, every document's scores, and rejected records.

Each staged shard becomes one ``selected/`` and one ``scores/`` shard of the same name, cast to
the run's one unified schema; rejected records are written in batches. Each writer also emits a
small summary (counts, and the n-gram counts of the selected and random subsets for the KL
reduction) that the run combines into the manifest.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import ARROW_TYPES, DUPLICATE, REASON, Chain, reason_values
from beamsift.transforms.chain.meter import MeteredDoFn, StageMeter
from beamsift.transforms.chain.side_by_side import SideBySide
from beamsift.transforms.chain.staging import read_staging, write_parquet
from beamsift.transforms.io.examples import shard_extremes
from beamsift.transforms.io.read import POSITION_BITS, REJECTED
from beamsift.transforms.io.schema import (
    INTERNAL,
    N_TOKENS,
    ORDER,
    REJECTED_SCHEMA,
    TEXT,
    conform,
    input_field,
    output_column,
)
from beamsift.transforms.stages.dsir import selection_ngrams


def score_fields(chain: Chain) -> list[pa.Field]:
    """scores/: one row for every valid document. ``id`` takes the input's id type (an integer id
    stays an integer); each stage's columns follow in stage order; the input fields but the text
    come after these."""
    return [pa.field("id", pa.string()), *_stage_fields(chain), *_TAIL]


def selected_fields(chain: Chain) -> list[pa.Field]:
    """selected/: the selected documents: id, the text (under its input name), the scores."""
    return [pa.field("id", pa.string()), pa.field(TEXT, pa.string()), *_stage_fields(chain), _TAIL[0]]


_TAIL = [pa.field(N_TOKENS, pa.int32()), pa.field("selected", pa.bool_()), pa.field("reason", pa.string())]


def _stage_fields(chain: Chain) -> list[pa.Field]:
    """The stages' output columns in stage order, each once: a column that two stages write
    (``loss`` from proxy and excess_loss) holds the later stage's values (``Chain.producer``)."""
    fields: dict[str, pa.Field] = {}
    for stage in chain.stages:
        for name, type_str in chain.columns.get(stage, ()):
            if not name.startswith("_") and name != "selected" and name not in fields:
                fields[name] = pa.field(name, ARROW_TYPES[type_str])
    return list(fields.values())


def with_text_named(table: pa.Table, text_column: str) -> pa.Table:
    """The internal text column under the name the input gave it."""
    return table.rename_columns([text_column if n == TEXT else n for n in table.column_names])


class WriteSelectionShards(MeteredDoFn):
    """A shard after the last stage -> its selected/ and scores/ shards, its duplicate-id rejects,
    and a summary (counts by reason; with DSIR, the n-gram counts of the selected and the random
    subsets, for the KL reduction)."""

    def __init__(
        self,
        output_dir: str,
        chain: Chain,
        input_files: list[str],
        text_field: str,
        id_field: str | None,
        ngram_buckets: int | None = None,
        progress_dir: str | None = None,
        threads: int = 1,
    ):
        self.output_dir = output_dir
        self.chain = chain
        self.input_files = input_files
        self.text_field = text_field
        self.id_field = id_field
        self.ngram_buckets = ngram_buckets
        self.meter = StageMeter("write", progress_dir)
        self.threads = threads  # > 1: that many shards written side by side (one process, several cores)

    def setup(self):
        super().setup()
        self._shards = SideBySide(self.threads, "write", self._done)

    def process(self, item, fields):
        yield from self._shards.submit(self._write, item, fields)

    def finish_bundle(self):
        yield from self._shards.rest()
        super().finish_bundle()

    def teardown(self):
        self._shards.close()

    def _done(self, written: tuple) -> list:
        started, ended, docs, outputs = written
        self.meter.record(started, ended, docs)
        return outputs

    def _write(self, item, fields) -> tuple:
        """A shard's files written -> (started, ended, documents, the outputs: rejects and a summary)."""
        shard = item.ref
        started = time.time()
        outputs = []
        table = read_staging(shard.path)
        last = self.chain.read(self.chain.stages[-1], shard.name)
        reasons = reason_values(last.column(REASON))
        selected = np.asarray(last.column("selected").to_numpy(zero_copy_only=False), dtype=bool)
        duplicate = np.equal(reasons, DUPLICATE)
        scored = table
        # Each stage's file read once, for all the columns it gives.
        by_stage: dict[str, list[str]] = {}
        for f in _stage_fields(self.chain):
            by_stage.setdefault(self.chain.producer(f.name), []).append(f.name)
        for stage, names in by_stage.items():
            part = self.chain.read(stage, shard.name, names)
            for name in names:
                scored = scored.append_column(name, part.column(name))
        scored = scored.append_column("selected", pa.array(selected))
        scored = scored.append_column("reason", pa.array(np.where(duplicate, None, reasons), pa.string()))

        # The columns first, then the rows: filtering never copies what is not written (the
        # text for scores/; for selected/ the staged n-gram buckets, ~1.9 KB a document: with
        # 95% kept at 1M, the step took 12.0 s with that copy, 8.5 s without)
        scores_out = conform(scored, fields, score_fields(self.chain)).filter(pa.array(~duplicate))
        selected_out = conform(scored, fields, selected_fields(self.chain)).filter(pa.array(selected))
        selected_out = with_text_named(selected_out, output_column(self.text_field))
        # The text is in selected/ only: scores/ stays small enough to scan for re-selection.
        write_parquet(scores_out, FileSystems.join(self.output_dir, "scores", shard.name + ".parquet"))
        write_parquet(selected_out, FileSystems.join(self.output_dir, "selected", shard.name + ".parquet"))

        if duplicate.any():
            duplicates = self.chain.duplicates(item)
            for row in np.flatnonzero(duplicate):
                outputs.append(beam.pvalue.TaggedOutput(REJECTED, self._duplicate_reject(table, row, duplicates)))

        ended = time.time()
        counts = {"selected": int(selected.sum())}
        if duplicate.any():
            counts["rejected: duplicate id"] = int(duplicate.sum())
        for r, n in collections.Counter(reasons[~duplicate & ~selected].tolist()).items():
            counts["not selected: " + r] = n
        summary = {"counts": counts}
        floats = [f.name for f in _stage_fields(self.chain) if pa.types.is_floating(f.type)]
        summary["examples"] = shard_extremes(scored, ~duplicate, floats, TEXT)
        if self.ngram_buckets is not None and "_in_random" in last.column_names:
            in_random = np.asarray(last.column("_in_random").to_numpy(zero_copy_only=False), dtype=bool)
            summary.update(selection_ngrams(table, selected, in_random, self.ngram_buckets))
        return started, ended, table.num_rows, [*outputs, summary]

    def _duplicate_reject(self, table: pa.Table, row: int, duplicates) -> dict:
        # The record as it was read, under its own field names; a null field is left out, as it
        # may not have been there (staging shards give every record every field of its batch).
        record = {}
        for name in table.column_names:
            if name == TEXT:
                record[self.text_field] = table.column(name)[row].as_py()
            elif name == "id":
                if self.id_field == "id":
                    record["id"] = table.column(name)[row].as_py()
            elif name not in INTERNAL and name != N_TOKENS:
                record[input_field(name)] = table.column(name)[row].as_py()
        record = {k: v for k, v in record.items() if v is not None}
        order = int(table.column(ORDER)[row].as_py())
        first = duplicates.winner_of(order)
        return {
            "input": "pool",
            "source_file": self._file(order),
            "position": order & ((1 << POSITION_BITS) - 1),
            "reason": "duplicate id",
            "detail": f"the first record with this id is at {self._file(first)} position "
            f"{first & ((1 << POSITION_BITS) - 1)}",
            "record": json.dumps(record, ensure_ascii=False, default=str),
            "id": str(table.column("id")[row].as_py()),
        }

    def _file(self, order: int) -> str:
        return self.input_files[order >> POSITION_BITS]


class WriteRejectedShard(beam.DoFn):
    """A batch of reject records -> one rejected/ shard, and a summary of counts by reason."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def process(self, rows: list[dict]):
        rows = sorted(rows, key=lambda r: (r["input"], r["source_file"], r["position"]))
        table = pa.Table.from_pylist(rows, schema=REJECTED_SCHEMA)
        first = rows[0]
        name = hashlib.blake2b(
            f"{first['input']}\0{first['source_file']}\0{first['position']}\0{len(rows)}".encode(),
            digest_size=8,
        ).hexdigest()
        write_parquet(table, FileSystems.join(self.output_dir, "rejected", f"part-{name}.parquet"))
        counts: dict[str, int] = {}
        for r in rows:
            key = ("rejected: " if r["input"] == "pool" else "target rejected: ") + r["reason"]
            if r["reason"] == "duplicate id":
                continue  # counted where it was found (WriteSelectionShards)
            counts[key] = counts.get(key, 0) + 1
        yield {"counts": counts}
