"""The stage registry's contracts: every column a stage can write is reserved, the selectors
answer an impossible budget alike, and a stage added as one module (doc_length) works end to end."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from beamsift.pipeline.config import ConfigError, load_config
from beamsift.transforms.io.schema import output_column
from beamsift.transforms.stages import STAGES, stage_columns
from beamsift.transforms.stages.doc_length import length_columns
from conftest import demo_records, make_config, run_cli, write_jsonl


def test_every_stage_declares_the_columns_it_writes_among_its_reserved_names():
    for kind, stage in STAGES.items():
        assert bool(stage.all_columns) == (kind not in ("filter", "embed")), kind  # those two write none
        assert set(stage.all_columns) <= stage_columns()
    # A stage's columns in a config are among those it declares (internal ones start with _).
    cfg = load_config("configs/quality_diversity.yaml")
    for name in cfg["stages"]:
        kind = name.split("_")[0] if name.startswith("filter") else name
        written = {c for c, _ in STAGES[kind].columns(cfg, name) if not c.startswith("_")}
        assert written <= set(STAGES[kind].all_columns), kind


def test_an_input_field_named_after_any_column_is_carried_as_input_name(tmp_path, small_corpus):
    """Before, only DSIR's names were reserved: a pool with a field `cluster` ran to the end and
    failed at the writer with `Field "cluster" exists 2 times`."""
    names = sorted(stage_columns() | {"selected", "reason", "n_tokens", "source_file"})
    records = [{**r, **{n: f"{n}-{i}" for n in names}} for i, r in enumerate(demo_records(300))]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        small_corpus["target"],
        stages=["dsir", "doc_length", "embed", "cluster", "dedup", "select"],
        embed={"method": "projection", "dim": 32},
        cluster={"k": 4},
        select={"method": "sensitivity", "k": 40},
    )
    run_cli("run", str(cfg))
    db = duckdb.connect()
    table = db.sql(f"SELECT * FROM '{tmp_path}/out/scores/*.parquet'").to_arrow_table()
    for n in names:
        assert output_column(n) == f"input_{n}"
        values = table.column(f"input_{n}").to_pylist()
        assert all(v.startswith(f"{n}-") for v in values), n
    # The stages' own columns are the stages' values, not the input's.
    assert table.column("cluster").type == pa.int64() and table.column("selected").type == pa.bool_()
    assert sum(table.column("selected").to_pylist()) == 40


@pytest.mark.parametrize("method", ["importance", "top", "balanced", "sensitivity"])
def test_every_selector_gives_the_same_answer_to_an_impossible_or_tiny_budget(tmp_path, small_corpus, method):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(300))
    select = {"method": method, "column": "cluster_distance"}
    if method == "sensitivity":
        select.pop("column")
    expected = {
        # 150 documents are left after the filter: k = 200 cannot be met, 0.001 of 150 is none.
        "k": ({"k": 200}, "select.k=200 is larger than the 150 eligible documents", "(lower select.k)"),
        "fraction": (
            {"k": None, "fraction": 0.001},
            "select.fraction=0.001 of 150 eligible documents rounds to none",
            "(raise select.fraction to at least 0.0067, or set select.k)",
        ),
    }
    # Each selector meets one of the two budgets (both budgets are met by two selectors): the
    # message comes from one place, and eight runs of the chain took a minute and a half of the suite.
    met = "k" if method in ("importance", "balanced") else "fraction"
    for budget, (values, start, hint) in [(met, expected[met])]:
        cfg = make_config(
            tmp_path / budget,
            pool,
            small_corpus["target"],
            stages=["embed", "cluster", "filter", "select"],
            embed={"method": "projection", "dim": 16},
            cluster={"k": 3},
            filter={"column": "cluster_distance", "keep_top": 0.5},
            select={**select, **values},
        )
        proc = run_cli("run", str(cfg), check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip() and "apitools" not in line]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert start in lines[0] and lines[0].endswith(hint), lines[0]


def test_length_columns_by_hand():
    out = length_columns(pa.array(["ab cde", "", "héllo  wörld x", "  "]))
    assert out["n_chars"].tolist() == [6, 0, 14, 2]
    np.testing.assert_allclose(out["mean_word_length"], [2.5, np.nan, 11 / 3, np.nan], equal_nan=True)


def test_a_stage_added_as_one_module_runs_in_a_chain(tmp_path):
    """doc_length was added as a module and a registry line: its columns reach scores/, a filter
    reads them, and a pool field named n_chars is carried as input_n_chars."""
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(["a b c d", "word " * 30, "ok fine text here", "x"])]
    records[2]["n_chars"] = 7
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["doc_length", "filter", "select"],
        filter={"column": "mean_word_length", "min": 3, "max": 10},
        select={"method": "all", "k": None},
    )
    run_cli("run", str(cfg))
    rows = duckdb.connect().execute(
        f"SELECT id, n_chars, mean_word_length, selected, reason, input_n_chars "
        f"FROM '{tmp_path}/out/scores/*.parquet' ORDER BY id"
    )
    got = {r[0]: r[1:] for r in rows.fetchall()}
    assert got["d0"] == (7, 1.0, False, "filtered: mean_word_length out of range", None)
    assert got["d1"] == (150, 4.0, True, None, None)
    assert got["d2"] == (17, 3.5, True, None, 7)
    assert got["d3"] == (1, 1.0, False, "filtered: mean_word_length out of range", None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["selected"] == 2


def test_excess_loss_refuses_proxy_seeds_it_would_ignore(tmp_path, small_corpus):
    """Before, excess_loss read the proxy section but trained one model per side whatever
    proxy.seeds said."""
    select = {"method": "top", "column": "excess_loss", "k": 5}
    for seeds, ok in ((3, False), (1, True)):
        cfg = make_config(tmp_path / str(seeds), small_corpus["pool"], small_corpus["target"],
                          stages=["excess_loss", "select"], select=select, proxy={"seeds": seeds})  # fmt: skip
        if ok:
            assert load_config(str(cfg))["proxy.seeds"] == 1
        else:
            with pytest.raises(ConfigError, match=r"proxy.seeds=3: the excess_loss stage trains one model on the"):
                load_config(str(cfg))
