"""Sensitivity sampling: the probabilities by hand, the inclusion scale, an unbiased estimate of a
pool mean over many seeds, and the selector end to end (weight = 1/(k·p), k picks)."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.selectors.core import SelectionError
from beamsift.transforms.selectors.sensitivity import inclusion, inclusion_scale, pareto_keys, sensitivities
from conftest import demo_records, make_config, write_jsonl


def test_sensitivities_by_hand():
    # Cluster 0: squared distances 1, 3 (cost 4, 2 documents); cluster 1: 0, 0, 0 (cost 0, 3).
    clusters = np.array([0, 0, 1, 1, 1, -1])
    d2 = np.array([1.0, 3.0, 0.0, 0.0, 0.0, 9.0])
    p = sensitivities(clusters, d2, {0: (2, 4.0), 1: (3, 0.0)})
    # s = d²/cost + 1/|C|: 1/4 + 1/2, 3/4 + 1/2; cost 0: 1/3 + 1/3 each. 2K = 4.
    assert p[:5] == pytest.approx([0.75 / 4, 1.25 / 4, (2 / 3) / 4, (2 / 3) / 4, (2 / 3) / 4])
    assert np.isnan(p[5])  # not in any cluster: not in the running
    assert np.nansum(p) == pytest.approx(1.0)


def test_inclusion_scale_caps_what_would_be_drawn_twice():
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    # k = 2: λ = 2 would give 0.5·2 = 1: the first is taken for sure, the other one is shared
    # by the rest: λ = 1 / 0.5 = 2 (and 0.5 · 2 = 1 exactly: certain).
    assert inclusion_scale(p, 2, 6) == pytest.approx(2.0)
    # k = 3: λ = 3 gives 1.5 for the first: capped; the 2 left over the other 0.5 -> λ = 4,
    # and 0.2 · 4 = 0.8 < 1.
    lam = inclusion_scale(p, 3, 6)
    assert lam == pytest.approx(4.0)
    assert inclusion(p, lam).sum() == pytest.approx(3.0)
    assert inclusion_scale(p, 1, 6) == pytest.approx(1.0)  # nothing capped: λ = k
    assert np.isinf(inclusion_scale(p, 6, 6))  # everything: all certain
    # From the k largest alone (what the pipeline merges): the same λ.
    assert inclusion_scale(np.sort(p)[::-1][:3], 3, 6) == pytest.approx(4.0)


def test_weights_estimate_the_pool_mean_without_bias():
    """Σ_pick f/π over N estimates the pool's mean; averaged over many seeds it is the mean."""
    rng = np.random.default_rng(7)
    n, k = 400, 40
    clusters = rng.integers(0, 5, n)
    d2 = rng.gamma(0.8, size=n)
    f = 3 * d2 + clusters + rng.normal(size=n)  # a "loss" that grows away from the centroids
    stats = {c: (int((clusters == c).sum()), float(d2[clusters == c].sum())) for c in range(5)}
    p = sensitivities(clusters, d2, stats)
    pi = inclusion(p, inclusion_scale(p, k, n))
    ids = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    estimates, uniform = [], []
    for seed in range(1500):
        picked = np.argsort(-pareto_keys(pi, ids, seed), kind="stable")[:k]
        estimates.append((f[picked] / pi[picked]).sum() / n)
        uniform.append(f[np.random.default_rng(seed).choice(n, k, replace=False)].mean())
    estimates = np.array(estimates)
    se = estimates.std() / np.sqrt(len(estimates))
    assert abs(estimates.mean() - f.mean()) < 4 * se + 0.005 * abs(f.mean())
    # ... and weighting by sensitivity pays: less variance than a uniform pick of the same size.
    assert estimates.std() < np.std(uniform)


def test_sensitivity_selector_end_to_end(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(500))
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "select"],
        embed={"dim": 32},
        cluster={"k": 5},
        select={"method": "sensitivity", "k": 40},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    assert manifest["counts"]["selected"] == 40
    db = duckdb.connect()
    scores = f"'{tmp_path}/out/scores/*.parquet'"
    total, n_sel, sum_p, bad = db.execute(
        f"SELECT count(*), count(*) FILTER (selected), sum(sensitivity), "
        f"count(*) FILTER (selected AND abs(weight * 40 * sensitivity - 1) > 1e-9) "
        f"FROM {scores}"
    ).fetchone()
    assert n_sel == 40 and sum_p == pytest.approx(1.0) and bad == 0
    assert db.execute(f"SELECT count(*) FROM {scores} WHERE NOT selected AND weight IS NOT NULL").fetchone() == (0,)
    reasons = dict(db.execute(f"SELECT coalesce(reason, 'in'), count(*) FROM {scores} GROUP BY 1").fetchall())
    assert reasons == {"in": 40, "not sampled": total - 40}
    # The selected view carries the weight for a weighted trainer.
    weights = db.execute(f"SELECT weight FROM '{tmp_path}/out/selected/*.parquet'").fetchall()
    assert len(weights) == 40 and all(w[0] > 1 for w in weights)  # no document here is certain


def test_the_whole_running_and_an_empty_budget(tmp_path):
    records = demo_records(150)
    pool = write_jsonl(
        tmp_path / "pool.jsonl", records + [{**r, "id": f"copy-{i}"} for i, r in enumerate(records[:30])]
    )

    def run(select):
        cfg = make_config(tmp_path, pool, pool, stages=["embed", "cluster", "dedup", "select"],
                          embed={"method": "projection", "dim": 64}, cluster={"k": 3}, select=select)  # fmt: skip
        return run_selection(load_config(str(cfg)), overwrite=True)

    # Every document still in the running (the 30 copies are out as exact duplicates), weight 1.
    manifest = run({"method": "sensitivity", "k": None, "fraction": 1.0})
    assert manifest["counts"]["selected"] == 150
    weights = duckdb.connect().execute(f"SELECT DISTINCT weight FROM '{tmp_path}/out/selected/*.parquet'").fetchall()
    assert weights == [(1.0,)]
    with pytest.raises(SelectionError, match="rounds to none"):
        run({"method": "sensitivity", "k": None, "fraction": 0.002})


def _scale_by_suffix_sums(p: np.ndarray, k: int) -> float:
    """λ with Σ min(1, λp) = k, by the loop over p sorted largest first, 1 − S_m taken as the sum
    of the rest added smallest first (accurate where 1 − S_m is tiny)."""
    top = np.sort(p)[::-1]
    rest = np.cumsum(top[::-1])[::-1]  # rest[m] = Σ_{i ≥ m} top[i]
    for m in range(min(k, len(top))):
        if (k - m) * top[m] < rest[m]:
            return (k - m) / rest[m]
    return np.inf


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inclusion_scale_in_bounded_passes_equals_the_k_largest_in_one_place(seed):
    """λ from two histograms and one sub-bin's values (what the selector holds) against the loop
    over every value in one place: heavy tails (many documents certain), ties, any split."""
    from beamsift.transforms.selectors import inclusion as search
    from beamsift.transforms.selectors.inclusion import scale_in_passes

    rng = np.random.default_rng(seed)
    n = 30_000
    s = np.concatenate([rng.pareto(1.2, n - 3000) + 1e-3, np.full(3000, 0.5)])  # a tail and a block of ties
    p = s / s.sum()
    parts = np.array_split(rng.permutation(p), 7)
    for k in (1, 10, 300, 3_000, 15_000, 29_999, 30_000):
        expected = _scale_by_suffix_sums(p, k) if k < n else np.inf
        got = scale_in_passes(parts, k, n)
        if np.isinf(expected):
            assert np.isinf(got), k
            continue
        assert got == pytest.approx(expected, rel=1e-9), k
        assert (got * p >= 1).sum() == (expected * p >= 1).sum(), k
        # The selector's earlier rule (the k largest in one place, 1 − their sum) agrees but where
        # 1 − S is tiny (k near n), where it loses digits.
        assert got == pytest.approx(inclusion_scale(np.sort(p)[::-1][:k], k, n), rel=1e-4), k
    # Some of those k have the boundary inside a bin: the sub-bins and the values were used.
    hist = search.histogram(search.log_bins(p), p, search.LOG_BINS)
    inside = [k for k in (10, 300, 3_000, 15_000) if search.scan(hist, k, 0, int(hist[1].sum()))[0] == "inside"]
    assert inside
