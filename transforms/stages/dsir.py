"""DSIR: Data Selection with Importance Resampling (Xie et al., NeurIPS 2023, arXiv:2302.03169).

Given a raw pool and a target sample, both as hashed n-gram counts (``featurize.py``):

    p̂ = target counts / Σ,   q̂ = raw counts / Σ          (bag-of-hashed-n-grams models)
    log w_i = Σ_j c_ij (log(p̂_j + ε) − log(q̂_j + ε))       (ε = 1e-8 as in the reference)

then k documents are drawn without replacement with probability ∝ w_i by the Gumbel top-k
trick (``selectors/cut.py``). Both fits are integer sums, so they are exact and independent of how
the work is split; the weights are a map over the pool with the two models as a side input.

Beyond the paper (docs/guide.md, "Which to rank on"): an optional length normalisation (the raw sum grows with
length, so long documents dominate and sampling degenerates to top-k), a visible minimum
length, and the KL reduction of the selection computed in the run.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask, shard_of
from beamsift.transforms.chain.meter import StageMeter
from beamsift.transforms.chain.seeded import SELECT_STREAM, gumbel
from beamsift.transforms.chain.staging import read_staging
from beamsift.transforms.featurize import (
    FeaturizeHashedNgrams,
    NgramFeatures,
    bucket_counts,
    features_from_arrow,
    loaded_kernels,
)
from beamsift.transforms.io.read import describe_rejects
from beamsift.transforms.io.schema import BUCKETS, ID_HASH, N_TOKENS, ORDER
from beamsift.transforms.selectors.core import SelectionError
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting


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
    kernels = loaded_kernels()
    if kernels is not None and log_ratio.dtype == np.float64:  # the same sums, 8x faster
        return kernels.document_sums_compiled(log_ratio, features.buckets, np.asarray(features.offsets, np.int64))
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
    k: int | None = None  # not used by scoring: the selector stage decides the budget
    eligible: int = 0  # pool documents with at least min_tokens tokens
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


@dataclass(frozen=True)
class CountNgrams:
    """A featurized batch -> its NgramTotals (eligible: at least ``min_tokens`` tokens)."""

    num_buckets: int
    min_tokens: int = 0

    def __call__(self, table, rows: np.ndarray | None = None) -> NgramTotals:
        n_tokens = np.asarray(table.column(N_TOKENS).combine_chunks())
        features = features_from_arrow(table.column(BUCKETS), n_tokens, dtype=None)
        keep = np.ones(len(n_tokens), dtype=bool) if rows is None else rows
        eligible = keep & (n_tokens >= self.min_tokens)
        return NgramTotals(
            bucket_counts(features, self.num_buckets, rows=keep),
            int(keep.sum()),
            int(eligible.sum()),
            int(features.n_ngrams[eligible].sum()),
        )


class CountDuplicateNgrams(beam.DoFn):
    """A shard -> the NgramTotals of its duplicate-id records, to take out of the fit.

    Shards are counted whole as they are staged (no extra pass); duplicates are rare, so only a
    shard that holds one is read again.
    """

    def __init__(self, count: CountNgrams, chain):
        self.count, self.chain = count, chain

    def process(self, item):
        if not getattr(item, "duplicates", 0):
            return
        table = read_staging(shard_of(item).path, columns=[ORDER, N_TOKENS, BUCKETS])
        rows = self.chain.duplicates(item).mask(np.asarray(table.column(ORDER).combine_chunks()))
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

    ``rejects`` (read.CountRejectReasons) lets an empty target name its real cause: a wrong text
    field rejects every record, and "the target has no n-grams" alone hides that.
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
    return DsirModel(
        target_counts=target_counts,
        raw_counts=raw_counts,
        smoothing=params["smoothing"],
        num_buckets=params["num_buckets"],
        max_ngram=params["max_ngram"],
        length_norm=params["length_norm"],
        min_tokens=params["min_tokens"],
        mean_ngrams=pool.eligible_ngrams / max(pool.eligible, 1),
        eligible=pool.eligible,
    )


TOO_SHORT = "too short"
# The columns the DSIR stage adds to scores/ (name, Arrow type).
# dsir_log_weight_per_ngram is what a filter or a top-k should rank on: the paper's sum grows
# with length, so that ranking by it favours short documents whenever log w < 0 for most.
COLUMNS = (
    ("dsir_log_weight", "double"),
    ("dsir_log_weight_per_ngram", "double"),
    ("dsir_key", "double"),
    ("n_ngrams", "int64"),
)


class ScoreDsirShard(ShardStageFn):
    """A staged shard -> its DSIR columns: the paper's log importance weight, the importance-
    resampling key (the weight, length-normalised if asked, plus Gumbel noise seeded by (seed, id);
    null for a document out of the running, so that ORDER BY dsir_key DESC LIMIT k re-selects),
    and its n-gram count. A document below ``dsir.min_tokens`` leaves the running: "too short"."""

    def __init__(self, name, chain, seed: int, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.seed = seed

    def score(self, shard, reasons, model):
        table = read_staging(shard.path, columns=[ID_HASH, N_TOKENS, BUCKETS])
        n_tokens = np.asarray(table.column(N_TOKENS).combine_chunks())
        id_hash = np.asarray(table.column(ID_HASH).combine_chunks(), dtype=np.uint64)
        features = features_from_arrow(table.column(BUCKETS), n_tokens, dtype=None)
        log_w, resampled = model.scores(features)
        running = running_mask(reasons)
        reasons[running & ~model.eligible_mask(n_tokens)] = TOO_SHORT
        key = resampled + gumbel(id_hash, self.seed, SELECT_STREAM)
        key[~running_mask(reasons)] = np.nan
        per_ngram = log_w / np.maximum(features.n_ngrams, 1)
        columns = {"dsir_log_weight": log_w, "dsir_log_weight_per_ngram": per_ngram, "dsir_key": key}
        return {**columns, "n_ngrams": features.n_ngrams}, reasons


def selection_ngrams(staged, selected: np.ndarray, in_random: np.ndarray, num_buckets: int) -> dict:
    """The hashed n-gram counts of a shard's selected and random-baseline documents (KL reduction)."""
    n_tokens = np.asarray(staged.column(N_TOKENS).combine_chunks())
    features = features_from_arrow(staged.column(BUCKETS), n_tokens, dtype=None)
    return {
        "selected_ngrams": bucket_counts(features, num_buckets, rows=selected),
        "random_ngrams": bucket_counts(features, num_buckets, rows=in_random),
    }


# ---- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DsirSettings:
    min_tokens: int = setting(100, "documents with fewer word tokens are not selected (reason kept)", at_least=0)
    length_norm: str = setting(
        "none", "none = the paper's raw sum; mean = per n-gram x corpus mean", choices=("none", "mean")
    )
    smoothing: float = setting(1e-8, "eps in log(p + eps), as in the reference", above=0)
    model: str | None = setting(None, "artifacts/ folder of an earlier run: apply, don't fit")


MODEL_FILE = "dsir_model.npz"


def _check(cfg, name, available, fail) -> None:
    if cfg["target.path"] is None and cfg["dsir.model"] is None:
        fail("target.path", "set 'target.path' (or 'dsir.model' to apply a fitted model): the dsir stage needs one")


def _build(ctx: Context, name: str, shards):
    """Fit p̂ on the target and q̂ on the pool (less its duplicate ids), or apply a saved model's
    counts, then score every shard."""
    cfg = ctx.cfg
    buckets = cfg["featurize.buckets"]
    sum_totals = SumNgramTotals(buckets)
    target_totals = None
    if ctx.target_docs is not None:
        target_totals = (
            ctx.target_docs
            | "FeaturizeTarget"
            >> beam.ParDo(
                FeaturizeHashedNgrams(
                    buckets, cfg["featurize.max_ngram"], StageMeter("featurize_target", ctx.progress_dir)
                )
            )
            | "CountTargetNgrams" >> beam.Map(CountNgrams(buckets))
            | "FitTargetModel" >> beam.CombineGlobally(sum_totals)
        )
        ctx.rejected.append(ctx.target_rejected)
        ctx.summaries.append(target_totals | "TargetSummary" >> beam.Map(lambda t: {"counts": {"target used": t.docs}}))
    duplicate_totals = (
        shards
        | "CountDuplicateNgrams" >> beam.ParDo(CountDuplicateNgrams(ctx.count_pool, ctx.chain))
        | "SumDuplicateTotals" >> beam.CombineGlobally(sum_totals).without_defaults()
    )
    pool_totals = ctx.staging_summary | "FitRawModel" >> beam.Map(
        lambda summary, dups: subtract_totals(summary[1], dups),
        AsSingleton(duplicate_totals, default_value=sum_totals.create_accumulator()),
    )
    params = {
        "smoothing": float(cfg["dsir.smoothing"]),
        "num_buckets": buckets,
        "max_ngram": cfg["featurize.max_ngram"],
        "length_norm": cfg["dsir.length_norm"],
        "min_tokens": cfg["dsir.min_tokens"],
    }
    target_side = AsSingleton(target_totals) if target_totals is not None else None
    fitted = ctx.fitted_dsir
    model = AsSingleton(
        pool_totals | "BuildDsirModel" >> beam.Map(build_model, target_side, fitted, params, ctx.reject_reasons())
    )
    ctx.finishers.append((_report, model))
    ctx.selection_buckets = buckets  # the writer sums the selection's n-grams, for the KL reduction
    fn = ScoreDsirShard(name, ctx.chain, ctx.seed, ctx.progress_dir)
    return shards | "Stage_" + name >> ApplyStage(fn, model=model)


def _report(report: dict, summary: dict, model: DsirModel, out: str) -> None:
    """The manifest's ``dsir``: eligible documents, and the KL reduction toward the target of the
    selection against a random pick of the same size; the fitted model to artifacts/."""
    report["dsir"] = {"eligible": model.eligible, "mean_ngrams": model.mean_ngrams}
    if "selected_ngrams" in summary:
        eps = model.smoothing
        kl_random = kl_divergence(model.target_counts, summary["random_ngrams"], eps)
        kl_selected = kl_divergence(model.target_counts, summary["selected_ngrams"], eps)
        report["dsir"]["kl"] = {
            "target_vs_random": kl_random,
            "target_vs_selected": kl_selected,
            "reduction": kl_random - kl_selected,
        }
    with FileSystems.create(FileSystems.join(out, "artifacts", MODEL_FILE)) as f:
        f.write(model.to_bytes())


STAGE = Stage(
    kind="dsir",
    summary="DSIR log importance weights toward target.path (Xie et al. 2023)",
    settings=DsirSettings,
    columns=fixed_columns(*COLUMNS),
    all_columns=tuple(c for c, _ in COLUMNS),
    needs_target=lambda cfg: cfg["dsir.model"] is None,
    check=_check,
    build=_build,
    cluster_stats_skip=("dsir_key",),  # a key with noise in it
)
