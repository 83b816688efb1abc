"""Cluster-balanced selection: quotas that add up to the budget and never exceed a cluster, and
the best documents by the column within each cluster."""

from __future__ import annotations

import duckdb
import pytest
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.selectors.balanced import quotas
from beamsift.transforms.selectors.core import SelectionError
from conftest import demo_records, make_config, write_jsonl


@pytest.mark.parametrize(
    "rule, expected",
    [
        # 30 over sizes 10, 2, 100. Uniform: 10 each, the 2-document cluster takes 2, the 8 left
        # go 4 and 4, the 10-document cluster is then full and the last 4 go to the largest.
        ("uniform", {0: 10, 1: 2, 2: 18}),
        # Proportional: 2.68, 0.54, 26.79 -> 2, 0, 26 and the two largest remainders: 3, 0, 27.
        ("proportional", {0: 3, 1: 0, 2: 27}),
        # Square root: 6.51, 2.91, 20.58 -> 6, 2, 20; the full cluster 1 is passed over: 7, 2, 21.
        ("sqrt", {0: 7, 1: 2, 2: 21}),
    ],
)
def test_quotas_by_hand(rule, expected):
    got = quotas({0: 10, 1: 2, 2: 100}, 30, rule)
    assert got == expected and sum(got.values()) == 30


def test_quotas_by_a_cluster_score():
    # 12 over scores 2, 1, 1: shares 6, 3, 3; the 2-document cluster takes 2, and the one left
    # goes to the first cluster (all remainders are 0).
    assert quotas({0: 10, 1: 2, 2: 100}, 12, "score", {0: 2.0, 1: 1.0, 2: 1.0}) == {0: 7, 1: 2, 2: 3}
    # A zero score gets nothing while others can take the budget.
    assert quotas({0: 10, 1: 10}, 5, "score", {0: 0.0, 1: 3.0}) == {0: 0, 1: 5}
    # ... nor when a full cluster leaves part of the budget to share again (perplexity
    # correlations' domain weights: zero for the excluded domains): 42 wanted of 3 in cluster 0.
    assert quotas({0: 3, 1: 100, 2: 50, 3: 50}, 60, "score", {0: 0.7, 1: 0.3, 2: 0.0, 3: 0.0}) == {
        0: 3,
        1: 57,
        2: 0,
        3: 0,
    }
    with pytest.raises(SelectionError, match="cluster 1 has -0.5"):
        quotas({0: 10, 1: 10}, 5, "score", {0: 1.0, 1: -0.5})


def test_quotas_never_exceed_a_cluster_and_add_up():
    sizes = {c: n for c, n in enumerate([1, 3, 7, 50, 200, 4])}
    for budget in (1, 10, 64, 200, 265, 1000):
        for rule in ("uniform", "proportional", "sqrt"):
            q = quotas(sizes, budget, rule)
            assert sum(q.values()) == min(budget, sum(sizes.values()))
            assert all(0 <= q[c] <= sizes[c] for c in sizes)


def test_balanced_selection_end_to_end(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(700))
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "select"],
        cluster={"k": 6},
        select={"method": "balanced", "column": "n_tokens", "quota": "uniform", "k": 60},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    assert manifest["counts"]["selected"] == 60
    rows = duckdb.connect().execute(f"SELECT cluster, n_tokens, selected FROM '{tmp_path}/out/scores/*.parquet'")
    by_cluster: dict = {}
    for c, n, s in rows.fetchall():
        by_cluster.setdefault(c, []).append((n, s))
    sizes = {c: len(v) for c, v in by_cluster.items()}
    expected = quotas(sizes, 60, "uniform")
    for c, docs in by_cluster.items():
        picked = [n for n, s in docs if s]
        assert len(picked) == expected[c]
        rest = [n for n, s in docs if not s]
        if picked and rest:
            assert min(picked) >= max(rest)  # the longest documents of the cluster


@pytest.mark.parametrize("method", ["balanced", "sensitivity"])
def test_the_kl_baseline_is_the_same_random_pick_for_every_selector(tmp_path, small_corpus, method):
    """The KL reduction compares with a seeded random pick of the same size from the raw pool:
    the cluster-aware selectors draw the same one as DSIR's importance resampling."""
    runs = {}
    for name, stages, select, extra in [
        ("dsir", ["dsir", "select"], {"k": 50}, {}),
        (
            method,
            ["dsir", "embed", "cluster", "select"],
            {"method": method, "column": "dsir_key", "k": 50},
            {"cluster": {"k": 4}},
        ),
    ]:
        if method == "sensitivity":
            select.pop("column", None)
        cfg = make_config(tmp_path / name, small_corpus["pool"], small_corpus["target"], stages=stages,
                          select=select, **extra)  # fmt: skip
        runs[name] = run_selection(load_config(str(cfg)), overwrite=True)["dsir"]["kl"]
    # (Before, these selectors drew no baseline: the KL to an empty pick, ~10, made any reduction
    # look large.)
    assert runs[method]["target_vs_random"] == pytest.approx(runs["dsir"]["target_vs_random"])


def test_quota_by_a_cluster_score_end_to_end(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(500))
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "select"],
        cluster={"k": 5},
        select={"method": "balanced", "quota": "score", "quota_column": "n_tokens", "k": 80},
    )
    run_selection(load_config(str(cfg)), overwrite=True)
    rows = duckdb.connect().execute(
        f"SELECT cluster, count(*), avg(n_tokens), count(*) FILTER (selected) FROM '{tmp_path}/out/scores/*.parquet' "
        f"GROUP BY 1"
    )
    stats = {c: (n, mean, picked) for c, n, mean, picked in rows.fetchall()}
    expected = quotas({c: v[0] for c, v in stats.items()}, 80, "score", {c: v[1] for c, v in stats.items()})
    assert {c: v[2] for c, v in stats.items()} == expected and sum(expected.values()) == 80


def test_a_threshold_selection_is_compared_with_a_random_pick_of_its_own_size(tmp_path, small_corpus):
    """A threshold keeps a number nobody chose in advance; its KL baseline is still a seeded random
    pick of that many (the one a top-k selection of the same size draws), not an empty pick."""
    runs = {}
    for name, select in [
        ("threshold", {"method": "threshold", "column": "dsir_log_weight", "min": 0.0, "k": None}),
        ("top", {"method": "top", "column": "dsir_log_weight"}),
    ]:
        if name == "top":
            select["k"] = runs["threshold"]["counts"]["selected"]
        cfg = make_config(tmp_path / name, small_corpus["pool"], small_corpus["target"], stages=["dsir", "select"],
                          select=select)  # fmt: skip
        runs[name] = run_selection(load_config(str(cfg)), overwrite=True)
    assert 0 < runs["threshold"]["counts"]["selected"] and runs["threshold"]["counts"]["not_selected"] > 0
    kl = {name: m["dsir"]["kl"] for name, m in runs.items()}
    assert kl["threshold"]["target_vs_random"] == pytest.approx(kl["top"]["target_vs_random"])
    assert kl["threshold"]["target_vs_selected"] == pytest.approx(kl["top"]["target_vs_selected"])
