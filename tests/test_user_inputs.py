"""Inputs a user writes that once gave a result they could not trust, through the command line:
`~` in paths, query strings with no or several statements, the type of the ids in duplicate_of
and clusters.examples, and label fields that are not labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, demo_records, make_config, run_cli, write_jsonl


def _cli(*args: str, home=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HOME=str(home)) if home is not None else None
    return subprocess.run(
        [sys.executable, "-m", "beamsift.pipeline.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env
    )


def _error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    text = proc.stderr.strip()
    assert "\n" not in text, text  # one line: no traceback
    assert text.startswith("beamsift: error: ")
    return text[len("beamsift: error: ") :]


# ---- item 9: ~ in paths ----------------------------------------------------------------------


def test_tilde_in_paths_is_the_home_folder(tmp_path, small_corpus):
    home = tmp_path / "home"
    home.mkdir()
    write_jsonl(home / "pool.jsonl", demo_records(200))
    cfg = make_config(tmp_path, "~/pool.jsonl", small_corpus["target"], out="~/out")
    assert "~/out" in cfg.read_text()
    proc = _cli("run", str(cfg), home=home)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((home / "out" / "manifest.json").read_text())
    assert manifest["counts"]["selected"] == 50
    assert not (ROOT / "~").exists() and not (tmp_path / "~").exists()
    # --set takes it too.
    proc = _cli("run", str(cfg), "--set", "output.dir=~/again", home=home)
    assert proc.returncode == 0, proc.stderr
    assert (home / "again" / "manifest.json").is_file() and not (ROOT / "~").exists()


def test_a_bare_tilde_is_null_and_the_error_says_so(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    data = yaml.safe_load(cfg.read_text())
    data["output"]["dir"] = None
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(data).replace("dir: null", "dir: ~"))
    assert "dir: ~" in bare.read_text()
    hint = "(YAML reads a bare ~ as null; write '~/...' or quote it)"
    assert _error(run_cli("run", str(bare), check=False)) == (
        f"{bare}: config key 'output.dir' must be text, got null {hint}"
    )
    assert _error(run_cli("run", str(cfg), "--set", "output.dir=~", check=False)) == (
        f"--set output.dir=~: config key 'output.dir' must be text, got null {hint}"
    )
    assert not (ROOT / "~").exists()


# ---- items 12 and 13: a dedup run with integer ids, and one with text ids ----------------------

PLANTED = 6  # documents whose text repeats an earlier one (up to case and punctuation)


def _dedup_run(tmp_path, records, id_of) -> str:
    pool = [{"id": id_of(i), "text": r["text"], "source": r["source"]} for i, r in enumerate(records)]
    pool += [{"id": id_of(900 + i), "text": records[i]["text"].upper() + " !!"} for i in range(PLANTED)]
    path = write_jsonl(tmp_path / "pool.jsonl", pool)
    cfg = make_config(
        tmp_path,
        path,
        path,
        stages=["embed", "cluster", "dedup", "select"],
        embed={"method": "projection", "dim": 32},
        cluster={"k": 4},
        select={"method": "all", "k": None},
    )
    run_cli("run", str(cfg))
    return str(tmp_path / "out")


@pytest.fixture(scope="module")
def int_ids(tmp_path_factory):
    return _dedup_run(tmp_path_factory.mktemp("int_ids"), demo_records(240), lambda i: 10_000 + i)


@pytest.fixture(scope="module")
def text_ids(tmp_path_factory):
    return _dedup_run(tmp_path_factory.mktemp("text_ids"), demo_records(240), lambda i: f"doc-{i}")


def _sql(out: str, sql: str) -> list:
    proc = run_cli("query", out, "--format", "json", sql)
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("sql", ["", "   \n", "-- only a comment", "/* a comment */ ;"])
def test_query_without_a_statement_is_one_line(int_ids, sql):
    message = _error(run_cli("query", int_ids, sql, check=False))
    assert message == 'the SQL is empty (or only comments): give one statement, e.g. "SELECT count(*) FROM scores"'


def test_query_with_two_statements_is_refused_not_half_printed(int_ids):
    proc = run_cli("query", int_ids, "SELECT 1 AS a; SELECT 2 AS b", check=False)
    assert _error(proc) == "the SQL holds 2 statements; beamsift query runs one: run each on its own"
    assert proc.stdout == ""
    # One statement with a trailing ';' and a ';' inside a string is one statement.
    assert _sql(int_ids, "SELECT ';' AS s;") == [{"s": ";"}]


def test_duplicate_of_has_the_type_of_id(int_ids, text_ids):
    sql = "SELECT DISTINCT '{0}' AS view, typeof(id) AS id, typeof(duplicate_of) AS dup FROM {0}"
    for out, expected in ((int_ids, "BIGINT"), (text_ids, "VARCHAR")):
        types = _sql(out, f"{sql.format('scores')} UNION ALL {sql.format('selected')} ORDER BY view")
        assert types == [{"view": v, "id": expected, "dup": expected} for v in ("scores", "selected")], out


def test_duplicate_of_joins_with_id_as_it_is(int_ids, text_ids):
    rows = _sql(
        int_ids,
        "SELECT d.id, d.duplicate_of, d.reason, k.selected AS kept_selected FROM scores d "
        "JOIN scores k ON d.duplicate_of = k.id WHERE d.id >= 10900 ORDER BY d.id",
    )
    # Each planted copy points at the integer id of the document it repeats, which is kept.
    assert [(r["id"], r["duplicate_of"], r["reason"]) for r in rows] == [
        (10_900 + i, 10_000 + i, "exact duplicate") for i in range(PLANTED)
    ]
    assert all(r["kept_selected"] for r in rows)
    (row,) = _sql(
        text_ids,
        "SELECT (SELECT count(duplicate_of) FROM scores) AS n, count(*) AS joined "
        "FROM scores d JOIN scores k ON d.duplicate_of = k.id",
    )
    assert row["n"] == row["joined"] >= PLANTED


def test_cluster_examples_have_the_type_of_id(int_ids, text_ids):
    for out, expected, kind in ((int_ids, "BIGINT[]", int), (text_ids, "VARCHAR[]", str)):
        # Every example is an id of scores/, compared as it is.
        (row,) = _sql(
            out,
            "SELECT (SELECT list(DISTINCT typeof(examples)) FROM clusters) AS types, count(*) AS n, "
            "count(s.id) AS found FROM (SELECT unnest(examples) AS e FROM clusters) LEFT JOIN scores s ON s.id = e",
        )
        assert row["types"] == [expected] and row["n"] == row["found"] > 0
        manifest = json.loads(open(os.path.join(out, "manifest.json")).read())
        examples = [e for c in manifest["clusters"] for e in c["examples"]]
        assert examples and all(isinstance(e, kind) for e in examples)


# ---- item 14: a label field that holds no labels ---------------------------------------------


def _label_config(tmp_path, pool, field: str):
    return make_config(
        tmp_path,
        pool,
        pool,
        input={"label_field": field},
        stages=["proxy", "select"],
        proxy={"seeds": 1, "epochs": 1, "sample": 100},
        select={"method": "top", "column": "el2n", "k": 10},
    )


@pytest.mark.parametrize(
    "value, kind, shown",
    [
        (lambda r: {"source": r["source"]}, "an object", '{"source": "kjv"}'),
        (lambda r: [r["source"]], "a list", '["kjv"]'),
    ],
)
def test_a_label_field_of_objects_or_lists_is_refused_up_front(tmp_path, value, kind, shown):
    records = [{**r, "meta": value(r)} for r in demo_records(200)]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    assert _error(run_cli("run", str(_label_config(tmp_path, pool, "meta")), check=False)) == (
        f"input.label_field 'meta' holds {kind} ({shown}) in 100 of the first 100 records of {pool}: "
        "a label must be a string, a number or a boolean (name a field that holds one)"
    )
    assert not (tmp_path / "out").exists()


def test_a_parquet_label_column_of_structs_is_refused_up_front(tmp_path):
    records = demo_records(200)
    table = pa.table(
        {
            "id": [r["id"] for r in records],
            "text": [r["text"] for r in records],
            "meta": [{"source": r["source"], "n": i} for i, r in enumerate(records)],
        }
    )
    pool = tmp_path / "pool.parquet"
    pq.write_table(table, pool)
    assert _error(run_cli("run", str(_label_config(tmp_path, pool, "meta")), check=False)) == (
        f"input.label_field 'meta' is a column of objects in {pool}: "
        "a label must be a string, a number or a boolean (name a field that holds one)"
    )


def test_a_label_of_its_own_for_every_document_is_refused(tmp_path):
    records = [{**r, "url": f"https://example.org/{r['id']}"} for r in demo_records(200)]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    message = _error(run_cli("run", str(_label_config(tmp_path, pool, "url")), check=False))
    assert message.startswith("input.label_field 'url': each of the proxy's 100 training documents has a label")
    assert message.endswith("a label must name a class that documents share")
    assert not (tmp_path / "out").exists()  # (shared labels train: tests/test_models.py)


def test_a_hub_dataset_id_offline_is_one_clear_line(tmp_path):
    """input.path: hf://OWNER/NAME loads through datasets where the hub can be reached; here it
    cannot, and the run says so at once, with what to do instead."""
    cfg = make_config(tmp_path, "hf://allenai/c4/en@validation", "hf://allenai/c4/en@validation")
    proc = run_cli("run", str(cfg), check=False, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "beamsift: error: input.path hf://allenai/c4/en@validation: the HuggingFace hub is off (HF_HUB_OFFLINE / "
        "HF_DATASETS_OFFLINE); load it where the hub can be reached (datasets.load_dataset(...).save_to_disk(PATH)) "
        "and set input.path to PATH"
    ]
    bad = make_config(tmp_path / "b", "hf://c4", "hf://c4")
    proc = run_cli("run", str(bad), check=False)
    assert proc.returncode == 2 and "a hub dataset is hf://OWNER/NAME" in proc.stderr
