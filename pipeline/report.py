"""``report.html``: a run's result as a page a person would rather look at than read.

One self-contained file (styles and images inline; nothing fetched, no script): the counts as a
funnel from the records read to the selection, the KL reduction and what it means, a histogram of
every score with the selection against the rest and the selector's cut marked, the selection's
make-up against the pool by every categorical field and by cluster, the duplicates found by
kind, the documents at both ends of every score, and the time of each stage.

Every run writes it into its output folder (the job's last step, before publishing), and
``beamsift report DIR`` builds it again for any earlier output, local or in a bucket. The
numbers come from the manifest and from DuckDB over the output's Parquet views, aggregated
there (a histogram is a GROUP BY, never the column loaded whole); the charts are inline SVG
(``charts.py``).
"""

from __future__ import annotations

import contextlib
import html
import json

import duckdb
from beamsift.pipeline import charts

REPORT = "report.html"
BINS = 40
MAX_CATEGORIES = 30  # a string field with more distinct values is not a category
MAX_CHARTS = 24  # score histograms drawn (the first, in the output's column order)
SELECTED, REST, REJECTED = "#2f6fb3", "#c9cfd6", "#c0504d"
NOT_SCORES = {"id", "selected", "reason"}


# ---- the data ----------------------------------------------------------------------------------


def _columns(con, view: str) -> list[tuple[str, str]]:
    try:
        return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {view}").fetchall()]
    except duckdb.Error:
        return []


def _numeric(kind: str) -> bool:
    return kind in ("DOUBLE", "FLOAT", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT", "UINTEGER")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def histogram(con, column: str, bins: int = BINS) -> dict | None:
    """Counts of ``scores.column`` in equal-width bins, selected and not, with the edges; None
    where the column has no finite value."""
    c = _q(column)
    lo, hi, n, sel_lo, sel_hi = con.execute(
        f"SELECT min({c}), max({c}), count({c}), min({c}) FILTER (WHERE selected), max({c}) FILTER (WHERE selected) "
        f"FROM scores WHERE isfinite({c}::DOUBLE)"
    ).fetchone()
    if not n:
        return None
    lo, hi = float(lo), float(hi)
    width = (hi - lo) / bins if hi > lo else 1.0
    rows = con.execute(
        f"SELECT least(floor(({c}::DOUBLE - ?) / ?)::BIGINT, ?) AS b, coalesce(selected, false), count(*) "
        f"FROM scores WHERE isfinite({c}::DOUBLE) GROUP BY ALL",
        [lo, width, bins - 1],
    ).fetchall()
    picked, rest = [0] * bins, [0] * bins
    for b, sel, count in rows:
        (picked if sel else rest)[int(b)] += count
    return {
        "edges": [lo + i * width for i in range(bins + 1)],
        "selected": picked,
        "rest": rest,
        "selected_range": (sel_lo, sel_hi) if sel_lo is not None else None,
        "documents": n,
    }


def composition(con, column: str) -> list[tuple[str, int, int]] | None:
    """(value, documents in the pool, in the selection) of a categorical field, largest first;
    None where it has more than MAX_CATEGORIES values (or fewer than 2)."""
    c = _q(column)
    distinct, present = con.execute(f"SELECT count(DISTINCT {c}), count({c}) FROM scores").fetchone()
    if not 2 <= distinct <= MAX_CATEGORIES or present < 5 * distinct:  # ids (duplicate_of) are no category
        return None
    rows = con.execute(
        f"SELECT coalesce({c}::VARCHAR, '(none)'), count(*), count(*) FILTER (WHERE selected) FROM scores "
        "GROUP BY 1 ORDER BY 2 DESC, 1"
    ).fetchall()
    return [(str(v), int(n), int(s)) for v, n, s in rows]


# ---- the charts ---------------------------------------------------------------------------------


def funnel_chart(steps: list[tuple[str, int, str]]) -> str:
    return charts.bar_chart(steps, "documents")


def histogram_chart(column: str, h: dict, cut: bool) -> str:
    return charts.histogram_chart(
        h["edges"], h["rest"], h["selected"], column, (SELECTED, REST),
        cut=tuple(h["selected_range"]) if cut and h["selected_range"] else None,
    )  # fmt: skip


def composition_chart(column: str, rows: list[tuple[str, int, int]]) -> str:
    pool = sum(n for _, n, _ in rows) or 1
    picked = sum(s for _, _, s in rows) or 1
    shares = [(v, n / pool, s / picked) for v, n, s in rows]
    return charts.paired_bar_chart(shares, f"share of documents by {column}", ("pool", "selection"), (REST, SELECTED))


def clusters_chart(rows: list[tuple]) -> str:
    columns = [(str(r[0]), r[1], r[2]) for r in rows]
    return charts.column_chart(columns, "cluster (largest first)", ("size", "selected"), (REST, SELECTED))


def timings_chart(stages: list[tuple[str, float]]) -> str:
    return charts.bar_chart([(s, t, SELECTED) for s, t in stages], "wall time (s)", [f"{t:.1f} s" for _, t in stages])


# ---- the page -----------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:14px;margin:14px 0 4px}
.facts{color:#59636e;font-size:13px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px 16px;min-width:140px}
.card b{display:block;font-size:22px} .card span{color:#59636e;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(500px,1fr));gap:12px}
.panel{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px}
img{max-width:100%} table{border-collapse:collapse;font-size:12px;background:#fff;width:100%}
td,th{border:1px solid #e3e6ea;padding:3px 6px;text-align:left;vertical-align:top;white-space:nowrap}
th{background:#eef1f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
td.text{color:#3b444d;white-space:normal;overflow-wrap:anywhere;width:100%}
.note{color:#59636e;font-size:12px} .warn{color:#8a4b00}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset(), text: int | None = None) -> str:
    """An HTML table; ``numeric`` columns right-aligned, the ``text`` column wrapped, the others not."""

    def cell(i, c):
        kind = " class='n'" if i in numeric else " class='text'" if i == text else ""
        return f"<td{kind}>{_e(c)}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _funnel(manifest: dict) -> tuple[list[tuple[str, int, str]], list[list]]:
    counts = manifest["counts"]
    steps = [("records read", counts["input_records"], REST)]
    if counts.get("rejected"):
        steps.append(("rejected", counts["rejected"], REJECTED))
    reasons = []
    for stage in manifest.get("stages") or []:
        steps.append((f"after {stage['name']}", stage["out"], SELECTED if stage is manifest["stages"][-1] else REST))
        for reason, n in (stage.get("taken_out") or {}).items():
            reasons.append([stage["name"], reason, n])
    for reason, n in (counts.get("rejected_by_reason") or {}).items():
        reasons.insert(0, ["read", f"rejected: {reason}", n])
    return steps, reasons


def _kl(manifest: dict) -> str:
    kl = (manifest.get("dsir") or {}).get("kl")
    if not kl:
        return ""
    return (
        f"<h2>How close the selection is to the target</h2><div class='cards'>"
        f"<div class='card'><b>{kl['reduction']:.4f}</b><span>KL reduction</span></div>"
        f"<div class='card'><b>{kl['target_vs_selected']:.4f}</b><span>KL(target ‖ selection)</span></div>"
        f"<div class='card'><b>{kl['target_vs_random']:.4f}</b><span>KL(target ‖ random pick)</span></div></div>"
        "<p class='note'>The KL divergence from the target's hashed n-gram distribution to the selection's, "
        "against a seeded random pick of the same size from the pool: the reduction is how much nearer the "
        "target the selection is than chance (DSIR's measure; 0 is no better than random, negative worse).</p>"
    )


def _stages(manifest: dict) -> list[str]:
    return (manifest.get("config") or {}).get("stages") or ["dsir", "select"]


def _ranked_column(manifest: dict) -> str | None:
    for stage in manifest.get("stages") or []:
        if stage["name"] == "select" and stage.get("ranked_by"):
            return stage["ranked_by"]["column"]
    return None


def build_html(con, manifest: dict, title: str) -> str:
    counts = manifest["counts"]
    parts = [
        f"<h1>beamsift report: {_e(title)}</h1>",
        f"<div class='facts'>run {_e(manifest.get('run_id', ''))} · {_e(manifest.get('created', ''))} · "
        f"config {_e(manifest.get('config_file', ''))} · stages {_e(', '.join(_stages(manifest)))} · "
        f"seed {_e(manifest.get('seed'))} · beamsift {_e(manifest.get('beamsift_version', ''))} · "
        f"{_e((manifest.get('runner') or {}).get('name', ''))}</div>",
        "<div class='cards'>"
        + "".join(
            f"<div class='card'><b>{counts.get(k, 0):,}</b><span>{label}</span></div>"
            for k, label in (
                ("input_records", "records read"),
                ("selected", "selected"),
                ("not_selected", "not selected"),
                ("rejected", "rejected"),
            )
        )  # fmt: skip
        + "</div>",
    ]
    steps, reasons = _funnel(manifest)
    parts.append("<h2>From the records read to the selection</h2><div class='grid'><div class='panel'>")
    parts.append(funnel_chart(steps) + "</div><div class='panel'>")
    rows = [[a, b, f"{n:,}"] for a, b, n in reasons]
    parts.append(_table(["stage", "why documents left", "documents"], rows, {2}, text=1))
    parts.append("</div></div>")
    parts.append(_kl(manifest))

    columns = _columns(con, "scores")
    names = {n for n, _ in columns}
    ranked = _ranked_column(manifest)
    scores = [n for n, k in columns if _numeric(k) and n not in NOT_SCORES and n != "cluster"]
    if scores:
        parts.append("<h2>Every score: the selection against the rest</h2><div class='grid'>")
        for name in scores[:MAX_CHARTS]:
            h = histogram(con, name)
            if h:
                cut = " (the selector's column: the dashed lines bound the selection)" if name == ranked else ""
                parts.append(
                    f"<div class='panel'><h3>{_e(name)}{_e(cut)}</h3>{histogram_chart(name, h, name == ranked)}"
                    f"<div class='note'>{h['documents']:,} documents with a value</div></div>"
                )
        parts.append("</div>")

    categorical = [n for n, k in columns if k == "VARCHAR" and n not in NOT_SCORES]
    charts = [(n, rows) for n in categorical if (rows := composition(con, n))]
    if charts:
        parts.append("<h2>What the selection is made of, against the pool</h2><div class='grid'>")
        for name, rows in charts:
            parts.append(f"<div class='panel'><h3>by {_e(name)}</h3>{composition_chart(name, rows)}</div>")
        parts.append("</div>")

    if "clusters" in _views(con) and "cluster" in names:
        rows = con.execute(
            "SELECT cluster, size, selected, duplicates, examples FROM clusters ORDER BY size DESC, cluster"
        ).fetchall()
        shown = rows[:40]
        parts.append(f"<h2>Clusters ({len(rows)})</h2><div class='panel'>{clusters_chart(shown)}</div>")
        parts.append(
            _table(
                ["cluster", "size", "selected", "duplicates", "nearest the centroid"],
                [[c, f"{s:,}", f"{k:,}", f"{d:,}", ", ".join(map(str, (ex or [])[:5]))] for c, s, k, d, ex in shown],
                {1, 2, 3},
                text=4,
            )  # fmt: skip
        )

    by_reason = {**(counts.get("not_selected_by_reason") or {}), **(counts.get("rejected_by_reason") or {})}
    duplicates = {reason: n for reason, n in by_reason.items() if "duplicate" in reason}
    if duplicates:
        parts.append("<h2>Duplicates found</h2>")
        parts.append(_table(["kind", "documents"], [[k, f"{v:,}"] for k, v in sorted(duplicates.items())], {1}))

    if "examples" in _views(con):
        rows = con.execute(
            'SELECT "column", "end", rank, value, id, selected, text FROM examples ORDER BY 1, 2 DESC, 3'
        ).fetchall()
        if rows:
            parts.append("<h2>The documents at both ends of every score</h2>")
            by_column: dict = {}
            for r in rows:
                by_column.setdefault(r[0], []).append(r)
            for column, rs in by_column.items():
                parts.append(f"<h3>{_e(column)}</h3>")
                parts.append(
                    _table(
                        ["end", "value", "id", "selected", "text (cut short)"],
                        [[f"{e} {k}", _fmt(v), i, "yes" if s else "", _short(t)] for _, e, k, v, i, s, t in rs],
                        text=4,
                    )  # fmt: skip
                )

    stages = [(name, t["wall_s"]) for name, t in ((manifest.get("timings") or {}).get("stages") or {}).items()
              if isinstance(t, dict) and "wall_s" in t]  # fmt: skip
    if stages:
        total = (manifest.get("timings") or {}).get("total_s")
        resumed = (manifest.get("resumed") or {}).get("stages") or []
        also = f"; resumed after {_e(resumed[-1])}, whose stages an interrupted run had finished" if resumed else ""
        parts.append(f"<h2>Time by stage</h2><div class='panel'>{timings_chart(stages)}"
                     f"<div class='note'>the whole run: {total} s{also}</div></div>")  # fmt: skip
    if manifest.get("warnings"):
        parts.append(
            "<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in manifest["warnings"]) + "</ul>"
        )
    body = "\n".join(p for p in parts if p)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>beamsift report: {_e(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def _short(text: str | None, n: int = 220) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _views(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def build_report(out_dir: str, manifest: dict | None = None, title: str | None = None) -> str:
    """The report of the output at ``out_dir`` (local or on an object store) as HTML;
    ``manifest``: the run's (when it is not yet written there)."""
    from beamsift.pipeline.query import connect

    con = connect(out_dir, require_manifest=manifest is None)
    try:
        if manifest is None:
            manifest = json.loads(_read(out_dir, "manifest.json"))
        return build_html(con, manifest, title or out_dir)
    finally:
        con.close()


def _read(out_dir: str, name: str) -> bytes:
    """A file of an output, local or on an object store (``query.arrow_filesystem``)."""
    from beamsift.pipeline.query import arrow_filesystem

    fs, root = arrow_filesystem(out_dir)
    with fs.open_input_stream(f"{root}/{name}", compression=None) as f:
        return f.read()


def _write(out_dir: str, name: str, data: bytes) -> str:
    """Put a file of an output in place at once: on a local disk written beside it and renamed
    over the old; an object's upload is atomic as it is."""
    import pyarrow.fs as pafs
    from beamsift.pipeline.query import arrow_filesystem

    fs, root = arrow_filesystem(out_dir)
    target = f"{root}/{name}"
    local = isinstance(fs, pafs.LocalFileSystem)
    try:
        with fs.open_output_stream(target + ".tmp" if local else target, compression=None) as f:
            f.write(data)
        if local:
            fs.move(target + ".tmp", target)
    except BaseException:
        if local:  # nothing half-written left in the output for a later --overwrite to trip on
            with contextlib.suppress(OSError):
                fs.delete_file(target + ".tmp")
        raise
    if local:
        return target
    return out_dir.rstrip("/") + "/" + name


def _exists(out_dir: str, name: str) -> bool:
    import pyarrow.fs as pafs
    from beamsift.pipeline.query import arrow_filesystem

    fs, root = arrow_filesystem(out_dir)
    return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound


def write_report(out_dir: str, manifest: dict | None = None) -> str:
    """Build the report of a published output and put it in place. Returns its path."""
    return _write(out_dir, REPORT, build_report(out_dir, manifest).encode("utf-8"))


def add_arguments(parser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output.dir of a finished `beamsift run`")
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="write the page here instead of OUTPUT_DIR/report.html (a local file)"
    )


def main(args) -> int:
    """``beamsift report DIR``: report.html built again for an earlier output; the manifest's list
    of files gains it, so that a later --overwrite replaces it as beamsift's own."""
    from beamsift.pipeline.query import QueryError

    try:
        manifest = json.loads(_read(args.output_dir, "manifest.json"))
    except (OSError, ValueError) as e:
        raise QueryError(
            f"{args.output_dir}: no readable manifest.json: not the output of a finished beamsift run ({e})"
        ) from None
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(build_report(args.output_dir, manifest))
        print(f"beamsift: wrote {args.output}")
        return 0
    if REPORT not in manifest.get("files", []) and _exists(args.output_dir, REPORT):
        raise QueryError(
            f"{args.output_dir} holds a {REPORT} that beamsift did not write; write the report elsewhere with -o FILE"
        )
    path = write_report(args.output_dir, manifest)
    if REPORT not in manifest.get("files", []):
        manifest["files"] = sorted([*manifest.get("files", []), REPORT])
        _write(args.output_dir, "manifest.json", json.dumps(manifest, indent=2).encode())
    print(f"beamsift: wrote {path}")
    return 0
