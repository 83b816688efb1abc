"""Exact and semantic de-duplication on planted duplicates: each planted pair loses exactly one
document, which points at the other, and nothing else is dropped."""

from __future__ import annotations

import random

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.stages.dedup import _gather, normalise_text, normalised_text_hash, semdedup_cluster
from conftest import demo_records, make_config, write_jsonl


def test_greedy_keeps_one_of_each_group_by_hand():
    # (distance to centroid, order, id, vector): a and b are near-duplicates, c is not; a is
    # nearest the centroid, so a is kept and b points at it.
    items = [
        (0.3, 2, "b", np.array([1.0, 0.05])),
        (0.1, 5, "a", np.array([1.0, 0.0])),
        (0.2, 1, "c", np.array([0.0, 1.0])),
    ]
    assert semdedup_cluster(items, epsilon=0.05) == [(2, "a", "near duplicate", (0.1, 5))]
    assert semdedup_cluster(items, epsilon=0.0001) == []


def test_blocked_greedy_is_the_greedy():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(60, 8))
    vectors = np.concatenate([base, base[:40] + 0.15 * rng.normal(size=(40, 8))])
    items = [(float(rng.random()), i, f"d{i}", v) for i, v in enumerate(vectors)]
    one = semdedup_cluster(items, 0.05, block=1)
    assert len(one) > 10
    assert semdedup_cluster(items, 0.05, block=7) == one == semdedup_cluster(items, 0.05, block=1000)


def test_a_pointer_at_a_document_dropped_elsewhere_is_followed():
    # c was kept in its own cluster and dropped b there; in the next cluster c was dropped for a.
    # b must point at a (kept), never at c (dropped). d was dropped in two clusters: the pointer
    # to the earlier document (a, distance 0.1) wins over the one to e (0.5).
    dropped = _gather(
        [
            [(2, "c", "near duplicate", (0.3, 3))],  # b (order 2) for c (order 3)
            [(3, "a", "near duplicate", (0.1, 1)), (4, "a", "near duplicate", (0.1, 1))],
            [(4, "e", "near duplicate", (0.5, 5)), (9, "x", "exact duplicate", 8)],
            # f (order 10) repeats c (order 3) exactly; c was dropped as a near duplicate of a.
            [(10, "c", "exact duplicate", 3)],
        ]
    )
    assert dropped.orders.tolist() == [2, 3, 4, 9, 10]
    assert dropped.kept_ids == ["a", "a", "a", "x", "a"]
    assert dropped.reasons == ["near duplicate"] * 3 + ["exact duplicate"] * 2


def test_exact_normalisation_keeps_every_script():
    texts = pa.array(
        ["Привет, мир!", "こんにちは世界", "Hello,\u00a0World", "hello world", "HELLO   world?!", "Пока мир"]
    )
    h = normalised_text_hash(texts)
    assert normalise_text(texts).to_pylist()[:3] == ["привет мир", "こんにちは世界", "hello world"]
    assert h[2] == h[3] == h[4]  # case, a no-break space, punctuation
    assert len({h[0], h[1], h[3], h[5]}) == 4  # other scripts are not erased into one
    # é composed or decomposed, full-width letters: the same text.
    nfkc = normalised_text_hash(pa.array(["e\u0301t\u00e9 ＡＢＣ", "\u00e9t\u00e9 abc"]))
    assert nfkc[0] == nfkc[1]


def _near_copy(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 40)):  # drop a few words
        del words[rng.randrange(len(words))]
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]  # swap two
    return " ".join(words)


@pytest.mark.parametrize(
    "embed",
    [
        {"method": "projection", "dim": 512},  # compared on the embedding itself
        {"method": "svd", "dim": 64},  # topics for the clusters; compared on projected TF-IDF
    ],
)
def test_planted_duplicates(tmp_path, embed):
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
        embed=embed,
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
