"""Outputs that say what they mean: input names and types kept, a small vocabulary of reasons,
keys that re-select, documented positions, timings, progress, and the README's own queries."""

from __future__ import annotations

import csv
import io
import json
import re

import duckdb
import pytest
from conftest import ROOT, demo_records, make_config, run_cli, write_jsonl


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo, run as the README runs it, into a temporary folder."""
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run_cli("run", "configs/demo.yaml", "--set", f"output.dir={out}")
    return out, proc.stdout


def _query(out, sql):
    return duckdb.connect().execute(sql.replace("{out}", str(out))).fetchall()


def test_reasons_are_a_small_vocabulary_and_the_key_reselects(demo_run):
    out, _ = demo_run
    reasons = dict(_query(out, "SELECT reason, count(*) FROM '{out}/scores/*.parquet' GROUP BY 1"))
    assert reasons == {None: 800, "not sampled": 6272}
    # The same run with a higher minimum length: a third reason, and no key for the short ones.
    short = out.parent / "short"
    run_cli("run", "configs/demo.yaml", "--set", f"output.dir={short}", "--set", "dsir.min_tokens=150")
    reasons = dict(_query(short, "SELECT reason, count(*) FROM '{out}/scores/*.parquet' GROUP BY 1"))
    assert set(reasons) == {None, "not sampled", "too short"} and reasons[None] == 800
    keys = _query(
        short, "SELECT count(dsir_key), max(n_tokens) FROM '{out}/scores/*.parquet' WHERE reason = 'too short'"
    )
    assert keys[0][0] == 0 and keys[0][1] < 150
    # Only an eligible document has a key: ORDER BY dsir_key DESC LIMIT k is the selection.
    for folder in (out, short):
        again = _query(folder, "SELECT id FROM '{out}/scores/*.parquet' ORDER BY dsir_key DESC NULLS LAST LIMIT 800")
        selected = _query(folder, "SELECT id FROM '{out}/selected/*.parquet'")
        assert sorted(again) == sorted(selected) and len(selected) == 800


def test_the_readme_queries_give_what_the_readme_says(demo_run):
    out, summary = demo_run
    readme = (ROOT / "README.md").read_text()
    queries = re.findall(r'beamsift query out/demo "([^"]+)"', readme)
    assert len(queries) >= 4
    for sql in queries:
        run_cli("query", str(out), sql)  # every one runs
    # The ones whose results the README states:
    reselect = next(q for q in queries if "dsir_key" in q and "LIMIT" in q)
    ids = run_cli("query", str(out), reselect, "--format", "csv").stdout
    assert sorted(r["id"] for r in csv.DictReader(io.StringIO(ids))) == sorted(
        r[0] for r in _query(out, "SELECT id FROM '{out}/selected/*.parquet'")
    )
    by_reason = next(q for q in queries if "GROUP BY" in q and "reason" in q and "FROM scores" in q)
    rows = list(csv.DictReader(io.StringIO(run_cli("query", str(out), by_reason, "--format", "csv").stdout)))
    assert {r["reason"]: int(r["n"]) for r in rows} == {"not sampled": 6272, "": 800}  # NULL is empty in CSV
    # The summary's own next command works as printed.
    next_sql = re.search(r'next\s+beamsift query \S+ "([^"]+)"', summary).group(1)
    assert run_cli("query", str(out), next_sql).returncode == 0


def test_input_names_and_types_are_kept(tmp_path, small_corpus):
    records = [
        {"doc": i, "content": r["text"], "source": r["source"], "selected": "user's", "reason": 1}
        for i, r in enumerate(demo_records(120))
    ]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path, pool, small_corpus["target"], input={"text_field": "content", "id_field": "doc"}, select={"k": 10}
    )
    run_cli("run", str(cfg))
    out = tmp_path / "out"
    con = duckdb.connect()
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM '{out}/selected/*.parquet'").fetchall()}
    assert types["id"] == "BIGINT" and types["content"] == "VARCHAR" and types["doc"] == "BIGINT"
    # Input fields named like beamsift's columns are the ones renamed, never the other way round.
    assert types["input_selected"] == "VARCHAR" and types["input_reason"] == "BIGINT" and "text" not in types
    scores = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM '{out}/scores/*.parquet'").fetchall()}
    assert scores["id"] == "BIGINT" and scores["selected"] == "BOOLEAN" and "content" not in scores
    row = con.execute(f"SELECT id, content FROM '{out}/selected/*.parquet' ORDER BY id LIMIT 1").fetchone()
    assert row[1] == records[row[0]]["content"]
    # A batch with a string id makes the id column text, for every shard alike.
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"id": 1, "text": "one two three"}, {"id": "b", "text": "four"}])
    cfg = make_config(tmp_path, mixed, small_corpus["target"], select={"k": 1}, dsir={"min_tokens": 0})
    run_cli("run", str(cfg), "--overwrite")
    assert sorted(con.execute(f"SELECT id FROM '{out}/scores/*.parquet'").fetchall()) == [("1",), ("b",)]


def test_document_per_file_text_records_the_file(tmp_path, small_corpus):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"file {name} " + " ".join(demo_records(3)[0]["text"].split()[:50]))
    cfg = make_config(
        tmp_path,
        tmp_path / "*.txt",
        small_corpus["target"],
        input={"txt_mode": "file", "id_field": None},
        select={"k": 2},
        dsir={"min_tokens": 0},
    )
    run_cli("run", str(cfg))
    out = tmp_path / "out"
    files = _query(out, "SELECT source_file FROM '{out}/scores/*.parquet' ORDER BY 1")
    assert [f for (f,) in files] == [str(tmp_path / f"{n}.txt") for n in "abc"]
    picked = _query(out, "SELECT source_file, text FROM '{out}/selected/*.parquet'")
    assert len(picked) == 2 and all(text.startswith(f"file {f[-5]} ") for f, text in picked)


def test_rejected_position_is_the_byte_offset_of_the_line(tmp_path, small_corpus):
    good = demo_records(60)
    pool = write_jsonl(tmp_path / "pool.jsonl", good[:30], [b"{broken", b'{"id": "n", "text": null}'])
    with open(pool, "ab") as f:
        for r in good[30:]:
            f.write(json.dumps(r).encode() + b"\n")
    cfg = make_config(tmp_path, pool, small_corpus["target"], select={"k": 5})
    run_cli("run", str(cfg))
    data = pool.read_bytes()
    rows = _query(tmp_path / "out", "SELECT position, record, reason, detail FROM '{out}/rejected/*.parquet'")
    assert len(rows) == 2
    for position, record, _, _ in rows:
        assert data[position:].split(b"\n", 1)[0].decode() == record
    assert {(r[2], r[3]) for r in rows} == {
        ("malformed JSON", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("text is not a string", "field 'text' holds null"),
    }


def test_manifest_has_per_stage_times(demo_run):
    out, _ = demo_run
    stages = json.loads((out / "manifest.json").read_text())["timings"]["stages"]
    assert {"read", "featurize", "stage", "dsir", "select", "write"} <= set(stages)
    assert all(s["wall_s"] >= 0 for s in stages.values())
    assert stages["write"]["docs"] == stages["featurize"]["docs"] == 7072


def test_progress_on_request_and_silence_with_quiet(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], input={"batch_size": 64})
    shown = run_cli("run", str(cfg), "--progress")
    assert re.search(r"read [\d,]+ .*\| dsir [\d,]+ .*\| select [\d,]+ .*\| written [\d,]+", shown.stderr), shown.stderr
    assert "written 600" in shown.stderr.replace(",", "")
    workers = ["--", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    quiet = run_cli("run", str(cfg), "--force", "--quiet", *workers)
    assert quiet.stderr == ""  # not Beam's logs, not the worker processes'
    assert quiet.stdout.startswith("beamsift: selected 50 of 600 input records")


def test_query_formats_on_the_command_line(demo_run):
    out, _ = demo_run
    sql = "SELECT id, n_tokens FROM scores ORDER BY id LIMIT 3"
    rows = list(csv.reader(io.StringIO(run_cli("query", str(out), sql, "--format", "csv").stdout)))
    assert rows[0] == ["id", "n_tokens"] and len(rows) == 4
    lines = run_cli("query", str(out), sql, "--format", "json").stdout.splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [["id", "n_tokens"]] * 3
    text = run_cli("query", str(out), "SELECT text FROM selected LIMIT 1").stdout
    assert text.rstrip().endswith("--max-width 0 shows them whole)")  # a cut cell is said to be cut
    whole = run_cli("query", str(out), "SELECT text FROM selected LIMIT 1", "--max-width", "0").stdout
    assert "cut" not in whole.splitlines()[-1] and len(whole.splitlines()[2]) > 60
