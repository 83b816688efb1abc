"""Every shipped config gives the same answer as when its values were recorded: the same selected
ids and the same value in every score column, document by document.

The configs run on a slice of the bundled corpus, with their models made small enough to train
in seconds (the overrides below), so that the check stays in the suite. Refactoring the chain
must not change a selected id or a score; a change that is meant to (a bug fixed, a method
corrected) records the values again, on purpose:

    BEAMSIFT_RECORD_GOLDEN=1 pytest tests/test_golden.py

and the diff of tests/golden/ shows what moved.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from beamsift.pipeline.config import load_config
from conftest import ROOT, demo_records, run_cli, target_records, write_jsonl

GOLDEN = Path(__file__).parent / "golden"
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
POOL_DOCS, TARGET_DOCS = 700, 150
# Small models: the same stages and methods, trained in seconds (threads=1: the same sums in the
# same order on any machine).
SMALL_MODELS = {
    "proxy": {"sample": 300, "epochs": 2, "vocab_size": 400, "dim": 32, "context": 64, "threads": 1},
    "embed": {"threads": 1},
}
TEXT_COLUMNS = {"text"}  # the input's own text: not a score


@pytest.fixture(scope="module")
def slice_of_bundled_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("golden")
    write_jsonl(d / "pool.jsonl", demo_records(POOL_DOCS))
    write_jsonl(d / "target.jsonl", target_records(TARGET_DOCS))
    return d


def _overrides(name: str, data: Path, out: Path) -> list[str]:
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    sets = {"input.path": data / "pool.jsonl", "output.dir": out}
    if cfg["target.path"] is not None:
        sets["target.path"] = data / "target.jsonl"
    stages = cfg["stages"] or ["dsir", "select"]
    model_sections = {"proxy"} if {"proxy", "excess_loss"} & set(stages) else set()
    if "embed" in stages and cfg["embed.method"] == "model":
        model_sections.add("embed")
    for section in model_sections:
        for key, value in SMALL_MODELS[section].items():
            sets[f"{section}.{key}"] = value
    if cfg["select.k"] is not None:
        sets["select.k"] = min(cfg["select.k"], 60)
    for key in ("embed.sample", "cluster.sample"):
        if key.split(".")[0] in stages and cfg[key] > POOL_DOCS:
            sets[key] = POOL_DOCS
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def _scores(out: Path) -> pa.Table:
    table = duckdb.connect().sql(f"SELECT * FROM '{out}/scores/*.parquet' ORDER BY id").to_arrow_table()
    return table.select([c for c in table.column_names if c not in TEXT_COLUMNS])


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_gives_the_recorded_ids_and_scores(tmp_path, slice_of_bundled_data, name):
    out = tmp_path / "out"
    run_cli("run", f"configs/{name}.yaml", *_overrides(name, slice_of_bundled_data, out))
    got = _scores(out)
    golden = GOLDEN / f"{name}.parquet"
    if os.environ.get("BEAMSIFT_RECORD_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        pq.write_table(got, golden)
    expected = pq.read_table(golden)
    assert got.column_names == expected.column_names
    assert got.num_rows == expected.num_rows
    selected = lambda t: [i for i, s in zip(t["id"].to_pylist(), t["selected"].to_pylist()) if s]  # noqa: E731
    assert selected(got) == selected(expected)
    for column in expected.column_names:
        a, b = got[column].to_pylist(), expected[column].to_pylist()
        if pa.types.is_floating(expected.schema.field(column).type):
            a = np.array([np.nan if v is None else v for v in a], dtype=np.float64)
            b = np.array([np.nan if v is None else v for v in b], dtype=np.float64)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9, equal_nan=True, err_msg=column)
        else:
            assert a == b, column
