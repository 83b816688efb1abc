"""Writing the outputs: selected documents, every document's scores, and rejected records.

Each staged shard becomes one ``selected/`` and one ``scores/`` shard of the same name, cast to
the run's one unified schema; rejected records are written in batches. Each writer also emits a
small summary (counts, and the n-gram counts of the selected and random subsets for the KL
reduction) that the run combines into the manifest.
"""

from __future__ import annotations

import hashlib
import json

import apache_beam as beam
import numpy as np
import pyarrow as pa
from beamsift.transforms.dsir import score_shard
from beamsift.transforms.featurize import bucket_counts
from beamsift.transforms.meter import StageMeter
from beamsift.transforms.read import POSITION_BITS, REJECTED
from beamsift.transforms.schema import (
    ID_HASH,
    INTERNAL,
    N_TOKENS,
    ORDER,
    REJECTED_SCHEMA,
    TEXT,
    conform,
    input_field,
    output_column,
)
from beamsift.transforms.select import at_or_above
from beamsift.transforms.stage import read_staging, write_parquet

# scores/: one row for every valid document. ``id`` takes the input's id type (an integer id
# stays an integer); the input fields other than the text follow these columns.
SCORE_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("dsir_log_weight", pa.float64()),
    pa.field("dsir_key", pa.float64()),
    pa.field(N_TOKENS, pa.int32()),
    pa.field("n_ngrams", pa.int64()),
    pa.field("selected", pa.bool_()),
    pa.field("reason", pa.string()),
]
SELECTED_FRONT = [pa.field("id", pa.string()), pa.field(TEXT, pa.string())]
SELECTED_SCORES = [f for f in SCORE_FIELDS if f.name not in ("id", "selected", "reason")]

# Why a valid document was not selected: a small fixed vocabulary; the details are columns
# (``n_tokens`` for "too short", ``dsir_key`` against the cut for "not sampled").
TOO_SHORT = "too short"
NOT_SAMPLED = "not sampled"


def with_text_named(table: pa.Table, text_column: str) -> pa.Table:
    """The internal text column under the name the input gave it."""
    return table.rename_columns([text_column if n == TEXT else n for n in table.column_names])


class WriteSelectionShards(beam.DoFn):
    """A staged shard -> selected/ and scores/ shards, duplicate-id rejects, and a summary."""

    def __init__(
        self,
        output_dir: str,
        seed: int,
        input_files: list[str],
        text_field: str,
        id_field: str | None,
        progress_dir: str | None = None,
    ):
        self.output_dir = output_dir
        self.seed = seed
        self.input_files = input_files
        self.text_field = text_field
        self.id_field = id_field
        self.meter = StageMeter("write", progress_dir)

    def setup(self):
        self.meter.setup()

    def finish_bundle(self):
        self.meter.flush()

    def process(self, shard, model, duplicates, thresholds, fields):
        from apache_beam.io.filesystems import FileSystems

        started = self.meter.start()
        table = read_staging(shard.path)
        s = score_shard(table, model, duplicates, self.seed)
        id_hash = np.asarray(table.column(ID_HASH).combine_chunks(), dtype=np.uint64)
        selected = s.eligible & at_or_above(s.key, id_hash, thresholds.get("selected"))
        in_random = ~s.duplicate & at_or_above(s.random_key, id_hash, thresholds.get("random"))

        reasons = np.full(table.num_rows, None, dtype=object)
        reasons[~selected] = NOT_SAMPLED
        too_short = ~s.duplicate & ~s.eligible
        reasons[too_short] = TOO_SHORT
        # Only an eligible document has a resampling key, so that ORDER BY dsir_key DESC LIMIT k
        # over scores/ re-selects exactly what the run selected.
        key = pa.array(s.key, mask=~s.eligible)
        scored = table.append_column("dsir_log_weight", pa.array(s.log_weight))
        scored = scored.append_column("dsir_key", key)
        scored = scored.append_column("n_ngrams", pa.array(s.n_ngrams))
        scored = scored.append_column("selected", pa.array(selected))
        scored = scored.append_column("reason", pa.array(reasons, pa.string()))

        # Select the score columns first: filtering then never copies the text.
        scores_out = conform(scored, fields, SCORE_FIELDS).filter(pa.array(~s.duplicate))
        chosen = scored.filter(pa.array(selected))
        selected_out = conform(chosen, fields, SELECTED_FRONT + SELECTED_SCORES)
        selected_out = with_text_named(selected_out, output_column(self.text_field))
        # The text is in selected/ only: scores/ stays small enough to scan for re-selection.
        write_parquet(scores_out, FileSystems.join(self.output_dir, "scores", shard.name + ".parquet"))
        write_parquet(selected_out, FileSystems.join(self.output_dir, "selected", shard.name + ".parquet"))

        for row in np.flatnonzero(s.duplicate):
            yield beam.pvalue.TaggedOutput(REJECTED, self._duplicate_reject(table, row, duplicates))

        self.meter.done(started, docs=table.num_rows)
        counts = {"selected": int(selected.sum())}
        if s.duplicate.any():
            counts["rejected: duplicate id"] = int(s.duplicate.sum())
        not_selected = ~s.duplicate & ~selected
        for r in reasons[not_selected]:
            key = "not selected: " + r
            counts[key] = counts.get(key, 0) + 1
        yield {
            "counts": counts,
            "selected_ngrams": bucket_counts(s.features, model.num_buckets, rows=selected),
            "random_ngrams": bucket_counts(s.features, model.num_buckets, rows=in_random),
        }

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
        from apache_beam.io.filesystems import FileSystems

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


class SumSummaries(beam.CombineFn):
    """Add up summary dicts: counts by key, and n-gram count vectors."""

    def create_accumulator(self):
        return {"counts": {}}

    def add_input(self, acc, part):
        for key, value in part.items():
            if key == "counts":
                for name, n in value.items():
                    acc["counts"][name] = acc["counts"].get(name, 0) + n
            elif key in acc:
                acc[key] = acc[key] + value
            else:
                acc[key] = value
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc
