"""``beamsift query DIR SQL``: DuckDB over a run's Parquet shards, as views."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

import duckdb
from beamsift.pipeline.output import MANIFEST

# The views a finished run always has; any other folder of Parquet shards gets a view by its name too.
VIEWS = ("selected", "scores", "rejected")
FORMATS = ("table", "csv", "json", "markdown")
DEFAULT_MAX_WIDTH = 60

HELP = "SQL over a run's outputs (views selected, scores, rejected)"
HELP_DESCRIPTION = """\
Run one SQL statement (DuckDB's dialect) over the output folder of a finished
`beamsift run` and print the result."""
HELP_EPILOG = """\
views (one per folder of Parquet shards in OUTPUT_DIR, named after the folder):
  selected   the selected documents: id, text, every input field, their scores
  scores     one row for every valid document: id, dsir_log_weight, dsir_key, n_tokens,
             n_ngrams, selected, reason, and the input fields except the text
  rejected   records that could not be used: input, source_file, position, reason,
             detail, record (the raw record), id
  clusters   with a cluster stage: one row per cluster: cluster, size, selected,
             duplicates, mean_<score column>..., examples (ids nearest the centroid)
  examples   the 5 highest and 5 lowest documents of every score column: column, end,
             rank, value, id, selected, text (cut short)
  domains    with perplexity_correlations: one row per domain: domain, pc_domain,
             documents, tokens, bpb_<model>..., pc_estimate, pc_weight, include

formats:
  table      aligned columns; cells longer than --max-width are cut, and a last line says so
  markdown   a Markdown table (| escaped as \\|); cut like table
  csv        CSV with a header row; NULL is an empty field; never cut
  json       JSON Lines: one object per row; never cut
  In table and markdown a newline inside a cell shows as \\n.

examples:
  beamsift query out/demo "SELECT reason, count(*) AS n FROM scores GROUP BY 1 ORDER BY n DESC"
  beamsift query out/demo --format json "SELECT id, text FROM selected ORDER BY dsir_log_weight DESC LIMIT 5"
"""


class QueryError(RuntimeError):
    """An error the user must fix; its message is complete (possibly several lines)."""


def whole_number(at_least: int, note: str = ""):
    """An argparse type: a whole number of at least ``at_least`` (``note`` says what that one means)."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
        if n < at_least:
            raise argparse.ArgumentTypeError(f"must be {at_least}{note} or more, got {n}")
        return n

    return parse


_max_width = whole_number(0, " (never cut)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``query`` subcommand's arguments (see ``HELP_EPILOG`` for its description)."""
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output.dir of a finished `beamsift run`")
    parser.add_argument("sql", metavar="SQL", help="one SQL statement over the views below")
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="how to print the result (default: %(default)s)"
    )
    parser.add_argument(
        "--max-width",
        type=_max_width,
        default=DEFAULT_MAX_WIDTH,
        metavar="N",
        help="cut table and markdown cells longer than N characters (default: %(default)s; 0: never cut)",
    )


def main(args: argparse.Namespace) -> int:
    """Run ``args.sql`` over ``args.output_dir`` and print the result to stdout; 0 on success.

    Raises QueryError (with DuckDB's whole message for a bad statement) for the caller to report."""
    fmt = getattr(args, "format", "table")
    max_width = getattr(args, "max_width", DEFAULT_MAX_WIDTH)
    try:
        columns, rows = run_query(args.output_dir, args.sql)
    except duckdb.Error as e:
        raise QueryError(str(e).strip()) from None
    if fmt == "csv":
        write_csv(columns, rows, sys.stdout)
    elif fmt == "json":
        write_json_lines(columns, rows, sys.stdout)
    else:
        render = render_markdown if fmt == "markdown" else render_table
        text, cut = render(columns, rows, max_width)
        if text:
            print(text)
        if cut:
            if fmt == "markdown":
                print()  # a line right after a Markdown table would be read as one more row
            print(cut_note(max_width))
    return 0


def cut_note(max_width: int) -> str:
    return f"(cells longer than {max_width} characters were cut; --max-width 0 shows them whole)"


def connect(out_dir: str, require_manifest: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view over every folder of Parquet shards in ``out_dir``
    (``selected``, ``scores`` and ``rejected`` for a finished run): a local folder, or one on an
    object store (``s3://``, ``gs://``). ``require_manifest=False``: also a run's folder before
    its manifest is written (the report, built in the job's last step)."""
    if "://" in out_dir and not out_dir.startswith("file://"):
        return _connect_remote(out_dir, require_manifest)
    if not os.path.exists(out_dir):
        raise QueryError(f"{out_dir}: no such folder")
    if not os.path.isdir(out_dir):
        raise QueryError(f"{out_dir}: not a folder")
    if require_manifest and not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise QueryError(f"{out_dir} has no {MANIFEST}: not the output of a finished beamsift run")
    con = duckdb.connect()
    try:
        for name, files in _parquet_folders(out_dir):
            listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
            con.execute(f"CREATE VIEW {_quoted(name)} AS SELECT * FROM read_parquet([{listed}])")
    except BaseException:
        con.close()
        raise
    return con


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def arrow_filesystem(path: str):
    """(Arrow's filesystem of ``path``, the path within it): a local folder, or a bucket through
    Arrow's S3 and GCS filesystems (credentials, region and endpoint from the usual variables).
    What every command that reads or writes an output outside a pipeline goes through."""
    import pyarrow.fs as pafs

    if "://" in path and not path.startswith("file://"):
        return pafs.FileSystem.from_uri(path.rstrip("/"))
    return pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file://"))


def _connect_remote(out_dir: str, require_manifest: bool = True) -> duckdb.DuckDBPyConnection:
    """The views of a result on an object store, read through Arrow's S3 and GCS filesystems
    (credentials, region and endpoint from the usual variables: AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL; Google's application default
    credentials). DuckDB scans them as Arrow datasets: only the columns and row groups a
    statement needs are fetched."""
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs

    try:
        fs, root = arrow_filesystem(out_dir)
        entries = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as e:  # noqa: BLE001 - no such bucket, no credentials, no connection
        raise QueryError(f"{out_dir}: cannot list it: {str(e).strip().splitlines()[0]}") from None
    files = {e.path[len(root) + 1 :]: e for e in entries if e.type == pafs.FileType.File}
    if not files:
        raise QueryError(f"{out_dir}: no such folder")
    if require_manifest and MANIFEST not in files:
        raise QueryError(f"{out_dir} has no {MANIFEST}: not the output of a finished beamsift run")
    folders: dict[str, list[str]] = {}
    for rel in sorted(files):
        parts = rel.split("/")
        if len(parts) == 2 and not parts[0].startswith(".") and parts[1].endswith(".parquet"):
            folders.setdefault(parts[0], []).append(f"{root}/{rel}")
    con = duckdb.connect()
    try:
        for name, paths in folders.items():
            con.register(f"_{name}_dataset", ds.dataset(paths, filesystem=fs, format="parquet"))
            con.execute(f"CREATE VIEW {_quoted(name)} AS SELECT * FROM {_quoted('_' + name + '_dataset')}")
    except BaseException:
        con.close()
        raise
    return con


def _parquet_folders(out_dir: str) -> list[tuple[str, list[str]]]:
    """(folder name, its Parquet files) for each folder of ``out_dir`` that holds any."""
    found = []
    with os.scandir(out_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            files = sorted(
                os.path.join(entry.path, f)
                for f in os.listdir(entry.path)
                if f.endswith(".parquet") and os.path.isfile(os.path.join(entry.path, f))
            )
            if files:
                found.append((entry.name, files))
    return found


def run_query(out_dir: str, sql: str) -> tuple[list[str], list[tuple]]:
    """Column names and rows of ``sql`` over ``out_dir``'s views; a bad statement raises duckdb.Error."""
    con = connect(out_dir)
    try:
        check_one_statement(sql)
        cursor = con.execute(sql)
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    finally:
        con.close()


def check_one_statement(sql: str) -> None:
    """QueryError unless ``sql`` is exactly one statement: DuckDB runs every statement of a
    string but returns only the last one's rows, and an empty string has no result to print."""
    n = len(duckdb.extract_statements(sql))  # DuckDB's own parser: a ';' inside a string is no split
    if n == 0:
        raise QueryError('the SQL is empty (or only comments): give one statement, e.g. "SELECT count(*) FROM scores"')
    if n > 1:
        raise QueryError(f"the SQL holds {n} statements; beamsift query runs one: run each on its own")


# ---- formats ----


def _text(v) -> str:
    """A value as text: nested values (lists, structs, maps) as JSON, everything else as str()."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(_jsonable(v), default=str, ensure_ascii=False)
    return str(v)


def _jsonable(v):
    """``v`` with what JSON cannot hold made safe: NaN and infinities as strings, map keys as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k if isinstance(k, str) else _text(k): _jsonable(x) for k, x in v.items()}
    return v


def _unique(columns: list[str]) -> list[str]:
    """Column names made unique (``a``, ``a_1``, ...) so that no JSON key hides another."""
    seen: set[str] = set()
    out = []
    for c in columns:
        name, i = c, 0
        while name in seen:
            i += 1
            name = f"{c}_{i}"
        seen.add(name)
        out.append(name)
    return out


def write_csv(columns: list[str], rows: list[tuple], out) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else _text(v) for v in row])


def write_json_lines(columns: list[str], rows: list[tuple], out) -> None:
    keys = _unique(columns)
    for row in rows:
        obj = {k: _jsonable(v) for k, v in zip(keys, row)}
        out.write(json.dumps(obj, default=str, ensure_ascii=False) + "\n")


def _cells(rows: list[tuple], max_width: int, markdown: bool) -> tuple[list[list[str]], bool]:
    cut = False

    def cell(v) -> str:
        nonlocal cut
        s = "NULL" if v is None else _text(v).replace("\r", "\\r").replace("\n", "\\n")
        if max_width and len(s) > max_width:
            cut = True
            s = s[: max_width - 1] + "…"
        return s.replace("|", "\\|") if markdown else s

    return [[cell(v) for v in row] for row in rows], cut


def format_table(columns: list[str], rows: list[tuple], max_width: int = DEFAULT_MAX_WIDTH) -> str:
    """Aligned columns, a ``-+-`` separator and a ``(N rows)`` footer (see ``render_table``)."""
    return render_table(columns, rows, max_width)[0]


def format_markdown(columns: list[str], rows: list[tuple], max_width: int = DEFAULT_MAX_WIDTH) -> str:
    """A Markdown table (see ``render_markdown``)."""
    return render_markdown(columns, rows, max_width)[0]


def render_table(columns: list[str], rows: list[tuple], max_width: int = DEFAULT_MAX_WIDTH) -> tuple[str, bool]:
    """The table text, and whether any cell was cut at ``max_width`` characters (0: never cut)."""
    cells, cut = _cells(rows, max_width, markdown=False)
    columns = [c.replace("\n", "\\n") for c in columns]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    out += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out), cut


def render_markdown(columns: list[str], rows: list[tuple], max_width: int = DEFAULT_MAX_WIDTH) -> tuple[str, bool]:
    """A Markdown table (empty for a statement without columns), and whether any cell was cut."""
    cells, cut = _cells(rows, max_width, markdown=True)
    if not columns:
        return "", cut
    header = [c.replace("\n", "\\n").replace("|", "\\|") for c in columns]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines), cut
