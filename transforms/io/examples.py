"""The few documents at each end of every score: what a person reads to see what a score means.

scores/ has no text (it stays small enough to scan), and the documents at the bottom of a score
are mostly not in selected/. So each writer keeps, per score column, its shard's ``EXAMPLES``
highest and lowest documents with their text cut short, and the run's summary adds them up:
``Extremes.__add__`` keeps the n best of both sides, the same for any split and order (ties by
id). The result is ``examples/`` (a ``beamsift query`` view) and the report's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

EXAMPLES = 5  # documents at each end of each score
TEXT_CHARS = 300  # of each example's text
EXAMPLES_FILE = "examples/part-00000.parquet"
EXAMPLES_SCHEMA = pa.schema(
    [
        ("column", pa.string()),
        ("end", pa.string()),  # top or bottom
        ("rank", pa.int32()),  # 1 = the highest (top) or the lowest (bottom)
        ("value", pa.float64()),
        ("id", pa.string()),
        ("selected", pa.bool_()),
        ("text", pa.string()),
    ]
)


@dataclass
class Extremes:
    """The n highest and n lowest (value, id, selected, text) of a column, each side sorted from
    its end; ``+`` merges two and keeps the n of each side."""

    n: int = EXAMPLES
    top: list = field(default_factory=list)
    bottom: list = field(default_factory=list)

    def __add__(self, other: Extremes) -> Extremes:
        top = sorted(self.top + other.top, key=lambda e: (-e[0], e[1]))[: self.n]
        bottom = sorted(self.bottom + other.bottom, key=lambda e: (e[0], e[1]))[: self.n]
        return Extremes(self.n, top, bottom)


def shard_extremes(table: pa.Table, keep: np.ndarray, columns: list[str], text_column: str,
                   n: int = EXAMPLES) -> dict:  # fmt: skip
    """{column: Extremes} of a shard's documents where ``keep``, for each float column."""
    out = {}
    selected = np.asarray(table.column("selected").to_numpy(zero_copy_only=False), bool)
    text = table.column(text_column)

    def ids_of(rows):
        return np.array([str(v) for v in table.column("id").take(pa.array(rows)).to_pylist()])

    for name in columns:
        values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64)
        rows = np.flatnonzero(keep & np.isfinite(values))
        if not len(rows):
            continue
        top, bottom = _smallest(rows, -values, n, ids_of), _smallest(rows, values, n, ids_of)
        entries = [
            [(float(values[r]), i, bool(selected[r]), (text[int(r)].as_py() or "")[:TEXT_CHARS]) for r, i in side]
            for side in (top, bottom)
        ]
        out[name] = Extremes(n, *entries)
    return out


def _smallest(rows: np.ndarray, keys: np.ndarray, n: int, ids_of) -> list:
    """[(row, id)] of the n rows with the smallest (key, id): the ids (Python strings) are made
    only for the rows whose key is within the n smallest, ties included."""
    if len(rows) > n:
        nth = np.partition(keys[rows], n - 1)[n - 1]
        rows = rows[keys[rows] <= nth]
    ids = ids_of(rows)
    order = np.lexsort((ids, keys[rows]))[:n]
    return list(zip(rows[order].tolist(), ids[order].tolist()))


def _cut(text: str | None) -> str:
    return (text or "")[:TEXT_CHARS]


def examples_table(extremes: dict) -> pa.Table:
    rows = []
    for column in sorted(extremes):
        e = extremes[column]
        for end, side in (("top", e.top), ("bottom", e.bottom)):
            for rank, (value, id_, selected, text) in enumerate(side, 1):
                rows.append(
                    {"column": column, "end": end, "rank": rank, "value": value, "id": id_, "selected": selected,
                     "text": text}
                )  # fmt: skip
    return pa.Table.from_pylist(rows, schema=EXAMPLES_SCHEMA)
