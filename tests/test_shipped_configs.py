"""Every shipped config loads, and the diversity configs run with only the keys a user sets in
the skeleton (input, target, seed, output.dir): what scripts outside the project drive."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from beamsift.pipeline.config import load_config
from conftest import ROOT, SMALL_MODELS, demo_records, run_cli, target_records, write_jsonl

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads(name):
    load_config(str(ROOT / "configs" / name))


@pytest.fixture(scope="module")
def skeleton_inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("skeleton")
    # No `source` field and other ids: nothing of the bundled data's shape is assumed.
    records = [{"doc_id": f"x{i}", "text": r["text"]} for i, r in enumerate(demo_records(500))]
    records += [{"doc_id": "x-copy", "text": records[3]["text"].upper()}]
    write_jsonl(d / "pool.jsonl", records)
    write_jsonl(d / "target.jsonl", target_records(60))
    return d


def _skeleton(d: Path, out: Path) -> list[str]:
    return [
        "--set", f"input.path={d / 'pool.jsonl'}", "--set", "input.id_field=doc_id",
        "--set", f"target.path={d / 'target.jsonl'}", "--set", "seed=3", "--set", f"output.dir={out}",
    ]  # fmt: skip


def test_semdedup_config_runs_with_the_skeleton_keys(tmp_path, skeleton_inputs):
    out = tmp_path / "out"
    run_cli("run", "configs/semdedup.yaml", *_skeleton(skeleton_inputs, out), "--set", "cluster.k=4",
            "--set", "dedup.epsilon=0.1")  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["not_selected_by_reason"].get("exact duplicate") == 1
    row = duckdb.connect().execute(f"SELECT duplicate_of FROM '{out}/scores/*.parquet' WHERE id = 'x-copy'").fetchone()
    assert row == ("x3",)


def test_quality_diversity_config_runs_with_the_skeleton_keys(tmp_path, skeleton_inputs):
    out = tmp_path / "out"
    small = [arg for key, value in SMALL_MODELS["proxy"].items() for arg in ("--set", f"proxy.{key}={value}")]
    run_cli("run", "configs/quality_diversity.yaml", *_skeleton(skeleton_inputs, out), *small)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["stages"]][-1] == "select" and manifest["counts"]["selected"] > 0
    assert len(manifest["clusters"]) == 8
    db = duckdb.connect()
    covered = db.execute(f"SELECT count(DISTINCT cluster) FROM '{out}/selected/*.parquet'").fetchone()[0]
    # The pick spans every cluster that reached the selector (a filter before it may empty a small one).
    reached = db.execute(
        f"SELECT count(DISTINCT cluster) FROM '{out}/scores/*.parquet' "
        "WHERE reason IS NULL OR reason = 'below the cluster''s quota'"
    ).fetchone()[0]
    assert covered == reached >= 6
