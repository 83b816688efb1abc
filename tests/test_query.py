"""``beamsift query`` over a real (small, hand-written) output folder with real DuckDB: formats,
cut cells, and errors that keep DuckDB's whole message."""

from __future__ import annotations

import argparse
import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from beamsift.pipeline.query import HELP_EPILOG, QueryError, add_arguments, connect, main, run_query

# Over 100 characters, with a newline and a pipe in the first 60.
LONG = "first line | with a pipe\n" + "second line " + "x" * 100
SELECTED = {
    "id": ["doc-1", "doc-2"],
    "text": [LONG, "short"],
    "n_tokens": [150, 7],
    "source": ["web", None],
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "manifest.json").write_text("{}")
    tables = {
        "selected": pa.table(SELECTED),
        "scores": pa.table(
            {
                "id": ["doc-1", "doc-2", "doc-3"],
                "dsir_log_weight": [2.5, 1.0, -3.0],
                "selected": [True, True, False],
                "reason": ["selected", "selected", "below threshold"],
            }
        ),
        "rejected": pa.table(
            {
                "input": ["pool"],
                "source_file": ["pool.jsonl"],
                "position": pa.array([42], pa.int64()),
                "reason": ["invalid json"],
                "record": ["{not json"],
                "id": pa.array([None], pa.string()),
            }
        ),
    }
    for name, table in tables.items():
        (d / name).mkdir()
        pq.write_table(table, d / name / "part-0.parquet")
    (d / "artifacts").mkdir()
    (d / "artifacts" / "dsir_model.npz").write_bytes(b"not parquet")
    return d


def query(capsys, out_dir, sql: str, *options: str) -> str:
    """``beamsift query OUTPUT_DIR SQL [OPTIONS]`` as the command line parses it; its stdout."""
    parser = argparse.ArgumentParser(prog="beamsift query", epilog=HELP_EPILOG)
    add_arguments(parser)
    args = parser.parse_args([str(out_dir), sql, *options])
    assert main(args) == 0
    return capsys.readouterr().out


def error(out_dir, sql: str) -> str:
    parser = argparse.ArgumentParser(prog="beamsift query")
    add_arguments(parser)
    with pytest.raises(QueryError) as e:
        main(parser.parse_args([str(out_dir), sql]))
    return str(e.value)


def test_views_are_the_parquet_folders(out):
    columns, rows = run_query(str(out), "SELECT table_name FROM information_schema.tables ORDER BY 1")
    assert columns == ["table_name"] and rows == [("rejected",), ("scores",), ("selected",)]
    con = connect(str(out))
    try:
        assert con.execute("SELECT count(*) FROM scores").fetchone() == (3,)
    finally:
        con.close()


def test_table_keeps_its_look_and_says_nothing_when_nothing_is_cut(capsys, out):
    text = query(capsys, out, "SELECT id, n_tokens, source FROM selected ORDER BY id")
    assert text.splitlines() == [
        "id    | n_tokens | source",
        "------+----------+-------",
        "doc-1 | 150      | web   ",
        "doc-2 | 7        | NULL  ",
        "(2 rows)",
    ]


def test_table_cuts_long_cells_and_says_so(capsys, out):
    lines = query(capsys, out, "SELECT id, text FROM selected ORDER BY id").splitlines()
    assert len(lines) == 6  # header, separator, 2 rows, footer, note: the newline did not split a row
    assert lines[4] == "(2 rows)"
    assert lines[5] == "(cells longer than 60 characters were cut; --max-width 0 shows them whole)"
    cell = lines[2].split(" | ", 1)[1].rstrip()
    assert len(cell) == 60 and cell.endswith("…")
    assert cell.startswith("first line | with a pipe\\nsecond line ")


def test_max_width_0_shows_whole_cells(capsys, out):
    shown = LONG.replace("\n", "\\n")
    lines = query(capsys, out, "SELECT text FROM selected WHERE id = 'doc-1'", "--max-width", "0").splitlines()
    assert lines[2] == shown and lines[-1] == "(1 row)"


def test_note_appears_exactly_when_a_cell_is_cut(capsys, out):
    shown = len(LONG.replace("\n", "\\n"))
    sql = "SELECT text FROM selected"
    assert "--max-width 0" not in query(capsys, out, sql, "--max-width", str(shown))
    text = query(capsys, out, sql, "--max-width", str(shown - 1))
    assert text.splitlines()[-1] == (
        f"(cells longer than {shown - 1} characters were cut; --max-width 0 shows them whole)"
    )


def test_csv_parses_back_to_the_same_rows_and_is_never_cut(capsys, out):
    text = query(capsys, out, "SELECT * FROM selected ORDER BY id", "--format", "csv", "--max-width", "10")
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == list(SELECTED)
    expected = [["" if v is None else str(v) for v in row] for row in zip(*SELECTED.values())]
    assert parsed[1:] == expected
    assert parsed[1][1] == LONG  # whole, with its real newline and pipe
    assert "cut" not in text


def test_json_lines_parse_back(capsys, out):
    text = query(capsys, out, "SELECT * FROM selected ORDER BY id", "--format", "json", "--max-width", "10")
    lines = text.splitlines()
    assert len(lines) == 2
    assert [json.loads(line) for line in lines] == [dict(zip(SELECTED, row)) for row in zip(*SELECTED.values())]


def test_json_keeps_duplicate_columns_and_odd_values(capsys, out):
    text = query(
        capsys,
        out,
        "SELECT 1 AS a, 2 AS a, 'nan'::DOUBLE AS f, DATE '2024-05-01' AS d, [1, 2] AS l, {'x': NULL} AS s",
        "--format",
        "json",
    )
    assert json.loads(text) == {"a": 1, "a_1": 2, "f": "nan", "d": "2024-05-01", "l": [1, 2], "s": {"x": None}}


def test_markdown_table_escapes_pipes_and_newlines(capsys, out):
    text = query(capsys, out, "SELECT id, text FROM selected ORDER BY id", "--format", "markdown", "--max-width", "0")
    lines = text.splitlines()
    assert lines[0] == "| id | text |"
    assert lines[1] == "| --- | --- |"
    assert lines[2] == "| doc-1 | " + LONG.replace("|", "\\|").replace("\n", "\\n") + " |"
    assert lines[3] == "| doc-2 | short |"
    assert len(lines) == 4


def test_markdown_cut_note_follows_a_blank_line(capsys, out):
    lines = query(capsys, out, "SELECT id, text FROM selected ORDER BY id", "--format", "markdown").splitlines()
    assert lines[1] == "| --- | --- |"
    assert "with a pipe" in lines[2] and "\\|" in lines[2] and "…" in lines[2]
    assert lines[-2:] == ["", "(cells longer than 60 characters were cut; --max-width 0 shows them whole)"]


def test_misspelt_table_keeps_duckdbs_hint(out):
    message = error(out, "SELECT * FROM selectd")
    assert message.startswith("Catalog Error: Table with name selectd does not exist!")
    assert 'Did you mean "selected"' in message
    assert "LINE 1: SELECT * FROM selectd" in message


def test_misspelt_column_keeps_duckdbs_candidates(out):
    message = error(out, "SELECT txt FROM selected")
    assert 'Referenced column "txt" not found' in message
    assert 'Candidate bindings: "text"' in message
    assert "LINE 1:" in message


def test_syntax_error_keeps_line_pointer(out):
    message = error(out, "SELEC id FROM selected")
    lines = message.splitlines()
    assert lines[0] == 'Parser Error: syntax error at or near "SELEC"'
    assert "LINE 1: SELEC id FROM selected" in lines
    assert lines[-1].strip() == "^^^^^"


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    assert error(missing, "SELECT 1") == f"{missing}: no such folder"


def test_folder_without_manifest(tmp_path):
    (tmp_path / "selected").mkdir()
    assert error(tmp_path, "SELECT 1") == (
        f"{tmp_path} has no manifest.json: not the output of a finished beamsift run"
    )


@pytest.mark.parametrize("options", [["--max-width", "-1"], ["--max-width", "wide"], ["--format", "xml"]])
def test_bad_options_are_usage_errors(out, options, capsys):
    parser = argparse.ArgumentParser(prog="beamsift query")
    add_arguments(parser)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([str(out), "SELECT 1", *options])
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err


def test_help_names_the_views_and_shows_examples():
    for view in ("selected", "scores", "rejected"):
        assert f"  {view}  " in HELP_EPILOG
    assert HELP_EPILOG.count("beamsift query ") >= 2
