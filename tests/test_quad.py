"""Quad (Zhang et al. 2025): the bandit against three rounds worked by hand, the blocks and the
selection's order, and the selector end to end (only probed documents are scored)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from beamsift.transforms.selectors.quad import QuadParams, cluster_scores, doc_blocks, order_keys, run_bandit

REWARDS = {(0, 0): 0.3, (1, 0): -0.1, (0, 1): 0.2, (2, 0): 0.4, (2, 1): -0.2, (1, 1): 0.05}
# Clusters 0 and 1 are neighbours (0.1 apart, within delta = 0.2); cluster 2 is far from both.
DISTANCES = np.array([[0.0, 0.1, 0.5], [0.1, 0.0, 0.5], [0.5, 0.5, 0.0]])
SIZES = {0: [5, 5], 1: [5, 5], 2: [5, 5]}
PARAMS = QuadParams(per_round=2, probes=3, alpha=0.5, delta=0.2, offset=0.0, rounds=3)


def test_three_rounds_of_the_bandit_by_hand():
    probed = []

    def reward_of(c, b):
        probed.append((c, b))
        return REWARDS[(c, b)]

    state = run_bandit(SIZES, DISTANCES, 100, reward_of, PARAMS)
    # Round 0: every CS is 0, the first two clusters by index: (0,0) +0.3 chosen, (1,0) -0.1 not.
    #   0.3 goes to cluster 0 (weight 1) and to its neighbour 1 (weight 1 - 0.1/0.2 = 0.5);
    #   -0.1 to cluster 1 and, halved, to 0: R = (0.25, 0.05, 0), n = (2, 2, 0), sum n = 4;
    #   CS = R/n + 0.5 sqrt(2 ln 4 / (n + 1)) = (0.605676, 0.505676, 0.832555).
    # Round 1: clusters 2 then 0: (2,0) +0.4 and (0,1) +0.2, both chosen. R = (0.45, 0.15, 0.4),
    #   n = (3, 3, 1), sum 7: CS = (0.643193, 0.543193, 1.097479).
    # Round 2: cluster 0 has no block left; 2 then 1: (2,1) -0.2, (1,1) +0.05 chosen.
    #   R = (0.475, 0.2, 0.2), n = (4, 4, 2), sum 10: CS = (0.598603, 0.529853, 0.719487).
    assert probed == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (1, 1)]
    assert state.chosen == [(0, 0), (2, 0), (0, 1), (1, 1)]
    assert state.rounds == 3
    np.testing.assert_allclose([state.score[c] for c in range(3)], [0.475, 0.2, 0.2])
    assert [state.count[c] for c in range(3)] == [4, 4, 2]
    np.testing.assert_allclose([state.cs[c] for c in range(3)], [0.598603, 0.529853, 0.719487], atol=1e-6)
    # Short of the budget after the rounds: the probed blocks not chosen fill it, best reward first.
    assert state.filled == [(1, 0), (2, 1)]


def test_the_rounds_stop_once_the_chosen_blocks_hold_the_budget():
    state = run_bandit(SIZES, DISTANCES, 12, lambda c, b: REWARDS[(c, b)], PARAMS)
    assert state.rounds == 2 and state.chosen == [(0, 0), (2, 0), (0, 1)] and state.filled == []
    # The offset is taken from every reward: at 0.35 only (2,0) is still positive.
    state = run_bandit(
        SIZES, DISTANCES, 5, lambda c, b: REWARDS[(c, b)], QuadParams(**{**PARAMS.__dict__, "offset": 0.35})
    )
    assert state.chosen == [(2, 0)]


def test_cluster_score_formula():
    cs = cluster_scores({0: 1.0, 1: 0.0}, {0: 2, 1: 0}, 5, alpha=1e-4)
    assert cs[0] == pytest.approx(0.5 + 1e-4 * math.sqrt(2 * math.log(5) / 3))
    assert cs[1] == pytest.approx(1e-4 * math.sqrt(2 * math.log(5)))


def test_blocks_and_the_order_they_are_taken_in():
    hashes = np.arange(1, 2001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    clusters = np.zeros(2000, np.int64)
    blocks = doc_blocks(hashes, clusters, {0: 4}, seed=3)
    counts = np.bincount(blocks, minlength=4)
    assert counts.sum() == 2000 and np.all(np.abs(counts - 500) < 100)  # seeded, about even
    keys = order_keys(clusters, blocks, hashes, {(0, 2): 0, (0, 0): 1}, seed=3)
    # Block 2 (chosen first) ranks above block 0; blocks 1 and 3 were not chosen.
    assert keys[blocks == 2].min() > keys[blocks == 0].max()
    assert np.all(np.isneginf(keys[(blocks == 1) | (blocks == 3)]))


def test_the_selector_scores_only_its_probes_and_takes_whole_blocks(tmp_path):
    import json

    import duckdb
    import pyarrow as pa
    from beamsift.pipeline.config import load_config
    from beamsift.pipeline.run import run_selection
    from beamsift.transforms.featurize import hash_ids
    from beamsift.transforms.selectors.quad import blocks_of
    from conftest import SMALL_MODELS, demo_records, make_config, target_records, write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(300))
    target = write_jsonl(tmp_path / "target.jsonl", target_records(40))
    cfg = make_config(
        tmp_path,
        pool,
        target,
        stages=["embed", "cluster", "proxy", "select"],
        embed={"dim": 32},
        cluster={"k": 4},
        proxy={**SMALL_MODELS["proxy"], "seeds": 1},
        select={"method": "quad", "k": 90, "quad_block": 20, "quad_clusters": 2, "quad_probes": 3, "quad_offset": 0.0},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    out = tmp_path / "out"
    db = duckdb.connect()
    rows = db.execute(
        f"SELECT id, cluster, selected, quad_influence, loss FROM '{out}/scores/*.parquet' ORDER BY id"
    ).fetchall()
    assert sum(r[2] for r in rows) == 90 == manifest["counts"]["selected"]
    assert all(r[4] is None for r in rows)  # the proxy only trained: nothing else was scored
    quad = manifest["quad"]
    scored = [r for r in rows if r[3] is not None]
    assert len(scored) == quad["documents_scored"] <= quad["blocks_probed"] * 3 < len(rows)
    # Each document's block, as the selector cut them (⌈cluster size / 20⌉ blocks, seeded).
    names = [d[0] for d in db.execute(f"DESCRIBE SELECT * FROM '{out}/clusters/*.parquet'").fetchall()]
    clusters = {r[0]: dict(zip(names, r)) for r in db.execute(f"SELECT * FROM '{out}/clusters/*.parquet'").fetchall()}
    assert set(clusters) == {0, 1, 2, 3}
    ids = [r[0] for r in rows]
    c = np.array([r[1] for r in rows], np.int64)
    blocks = doc_blocks(hash_ids(pa.array(ids)), c, {k: blocks_of(v["size"], 20) for k, v in clusters.items()}, seed=1)
    probed = {(int(ci), int(b)) for ci, b, r in zip(c, blocks, rows) if r[3] is not None}
    for k, v in clusters.items():
        assert v["quad_probed"] == len({b for ci, b in probed if ci == k})
        picked = {int(b) for ci, b, r in zip(c, blocks, rows) if r[2] and ci == k}
        assert len(picked) <= v["quad_chosen"]  # whole blocks (the last one cut to the budget)
    # Whole blocks: every block the selection draws on is taken whole, but one (cut to fit k).
    sel = np.array([r[2] for r in rows])
    partial = [
        key
        for key in {(int(ci), int(b)) for ci, b, s_ in zip(c, blocks, sel) if s_}
        if not sel[(c == key[0]) & (blocks == key[1])].all()
    ]
    assert len(partial) <= 1
    json.dumps(quad)  # plain numbers for the manifest


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"select": {"method": "top", "column": "loss", "quad_probes": 3}}, "select.quad_probes goes with"),
        ({"stages": ["embed", "proxy", "select"]}, "select.method 'quad' needs a cluster stage"),
        ({"stages": ["embed", "cluster", "select"]}, "select.method 'quad' needs a proxy stage"),
        ({"input": {"label_field": "source"}}, "probes with a causal LM proxy: remove input.label_field"),
    ],
)
def test_quad_settings_that_cannot_work_are_named(tmp_path, sections, message):
    from beamsift.pipeline.config import ConfigError, load_config
    from conftest import demo_records, make_config, write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(20))
    base = {"stages": ["embed", "cluster", "proxy", "select"], "select": {"method": "quad"}}
    for name, value in sections.items():
        base[name] = {**base.get(name, {}), **value} if isinstance(value, dict) else value
    cfg = make_config(tmp_path, pool, pool, **base)
    with pytest.raises(ConfigError, match=message):
        load_config(str(cfg))
