"""The diversity stages give the same clusters, duplicates and pick on every runner and for any
split of the input: FnApiRunner, its multi-process mode and the PortableRunner, for a fixed seed
(SemDeDup's clusters each compared in parts, as a large corpus's are)."""

from __future__ import annotations

import duckdb
import pytest
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from conftest import demo_records, make_config, write_jsonl

RUNNERS = {
    "multiprocess": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    records = demo_records(400)
    # Planted duplicates: exact copies and copies with the last sentence cut.
    copies = [{**r, "id": f"copy-{i}"} for i, r in enumerate(records[:10])]
    cut = [
        {**r, "id": f"cut-{i}", "text": r["text"][: int(len(r["text"]) * 0.95)]} for i, r in enumerate(records[10:20])
    ]
    return write_jsonl(tmp_path_factory.mktemp("pool") / "pool.jsonl", records + copies + cut)


def _run(tmp_path, pool, select, beam_args=(), overrides=()):
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "dedup", "select"],
        embed={"method": "projection", "dim": 256},
        cluster={"k": 4, "sample": 300, "passes": 1},
        dedup={"max_group": 60},  # each cluster compared in parts, cut along its sample's principal directions
        select=select,
    )
    run_selection(load_config(str(cfg), list(overrides)), overwrite=True, beam_args=list(beam_args))
    return (
        duckdb.connect()
        .execute(
            f"SELECT id, cluster, duplicate_of, selected, round(sensitivity, 12), round(weight, 9) "
            f"FROM '{tmp_path}/out/scores/*.parquet' ORDER BY id"
        )
        .fetchall()
    )


@pytest.mark.parametrize("runner", ["multiprocess", "portable", "split", "threads"])
def test_same_diversity_pick_on_every_runner(tmp_path, pool, runner, monkeypatch):
    from beamsift.pipeline import run

    select = {"method": "sensitivity", "k": 40}
    if runner == "threads":  # one process's cores: SemDeDup's groups one at a time, then 3 at once
        monkeypatch.setattr(run, "worker_threads", lambda options: 1)
    base = _run(tmp_path / "a", pool, select)
    if runner == "split":  # many small read tasks and shards instead of one
        other = _run(tmp_path / "b", pool, select, overrides=["input.split_bytes=65536", "input.batch_size=50"])
    elif runner == "threads":
        monkeypatch.setattr(run, "worker_threads", lambda options: 3)
        other = _run(tmp_path / "b", pool, select)
    else:
        other = _run(tmp_path / "b", pool, select, beam_args=RUNNERS[runner])
    assert sum(r[3] for r in base) == 40 and sum(r[2] is not None for r in base) >= 10
    assert base == other
