"""``beamsift query DIR SQL``: DuckDB over a run's Parquet shards, as views."""

from __future__ import annotations

import os

import duckdb
from beamsift.pipeline.run import MANIFEST

VIEWS = ("selected", "scores", "rejected")


class QueryError(RuntimeError):
    pass


def connect(out_dir: str) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with views ``selected``, ``scores`` and ``rejected`` over ``out_dir``."""
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise QueryError(f"{out_dir} has no {MANIFEST}: not the output of a finished beamsift run")
    con = duckdb.connect()
    for view in VIEWS:
        glob = os.path.join(out_dir, view, "*.parquet").replace("'", "''")
        con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{glob}')")
    return con


def run_query(out_dir: str, sql: str) -> tuple[list[str], list[tuple]]:
    con = connect(out_dir)
    try:
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    finally:
        con.close()


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    def cell(v):
        s = "NULL" if v is None else str(v).replace("\n", " ")
        return s if len(s) <= max_width else s[: max_width - 1] + "…"

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)
