"""Every error a user can reach: exit status 2 and one line that names the real cause, as the
command line prints it. Most of them are found before any worker starts."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, demo_records, make_config, run_cli, write_jsonl


def _error(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    text = proc.stderr.strip()
    assert "\n" not in text, text  # one line: no traceback, no worker log
    assert text.startswith("beamsift: error: ")
    return text[len("beamsift: error: ") :]


@pytest.fixture(scope="module")
def pool_records():
    return demo_records(300)


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "input.text_field=txt",
            "input.text_field 'txt' is in none of the first 100 records of {pool}; "
            "their fields: 'id', 'text', 'source', 'n'",
        ),
        (
            "input.text_field=n",
            "input.text_field 'n' holds a number, never text, in the first 100 records of {pool}; "
            "their fields: 'id', 'text', 'source', 'n'",
        ),
        (
            "input.id_field=doc",
            "input.id_field 'doc' is in none of the first 100 records of {pool}; "
            "their fields: 'id', 'text', 'source', 'n'",
        ),
        (
            "target.text_field=body",
            "target.text_field 'body' is in none of the first 40 records of {target}; "
            "their fields: 'id', 'text', 'source'",
        ),
        (
            "input.text_field=id",
            "--set input.text_field=id: 'input.id_field' and 'input.text_field' name the same field",
        ),
        ("target.path={dir}/nothere.jsonl", "target.path {dir}/nothere.jsonl: no files match"),
        (
            "dsir.model={dir}/nothere",
            "dsir.model {dir}/nothere: no dsir_model.npz there; "
            "give an earlier run's folder, its artifacts/ folder or the file",
        ),
        ("select.kk=3", "--set select.kk=3: unknown config key 'select.kk' (did you mean 'select.k'?)"),
        ("selct.k=3", "--set selct.k=3: unknown config key 'selct.k' (did you mean 'select.k'?)"),
        (
            "select=3",
            "--set select=3: 'select' is a section; set one of its keys: 'select.method', 'select.quota', "
            "'select.quota_column', 'select.group_column', 'select.column', 'select.k', 'select.fraction', "
            "'select.offset', 'select.min', 'select.max', 'select.quad_block', 'select.quad_clusters', "
            "'select.quad_probes', 'select.quad_alpha', 'select.quad_delta', 'select.quad_offset', "
            "'select.quad_rounds'",
        ),
        ("seed=abc", "--set seed=abc: config key 'seed' must be an integer, got text: 'abc'"),
        (
            "input.format=csv",
            "--set input.format=csv: config key 'input.format' must be one of ['auto', 'hf', 'jsonl', "
            "'jsonl.gz', 'jsonl.zst', 'parquet', 'txt'], got 'csv'",
        ),
    ],
)
def test_wrong_keys_and_fields_are_named(tmp_path, pool_records, override, expected):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{**r, "n": i} for i, r in enumerate(pool_records)])
    target = write_jsonl(
        tmp_path / "target.jsonl", [{k: r[k] for k in ("id", "text", "source")} for r in pool_records[:40]]
    )
    cfg = make_config(tmp_path, pool, target)
    proc = run_cli("run", str(cfg), "--set", override.format(dir=tmp_path), check=False)
    assert _error(proc) == expected.format(pool=pool, target=target, dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_parquet_columns_are_checked_from_the_schema(tmp_path, small_corpus, pool_records):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "n": 1} for r in pool_records]), path)
    cfg = make_config(tmp_path, path, small_corpus["target"])
    assert _error(run_cli("run", str(cfg), "--set", "input.text_field=body", check=False)) == (
        f"input.text_field 'body' is not a column of {path}; its columns: 'id', 'text', 'source', 'n'"
    )
    assert _error(run_cli("run", str(cfg), "--set", "input.text_field=n", check=False)) == (
        f"input.text_field 'n' is a column of numbers, not text, in {path}; its columns: 'id', 'text', 'source', 'n'"
    )


def test_a_folder_given_as_a_text_input(tmp_path, small_corpus):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a document\n")
    cfg = make_config(tmp_path, tmp_path / "docs", small_corpus["target"], input={"format": "txt", "id_field": None})
    assert _error(run_cli("run", str(cfg), check=False)) == (
        f"input.path {tmp_path}/docs is a folder; give a glob of its files, e.g. {tmp_path}/docs/*.jsonl or "
        f"{tmp_path}/docs/*.txt"
    )


def test_text_that_is_not_json_lines(tmp_path, small_corpus):
    path = tmp_path / "notes.jsonl"
    path.write_text("just some text\nmore text\n")
    cfg = make_config(tmp_path, path, small_corpus["target"])
    assert _error(run_cli("run", str(cfg), check=False)) == (
        f"input.path: none of the first 2 lines of {path} is a JSON object (line 1: 'just some text'); "
        "is input.format right?"
    )


def test_when_most_records_are_rejected_the_error_says_why(tmp_path, small_corpus, pool_records):
    # The first 100 records are fine (the check before the run passes); the other 200 name
    # their text differently, so only 100 documents are eligible for k=150.
    records = pool_records[:100] + [{"id": r["id"], "body": r["text"]} for r in pool_records[100:]]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(tmp_path, pool, small_corpus["target"], dsir={"min_tokens": 0}, select={"k": 150})
    assert _error(run_cli("run", str(cfg), check=False)) == (
        "select.k=150 is larger than the 100 eligible documents: 200 of 300 pool records were rejected, 200 as "
        "'missing text field' (no field 'text'; the record's fields: 'id', 'body') (lower select.k)"
    )


def test_more_clusters_than_documents_fails_at_the_fit_with_one_line(tmp_path, pool_records):
    # k-means is fitted where its sample is merged (inside the sample's combine): its error
    # still reaches the user as the fit words it, not as a worker's traceback
    pool = write_jsonl(tmp_path / "pool.jsonl", pool_records[:60])
    cfg = make_config(tmp_path, pool, pool, stages=["embed", "cluster", "select"], cluster={"k": 64},
                      select={"method": "all"})  # fmt: skip
    assert _error(run_cli("run", str(cfg), check=False)) == (
        "cluster.k=64 is more than the 60 documents sampled to fit the centroids"
    )


def test_a_target_whose_every_record_is_rejected(tmp_path, small_corpus):
    target = write_jsonl(tmp_path / "target.jsonl", [{"text": "   "}] * 20)
    cfg = make_config(tmp_path, small_corpus["pool"], target)
    assert _error(run_cli("run", str(cfg), check=False)) == (
        "the target has no valid documents: 20 of 20 target records were rejected, 20 as 'empty text' "
        "(field 'text' holds only white space)"
    )


def test_relative_paths_are_read_from_the_current_folder_and_the_error_says_where(tmp_path, small_corpus):
    # A config in a sub-folder naming its input relative to itself: found beside the config,
    # not in the current folder (the repository root, where run_cli runs).
    (tmp_path / "cfgs").mkdir()
    write_jsonl(tmp_path / "pool.jsonl", demo_records(50))
    cfg = tmp_path / "cfgs" / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": {"path": "../pool.jsonl"},
                "target": {"path": str(small_corpus["target"])},
                "select": {"k": 5},
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    assert _error(run_cli("run", str(cfg), check=False)) == (
        f"input.path ../pool.jsonl: no files match (relative paths are read from the current folder, {ROOT}; "
        f"the config's folder has it: write {tmp_path}/pool.jsonl)"
    )


def test_select_fraction_on_the_command_line_replaces_k(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])  # the file sets select.k
    run_cli("run", str(cfg), "--set", "select.fraction=0.1")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["select"]["k"] is None and manifest["config"]["select"]["fraction"] == 0.1
    assert manifest["counts"]["selected"] == round(0.1 * manifest["dsir"]["eligible"])
    both = run_cli("run", str(cfg), "--set", "select.fraction=0.1", "--set", "select.k=5", check=False)
    assert _error(both) == (
        "--set select.k=5: set only one of 'select.k' and 'select.fraction' (the other can be cleared with "
        "--set select.k=null or --set select.fraction=null)"
    )


def test_dsir_model_takes_a_run_folder(tmp_path, small_corpus):
    first = make_config(tmp_path / "a", small_corpus["pool"], small_corpus["target"])
    run_cli("run", str(first))
    for given in ("out", "out/artifacts", "out/artifacts/dsir_model.npz"):
        cfg = make_config(
            tmp_path / "b", small_corpus["pool"], small_corpus["target"], dsir={"model": str(tmp_path / "a" / given)}
        )
        run_cli("run", str(cfg), "--overwrite")
        manifest = json.loads((tmp_path / "b" / "out" / "manifest.json").read_text())
        assert manifest["counts"]["selected"] == 50 and manifest["target"]["documents_used"] == 0


def test_query_errors(tmp_path, small_corpus):
    assert (
        _error(run_cli("query", str(tmp_path / "nothere"), "SELECT 1", check=False))
        == f"{tmp_path}/nothere: no such folder"
    )
    (tmp_path / "half").mkdir()
    assert _error(run_cli("query", str(tmp_path / "half"), "SELECT 1", check=False)) == (
        f"{tmp_path}/half has no manifest.json: not the output of a finished beamsift run"
    )
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    run_cli("run", str(cfg))
    # DuckDB's own hints are kept whole: the message spans lines here, by DuckDB's design.
    proc = run_cli("query", str(tmp_path / "out"), "SELECT id FROM selectd", check=False)
    assert proc.returncode == 2
    assert 'Did you mean "selected"' in proc.stderr and "LINE 1: SELECT id FROM selectd" in proc.stderr


def test_init_writes_the_template_and_never_overwrites(tmp_path):
    path = tmp_path / "mine.yaml"
    run_cli("init", str(path))
    text = path.read_text()
    assert "select:" in text and "# " in text  # the commented template
    assert _error(run_cli("init", str(path), check=False)) == f"{path} already exists; give another path"
    assert path.read_text() == text


def test_version_and_help():
    assert run_cli("--version").stdout.strip().startswith("beamsift ")
    run_help = run_cli("run", "--help").stdout
    assert "--set dotted.key=value" in run_help and "-- BEAM_OPTIONS" in run_help
    template = run_help.split("the template: ", 1)[1].split()[0]
    assert template.endswith("dsir.yaml") and open(template).read().startswith("# DSIR")
    query_help = run_cli("query", "--help").stdout
    assert all(view in query_help for view in ("selected", "scores", "rejected"))


def test_config_file_errors(tmp_path, small_corpus):
    missing = tmp_path / "nothere.yaml"
    assert _error(run_cli("run", str(missing), check=False)) == f"{missing}: no such config file"
    broken = tmp_path / "broken.yaml"
    broken.write_text("input: [unclosed\n")
    assert _error(run_cli("run", str(broken), check=False)) == (
        f"{broken}: not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"
    )
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], dsir={"smoothing": True})
    assert _error(run_cli("run", str(cfg), check=False)) == (
        f"{cfg}: config key 'dsir.smoothing' must be a number, got true or false: True"
    )
    no_out = tmp_path / "no-out.yaml"
    no_out.write_text(yaml.safe_dump({"input": {"path": "x"}, "target": {"path": "y"}, "select": {"k": 1}}))
    assert _error(run_cli("run", str(no_out), check=False)) == f"{no_out}: missing required config key 'output.dir'"


def test_output_dir_that_is_a_file_or_a_link(tmp_path, small_corpus):
    (tmp_path / "file").write_text("mine")
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], out=tmp_path / "file")
    assert _error(run_cli("run", str(cfg), check=False)) == f"output.dir {tmp_path}/file is a file, not a folder"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], out=tmp_path / "link")
    assert _error(run_cli("run", str(cfg), check=False)) == (
        f"output.dir {tmp_path}/link is a symbolic link; give the folder itself"
    )
    assert (tmp_path / "file").read_text() == "mine" and not any((tmp_path / "real").iterdir())


def test_unknown_file_suffix_and_a_model_of_another_shape(tmp_path, small_corpus):
    odd = tmp_path / "pool.data"
    odd.write_bytes(small_corpus["pool"].read_bytes())
    cfg = make_config(tmp_path, odd, small_corpus["target"])
    assert _error(run_cli("run", str(cfg), check=False)) == (
        f"input.path: cannot tell the format of {odd} from its name; set input.format "
        "(one of jsonl, jsonl.gz, jsonl.zst, parquet, txt, hf)"
    )
    run_cli("run", str(cfg), "--set", "input.format=jsonl")  # the format named: it reads
    model = tmp_path / "out"
    cfg = make_config(tmp_path / "b", small_corpus["pool"], small_corpus["target"], dsir={"model": str(model)})
    assert _error(run_cli("run", str(cfg), "--set", "featurize.buckets=999", check=False)) == (
        "dsir.model was fitted with featurize.buckets=10000, but the config sets 999"
    )


def test_a_dedup_epsilon_off_the_cosine_scale_is_refused(tmp_path):
    # 2 is a distance between unit vectors where a share of the cosine scale is meant: every
    # document would count as a duplicate of the first kept one
    out = tmp_path / "out"
    config = str(ROOT / "configs" / "semdedup.yaml")
    proc = run_cli("run", config, "--set", "dedup.epsilon=2", "--set", f"output.dir={out}", check=False)
    assert _error(proc) == "--set dedup.epsilon=2: config key 'dedup.epsilon' is a share: it must be in [0, 1], got 2"
    assert not out.exists()
