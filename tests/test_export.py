"""A run's selection in the trainers' formats: selected/ as it is through ``datasets``' parquet
loader, and ``beamsift export`` to a ``save_to_disk`` folder and to JSON Lines shards, loaded
back with ``datasets``; weights travel as a column."""

from __future__ import annotations

import json
import math

import duckdb
import pytest
from conftest import S3_BUCKET, demo_records, make_config, run_cli, s3_keys, write_jsonl

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory):
    """A finished run whose selection carries weights (sensitivity sampling's), in several shards."""
    tmp = tmp_path_factory.mktemp("run")
    pool = write_jsonl(tmp / "pool.jsonl", demo_records(300))
    cfg = make_config(
        tmp,
        pool,
        pool,
        stages=["embed", "cluster", "select"],
        embed={"method": "projection", "dim": 64},
        cluster={"k": 3, "sample": 200, "passes": 1},
        select={"method": "sensitivity", "k": 40},
        input={"path": str(pool), "id_field": "id", "split_bytes": 65536},
    )
    run_cli("run", str(cfg), "--quiet")
    return {"out": tmp / "out", "rows": _selected(tmp / "out")}


def _selected(out):
    """(id, text, weight) of selected/, shard by shard in file order."""
    con = duckdb.connect()
    files = sorted((out / "selected").glob("*.parquet"))
    return [r for f in files for r in con.execute(f"SELECT id, text, weight FROM '{f}'").fetchall()]


@pytest.fixture()
def offline_hf(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return {**OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}


def test_selected_loads_with_datasets_parquet_loader_as_it_is(weighted_run, offline_hf):
    import datasets

    files = sorted(str(f) for f in (weighted_run["out"] / "selected").glob("*.parquet"))
    assert len(files) > 1
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert list(zip(ds["id"], ds["text"], ds["weight"])) == weighted_run["rows"]
    assert len(weighted_run["rows"]) == 40 and all(w > 0 for _, _, w in weighted_run["rows"])


def test_export_to_hf_loads_with_load_from_disk(weighted_run, offline_hf, tmp_path):
    import datasets

    dest = tmp_path / "hf"
    proc = run_cli("export", str(weighted_run["out"]), "--to-hf", str(dest), env=offline_hf)
    assert "exported 40 documents" in proc.stdout and "load_from_disk" in proc.stdout
    ds = datasets.load_from_disk(str(dest))
    assert list(zip(ds["id"], ds["text"], ds["weight"])) == weighted_run["rows"]
    assert "cluster" in ds.column_names  # every column of selected/ by default
    # Only its own: no temporary sibling left beside it.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf-home") == ["hf"]


def test_export_to_jsonl_shards_of_the_chosen_size_with_the_trainers_columns(weighted_run, offline_hf, tmp_path):
    import datasets

    dest = tmp_path / "jsonl"
    run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(dest), "--columns", "id,text,weight",
            "--shard-docs", "15", "--gzip", env=offline_hf)  # fmt: skip
    shards = sorted(p.name for p in dest.glob("*.jsonl.gz"))
    assert shards == [f"part-{i:05d}.jsonl.gz" for i in range(math.ceil(40 / 15))]
    ds = datasets.load_dataset("json", data_files=[str(dest / s) for s in shards], split="train")
    assert ds.column_names == ["id", "text", "weight"]
    assert list(zip(ds["id"], ds["text"], ds["weight"])) == weighted_run["rows"]
    assert json.loads((dest / "beamsift_export.json").read_text())["documents"] == 40


def test_export_never_replaces_what_is_not_an_earlier_export(weighted_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(mine), "--overwrite", check=False)
    assert proc.returncode == 2 and "not a beamsift export" in proc.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    dest = tmp_path / "again"
    run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(dest), "--shard-docs", "10")
    again = run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(dest), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(dest), "--overwrite")
    assert sorted(p.name for p in dest.iterdir()) == ["beamsift_export.json", "part-00000.jsonl"]
    # A file of the user's put into an earlier export: replacing it would remove that file.
    (dest / "notes.md").write_text("mine")
    kept = run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(dest), "--overwrite", check=False)
    assert kept.returncode == 2 and "notes.md, which the earlier export did not write" in kept.stderr
    assert (dest / "notes.md").read_text() == "mine"
    (dest / "notes.md").unlink()
    missing = run_cli("export", str(tmp_path / "nothing"), "--to-jsonl", str(tmp_path / "x"), check=False)
    assert missing.returncode == 2 and "no manifest.json" in missing.stderr
    bad = run_cli("export", str(weighted_run["out"]), "--to-jsonl", str(tmp_path / "y"), "--columns", "id,nope",
                  check=False)  # fmt: skip
    assert bad.returncode == 2 and "no column 'nope'" in bad.stderr


def test_export_jsonl_into_a_bucket(weighted_run, s3):
    prefix = "exports/jsonl"
    run_cli("export", str(weighted_run["out"]), "--to-jsonl", f"s3://{S3_BUCKET}/{prefix}", "--shard-docs", "25",
            env=s3["env"])  # fmt: skip
    assert s3_keys(s3, prefix + "/") == [f"{prefix}/beamsift_export.json", f"{prefix}/part-00000.jsonl",
                                         f"{prefix}/part-00001.jsonl"]  # fmt: skip
    assert [k for k in s3_keys(s3, "exports/") if "beamsift-export-" in k] == []
    body = b"".join(s3["client"].get_object(Bucket=S3_BUCKET, Key=f"{prefix}/part-0000{i}.jsonl")["Body"].read()
                    for i in range(2))  # fmt: skip
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert [(r["id"], r["text"], r["weight"]) for r in rows] == weighted_run["rows"]
