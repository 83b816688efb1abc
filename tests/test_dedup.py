"""Exact and semantic de-duplication on planted duplicates: each planted pair loses exactly one
document, which points at the other, and nothing else is dropped."""

from __future__ import annotations

import random

import duckdb
import numpy as np
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.semdedup import semdedup_cluster
from conftest import demo_records, make_config, write_jsonl


def test_greedy_keeps_one_of_each_group_by_hand():
    # (distance to centroid, order, id, vector): a and b are near-duplicates, c is not; a is
    # nearest the centroid, so a is kept and b points at it.
    items = [
        (0.3, 2, "b", np.array([1.0, 0.05])),
        (0.1, 5, "a", np.array([1.0, 0.0])),
        (0.2, 1, "c", np.array([0.0, 1.0])),
    ]
    assert semdedup_cluster(items, epsilon=0.05) == [(2, "a", "near duplicate")]
    assert semdedup_cluster(items, epsilon=0.0001) == []


def _near_copy(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 40)):  # drop a few words
        del words[rng.randrange(len(words))]
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]  # swap two
    return " ".join(words)


def test_planted_duplicates(tmp_path):
    rng = random.Random(0)
    originals = [r for r in demo_records(2000) if r["source"] in ("kjv", "jargon", "devil")][:300]
    records = [{"id": r["id"], "text": r["text"]} for r in originals]
    near = {f"near-{i}": r["id"] for i, r in enumerate(originals[:20])}
    exact = {f"exact-{i}": r["id"] for i, r in enumerate(originals[20:25])}
    for new_id, old in near.items():
        records.append({"id": new_id, "text": _near_copy(next(r["text"] for r in originals if r["id"] == old), rng)})
    for new_id, old in exact.items():
        text = next(r["text"] for r in originals if r["id"] == old)
        records.append({"id": new_id, "text": "  " + text.upper().replace(",", "") + " !"})
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "dedup", "select"],
        embed={"method": "projection", "dim": 512},
        cluster={"k": 4},
        select={"method": "all", "k": None},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    rows = (
        duckdb.connect()
        .execute(f"SELECT id, duplicate_of, reason, selected FROM '{tmp_path}/out/scores/*.parquet' WHERE NOT selected")
        .fetchall()
    )
    dropped = {i: (of, reason) for i, of, reason, _ in rows}
    # Exact duplicates come later in input order: the copy is dropped and points at the first.
    for new_id, old in exact.items():
        assert dropped.pop(new_id) == (old, "exact duplicate")
    # Each near pair loses exactly one document, which points at the other.
    for new_id, old in near.items():
        assert (new_id in dropped) != (old in dropped), (new_id, old)
        loser, winner = (new_id, old) if new_id in dropped else (old, new_id)
        assert dropped.pop(loser) == (winner, "near duplicate")
    assert dropped == {}  # nothing else
    assert manifest["counts"]["selected"] == 300
    kept = duckdb.connect().execute(
        f"SELECT count(*) FROM '{tmp_path}/out/scores/*.parquet' WHERE duplicate_of IS NULL"
    )
    assert kept.fetchone()[0] == 300
