"""Embeddings and k-means for diversity: the model-free embedding, centroids fitted on a sample,
every document assigned to its nearest centroid.

``embed`` (model-free, the CPU default): the hashed n-gram counts that beamsift already computes,
TF-IDF-weighted (sublinear tf = 1 + log(count), smooth idf = log((1 + N)/(1 + df)) + 1, df over the
documents in the running), reduced to ``embed.dim`` dimensions and L2-normalised:

- ``svd`` (default): a truncated SVD fitted on a seeded sample (latent semantic analysis): the
  directions that carry the corpus's topics, what k-means needs to find them;
- ``projection``: a Gaussian random projection seeded by the config seed (no fit; keeps cosines up
  to a small distortion, Johnson–Lindenstrauss, but spreads the topics over every direction).

The vectors stay internal (``_embedding`` in the stage's staging files).

``cluster``: k-means (scikit-learn's, k-means++ seeded by the config seed) fitted on a seeded
sample of the embeddings (``cluster.sample``); every document in the running gets ``cluster`` (the
nearest centroid, the first on a tie, as scikit-learn's ``predict``) and ``cluster_distance`` (the
Euclidean distance to it). The centroids are saved to ``artifacts/cluster/centroids.npy``, beside
the settings they were fitted with (``cluster.json``) and, for svd and projection, the embedding's
IDF and basis (``idf.npy``, ``basis.npy``: fitted on the running's documents). ``cluster.model``
applies all of them to new data: the embed stage then uses the saved IDF and basis instead of
fitting its own, so that the same documents land in the same clusters.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.meter import Metered
from beamsift.transforms.chain.sampling import SampleRunning
from beamsift.transforms.chain.seeded import EMBED_SAMPLE_STREAM
from beamsift.transforms.chain.staging import read_staging
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.featurize import features_from_arrow
from beamsift.transforms.io.cluster_stats import ClusterStatistics
from beamsift.transforms.io.schema import BUCKETS, N_TOKENS
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting

EMBEDDING = "_embedding"
EMBED_COLUMNS = ((EMBEDDING, "embedding"),)
NEXT_CLUSTER = "_cluster_next"  # the second nearest centroid: where SemDeDup also compares
CLUSTER_COLUMNS = (("cluster", "int64"), ("cluster_distance", "double"), (NEXT_CLUSTER, "int64"))
# A cluster model (artifacts/cluster): the centroids, the settings they were fitted with, and for
# svd and projection the embedding that maps documents to the centroids' space.
CENTROIDS_FILE, META_FILE, IDF_FILE, BASIS_FILE = "centroids.npy", "cluster.json", "idf.npy", "basis.npy"


def projection(num_buckets: int, dim: int, seed: int) -> np.ndarray:
    """The random projection: (num_buckets, dim) Gaussian entries of variance 1/dim, from the seed."""
    rng = np.random.default_rng([seed, 0xE4BED])
    return (rng.standard_normal((num_buckets, dim)) / np.sqrt(dim)).astype(np.float32)


def tfidf(features, idf: np.ndarray):
    """Documents' hashed n-grams -> their TF-IDF rows (a scipy CSR matrix)."""
    import scipy.sparse as sp

    n = len(features.offsets) - 1
    # CSR straight from the offsets (no row-index array, no COO copy); duplicates summed in place.
    counts = sp.csr_matrix(
        (np.ones(len(features.buckets), np.float32), features.buckets.astype(np.int32), features.offsets),
        shape=(n, len(idf)),
    )
    counts.sum_duplicates()
    counts.data = (1 + np.log(counts.data)) * idf[counts.indices]
    return counts


def tfidf_embeddings(features, idf: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Documents' hashed n-grams -> L2-normalised, reduced TF-IDF vectors (n, dim); ``proj`` is
    (num_buckets, dim): a random projection or the SVD's components, transposed."""
    out = np.asarray(tfidf(features, idf) @ proj, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


def assign(vectors: np.ndarray, centroids: np.ndarray, with_next: bool = False):
    """(nearest centroid, Euclidean distance to it) of each vector; the first centroid on a tie.
    ``with_next``: also the second nearest (the nearest itself when there is one centroid)."""
    v = vectors.astype(np.float64)
    c = centroids.astype(np.float64)
    d2 = (v * v).sum(1)[:, None] - 2 * v @ c.T + (c * c).sum(1)[None, :]
    nearest = np.argmin(d2, axis=1)
    distance = np.sqrt(np.maximum(d2[np.arange(len(v)), nearest], 0))
    if not with_next:
        return nearest, distance
    d2[np.arange(len(v)), nearest] = np.inf
    following = np.argmin(d2, axis=1) if c.shape[0] > 1 else nearest
    return nearest, distance, following


def _features(shard):
    table = read_staging(shard.path, [N_TOKENS, BUCKETS])
    return features_from_arrow(table.column(BUCKETS), np.asarray(table.column(N_TOKENS).combine_chunks()))


class _DocumentFrequencies(beam.DoFn):
    def __init__(self, stage, chain, num_buckets):
        self.stage, self.chain, self.num_buckets = stage, chain, num_buckets

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        f = _features(shard)
        rows = np.repeat(np.arange(len(running)), np.diff(f.offsets))
        keep = running[rows]
        pairs = np.unique(rows[keep].astype(np.int64) * self.num_buckets + f.buckets[keep])
        yield np.bincount(pairs % self.num_buckets, minlength=self.num_buckets).astype(np.int64), int(running.sum())


def document_frequencies(shards, stage, chain, num_buckets):
    """A side input: (document frequency of each bucket, documents) over those in the running."""
    return beam.pvalue.AsSingleton(
        shards
        | "DocumentFrequencies" >> beam.ParDo(_DocumentFrequencies(stage, chain, num_buckets))
        | "SumFrequencies" >> beam.CombineGlobally(Sum()).without_defaults(),
        default_value=(np.zeros(num_buckets, np.int64), 0),
    )


def smooth_idf(frequencies) -> np.ndarray:
    df, n = frequencies
    return (np.log((1 + n) / (1 + df)) + 1).astype(np.float32)


class EmbedShard(ShardStageFn):
    """A shard -> the model-free embedding of each document in the running (zeros elsewhere)."""

    def __init__(self, name, chain, dim: int, seed: int, num_buckets: int, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.dim, self.seed, self.num_buckets = dim, seed, num_buckets

    def score(self, shard, reasons, idf, proj):
        running = running_mask(reasons)
        vectors = tfidf_embeddings(_features(shard), idf, proj)
        vectors[~running] = 0
        flat = pa.array(vectors.reshape(-1), pa.float32())
        return {EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, proj.shape[1])}, reasons


def fit_svd(sample: list, idf: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The truncated SVD's components (num_buckets, dim') of the sample's TF-IDF rows."""
    from beamsift.transforms.featurize import NgramFeatures
    from sklearn.decomposition import TruncatedSVD

    buckets = [b for _, _, b in sample]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in buckets])]).astype(np.int64)
    flat = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
    features = NgramFeatures(flat, offsets, np.zeros(len(buckets), np.int64))
    matrix = tfidf(features, idf)
    k = max(1, min(dim, matrix.shape[0] - 1, matrix.shape[1] - 1))
    svd = TruncatedSVD(n_components=k, random_state=seed, algorithm="randomized", n_iter=5)
    svd.fit(matrix)
    return svd.components_.T.astype(np.float32)


class EmbedDocuments(beam.PTransform):
    def __init__(
        self,
        name,
        chain,
        dim,
        seed,
        num_buckets,
        method="svd",
        sample=20000,
        progress_dir=None,
        encoder=None,
        save_to=None,
        saved=None,
    ):
        super().__init__()
        self.name, self.chain, self.dim, self.seed = name, chain, dim, seed
        self.num_buckets, self.progress_dir = num_buckets, progress_dir
        self.method, self.sample = method, sample
        self.encoder = encoder  # method "model": (model, max_tokens, batch_size, threads)
        # svd, projection: the folder the fitted IDF and basis go to (the cluster stage's
        # artifacts), or a saved cluster model's folder whose IDF and basis are applied instead.
        self.save_to, self.saved = save_to, saved

    def expand(self, shards):
        if self.method == "model":
            from beamsift.transforms.models.encoder import EncodeShard

            fn = EncodeShard(self.name, self.chain, *self.encoder, progress_dir=self.progress_dir)
            return shards | "Encode" >> ApplyStage(fn)
        if self.saved is not None:
            given = shards.pipeline | "SavedEmbedding" >> beam.Create([self.saved])
            idf = beam.pvalue.AsSingleton(given | "LoadIdf" >> beam.Map(load_array, IDF_FILE))
            proj = given | "LoadBasis" >> beam.Map(load_array, BASIS_FILE)
        else:
            idf, proj = self._fit(shards)
            if self.save_to is not None:
                _ = proj | "SaveEmbedding" >> beam.Map(save_embedding, idf, self.save_to)
        fn = EmbedShard(self.name, self.chain, self.dim, self.seed, self.num_buckets, self.progress_dir)
        return shards | "Embed" >> ApplyStage(fn, idf=idf, proj=beam.pvalue.AsSingleton(proj))

    def _fit(self, shards):
        """(the IDF as a side input, the basis as a PCollection of one) over the documents in the running."""
        frequencies = document_frequencies(shards, self.name, self.chain, self.num_buckets)
        # Computed once, from the frequencies' side input (its default covers an empty running).
        idf = beam.pvalue.AsSingleton(
            shards.pipeline | "Once" >> beam.Create([None]) | "Idf" >> beam.Map(lambda _, f: smooth_idf(f), frequencies)
        )
        if self.method == "svd":
            proj = (
                shards
                | "SampleFeatures"
                >> SampleRunning(self.name, self.chain, self.sample, self.seed, EMBED_SAMPLE_STREAM, _bucket_lists)
                | "FitSvd" >> beam.Map(Metered(self.name, fit_svd), idf, self.dim, self.seed)
            )
        else:
            proj = (
                shards.pipeline
                | "Seed" >> beam.Create([self.seed])
                | "Projection" >> beam.Map(lambda seed, m, d: projection(m, d, seed), self.num_buckets, self.dim)
            )
        return idf, proj


def embeddings(chain, shard_name: str) -> np.ndarray:
    """The (n, dim) embeddings an embed stage wrote for a shard."""
    column = chain.read(chain.producer(EMBEDDING), shard_name, [EMBEDDING]).column(0).combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


# Copies, not views: a sample held across shards must not keep every shard's arrays alive.
def _bucket_lists(chain, shard, rows):
    f = _features(shard)
    return [f.buckets[f.offsets[r] : f.offsets[r + 1]].copy() for r in rows]


def _embedding_rows(chain, shard, rows):
    return [v.copy() for v in embeddings(chain, shard.name)[rows]]


def fit_centroids(sample: list, k: int, seed: int, artifacts: str | None) -> np.ndarray:
    """k-means (k-means++, scikit-learn) on the sample's vectors; saved to artifacts/ if given."""
    from beamsift.transforms.selectors.cut import SelectionError
    from sklearn.cluster import KMeans

    vectors = np.stack([v for _, _, v in sample]) if sample else np.zeros((0, 1), np.float32)
    if len(vectors) < k:
        raise SelectionError(f"cluster.k={k} is more than the {len(vectors)} documents sampled to fit the centroids")
    centroids = KMeans(n_clusters=k, random_state=seed, n_init=3).fit(vectors).cluster_centers_.astype(np.float32)
    return save_centroids(centroids, artifacts) if artifacts is not None else centroids


def load_centroids(path: str) -> np.ndarray:
    target = path if path.endswith(".npy") else FileSystems.join(path, CENTROIDS_FILE)
    with FileSystems.open(target) as f:
        return np.load(io.BytesIO(f.read()))


def load_array(folder: str, name: str) -> np.ndarray:
    with FileSystems.open(FileSystems.join(folder, name)) as f:
        return np.load(io.BytesIO(f.read()))


def _save_array(array: np.ndarray, folder: str, name: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    with FileSystems.create(FileSystems.join(folder, name)) as f:
        f.write(buffer.getvalue())


def save_embedding(basis: np.ndarray, idf: np.ndarray, folder: str) -> None:
    """What applies the embedding again: the IDF (num_buckets,) and the basis (num_buckets, dim)."""
    _save_array(idf, folder, IDF_FILE)
    _save_array(basis, folder, BASIS_FILE)


def read_cluster_meta(folder: str) -> dict | None:
    """The settings a cluster model was fitted with (``cluster.json``); None if it has none."""
    path = FileSystems.join(folder, META_FILE)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read())


class AssignShard(ShardStageFn):
    def score(self, shard, reasons, centroids):
        running = running_mask(reasons)
        cluster = np.full(len(reasons), -1, dtype=np.int64)
        following = np.full(len(reasons), -1, dtype=np.int64)
        distance = np.full(len(reasons), np.nan)
        rows = np.flatnonzero(running)
        if len(rows):
            nearest, dist, second = assign(embeddings(self.chain, shard.name)[rows], centroids, with_next=True)
            cluster[rows], distance[rows], following[rows] = nearest, dist, second
        columns = {
            "cluster": pa.array(cluster, mask=~running),
            "cluster_distance": distance,
            NEXT_CLUSTER: pa.array(following, mask=~running),
        }
        return columns, reasons


FIXED_POINT = float(1 << 32)  # the Lloyd passes sum vectors as integers: exact in any order


class _CentroidSums(beam.DoFn):
    """A shard -> (per-centroid sums of its running documents' vectors, counts), as integers."""

    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def process(self, item, centroids):
        shard, running = self.chain.running(self.stage, item)
        vectors = embeddings(self.chain, shard.name)[running].astype(np.float64)
        sums = np.zeros(centroids.shape, np.int64)
        counts = np.zeros(len(centroids), np.int64)
        if len(vectors):
            nearest, _ = assign(vectors, centroids)
            np.add.at(sums, nearest, np.round(vectors * FIXED_POINT).astype(np.int64))
            counts = np.bincount(nearest, minlength=len(centroids)).astype(np.int64)
        yield sums, counts


def _move_centroids(total, centroids: np.ndarray) -> np.ndarray:
    """One Lloyd step: each centroid to the mean of its documents (an empty one stays)."""
    sums, counts = total
    moved = centroids.astype(np.float64).copy()
    full = counts > 0
    moved[full] = sums[full] / FIXED_POINT / counts[full][:, None]
    return moved.astype(np.float32)


def save_centroids(centroids: np.ndarray, artifacts: str, meta: dict | None = None) -> np.ndarray:
    """The centroids, and with ``meta`` the settings that made them (checked when they are applied)."""
    _save_array(centroids, artifacts, CENTROIDS_FILE)
    if meta is not None:
        meta = {**meta, "cluster.k": int(centroids.shape[0]), "width": int(centroids.shape[1])}
        with FileSystems.create(FileSystems.join(artifacts, META_FILE)) as f:
            f.write(json.dumps(meta, indent=2).encode())
    return centroids


class ClusterDocuments(beam.PTransform):
    """Fit k centroids on a sample (or load them), refine them with ``passes`` Lloyd iterations
    over every document in the running (Beam combines: when a sample is not enough), and assign
    every document."""

    def __init__(self, name, chain, k, sample, seed, artifacts, model=None, progress_dir=None, passes=0, meta=None):
        super().__init__()
        self.name, self.chain, self.k, self.sample, self.seed = name, chain, k, sample, seed
        self.artifacts, self.model, self.progress_dir = artifacts, model, progress_dir
        self.passes = passes
        self.meta = meta  # the embedding's settings, saved beside the centroids

    def expand(self, shards):
        if self.model is not None:
            centroids = shards.pipeline | "GivenCentroids" >> beam.Create([self.model]) | beam.Map(load_centroids)
        else:
            artifacts = FileSystems.join(self.artifacts, self.name)
            centroids = (
                shards
                | "SampleEmbeddings"
                >> SampleRunning(self.name, self.chain, self.sample, self.seed, EMBED_SAMPLE_STREAM, _embedding_rows)
                | "FitCentroids" >> beam.Map(Metered(self.name, fit_centroids), self.k, self.seed, None)
            )
            for i in range(self.passes):
                current = beam.pvalue.AsSingleton(centroids)
                total = (
                    shards
                    | f"CentroidSums{i}" >> beam.ParDo(_CentroidSums(self.name, self.chain), current)
                    | f"SumCentroids{i}" >> beam.CombineGlobally(Sum())
                )
                centroids = total | f"MoveCentroids{i}" >> beam.Map(Metered(self.name, _move_centroids), current)
            centroids = centroids | "SaveCentroids" >> beam.Map(save_centroids, artifacts, self.meta)
        fn = AssignShard(self.name, self.chain, self.progress_dir)
        return shards | "Assign" >> ApplyStage(fn, centroids=beam.pvalue.AsSingleton(centroids))


# ---- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSettings:
    k: int = setting(16, "the number of clusters", at_least=1)
    sample: int = setting(20000, "fit the centroids on at most this many documents (seeded)", at_least=1)
    passes: int = setting(
        0, "then this many Lloyd passes over every document (when a sample is not enough)", at_least=0
    )
    model: str | None = setting(None, "a run's folder (or its artifacts/): apply its embedding and centroids")


def cluster_meta(cfg) -> dict:
    """The settings a cluster model is fitted with, saved beside its centroids (``cluster.json``)."""
    method = cfg["embed.method"]
    meta = {"embed.method": method, "featurize.buckets": cfg["featurize.buckets"], "seed": cfg["seed"]}
    if method == "model":
        meta["embed.model"] = encoder_name(cfg["embed.model"])
    else:
        meta.update({"embed.dim": cfg["embed.dim"], "featurize.max_ngram": cfg["featurize.max_ngram"]})
    return meta


def encoder_name(model: str | None) -> str:
    """An encoder's name: the default's package, a folder's last part (the folder may move), or the hub id."""
    from beamsift.transforms.models.encoder import PACKAGE

    if model is None:
        return PACKAGE
    return os.path.basename(model.rstrip("/")) if os.path.isdir(model) else model


def _check(cfg, name, available, fail) -> None:
    if cfg["cluster.passes"] and cfg["cluster.model"] is not None:
        fail("cluster.passes", "cluster.passes refines fitted centroids; with cluster.model the centroids are given")


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    stage = ClusterDocuments(
        name,
        ctx.chain,
        cfg["cluster.k"],
        cfg["cluster.sample"],
        ctx.seed,
        ctx.artifacts,
        ctx.given("cluster.model"),
        ctx.progress_dir,
        cfg["cluster.passes"],
        cluster_meta(cfg),
    )
    return shards | "Stage_" + name >> stage


def _statistics(ctx: Context, shards):
    """After the chain: each cluster's size, selection and mean scores (the clusters/ table)."""
    from beamsift.transforms.stages import cluster_stats_skip  # the registry, which lists this module

    statistics = ClusterStatistics(ctx.chain, ctx.cfg["stages"][-1], ctx.out, ctx.fields, cluster_stats_skip())
    return shards | "ClusterStatistics" >> statistics


STAGE = Stage(
    kind="cluster",
    summary="k-means over the embeddings: cluster and cluster_distance",
    settings=ClusterSettings,
    after=("embed",),
    columns=fixed_columns(*CLUSTER_COLUMNS),
    all_columns=("cluster", "cluster_distance"),
    model_key="cluster.model",
    check=_check,
    build=_build,
    after_chain=_statistics,
    cluster_stats_skip=("cluster",),  # the id itself
)
