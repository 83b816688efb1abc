"""Cluster-balanced selection: the budget split across clusters, the best documents by a score
column taken within each cluster.

Quotas (``select.quota``) are proportional to each cluster's size n_c, uniform, to √n_c, or to a
per-cluster score: the mean of ``select.quota_column`` over the cluster's documents in the running
(e.g. a quality score, so that better clusters get more of the budget; it must be >= 0). A
quota never exceeds its cluster's size, and what a full cluster cannot take goes to the others
(water-filling), so the quotas add up to the budget (or to everything there is). Within a cluster
the documents are ranked by ``select.column`` (highest first; ties by id hash), or at random (the
seeded Gumbel noise) without one. The ranks never gather the pool: ``ExactRanks`` finds each
cluster's cut from a sample, counts per bracket and the one bracket that holds the cut.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain import (
    ApplyStage,
    ShardStageFn,
    running_mask,
    shard_of,
)
from beamsift.transforms.chain.seeded import SELECT_STREAM, gumbel
from beamsift.transforms.chain.staging import read_id_hashes
from beamsift.transforms.chain.sums import Sum, fixed_point_sum
from beamsift.transforms.selectors.core import (
    Budget,
    SelectionError,
    at_or_above,
    in_random,
    random_keys,
    valid_mask,
)
from beamsift.transforms.selectors.exact_rank import ExactRanks

QUOTAS = ("proportional", "uniform", "sqrt", "score")
SCORE_FIXED_POINT = float(1 << 20)
RANDOM = "random"  # the KL baseline's candidates, next to the clusters' (int keys)


def quotas(sizes: dict[int, int], budget: int, rule: str, scores: dict[int, float] | None = None) -> dict[int, int]:
    """Per-cluster quotas that add up to min(budget, Σ sizes), none above its cluster's size.
    ``scores`` (rule "score"): each cluster's score, the weight of its share."""
    if rule == "score":
        bad = {c: v for c, v in (scores or {}).items() if not v >= 0}
        if bad:
            c, v = min(bad.items())
            raise SelectionError(
                f"select.quota 'score' needs a per-cluster score >= 0; cluster {c} has {v} "
                f"(use a non-negative column such as weight, or quota sqrt)"
            )
        if sum(scores[c] for c in sizes if sizes[c]) <= 0:
            rule = "proportional"  # every score is 0: no preference, split by size
    by_rule = {"proportional": lambda c: sizes[c], "uniform": lambda c: 1, "sqrt": lambda c: math.sqrt(sizes[c])}
    weight = by_rule.get(rule, lambda c: scores[c])
    out = {c: 0 for c in sizes}
    remaining = min(budget, sum(sizes.values()))
    while remaining > 0:
        open_ = sorted(c for c in sizes if out[c] < sizes[c])
        total = sum(weight(c) for c in open_)
        if total <= 0:  # only zero-score clusters are left: they share the rest by size
            weight, total = by_rule["proportional"], sum(sizes[c] for c in open_)
        shares = {c: remaining * weight(c) / total for c in open_}
        given = {c: min(int(math.floor(shares[c])), sizes[c] - out[c]) for c in open_}
        left = remaining - sum(given.values())
        # The largest remainders get one more, first cluster first on a tie; never a cluster whose
        # share is 0 (a zero score), which would otherwise take one each while the rest of the
        # budget waits for the next round.
        for c in sorted(open_, key=lambda c: (-(shares[c] - math.floor(shares[c])), c)):
            if left == 0:
                break
            if out[c] + given[c] < sizes[c] and shares[c] > 0:
                given[c] += 1
                left -= 1
        for c in open_:
            out[c] += given[c]
        if sum(given.values()) == 0:
            break
        remaining -= sum(given.values())
    return out


def _keys(chain, column, shard, id_hash, seed):
    if column is None:
        return gumbel(id_hash, seed, SELECT_STREAM)
    values = chain.column(column, shard.name)
    return np.where(np.isnan(values), -np.inf, values)


class _ClusterSizes(beam.DoFn):
    """A shard -> {cluster: (documents in the running, Σ score, documents with a score)}."""

    def __init__(self, stage, chain, score_column, group="cluster"):
        self.stage, self.chain, self.score_column, self.group = stage, chain, score_column, group

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        clusters = self.chain.column(self.group, shard.name)
        ok = running & ~np.isnan(clusters)
        scores = self.chain.column(self.score_column, shard.name) if self.score_column else np.zeros(len(ok))
        out = {}
        for c in np.unique(clusters[ok]).astype(np.int64).tolist():
            s = scores[ok & (clusters == c)]
            s = s[~np.isnan(s)]
            fixed = fixed_point_sum(s, SCORE_FIXED_POINT)
            out[c] = np.array([int(ok[clusters == c].sum()), fixed, len(s)], dtype=object)
        yield out


class _KeysWithinClusters:
    """A shard -> the ranking keys of its documents in the running, per cluster, and the random
    baseline's keys of every valid document: what ``ExactRanks`` ranks."""

    def __init__(self, stage, chain, column, seed, group="cluster"):
        self.stage, self.chain, self.column, self.seed, self.group = stage, chain, column, seed, group

    def keys(self, item) -> dict:
        shard = shard_of(item)
        reasons = self.chain.reasons(self.stage, shard)
        running = running_mask(reasons)
        id_hash = read_id_hashes(shard.path)
        clusters = np.nan_to_num(self.chain.column(self.group, shard.name), nan=-1).astype(np.int64)
        keys = _keys(self.chain, self.column, shard, id_hash, self.seed)
        out = {}
        for c in np.unique(clusters[running & (clusters >= 0)]).tolist():
            rows = running & (clusters == c)
            out[c] = (keys[rows], id_hash[rows])
        valid = valid_mask(reasons)
        out[RANDOM] = (random_keys(id_hash[valid], self.seed), id_hash[valid])
        return out


def _wanted(quota: dict) -> dict:
    wanted = {c: [q] for c, q in quota.items() if q}
    wanted[RANDOM] = [max(sum(quota.values()), 1)]
    return wanted


def _cuts(found: dict, wanted: dict) -> dict:
    return {c: found[c][ranks[0]] for c, ranks in wanted.items() if ranks[0] in found.get(c, {})}


class ApplyBalanced(ShardStageFn):
    def __init__(self, name, chain, column, seed, progress_dir=None, group="cluster"):
        super().__init__(name, chain, progress_dir)
        self.column, self.seed, self.group = column, seed, group
        self.rank_column = column  # None: a random pick within each cluster

    def score(self, shard, reasons, cuts):
        running = running_mask(reasons)
        id_hash = read_id_hashes(shard.path)
        clusters = np.nan_to_num(self.chain.column(self.group, shard.name), nan=-1).astype(np.int64)
        keys = _keys(self.chain, self.column, shard, id_hash, self.seed)
        kept = np.zeros(len(reasons), dtype=bool)
        cuts = dict(cuts)
        random_cut = cuts.pop(RANDOM, None)
        for c, threshold in cuts.items():
            rows = running & (clusters == c)
            kept |= rows & at_or_above(keys, id_hash, threshold)
        missing = running & (keys == -np.inf)
        kept &= ~missing
        reasons[running & ~kept & ~missing] = (
            "below the cluster's quota" if self.group == "cluster" else f"below its {self.group}'s quota"
        )
        reasons[missing] = f"no {self.column}"
        return {"selected": kept, "_in_random": in_random(reasons, id_hash, self.seed, random_cut)}, reasons


class BalancedSelection(beam.PTransform):
    def __init__(
        self,
        name,
        chain,
        column,
        k,
        fraction,
        rule,
        quota_column,
        seed,
        progress_dir=None,
        explain=None,
        context=(),
        group="cluster",
    ):
        super().__init__()
        self.group = group  # the integer column whose values are the groups
        self.name, self.chain, self.column, self.k, self.fraction = name, chain, column, k, fraction
        self.rule, self.seed, self.progress_dir = rule, seed, progress_dir
        self.quota_column = quota_column if rule == "score" else None
        self.explain, self.context = explain, context  # why the running is small (see core.Budget)

    def expand(self, shards):
        # The same budget rule, and the same errors, as every selector: never silently none.
        budget = shards | "Budget" >> Budget(self.k, self.fraction, explain=self.explain, context=self.context)
        quota = beam.pvalue.AsSingleton(
            shards
            | "ClusterSizes" >> beam.ParDo(_ClusterSizes(self.name, self.chain, self.quota_column, self.group))
            | "SumSizes" >> beam.CombineGlobally(Sum(start={}))
            | "Quotas" >> beam.Map(self._quotas, beam.pvalue.AsSingleton(budget))
        )
        wanted = quota.pvalue | "WantedRanks" >> beam.Map(_wanted)
        cuts = beam.pvalue.AsSingleton(
            shards
            | "Rank"
            >> ExactRanks(_KeysWithinClusters(self.name, self.chain, self.column, self.seed, self.group), wanted)
            | "Cuts" >> beam.Map(_cuts, beam.pvalue.AsSingleton(wanted)),
            default_value={},
        )
        fn = ApplyBalanced(self.name, self.chain, self.column, self.seed, self.progress_dir, self.group)
        return shards | "Cut" >> ApplyStage(fn, cuts=cuts)

    def _quotas(self, stats, budget):
        budget = budget[2]  # (running, skip, keep)
        sizes = {c: int(v[0]) for c, v in stats.items()}
        # A cluster's score: the mean of the quota column over its documents that have one.
        scores = {c: v[1] / SCORE_FIXED_POINT / v[2] if v[2] else 0.0 for c, v in stats.items()}
        return quotas(sizes, budget, self.rule, scores)
