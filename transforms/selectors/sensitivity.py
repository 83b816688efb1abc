"""Sensitivity sampling (Axiotis et al., "Data-Efficient Learning via Clustering-Based Sensitivity
Sampling", ICML 2024): a pick whose weighted averages estimate the pool's.

After k-means, document e in cluster C (centroid c, |C| documents in the running, cost(C) =
Σ_{e'∈C} ‖e' − c‖²) has the sensitivity

    s(e) = ‖e − c‖² / cost(C) + 1/|C|

(a cluster whose documents all sit on the centroid has cost 0; its first term is then 1/|C| too).
Each term sums to 1 over a cluster, so Σ s = 2K over K clusters, and p(e) = s(e) / 2K is a
probability: ``sensitivity`` in ``scores/``. Far-out documents and small clusters get more of it.

The paper draws k documents i.i.d. from p and weights each by 1/(k·p). A data pipeline wants k
distinct documents, so this draws k without replacement with inclusion probabilities
π(e) = min(1, λ·p(e)), where λ makes Σ π = k (λ = k unless some documents would be drawn more
than once on average: those are taken for sure, with π = 1). The draw is Pareto sampling (Rosén
1997): keep the k largest logit(π) + L, L standard logistic noise fixed by (seed, id), which
includes each document with probability π up to a small error. ``weight`` = 1/π(e) = 1/(k·p(e))
(Horvitz–Thompson), so Σ_pick weight·f / N estimates the pool's mean of f, and Σ_pick weight ≈ N.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
from beamsift.transforms.chain import (
    ApplyStage,
    ShardStageFn,
    running_mask,
    shard_of,
)
from beamsift.transforms.chain.seeded import SENSITIVITY_STREAM, uniform01
from beamsift.transforms.chain.staging import read_id_hashes
from beamsift.transforms.chain.sums import Sum, fixed_point_sum
from beamsift.transforms.selectors import inclusion as search
from beamsift.transforms.selectors.core import Budget, at_or_above, in_random, random_keys, valid_mask
from beamsift.transforms.selectors.exact_rank import ExactRanks

COLUMNS = (("sensitivity", "double"), ("weight", "double"))
KEYS = ".keys"  # per shard: each document's Pareto key, what ExactRanks ranks


def sensitivities(clusters: np.ndarray, d2: np.ndarray, stats: dict) -> np.ndarray:
    """p(e) = (d²/cost(C) + 1/|C|) / 2K for each document; ``stats``: cluster -> (|C|, cost(C))."""
    p = np.full(len(clusters), np.nan)
    n_clusters = sum(1 for n, _ in stats.values() if n > 0)
    for c, (n, cost) in stats.items():
        rows = clusters == c
        if n == 0 or not rows.any():
            continue
        first = d2[rows] / cost if cost > 0 else np.full(int(rows.sum()), 1.0 / n)
        p[rows] = (first + 1.0 / n) / (2 * n_clusters)
    return p


def inclusion_scale(largest: np.ndarray, k: int, n: int, total: float = 1.0) -> float:
    """λ with Σ min(1, λ·p) = k over n documents, from the k largest p (any order) and Σ p;
    inf when k covers all n."""
    if k >= n:
        return math.inf
    top = np.sort(np.asarray(largest, np.float64))[::-1]
    taken = 0.0
    for m, pm in enumerate(top[:k]):
        rest = total - taken
        if rest <= 0:
            break
        lam = (k - m) / rest
        if lam * pm < 1:
            return lam
        taken += pm
    return math.inf


def inclusion(p: np.ndarray, lam: float) -> np.ndarray:
    """π = min(1, λ·p); NaN (not in the running) stays NaN."""
    return np.where(np.isnan(p), np.nan, 1.0) if math.isinf(lam) else np.minimum(1.0, lam * p)


def pareto_keys(pi: np.ndarray, id_hash: np.ndarray, seed: int) -> np.ndarray:
    """logit(π) + logistic noise; the k largest are a Pareto πps sample. π = 1 ranks first."""
    u = uniform01(id_hash, seed, SENSITIVITY_STREAM)
    with np.errstate(divide="ignore"):
        target = np.log(pi) - np.log1p(-pi)
    return np.where(np.isnan(pi), -np.inf, target - (np.log(u) - np.log1p(-u)))


def clusters_and_d2(chain, shard_name: str, running: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's cluster (-1 where it is out of the running) and squared distance to it."""
    clusters = chain.column("cluster", shard_name)
    d2 = chain.column("cluster_distance", shard_name) ** 2
    return np.where(running & ~np.isnan(clusters), clusters, -1).astype(np.int64), d2


class _Read:
    """What every pass reads of a shard: its reasons, the running documents' clusters and
    squared distances."""

    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def read(self, item):
        shard = shard_of(item)
        reasons = self.chain.reasons(self.stage, shard)
        clusters, d2 = clusters_and_d2(self.chain, shard.name, running_mask(reasons))
        return shard, reasons, clusters, d2


FIXED_POINT = float(1 << 32)  # costs are summed as integers: the same total for any split or order


class _ClusterCosts(_Read, beam.DoFn):
    def process(self, item):
        _, _, clusters, d2 = self.read(item)
        out = {}
        for c in np.unique(clusters[clusters >= 0]).tolist():
            rows = clusters == c
            out[c] = (int(rows.sum()), fixed_point_sum(d2[rows], FIXED_POINT))
        yield out


def _costs(stats: dict) -> dict:
    return {c: (n, q / FIXED_POINT) for c, (n, q) in stats.items()}


class _Probabilities(_Read):
    """p of a shard's documents that have one (with their id hashes), from the cluster costs."""

    def probabilities(self, item, stats):
        shard, reasons, clusters, d2 = self.read(item)
        p = sensitivities(clusters, d2, stats)
        ok = ~np.isnan(p)
        return shard, reasons, p, ok


class _LogHistogram(_Probabilities, beam.DoFn):
    def process(self, item, stats):
        _, _, p, ok = self.probabilities(item, stats)
        if ok.any():
            yield search.histogram(search.log_bins(p[ok]), p[ok], search.LOG_BINS)


class _SubHistogram(_Probabilities, beam.DoFn):
    def process(self, item, stats, located, hist):
        if located[0] != "inside":
            return
        _, _, p, ok = self.probabilities(item, stats)
        b = located[1]
        p = p[ok][search.log_bins(p[ok]) == b]
        if len(p):
            yield search.histogram(search.sub_bins(p, hist[3][b], hist[2][b]), p, search.SUB_BINS)


class _BoundaryValues(_Probabilities, beam.DoFn):
    """The distinct p of the one sub-bin that holds the boundary, with their counts."""

    def process(self, item, stats, located, sub_located, hist):
        if located[0] != "inside" or sub_located[0] != "inside":
            return
        _, _, p, ok = self.probabilities(item, stats)
        b = located[1]
        p = p[ok][search.log_bins(p[ok]) == b]
        p = p[search.sub_bins(p, hist[3][b], hist[2][b]) == sub_located[1]]
        if len(p):
            values, counts = np.unique(p, return_counts=True)
            yield dict(zip(values.tolist(), counts.tolist()))


def _locate(hist, budget) -> tuple:
    running, _, k = budget
    if hist is None or k >= running:
        return "lambda", math.inf
    return search.scan(hist, k, 0, int(hist[1].sum()))


def _locate_sub(sub, located, budget) -> tuple:
    if located[0] != "inside":
        return located
    _, _, m, rest_fixed = located
    return search.scan(sub, budget[2], m, rest_fixed)


def _scale(values: dict, located, sub_located, budget) -> float:
    """λ: found at a bin's start, or by finishing the loop over the boundary sub-bin's values."""
    for found in (located, sub_located):
        if found[0] == "lambda":
            return found[1]
    _, _, m, rest_fixed = sub_located
    v = np.array(sorted(values), np.float64)
    c = np.array([values[x] for x in sorted(values)], np.int64)
    lam, m, rest_fixed = search.finish(v, c, budget[2], m, rest_fixed)
    # Every value of the sub-bin certain (rounding at its edge): the boundary is right after it.
    return search.lam_at(budget[2], m, rest_fixed) if lam is None else lam


class _WriteKeys(_Probabilities, beam.DoFn):
    """A shard -> itself, once its documents' Pareto keys are staged beside it (what is ranked)."""

    def __init__(self, stage, chain, seed):
        super().__init__(stage, chain)
        self.seed = seed

    def process(self, item, stats, lam):
        shard, _, p, _ = self.probabilities(item, stats)
        keys = pareto_keys(inclusion(p, lam), read_id_hashes(shard.path), self.seed)
        self.chain.write(self.stage + KEYS, shard.name, pa.table({"key": pa.array(keys, pa.float64())}))
        yield item


class _Keys:
    """ExactRanks' source: the pick's keys (documents with a p) and the random baseline's."""

    def __init__(self, stage, chain, seed):
        self.stage, self.chain, self.seed = stage, chain, seed

    def keys(self, item) -> dict:
        shard = shard_of(item)
        reasons = self.chain.reasons(self.stage, shard)
        id_hash = read_id_hashes(shard.path)
        keys = np.asarray(self.chain.read(self.stage + KEYS, shard.name, ["key"]).column(0).combine_chunks())
        ok = keys > -np.inf
        valid = valid_mask(reasons)
        return {"pick": (keys[ok], id_hash[ok]), "random": (random_keys(id_hash[valid], self.seed), id_hash[valid])}


def _wanted(budget) -> dict:
    keep = max(budget[2], 1)
    return {"pick": [keep], "random": [keep]}


def _thresholds(found: dict, budget) -> tuple:
    keep = max(budget[2], 1)
    pick = found.get("pick", {}).get(keep) if budget[2] else None
    return pick, found.get("random", {}).get(keep)


class ApplySensitivity(ShardStageFn):
    def __init__(self, name, chain, seed, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.seed = seed

    def score(self, shard, reasons, stats, lam, threshold):
        running = running_mask(reasons)
        clusters, d2 = clusters_and_d2(self.chain, shard.name, running)
        id_hash = read_id_hashes(shard.path)
        p = sensitivities(clusters, d2, stats)
        pi = inclusion(p, lam)
        keys = pareto_keys(pi, id_hash, self.seed)
        missing = running & np.isnan(p)
        kept = running & ~missing & at_or_above(keys, id_hash, threshold[0])
        reasons[running & ~kept & ~missing] = "not sampled"
        reasons[missing] = "no cluster"
        weight = np.where(kept, 1.0 / pi, np.nan)
        certain = int((kept & (pi >= 1)).sum())
        columns = {
            "selected": kept,
            "_in_random": in_random(reasons, id_hash, self.seed, threshold[1]),
            "sensitivity": p,
            "weight": weight,
        }
        return columns, reasons, {"taken with certainty (weight 1)": certain} if certain else {}


class SensitivitySampling(beam.PTransform):
    """The selector ``select.method: sensitivity``: k documents (or a fraction of the running)."""

    def __init__(self, name, chain, k, fraction, seed, progress_dir=None, explain=None, context=()):
        super().__init__()
        self.name, self.chain, self.k, self.fraction, self.seed = name, chain, k, fraction, seed
        self.progress_dir = progress_dir
        self.explain, self.context = explain, context  # why the running is small (see core.Budget)

    def expand(self, shards):
        # (documents in the running, 0, k): the same budget rule, and errors, as every selector.
        budget_pc = shards | "Budget" >> Budget(self.k, self.fraction, explain=self.explain, context=self.context)
        budget = beam.pvalue.AsSingleton(budget_pc)
        stats = beam.pvalue.AsSingleton(
            shards
            | "ClusterCosts" >> beam.ParDo(_ClusterCosts(self.name, self.chain))
            | "SumCosts" >> beam.CombineGlobally(Sum(start={}))
            | "Costs" >> beam.Map(_costs)
        )
        # λ from two histograms and the values of one sub-bin (``selectors/inclusion.py``): never the k largest.
        hist_pc = (
            shards
            | "LogHistogram" >> beam.ParDo(_LogHistogram(self.name, self.chain), stats)
            | "MergeLogHistogram" >> beam.CombineGlobally(search.MergeHistograms())
        )
        hist = beam.pvalue.AsSingleton(hist_pc)
        located = beam.pvalue.AsSingleton(hist_pc | "Locate" >> beam.Map(_locate, budget))
        sub_located = beam.pvalue.AsSingleton(
            shards
            | "SubHistogram" >> beam.ParDo(_SubHistogram(self.name, self.chain), stats, located, hist)
            | "MergeSubHistogram" >> beam.CombineGlobally(search.MergeHistograms())
            | "LocateSub" >> beam.Map(_locate_sub, located, budget)
        )
        lam = beam.pvalue.AsSingleton(
            shards
            | "BoundaryValues" >> beam.ParDo(_BoundaryValues(self.name, self.chain), stats, located, sub_located, hist)
            | "MergeBoundaryValues" >> beam.CombineGlobally(Sum(start={}))
            | "Scale" >> beam.Map(_scale, located, sub_located, budget)
        )
        keyed = shards | "WriteKeys" >> beam.ParDo(_WriteKeys(self.name, self.chain, self.seed), stats, lam)
        wanted = budget_pc | "WantedRanks" >> beam.Map(_wanted)
        found = beam.pvalue.AsSingleton(
            keyed | "Rank" >> ExactRanks(_Keys(self.name, self.chain, self.seed), wanted), default_value={}
        )
        threshold = beam.pvalue.AsSingleton(budget_pc | "Cut" >> beam.Map(lambda b, f: _thresholds(f, b), found))
        fn = ApplySensitivity(self.name, self.chain, self.seed, self.progress_dir)
        return shards | "Pick" >> ApplyStage(fn, stats=stats, lam=lam, threshold=threshold)
