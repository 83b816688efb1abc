"""The model-free embedding and k-means: assignment against scikit-learn's predict on the same
centroids, the embedding against its formula, clusters that find the corpus's domains."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.featurize import hashed_ngram_features
from beamsift.transforms.stages.cluster import assign, fit_centroids, kmeans_best_of, load_centroids
from beamsift.transforms.stages.embed import projection, smooth_idf, tfidf_embeddings
from conftest import demo_records, make_config, write_jsonl
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits


def _predict(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """scikit-learn's predict with exactly the given centroids (a fitted estimator, its centres set)."""
    km = KMeans(n_clusters=len(centroids), init=centroids, n_init=1, max_iter=1).fit(centroids)
    km.cluster_centers_ = centroids.copy()
    return km.predict(vectors)


def test_assignment_is_scikit_learns_predict():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    centroids = KMeans(n_clusters=6, random_state=0, n_init=1).fit(vectors).cluster_centers_.astype(np.float32)
    nearest, distance = assign(vectors, centroids)
    np.testing.assert_array_equal(nearest, _predict(centroids, vectors))
    np.testing.assert_allclose(distance, np.linalg.norm(vectors - centroids[nearest], axis=1), rtol=1e-5)


def test_the_centroids_do_not_depend_on_the_threads_of_the_machine():
    """scikit-learn's k-means adds its OpenMP threads' partial sums in the order they finish:
    fitted on however many threads the machine gives it, the same sample gave other centroids."""
    rng = np.random.default_rng(0)
    sample = [(i, 0, v) for i, v in enumerate(rng.normal(size=(3000, 16)).astype(np.float32))]
    fitted = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="openmp"):
            fitted.append(fit_centroids(sample, 16, 0, None))
            raw = KMeans(n_clusters=16, random_state=0, n_init=3).fit(np.stack([v for _, _, v in sample]))
        assert np.abs(raw.cluster_centers_ - fitted[-1]).max() < 1e-3  # scikit-learn's k-means, as it was
    np.testing.assert_array_equal(fitted[0], fitted[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_runs_side_by_side_are_scikit_learns_fit_bit_for_bit(dtype):
    """The starts drawn in scikit-learn's order, the Lloyd runs on threads, the best kept as it
    keeps it: the same centroids as KMeans(n_init=3).fit, on points with and without clusters."""
    rng = np.random.default_rng(3)
    blobs = rng.normal(size=(12, 24))[rng.integers(0, 12, 4000)] + 0.3 * rng.normal(size=(4000, 24))
    for points in (blobs.astype(dtype), rng.normal(size=(2500, 24)).astype(dtype)):
        for seed, k in ((0, 16), (5, 7)):
            with threadpool_limits(limits=1, user_api="openmp"):
                expected = KMeans(n_clusters=k, random_state=seed, n_init=3).fit(points).cluster_centers_
                np.testing.assert_array_equal(kmeans_best_of(points, k, seed, 3), expected)


def test_tfidf_embedding_by_hand():
    # Two documents, 4 buckets: counts (2, 1, 0, 0) and (0, 1, 0, 1); df = (1, 2, 0, 1), N = 2.
    from beamsift.transforms.featurize import NgramFeatures

    f = NgramFeatures(np.array([0, 0, 1, 1, 3]), np.array([0, 3, 5]), np.array([3, 2]))
    idf = smooth_idf((np.array([1, 2, 0, 1]), 2))
    np.testing.assert_allclose(idf, np.log(3 / np.array([2, 3, 1, 2])) + 1, rtol=1e-6)
    proj = np.eye(4, dtype=np.float32)  # no reduction: the normalised TF-IDF rows themselves
    rows = np.array([[(1 + np.log(2)) * idf[0], idf[1], 0, 0], [0, idf[1], 0, idf[3]]])
    np.testing.assert_allclose(tfidf_embeddings(f, idf, proj), rows / np.linalg.norm(rows, axis=1)[:, None], rtol=1e-5)


def test_the_tfidf_embedding_is_the_plain_product_bit_for_bit():
    # The kernel builds the CSC without scipy's sort and the product goes tile by tile; the
    # embedding must not move by a bit, or every cluster and SemDeDup decision after it could.
    import scipy.sparse as sp
    from beamsift.transforms.featurize import NgramFeatures, compiled_kernels
    from beamsift.transforms.stages.embed import tfidf

    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 300, 700)
    lengths[3] = 0  # a document with no n-gram
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    buckets = rng.zipf(1.3, offsets[-1]) % 1000  # repeats within a document, as text has
    f = NgramFeatures(buckets, offsets, lengths)
    idf = (1 + rng.random(1000) * 5).astype(np.float32)
    indptr, rows, counts = compiled_kernels().column_counts_compiled(buckets, offsets, 1000)
    want = tfidf(f, idf).tocsc()
    np.testing.assert_array_equal(indptr, want.indptr)
    np.testing.assert_array_equal(rows, want.indices)
    plain = sp.csr_matrix((np.ones(len(buckets)), buckets, offsets), shape=(700, 1000)).tocsc()
    plain.sum_duplicates()
    np.testing.assert_array_equal(counts, plain.data)
    proj = projection(1000, 80, 0)  # tiles of 32 columns: two whole, one part
    rowwise = (want @ proj).astype(np.float32)
    norms = np.linalg.norm(rowwise, axis=1, keepdims=True)
    np.testing.assert_array_equal(tfidf_embeddings(f, idf, proj), rowwise / np.where(norms > 0, norms, 1))


def test_document_frequencies_by_hand_and_against_a_unique_per_document():
    from beamsift.transforms.featurize import compiled_kernels

    kernels = compiled_kernels()
    # The documents of the test above, and a third not in the running: df = (1, 2, 0, 1).
    buckets, offsets = np.array([0, 0, 1, 1, 3, 2, 2]), np.array([0, 3, 5, 7])
    running = np.array([True, True, False])
    assert kernels.document_frequencies_compiled(buckets, offsets, running, 4).tolist() == [1, 2, 0, 1]
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 50, 400)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    buckets = rng.integers(0, 64, offsets[-1])
    running = rng.random(400) < 0.7
    want = np.zeros(64, np.int64)
    for d in np.flatnonzero(running):
        want[np.unique(buckets[offsets[d] : offsets[d + 1]])] += 1
    np.testing.assert_array_equal(kernels.document_frequencies_compiled(buckets, offsets, running, 64), want)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster")
    return write_jsonl(d / "pool.jsonl", demo_records(700))


def _projected(records, dim=64, seed=1):
    """The projection embedding outside the pipeline: idf over the documents, the seeded projection."""
    f = hashed_ngram_features(pa.array([r["text"] for r in records]), 10000)
    df = np.zeros(10000, np.int64)
    for i in range(len(records)):
        df[np.unique(f.buckets[f.offsets[i] : f.offsets[i + 1]])] += 1
    return tfidf_embeddings(f, smooth_idf((df, len(records))), projection(10000, dim, seed))


def test_the_cluster_stage_assigns_as_scikit_learn_would(tmp_path, corpus):
    cfg = make_config(
        tmp_path,
        corpus,
        corpus,
        stages=["embed", "cluster", "select"],
        embed={"method": "projection", "dim": 64},
        cluster={"k": 5},
        select={"method": "all", "k": None},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    assert manifest["counts"]["selected"] == 700
    rows = duckdb.connect().execute(f"SELECT id, cluster, cluster_distance FROM '{tmp_path}/out/scores/*.parquet'")
    got = {i: (c, dist) for i, c, dist in rows.fetchall()}
    records = demo_records(700)
    vectors = _projected(records)
    centroids = load_centroids(str(tmp_path / "out" / "artifacts" / "cluster"))
    expected = _predict(centroids, vectors)
    assert [got[r["id"]][0] for r in records] == expected.tolist()
    np.testing.assert_allclose(
        [got[r["id"]][1] for r in records], np.linalg.norm(vectors - centroids[expected], axis=1), rtol=1e-4
    )


def test_svd_clusters_find_the_domains(tmp_path, corpus):
    cfg = make_config(
        tmp_path,
        corpus,
        corpus,
        stages=["embed", "cluster", "select"],
        cluster={"k": 7},
        select={"method": "all", "k": None},
    )
    run_selection(load_config(str(cfg)), overwrite=True)
    rows = duckdb.connect().execute(f"SELECT cluster, source FROM '{tmp_path}/out/scores/*.parquet'").fetchall()
    # Purity: the share of documents whose cluster's most common source is their own.
    by_cluster = {}
    for c, s in rows:
        by_cluster.setdefault(c, []).append(s)
    pure = sum(max(v.count(s) for s in set(v)) for v in by_cluster.values())
    largest = max([s for _, s in rows].count(s) for s in {s for _, s in rows})
    assert pure / len(rows) > 0.7 and pure > 2.5 * largest  # one cluster for all: the largest domain


def test_per_cluster_statistics_agree_with_the_scores(tmp_path, corpus):
    cfg = make_config(
        tmp_path,
        corpus,
        corpus,
        stages=["embed", "cluster", "dedup", "select"],
        cluster={"k": 6},
        select={"method": "balanced", "column": "n_tokens", "quota": "sqrt", "k": 60},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    out = tmp_path / "out"
    db = duckdb.connect()
    expected = db.execute(
        f"SELECT cluster, count(*), count(*) FILTER (selected), count(duplicate_of), avg(n_tokens), "
        f"avg(cluster_distance), arg_min(id, cluster_distance) FROM '{out}/scores/*.parquet' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    got = db.execute(
        f"SELECT cluster, size, selected, duplicates, mean_n_tokens, mean_cluster_distance, examples[1] "
        f"FROM '{out}/clusters/*.parquet' ORDER BY 1"
    ).fetchall()
    assert len(got) == len(expected) == 6
    for g, e in zip(got, expected):
        assert g[:4] == e[:4] and g[4:6] == pytest.approx(e[4:6]) and g[6] == e[6]
    assert [c["size"] for c in manifest["clusters"]] == [e[1] for e in expected]
    assert sum(c["selected"] for c in manifest["clusters"]) == 60
    # beamsift query has the view.
    from conftest import run_cli

    shown = run_cli("query", str(out), "SELECT sum(size) AS n FROM clusters", "--format", "csv").stdout
    assert shown.split() == ["n", "700"]
    # clusters/ is beamsift's own: a second run replaces the result that holds it.
    run_cli("run", str(cfg), "--overwrite", "--quiet", "--no-progress")
    assert (out / "clusters" / "part-00000.parquet").exists()


def test_lloyd_passes_over_every_document(tmp_path, corpus):
    """cluster.passes: the sample's centroids moved to the mean of their documents, as many times."""
    fitted = {}
    for passes in (0, 2):
        cfg = make_config(
            tmp_path / str(passes),
            corpus,
            corpus,
            stages=["embed", "cluster", "select"],
            embed={"method": "projection", "dim": 64},
            cluster={"k": 5, "sample": 100, "passes": passes},
            select={"method": "all", "k": None},
        )
        run_selection(load_config(str(cfg)), overwrite=True)
        fitted[passes] = load_centroids(str(tmp_path / str(passes) / "out" / "artifacts" / "cluster"))
    vectors = _projected(demo_records(700)).astype(np.float64)
    expected = fitted[0].astype(np.float64)
    for _ in range(2):
        nearest, _ = assign(vectors, expected)
        expected = np.stack([vectors[nearest == c].mean(0) for c in range(5)])
    np.testing.assert_allclose(fitted[2], expected, atol=1e-5)
    assert np.abs(fitted[2] - fitted[0]).max() > 1e-3  # the passes did move them


def test_a_sample_that_names_its_rows_fits_what_one_that_carries_them_fits(tmp_path):
    """On a local disk a sample carries (shard, row) for each sampled embedding and the fit reads
    them where they are; on an object store it carries the vectors. The same rows, in the
    sample's order (not the shards'), give the same centroids and the same split directions."""
    from beamsift.transforms.chain import Chain
    from beamsift.transforms.stages.dedup import SHARD_ROWS, plan_splits
    from beamsift.transforms.stages.embed import EMBEDDING, embedding_refs, referred_embeddings

    rng = np.random.default_rng(4)
    chain = Chain(str(tmp_path), ("embed",), {"embed": ((EMBEDDING, "fixed_size_list<item: float>[8]"),)})
    assert chain.on_local_disk()
    shards = {}
    for name in ("part-b", "part-a", "part-c"):
        shards[name] = rng.normal(size=(50, 8)).astype(np.float32)
        flat = pa.array(shards[name].reshape(-1), pa.float32())
        chain.write("embed", name, pa.table({EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, 8)}))
    picks = [(name, int(r)) for name in shards for r in rng.choice(50, 20, replace=False)]
    order = rng.permutation(len(picks))  # the sample's order: by key, across the shards
    refs = [embedding_refs(chain, picks[i][0], np.array([picks[i][1]]))[0] for i in order]
    carried = [shards[picks[i][0]][picks[i][1]].copy() for i in order]
    assert refs[0] == picks[order[0]]
    np.testing.assert_array_equal(referred_embeddings(chain, refs), np.stack(carried))
    by_ref = fit_centroids([(i, 0, p) for i, p in enumerate(refs)], 4, 0, None, chain=chain)
    by_value = fit_centroids([(i, 0, v) for i, v in enumerate(carried)], 4, 0, None)
    np.testing.assert_array_equal(by_ref, by_value)

    named = np.empty(len(refs), SHARD_ROWS)
    named["shard"], named["row"] = [r[0] for r in refs], [r[1] for r in refs]
    half = np.stack(carried).astype(np.float16)
    shapes = {3: (4000, np.stack(carried).sum(0), len(carried))}
    a = plan_splits(shapes, 1000, {3: (None, None, named)}, chain=chain)[3]
    b = plan_splits(shapes, 1000, {3: (None, None, half)})[3]
    assert a[0] == b[0] == 3
    for x, y in zip(a[1:], b[1:]):
        np.testing.assert_array_equal(x, y)


def test_split_samples_that_name_no_rows_leave_the_cluster_to_seeded_cuts(tmp_path):
    """A cluster none of whose documents fell under the sampling cut has an empty sample: named
    rows or carried ones, it is cut along seeded directions, the same either way."""
    from beamsift.transforms.chain import Chain
    from beamsift.transforms.stages.dedup import SHARD_ROWS, plan_splits

    chain = Chain(str(tmp_path), ("embed",))
    shapes = {2: (5000, np.ones(8), 100)}
    named = plan_splits(shapes, 1000, {2: (np.zeros(0), np.zeros(0), np.empty(0, SHARD_ROWS))}, chain=chain)[2]
    carried = plan_splits(shapes, 1000, {2: (np.zeros(0), np.zeros(0), np.zeros((0, 8), np.float16))})[2]
    assert named[0] == carried[0] == 4
    for x, y in zip(named[1:], carried[1:]):
        np.testing.assert_array_equal(x, y)
