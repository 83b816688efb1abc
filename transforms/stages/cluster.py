"""The cluster stage: k-means over the embed stage's vectors (``embed.py``).

k-means (scikit-learn's, k-means++ seeded by the config seed) is fitted on a seeded sample of the
embeddings (``cluster.sample``), optionally refined by Lloyd passes over every document
(``cluster.passes``, summed as integers: the same centroids for any split); every document in
the running gets ``cluster`` (the nearest centroid, the first on a tie, as scikit-learn's
``predict``) and ``cluster_distance`` (the Euclidean distance to it). The centroids are saved to
``artifacts/cluster/centroids.npy``, beside the settings they were fitted with (``cluster.json``)
and, for svd and projection, the embedding's IDF and basis (``idf.npy``, ``basis.npy``, written by
the embed stage). ``cluster.model`` applies all of them to new data: the embed stage then uses
the saved IDF and basis instead of fitting its own, so that the same documents land in the same
clusters.
"""

from __future__ import annotations

import functools
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.meter import Metered
from beamsift.transforms.chain.sampling import SampleRunning
from beamsift.transforms.chain.seeded import EMBED_SAMPLE_STREAM
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.io.cluster_stats import ClusterStatistics
from beamsift.transforms.selectors.core import SelectionError
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting
from beamsift.transforms.stages.embed import embedding_refs, embeddings, referred_embeddings, save_array

NEXT_CLUSTER = "_cluster_next"  # the second nearest centroid: where SemDeDup also compares
CLUSTER_COLUMNS = (("cluster", "int64"), ("cluster_distance", "double"), (NEXT_CLUSTER, "int64"))
# A cluster model (artifacts/cluster): the centroids, the settings they were fitted with, and for
# svd and projection the embedding that maps documents to the centroids' space.
CENTROIDS_FILE, META_FILE = "centroids.npy", "cluster.json"


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


def _embedding_rows(chain, shard, rows):
    return embedding_refs(chain, shard.name, rows)


def fit_centroids(sample: list, k: int, seed: int, artifacts: str | None, chain=None) -> np.ndarray:
    """k-means (k-means++, scikit-learn) on the sample's vectors (or the embeddings it names, read
    through ``chain``); saved to artifacts/ if given."""
    from threadpoolctl import threadpool_limits

    vectors = referred_embeddings(chain, [v for _, _, v in sample])
    if len(vectors) < k:
        raise SelectionError(f"cluster.k={k} is more than the {len(vectors)} documents sampled to fit the centroids")
    # On one OpenMP thread: scikit-learn's Lloyd step sums each thread's share of the points, then
    # adds the threads' sums in the order they finish, so the centroids (and every assignment and
    # SemDeDup decision after them) would change with the machine's cores, and with three or more
    # threads from run to run. One thread: +0.5 s on a 20,000 x 512 sample (1.7 -> 2.2 s, 2 cores).
    with threadpool_limits(limits=1, user_api="openmp"):
        centroids = kmeans_best_of(vectors, k, seed, N_INIT).astype(np.float32)
    return save_centroids(centroids, artifacts) if artifacts is not None else centroids


N_INIT = 3  # k-means++ starts, the best kept


def kmeans_best_of(vectors: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """The centroids of ``KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(vectors)``,
    bit for bit, with its runs side by side: scikit-learn draws the starts one after the other
    from one generator (cheap) and then runs Lloyd from each in turn (most of the fit, on one
    thread here); the runs are independent, so they go on threads of their own (compiled, without
    the GIL), each on one thread as before. The fit is one step that runs alone, so it takes the
    machine's cores: 20,000 x 512 at k = 16 in a worker limited to one thread, 3.3-3.6 -> 2.3 s.
    Where scikit-learn's private helpers differ from the ones this was written against, its own
    fit."""
    from sklearn.cluster import KMeans

    try:
        from sklearn.cluster import _kmeans as km
        from sklearn.utils.extmath import row_norms

        parts = (km._tolerance, km._kmeans_plusplus, km._kmeans_single_lloyd, km._is_same_clustering)
    except (ImportError, AttributeError):
        parts = None
    threads = min(n_init, os.cpu_count() or 1)
    if parts is None or threads < 2 or vectors.dtype not in (np.float32, np.float64):
        return KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(vectors).cluster_centers_
    tolerance, plusplus, lloyd, same_clustering = parts
    # KMeans.fit's steps: a C-ordered copy, the tolerance from its variances, the mean taken out,
    # the squared norms, n_init starts from one generator, then a Lloyd run from each
    points = np.array(vectors, order="C", copy=True)
    tol = tolerance(points, 1e-4)
    generator = np.random.RandomState(seed)
    weights = np.ones(len(points), dtype=points.dtype)
    mean = points.mean(axis=0)
    points -= mean
    norms = row_norms(points, squared=True)
    starts = [
        plusplus(points, k, random_state=generator, x_squared_norms=norms, sample_weight=weights)[0]
        for _ in range(n_init)
    ]

    def run(start):
        return lloyd(points, weights, start, max_iter=300, verbose=False, tol=tol, n_threads=1)

    with ThreadPoolExecutor(threads, thread_name_prefix="kmeans") as pool:
        runs = list(pool.map(run, starts))
    best = None  # the first run, then a later one only with a lower inertia and another clustering
    for labels, inertia, centers, _ in runs:
        if best is None or (inertia < best[1] and not same_clustering(labels, best[0], k)):
            best = (labels, inertia, centers)
    return best[2] + mean


def load_centroids(path: str) -> np.ndarray:
    target = path if path.endswith(".npy") else FileSystems.join(path, CENTROIDS_FILE)
    with FileSystems.open(target) as f:
        return np.load(io.BytesIO(f.read()))


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
    save_array(centroids, artifacts, CENTROIDS_FILE)
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
            fit = functools.partial(
                Metered(self.name, fit_centroids), k=self.k, seed=self.seed, artifacts=None, chain=self.chain
            )
            centroids = shards | "FitCentroids" >> SampleRunning(
                self.name, self.chain, self.sample, self.seed, EMBED_SAMPLE_STREAM, _embedding_rows, then=fit
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

    statistics = ClusterStatistics(
        ctx.chain, ctx.cfg["stages"][-1], ctx.out, ctx.fields, cluster_stats_skip(), ctx.cluster_extra
    )
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
