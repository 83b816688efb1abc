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
    ids = None
    for name in columns:
        values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), np.float64)
        rows = np.flatnonzero(keep & np.isfinite(values))
        if not len(rows):
            continue
        if ids is None:
            ids = np.array([str(v) for v in table.column("id").to_pylist()])
            selected = np.asarray(table.column("selected").to_numpy(zero_copy_only=False), bool)
            text = table.column(text_column)
        top = rows[np.lexsort((ids[rows], -values[rows]))[:n]]
        bottom = rows[np.lexsort((ids[rows], values[rows]))[:n]]
        entries = [
            [
                (float(values[r]), str(ids[r]), bool(selected[r]), (text[int(r)].as_py() or "")[:TEXT_CHARS])
                for r in side
            ]
            for side in (top, bottom)
        ]
        out[name] = Extremes(n, *entries)
    return out


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
