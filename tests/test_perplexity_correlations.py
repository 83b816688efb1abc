"""Perplexity correlations (Thrush et al. 2024): both estimators and the linear projection on
numbers worked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from beamsift.transforms.models.correlations import caps, estimate, linear_projection, sign_cdf, spearmanr

# Three models' benchmark errors, and their bits per byte on two domains: on domain 0 the models
# with lower loss are the ones with lower error; on domain 1 the opposite.
Y = np.array([0.2, 0.5, 0.4])
X = np.array([[1.0, 3.0], [3.0, 1.0], [2.0, 2.0]])


def test_spearmanr_by_hand():
    # Domain 0: ranks (1, 3, 2) against y's (1, 3, 2): rho = 1. Domain 1: (3, 1, 2): d = (2, -2, 0),
    # rho = 1 - 6 * 8 / (3 * (9 - 1)) = -1.
    np.testing.assert_allclose(spearmanr(X, Y), [1.0, -1.0])
    np.testing.assert_allclose(estimate(X, Y, "spearmanr"), [1.0, -1.0])


def test_sign_cdf_by_hand():
    # Domain 0: F = rank / 3 = (1/3, 1, 2/3). Pairs (i < j): sign(y_j - y_i) (F_j - F_i):
    #   (0,1): +1 * (1 - 1/3) = 2/3; (0,2): +1 * (2/3 - 1/3) = 1/3; (1,2): -1 * (2/3 - 1) = 1/3;
    #   sum 4/3, times 2 / (3 * 2): 4/9. Domain 1, F = (1, 1/3, 2/3): -2/3 - 1/3 - 1/3 -> -4/9.
    np.testing.assert_allclose(sign_cdf(X, Y), [4 / 9, -4 / 9])
    np.testing.assert_allclose(estimate(X, Y, "sign_cdf"), [4 / 9, -4 / 9])


def test_estimators_rank_a_planted_relation():
    rng = np.random.default_rng(0)
    w = np.array([2.0, 1.0, 0.0, -1.0])  # the domains' true weights, best first
    X = rng.normal(size=(40, 4))
    y = 1 / (1 + np.exp(-(X @ w + 0.1 * rng.normal(size=40))))  # a monotone f of <w, x>
    for name in ("spearmanr", "sign_cdf"):
        assert list(np.argsort(-estimate(X, y, name))) == [0, 1, 2, 3]


def test_linear_projection_by_hand():
    # Tokens 100, 300, 600 and half of the pool's tokens wanted: caps = share / 0.5 = 0.2, 0.6, 1.2.
    tau = caps([100, 300, 600], 0.5)
    np.testing.assert_allclose(tau, [0.2, 0.6, 1.2])
    # Estimates 0.9, 0.1, 0.5: domain 0 gets its cap 0.2, domain 2 the remaining 0.8, domain 1 none.
    np.testing.assert_allclose(linear_projection([0.9, 0.1, 0.5], tau), [0.2, 0.0, 0.8])
    # Only the ranks matter; and a first domain whose cap is above 1 takes everything.
    np.testing.assert_allclose(linear_projection([9.0, -5.0, 0.0], tau), [0.2, 0.0, 0.8])
    np.testing.assert_allclose(linear_projection([0.1, 0.2, 0.9], tau), [0.0, 0.0, 1.0])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="at least 2 models"):
        spearmanr(X[:1], Y[:1])
    with pytest.raises(ValueError, match="models × domains"):
        sign_cdf(X, Y[:2])


@pytest.fixture(scope="module")
def three_lms(tmp_path_factory):
    """Three small LMs, each trained on one domain of the demo records: "existing LMs"."""
    from beamsift.transforms import models
    from conftest import demo_records

    d = tmp_path_factory.mktemp("lms")
    records = demo_records(600)
    out = []
    for i, source in enumerate(("kjv", "pydoc", "sqlite")):
        texts = [r["text"] for r in records if r["source"] == source][:80]
        models.train_small_lm(texts, str(d / source), seed=i, vocab_size=300, dim=16, epochs=1, context=64)
        out.append(str(d / source))
    return out


def test_the_stage_weighs_the_domains_by_the_estimate_and_the_projection(tmp_path, three_lms):
    import duckdb
    from beamsift.pipeline.config import load_config
    from beamsift.pipeline.run import run_selection
    from conftest import demo_records, make_config, write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(300))
    errors = [0.6, 0.2, 0.4]  # the pydoc model "does best on the benchmark"
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["perplexity_correlations", "select"],
        perplexity_correlations={
            "models": [{"path": p, "error": e} for p, e in zip(three_lms, errors)],
            "domain_field": "source",
            "sample_per_domain": 6,
            "estimator": "sign_cdf",
            "context": 64,
        },
        select={"method": "top", "column": "pc_score", "fraction": 0.3, "k": None},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    out = tmp_path / "out"
    db = duckdb.connect()
    domains = db.execute(
        f"SELECT domain, pc_domain, tokens, bpb_kjv, bpb_pydoc, bpb_sqlite, pc_estimate, pc_weight, include "
        f"FROM '{out}/domains/*.parquet' ORDER BY pc_domain"
    ).fetchall()
    X = np.array([[r[3], r[4], r[5]] for r in domains]).T  # models × domains
    np.testing.assert_allclose([r[6] for r in domains], sign_cdf(X, np.array(errors)), rtol=1e-9)
    weights = linear_projection([r[6] for r in domains], caps([r[2] for r in domains], 0.3))
    np.testing.assert_allclose([r[7] for r in domains], weights, rtol=1e-9)
    assert [r[8] for r in domains] == [w > 0 for w in weights]
    assert sum(r[7] for r in domains) == pytest.approx(1.0)
    # Each model scores its own domain best (lowest bits per byte).
    by_name = {r[0]: r for r in domains}
    assert by_name["kjv"][3] < by_name["kjv"][4] and by_name["pydoc"][4] < by_name["pydoc"][3]
    # Every document carries its domain's estimate and weight; the sampled ones their bits per byte.
    rows = db.execute(
        f"SELECT source, pc_estimate, pc_weight, pc_score, bpb_kjv FROM '{out}/scores/*.parquet'"
    ).fetchall()
    for source, est, weight, score, _ in rows:
        assert est == by_name[source][6] and weight == by_name[source][7] and 0 <= score <= 1
    sampled = db.execute(
        f"SELECT source, count(bpb_kjv) FROM '{out}/scores/*.parquet' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    sizes = dict(db.execute(f"SELECT source, count(*) FROM '{out}/scores/*.parquet' GROUP BY 1").fetchall())
    assert all(n == min(6, sizes[s]) for s, n in sampled)
    # The classifier ranks the included domains' documents above the others.
    inc = [s for s, *_ in rows if by_name[s][8]]
    assert 0 < len(inc) < len(rows)
    mean_in = np.mean([r[3] for r in rows if by_name[r[0]][8]])
    mean_out = np.mean([r[3] for r in rows if not by_name[r[0]][8]])
    assert mean_in > mean_out
    assert manifest["perplexity_correlations"]["domains"] == len(domains)


def test_without_a_domain_field_each_document_is_its_own_domain(tmp_path, three_lms):
    """Every document scored by every model; its estimate from its own column; the projection with a
    domain a document (a token-weighted cut, ties by id hash); the selection what it keeps."""
    import duckdb
    import pyarrow as pa
    from beamsift.pipeline.config import load_config
    from beamsift.pipeline.run import run_selection
    from beamsift.transforms.featurize import hash_ids
    from conftest import demo_records, make_config, write_jsonl

    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(120))
    errors = [0.6, 0.2, 0.4]
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["perplexity_correlations", "select"],
        perplexity_correlations={
            "models": [{"path": p, "error": e} for p, e in zip(three_lms, errors)],
            "domain_field": None,
            "desired_fraction": 0.25,
            "context": 64,
        },
        select={"method": "threshold", "column": "pc_weight", "min": 1.0e-300, "k": None},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    rows = (
        duckdb.connect()
        .execute(
            f"SELECT id, n_tokens, bpb_kjv, bpb_pydoc, bpb_sqlite, pc_estimate, pc_weight, pc_score, pc_domain, "
            f"selected FROM '{tmp_path}/out/scores/*.parquet'"
        )
        .fetchall()
    )
    assert len(rows) == 120 and all(r[2] is not None and r[8] is None for r in rows)
    X = np.array([r[2:5] for r in rows]).T  # models × documents
    est = spearmanr(X, np.array(errors))
    np.testing.assert_allclose([r[5] for r in rows], est, rtol=1e-9)
    # The projection over documents, best estimate first and ties by the smaller id hash.
    hashes = np.asarray(hash_ids(pa.array([r[0] for r in rows])), np.uint64)
    order = np.lexsort((hashes, -est))
    tokens = np.array([max(r[1], 1) for r in rows], np.float64)
    expected = np.empty(len(rows))
    expected[order] = linear_projection(np.arange(len(rows), 0, -1), caps(tokens[order], 0.25))
    np.testing.assert_allclose([r[6] for r in rows], expected, rtol=1e-9, atol=1e-15)
    kept = expected > 0
    assert sum(r[6] for r in rows) == pytest.approx(1.0)
    boundary = tokens[order][kept[order]][-1]  # the last kept, best first: it takes the rest of 1
    assert tokens[kept].sum() >= 0.25 * tokens.sum() > tokens[kept].sum() - boundary
    assert [bool(r[9]) for r in rows] == list(kept)
    assert np.mean([r[7] for r, k in zip(rows, kept) if k]) > np.mean([r[7] for r, k in zip(rows, kept) if not k])
    report = manifest["perplexity_correlations"]
    assert report["per_document"] and report["documents"] == 120 and report["tokens"] == tokens.sum()
    assert report["included"] == kept.sum()
    assert not (tmp_path / "out" / "domains").exists()
    # The same cut on the multi-process runner with the input split into many shards.
    from conftest import WORKERS

    split = ["input.split_bytes=16384", "input.batch_size=16", f"output.dir={tmp_path / 'b'}"]
    run_selection(load_config(str(cfg), split), beam_args=WORKERS)
    query = "SELECT id, selected, round(pc_weight, 12), round(pc_score, 6) FROM '{}/scores/*.parquet' ORDER BY id"
    db = duckdb.connect()
    assert db.execute(query.format(tmp_path / "out")).fetchall() == db.execute(query.format(tmp_path / "b")).fetchall()
    assert len(list((tmp_path / "b" / "scores").glob("*.parquet"))) > 1
