"""Every shipped config gives the same answer as when its values were recorded: the same selected
ids and the same value in every score column, document by document.

The configs run on a slice of the bundled corpus, with their models made small enough to train
in seconds (``small_overrides``), so that the check stays in the suite. They run as at scale: the
input, the target and the output in a bucket of a real S3 server on loopback, on the
multi-process runner whose workers share nothing but the bucket; the values were recorded by the
local in-process runner, so each run also shows that the runner and the store change nothing.
Refactoring the chain must not change a selected id or a score; a change that is meant to (a bug
fixed, a method corrected) records the values again, on purpose:

    BEAMSIFT_RECORD_GOLDEN=1 pytest tests/test_golden.py

and the diff of tests/golden/ shows what moved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, S3_BUCKET, TEXT_COLUMNS, WORKERS, assert_same_result, run_cli, s3_keys, small_overrides

GOLDEN = Path(__file__).parent / "golden"
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


def _scores(s3, out: str, monkeypatch):
    from beamsift.pipeline.query import connect

    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    con = connect(out)
    table = con.sql("SELECT * FROM scores ORDER BY id").to_arrow_table()
    con.close()
    return table.select([c for c in table.column_names if c not in TEXT_COLUMNS])


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_gives_the_recorded_ids_and_scores_from_a_bucket_into_a_bucket(s3, name, monkeypatch):
    out = f"s3://{S3_BUCKET}/out/{name}"
    pool, target = f"s3://{S3_BUCKET}/in/pool.jsonl", f"s3://{S3_BUCKET}/in/target.jsonl"
    recording = bool(os.environ.get("BEAMSIFT_RECORD_GOLDEN"))
    runner = [] if recording else ["--", *WORKERS]  # recorded by the plain local runner
    run_cli("run", f"configs/{name}.yaml", *small_overrides(name, pool, target, out), "--quiet", "--overwrite",
            *runner, env=s3["env"])  # fmt: skip
    got = _scores(s3, out, monkeypatch)
    golden = GOLDEN / f"{name}.parquet"
    if recording:
        GOLDEN.mkdir(exist_ok=True)
        pq.write_table(got, golden)
    assert_same_result(got, pq.read_table(golden))

    # The bucket holds the published files and nothing else: no staging, no temporary sibling.
    body = s3["client"].get_object(Bucket=S3_BUCKET, Key=f"out/{name}/manifest.json")["Body"].read()
    manifest = json.loads(body)
    published = sorted(f"out/{name}/{f}" for f in [*manifest["files"], "manifest.json"])
    assert s3_keys(s3, f"out/{name}/") == published
    assert [k for k in s3_keys(s3, "out/") if "beamsift-tmp-" in k or "_staging" in k] == []
    stages = manifest["config"]["stages"] or []
    if "proxy" in stages:
        assert f"out/{name}/artifacts/proxy/models.tar" in published  # every level of artifacts/
    if "cluster" in stages:
        assert f"out/{name}/artifacts/cluster/centroids.npy" in published
    assert manifest["counts"]["accounted_for"] is True
