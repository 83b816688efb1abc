"""DSIR: Data Selection with Importance Resampling (Xie et al., NeurIPS 2023, arXiv:2302.03169).

Given a raw pool and a target sample, both as hashed n-gram counts (``featurize.py``):

    p̂ = target counts / Σ,   q̂ = raw counts / Σ          (bag-of-hashed-n-grams models)
    log w_i = Σ_j c_ij (log(p̂_j + ε) − log(q̂_j + ε))       (ε = 1e-8 as in the reference)

then k documents are drawn without replacement with probability ∝ w_i by the Gumbel top-k
trick (``select.py``). Both fits are integer sums, so they are exact and independent of how
the work is split; the weights are a map over the pool with the two models as a side input.

Beyond the paper (METHODS.md): an optional length normalisation (the raw sum grows with
length, so long documents dominate and sampling degenerates to top-k), a visible minimum
length, and the KL reduction of the selection computed in the run.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from beamsift.transforms.featurize import NgramFeatures, bucket_counts, features_from_arrow
from beamsift.transforms.meter import StageMeter
from beamsift.transforms.read import describe_rejects
from beamsift.transforms.schema import BUCKETS, ID_HASH, N_TOKENS, ORDER
from beamsift.transforms.select import RANDOM_STREAM, SELECT_STREAM, Candidates, gumbel
from beamsift.transforms.stage import read_staging


class SelectionError(ValueError):
    """The selection asked for cannot be made (e.g. k larger than the eligible pool)."""


@dataclass
class NgramTotals:
    """Sums over a set of documents: bucket counts, documents, eligible documents and n-grams."""

    counts: np.ndarray
    docs: int = 0
    eligible: int = 0
    eligible_ngrams: int = 0

    def __add__(self, other: NgramTotals) -> NgramTotals:
        return NgramTotals(
            self.counts + other.counts,
            self.docs + other.docs,
            self.eligible + other.eligible,
            self.eligible_ngrams + other.eligible_ngrams,
        )


class SumNgramTotals(beam.CombineFn):
    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets

    def create_accumulator(self):
        return NgramTotals(np.zeros(self.num_buckets, np.int64))

    def add_input(self, acc, totals):
        return acc + totals

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out = out + acc
        return out

    def extract_output(self, acc):
        return acc


def log_probs(counts: np.ndarray, eps: float) -> np.ndarray:
    """log(p̂ + ε) with p̂ = counts / Σ counts: the reference implementation's smoothing."""
    total = counts.sum()
    p = counts / total if total > 0 else np.zeros(len(counts))
    return np.log(p + eps)


def dsir_log_weights(features: NgramFeatures, log_ratio: np.ndarray) -> np.ndarray:
    """log w_i = Σ_j c_ij · log_ratio_j, summed over each document's n-gram occurrences."""
    values = log_ratio[features.buckets]
    n_docs = len(features.offsets) - 1
    if len(values) == 0:
        return np.zeros(n_docs)
    # reduceat sums each document's range in order (deterministic); an empty range gives the
    # value at its start instead of 0, so empty documents are set to 0 afterwards.
    sums = np.add.reduceat(values, np.minimum(features.offsets[:-1], len(values) - 1))
    sums[features.n_ngrams == 0] = 0.0
    return sums


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray, eps: float) -> float:
    """KL(p̂ ‖ q̂) = Σ_j p̂_j (log(p̂_j + ε) − log(q̂_j + ε)) over the buckets where p̂_j > 0."""
    p = p_counts / p_counts.sum()
    lq = log_probs(q_counts, eps)
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz] + eps) - lq[nz])))


@dataclass
class DsirModel:
    """The fitted models and everything the scoring needs; saved to ``artifacts/``."""

    target_counts: np.ndarray
    raw_counts: np.ndarray
    smoothing: float
    num_buckets: int
    max_ngram: int
    length_norm: str
    min_tokens: int
    mean_ngrams: float  # mean n-grams per eligible pool document (for length_norm: mean)
    k: int  # how many documents to select
    eligible: int
    log_ratio: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.log_ratio = log_probs(self.target_counts, self.smoothing) - log_probs(self.raw_counts, self.smoothing)

    def scores(self, features: NgramFeatures) -> tuple[np.ndarray, np.ndarray]:
        """(log weight as the paper defines it, the value that is resampled)."""
        log_w = dsir_log_weights(features, self.log_ratio)
        if self.length_norm == "mean":
            # Per n-gram, rescaled to the corpus's mean length so that the Gumbel noise keeps
            # the scale it has against the raw sums (dividing alone makes sampling ~random).
            n = np.maximum(features.n_ngrams, 1)
            return log_w, log_w / n * self.mean_ngrams
        return log_w, log_w

    def eligible_mask(self, n_tokens: np.ndarray) -> np.ndarray:
        return np.asarray(n_tokens) >= self.min_tokens

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        meta = {
            k: getattr(self, k)
            for k in (
                "smoothing",
                "num_buckets",
                "max_ngram",
                "length_norm",
                "min_tokens",
                "mean_ngrams",
            )
        }
        np.savez_compressed(
            buffer,
            target_counts=self.target_counts,
            raw_counts=self.raw_counts,
            log_ratio=self.log_ratio,
            meta=np.array(json.dumps(meta)),
        )
        return buffer.getvalue()


def load_fitted_counts(data: bytes) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(io.BytesIO(data)) as z:
        return z["target_counts"], z["raw_counts"], json.loads(str(z["meta"]))


def resolve_k(k: int | None, fraction: float | None, eligible: int, explain: str = "") -> int:
    if k is None:
        k = math.floor(fraction * eligible + 0.5)
        if k < 1:
            raise SelectionError(f"select.fraction={fraction} of {eligible} eligible documents selects none{explain}")
    if k > eligible:
        raise SelectionError(f"select.k={k} is larger than the {eligible} eligible documents{explain}")
    return k


def _explain_eligible(pool: NgramTotals, rejects: dict, min_tokens: int) -> str:
    """Why the eligible pool is as small as it is, in the order a user would check."""
    short = pool.docs - pool.eligible
    parts = [describe_rejects(rejects, "pool", pool.docs)]
    if short:
        parts.append(f"{short:,} valid documents have fewer than dsir.min_tokens={min_tokens} tokens")
    hint = "lower select.k or dsir.min_tokens" if short else "lower select.k"
    return ": " + "; ".join(parts) + f" ({hint})"


@dataclass(frozen=True)
class CountNgrams:
    """A featurized batch -> its NgramTotals (eligible: at least ``min_tokens`` tokens)."""

    num_buckets: int
    min_tokens: int = 0

    def __call__(self, table, rows: np.ndarray | None = None) -> NgramTotals:
        n_tokens = np.asarray(table.column(N_TOKENS).combine_chunks())
        features = features_from_arrow(table.column(BUCKETS), n_tokens)
        keep = np.ones(len(n_tokens), dtype=bool) if rows is None else rows
        eligible = keep & (n_tokens >= self.min_tokens)
        return NgramTotals(
            bucket_counts(features, self.num_buckets, rows=keep),
            int(keep.sum()),
            int(eligible.sum()),
            int(features.n_ngrams[eligible].sum()),
        )


class CountDuplicateNgrams(beam.DoFn):
    """A staged shard -> the NgramTotals of its duplicate-id records, to take out of the fit.

    Shards are counted whole as they are staged (no extra pass); duplicates are rare, so only a
    shard whose order range holds one is read again.
    """

    def __init__(self, count: CountNgrams):
        self.count = count

    def process(self, shard, duplicates):
        lo, hi = np.searchsorted(duplicates.losers, [shard.min_order, shard.max_order + 1])
        if lo == hi:
            return
        table = read_staging(shard.path, columns=[ORDER, N_TOKENS, BUCKETS])
        rows = duplicates.mask(np.asarray(table.column(ORDER).combine_chunks()))
        yield self.count(table, rows)


def subtract_totals(all_docs: NgramTotals, duplicates: NgramTotals) -> NgramTotals:
    return NgramTotals(
        all_docs.counts - duplicates.counts,
        all_docs.docs - duplicates.docs,
        all_docs.eligible - duplicates.eligible,
        all_docs.eligible_ngrams - duplicates.eligible_ngrams,
    )


def build_model(pool: NgramTotals, target: NgramTotals | None, fitted, params: dict, rejects=None) -> DsirModel:
    """Combine the two fits (or a saved model's counts) and the run's parameters.

    ``rejects`` (read.CountRejectReasons) lets an impossible selection name its real cause: a
    wrong text field rejects every record, and "k is larger than the 0 eligible" alone hides that.
    """
    rejects = rejects or {}
    if fitted is not None:
        target_counts, raw_counts, _ = fitted
    else:
        target_counts, raw_counts = target.counts, pool.counts
        if target.docs == 0:
            raise SelectionError(f"the target has no valid documents: {describe_rejects(rejects, 'target', 0)}")
    if target_counts.sum() == 0:
        raise SelectionError("the target has no n-grams: its documents hold no word or punctuation tokens")
    explain = _explain_eligible(pool, rejects, params["min_tokens"])
    k = resolve_k(params["k"], params["fraction"], pool.eligible, explain)
    return DsirModel(
        target_counts=target_counts,
        raw_counts=raw_counts,
        smoothing=params["smoothing"],
        num_buckets=params["num_buckets"],
        max_ngram=params["max_ngram"],
        length_norm=params["length_norm"],
        min_tokens=params["min_tokens"],
        mean_ngrams=pool.eligible_ngrams / max(pool.eligible, 1),
        k=k,
        eligible=pool.eligible,
    )


SCORE_COLUMNS = [ORDER, ID_HASH, N_TOKENS, BUCKETS]


@dataclass
class ShardScores:
    """DSIR scores of a staged shard's documents, aligned with its rows."""

    log_weight: np.ndarray  # the paper's log importance weight
    key: np.ndarray  # resampling key: (normalised) log weight + Gumbel noise
    random_key: np.ndarray  # Gumbel noise alone: the uniformly random baseline subset
    n_ngrams: np.ndarray
    duplicate: np.ndarray  # bool: rejected, an earlier record has the same id
    eligible: np.ndarray  # bool: may be selected (not a duplicate, long enough)
    features: NgramFeatures


def score_shard(table, model: DsirModel, duplicates, seed: int) -> ShardScores:
    n_tokens = np.asarray(table.column(N_TOKENS).combine_chunks())
    id_hash = np.asarray(table.column(ID_HASH).combine_chunks(), dtype=np.uint64)
    features = features_from_arrow(table.column(BUCKETS), n_tokens)
    log_w, resampled = model.scores(features)
    duplicate = duplicates.mask(np.asarray(table.column(ORDER).combine_chunks()))
    return ShardScores(
        log_weight=log_w,
        key=resampled + gumbel(id_hash, seed, SELECT_STREAM),
        random_key=gumbel(id_hash, seed, RANDOM_STREAM),
        n_ngrams=features.n_ngrams,
        duplicate=duplicate,
        eligible=~duplicate & model.eligible_mask(n_tokens),
        features=features,
    )


class RankShard(beam.DoFn):
    """A staged shard -> its k best candidates for the selection and for the random baseline."""

    def __init__(self, seed: int, progress_dir: str | None = None):
        self.seed = seed
        self.meter = StageMeter("rank", progress_dir)

    def setup(self):
        self.meter.setup()

    def finish_bundle(self):
        self.meter.flush()

    def process(self, shard, model, duplicates):
        started = self.meter.start()
        table = read_staging(shard.path, columns=SCORE_COLUMNS)
        s = score_shard(table, model, duplicates, self.seed)
        id_hash = np.asarray(table.column(ID_HASH).combine_chunks(), dtype=np.uint64)
        valid = ~s.duplicate
        self.meter.done(started, docs=table.num_rows)
        yield {
            "selected": Candidates.of(s.key[s.eligible], id_hash[s.eligible], model.k),
            "random": Candidates.of(s.random_key[valid], id_hash[valid], model.k),
        }
