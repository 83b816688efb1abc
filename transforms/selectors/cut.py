"""Cutting by rank: the selector's methods and the filters' rules, seeded by (seed, document id).

Sampling k items without replacement with probabilities ∝ w_i is the same as keeping the k
largest keys log w_i + G_i with G_i ~ Gumbel(0, 1) (the Gumbel top-k trick). G_i comes from a
hash of (seed, id), not from a generator that walks the data, so the selection is the same on
every runner and for any number of workers (the reference seeds numpy per process and its
selection changes with ``num_proc``).

Every rule here is "keep the documents ranked (offset, offset + k] by a key": top-k by a column,
bottom-k (the key negated), a quantile band (skip the top offset, keep the next k), importance
resampling (the key is a log weight plus Gumbel noise), weighted sampling without replacement (log
weight + Gumbel: Efraimidis & Spirakis's scheme in its Gumbel form). A threshold keeps what lies
in [min, max]. The global ranks never gather the pool: ``ExactRanks`` finds the (key, id hash)
pairs at the two cut ranks from a sample, counts per bracket and the one bracket that holds each
rank, and those two pairs decide every document. Ties in the key are broken by the id hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask, shard_of
from beamsift.transforms.chain.seeded import SELECT_STREAM, gumbel
from beamsift.transforms.chain.staging import read_id_hashes
from beamsift.transforms.selectors.core import (
    Budget,
    at_or_above,
    in_random,
    random_keys,
    ranks,
    valid_mask,
)
from beamsift.transforms.selectors.exact_rank import ExactRanks

METHODS = ("importance", "top", "bottom", "band", "threshold", "weighted", "all")
SAMPLING = ("importance", "weighted")


@dataclass(frozen=True)
class Cut:
    """A rule that keeps part of the documents still in the running, by one column.

    ``k``/``fraction``: how many to keep (a fraction is of the documents in the running);
    ``offset``: how many of the best to skip first (a value below 1 is a fraction); ``low``,
    ``high``: the kept range of the column (threshold). ``key_column``: a column that already
    holds the ranking key (DSIR writes ``dsir_key``, its log weight plus the seeded noise).
    """

    column: str
    method: str = "top"
    k: int | None = None
    fraction: float | None = None
    offset: float = 0
    low: float | None = None
    high: float | None = None
    key_column: str | None = None

    def ranked(self) -> bool:
        return self.method not in ("threshold", "all") or self.k is not None or self.fraction is not None

    def ranks(self, running: int) -> tuple[int, int]:
        """(skip, keep) as counts, given how many documents are in the running."""
        return ranks(self.k, self.fraction, self.offset, running)

    def keys(self, values: np.ndarray, id_hash: np.ndarray, seed: int) -> np.ndarray:
        """The ranking key of each document (larger is better); NaN values rank last."""
        if self.method == "bottom":
            keys = -values
        elif self.method == "importance" and self.key_column is None:
            keys = values + gumbel(id_hash, seed, SELECT_STREAM)
        elif self.method == "weighted":
            with np.errstate(divide="ignore", invalid="ignore"):
                keys = np.log(values) + gumbel(id_hash, seed, SELECT_STREAM)
        else:
            keys = values
        return np.where(np.isnan(keys), -np.inf, keys)

    def within(self, running: np.ndarray, values: np.ndarray | None) -> np.ndarray:
        """What the cut keeps before any rank: the running, within [min, max] for a threshold."""
        return running & self.in_range(values) if self.method == "threshold" else running.copy()

    def in_range(self, values: np.ndarray) -> np.ndarray:
        ok = ~np.isnan(values)
        if self.low is not None:
            ok &= values >= self.low
        if self.high is not None:
            ok &= values <= self.high
        return ok


def apply_cut(
    cut: Cut, keys: np.ndarray, values: np.ndarray, id_hash: np.ndarray, running: np.ndarray, thresholds: dict
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, above) masks: kept in the cut; above = ranked better than the kept band (skipped)."""
    kept = cut.within(running, values)
    above = np.zeros(len(keys), dtype=bool)
    if cut.ranked():
        upper, lower = thresholds.get("upper"), thresholds.get("lower")
        if upper is not None:
            above = running & at_or_above(keys, id_hash, upper)
        within = at_or_above(keys, id_hash, lower) if lower is not None else np.ones(len(keys), bool)
        kept &= within & ~above
        if cut.method != "threshold":
            kept &= keys > -np.inf  # no value, no rank
    return kept, above


# ---- the Beam side: rank the shards, merge, cut --------------------------------------------


def cut_reasons(cut: Cut, role: str) -> tuple[str, str, str]:
    """(below, above, missing): what ``scores.reason`` says of a document the cut leaves out.

    The selector's are a small fixed vocabulary; a filter's name the rule, so that GROUP BY reason
    gives one row per filter: "filtered: dsir_log_weight below the 60th percentile"."""
    if role == "select":
        below = "not sampled" if cut.method in SAMPLING else "below the cut"
        return below, "above the band", f"no {cut.column}"
    c = cut.column
    missing = f"filtered: no {c}"
    if cut.method == "threshold":
        return f"filtered: {c} out of range", f"filtered: {c} out of range", missing
    skip, keep = cut.offset, cut.fraction
    if cut.method == "bottom":
        return f"filtered: {c} above the {_pct(keep)} percentile", "", missing
    below = f"filtered: {c} below the {_pct(1 - skip - keep)} percentile" if keep is not None else ""
    above = f"filtered: {c} above the {_pct(1 - skip)} percentile" if skip else ""
    return below, above, missing


def _pct(share: float | None) -> str:
    if share is None:
        return "cut"
    p = round(100 * share, 2)
    p = int(p) if p == int(p) else p
    suffix = "th" if 10 <= p % 100 <= 20 or int(p) != p else {1: "st", 2: "nd", 3: "rd"}.get(int(p) % 10, "th")
    return f"{p}{suffix}"


class KeysForCut:
    """A shard -> the (ranked) cut's keys of its documents in the running (``ranked``) and, for the
    selector, the random baseline's keys of every valid document (``random``): what
    ``ExactRanks`` ranks."""

    def __init__(self, stage: str, cut: Cut, chain, seed: int, random_baseline: bool = False):
        self.stage = stage
        self.cut = cut
        self.chain = chain
        self.seed = seed
        self.random_baseline = random_baseline

    def keys(self, item) -> dict:
        shard = shard_of(item)
        reasons = self.chain.reasons(self.stage, shard)
        id_hash = read_id_hashes(shard.path)
        out = {}
        if self.cut.ranked():
            values = self.chain.column(self.cut.column, shard.name)
            source = self.chain.column(self.cut.key_column, shard.name) if self.cut.key_column else values
            keys = self.cut.keys(source, id_hash, self.seed)
            rankable = self.cut.within(running_mask(reasons), values)
            out["ranked"] = (keys[rankable], id_hash[rankable])
        if self.random_baseline:
            valid = valid_mask(reasons)
            out["random"] = (random_keys(id_hash[valid], self.seed), id_hash[valid])
        return out


def _kept_count(item, stage: str, cut: Cut, chain) -> int:
    """How many of a shard's documents an unranked cut (a threshold, or all) keeps."""
    shard, running = chain.running(stage, item)
    values = chain.column(cut.column, shard.name) if cut.method == "threshold" else None
    return int(cut.within(running, values).sum())


def wanted_ranks(budget: tuple, random_baseline: bool) -> dict:
    """The ranks the cut needs, from the budget (running, skip, keep)."""
    _, skip, keep = budget
    wanted = {"ranked": [skip, skip + keep]}
    if random_baseline:
        wanted["random"] = [max(keep, 1)]
    return wanted


def cut_thresholds(found: dict, budget: tuple) -> dict:
    """The (key, id hash) pairs at the two cut ranks (and the random baseline's), or None where
    the rank is 0 or beyond the documents ranked."""
    _, skip, keep = budget
    ranked, rand = found.get("ranked", {}), found.get("random", {})
    return {"upper": ranked.get(skip), "lower": ranked.get(skip + keep), "random": rand.get(max(keep, 1))}


class ApplyCutShard(ShardStageFn):
    """A shard -> the cut applied: reasons for what it leaves out; the selector also writes
    ``selected`` and, for the KL reduction, ``_in_random`` (the random baseline of the same size)."""

    def __init__(self, name, chain, cut: Cut, role: str, seed: int, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.cut = cut
        self.role = role
        self.seed = seed
        if cut.ranked() and cut.method != "all":
            self.rank_column = cut.column

    def score(self, shard, reasons, thresholds):
        running = running_mask(reasons)
        id_hash = read_id_hashes(shard.path)
        below_reason, above_reason, missing_reason = cut_reasons(self.cut, self.role)
        columns = {}
        if self.cut.method == "all":
            kept = running
        else:
            values = self.chain.column(self.cut.column, shard.name)
            source = self.chain.column(self.cut.key_column, shard.name) if self.cut.key_column else values
            keys = self.cut.keys(source, id_hash, self.seed)
            kept, above = apply_cut(self.cut, keys, values, id_hash, running, thresholds)
            missing = running & np.isnan(values)
            reasons[running & above] = above_reason
            reasons[running & ~kept & ~above & ~missing] = below_reason
            reasons[missing] = missing_reason
        if self.role == "select":
            columns["selected"] = kept
            columns["_in_random"] = in_random(reasons, id_hash, self.seed, thresholds.get("random"))
        return columns, reasons


class CutStage(beam.PTransform):
    """A filter or the selector: rank the documents in the running by the cut's key, merge the
    shards' best into the global cut ranks, then apply the cut to every shard.

    ``explain``: for the selector, a function of (reject reasons, earlier stages' summaries) that
    says why the running is as small as it is, when the budget cannot be met.
    """

    def __init__(
        self, name, cut: Cut, role: str, chain, seed, progress_dir=None, explain=None, context=(), random_baseline=True
    ):
        super().__init__()
        # The selector's random pick of the same size, for the KL reduction: only where the run
        # has one (DSIR's n-gram counts); without it, a threshold or ``all`` is never ranked
        self.random_baseline = random_baseline and role == "select"
        self.name = name
        self.cut = cut
        self.role = role
        self.chain = chain
        self.seed = seed
        self.progress_dir = progress_dir
        self.explain = explain  # (running total, *context values) -> why the running is that small
        self.context = context  # side inputs for explain

    def expand(self, shards):
        cut = self.cut
        # The selector's budget fails as every selector's does; a filter's share may keep none.
        select = self.role == "select"
        budget = shards | "Budget" >> Budget(cut.k, cut.fraction, cut.offset, select, self.explain, self.context)
        if cut.ranked():
            wanted = budget | "WantedRanks" >> beam.Map(wanted_ranks, self.random_baseline)
            keys = KeysForCut(self.name, cut, self.chain, self.seed, self.random_baseline)
            found = beam.pvalue.AsSingleton(shards | "Rank" >> ExactRanks(keys, wanted), default_value={})
            # From the budget, which always has one element: an impossible budget fails even on an
            # empty input, where there is nothing to rank.
            thresholds = budget | "CutRanks" >> beam.Map(lambda b, f: cut_thresholds(f, b), found)
        elif self.random_baseline:  # a threshold or all: the KL baseline is a random pick of the kept size
            kept = (
                shards
                | "KeptPerShard" >> beam.Map(_kept_count, self.name, cut, self.chain)
                | "Kept" >> beam.CombineGlobally(sum)
            )
            wanted = kept | "WantedRandom" >> beam.Map(lambda n: {"random": [max(n, 1)]})
            keys = KeysForCut(self.name, cut, self.chain, self.seed, random_baseline=True)
            found = beam.pvalue.AsSingleton(shards | "Rank" >> ExactRanks(keys, wanted), default_value={})
            thresholds = kept | "RandomRank" >> beam.Map(
                lambda n, f: {"random": f.get("random", {}).get(max(n, 1))}, found
            )
        else:
            thresholds = budget | "NoRanks" >> beam.Map(lambda b: {})
        fn = ApplyCutShard(self.name, self.chain, cut, self.role, self.seed, self.progress_dir)
        return shards | "Cut" >> ApplyStage(fn, thresholds=beam.pvalue.AsSingleton(thresholds))
