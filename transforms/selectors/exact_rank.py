"""Exact ranks without gathering the pool: the (key, id hash) at given ranks, in three passes.

A cut keeps the documents ranked (offset, offset + k]; to decide each document a worker needs
the pairs at those two ranks. Gathering every shard's best offset + k pairs in one place would
put 100M keys on one worker at 1B documents and k = 10%. Instead (as a distributed quantile
selection does it):

1. **Sample**: each shard offers the pairs with the smallest sample priority (a hash of the id,
   independent of the key and of the tie-break order); a combine keeps the ``SAMPLE_SIZE``
   smallest. Sorted, every ``SAMPLE_PER_BRACKET``-th pair is a bracket boundary.
2. **Count**: each shard counts its pairs per bracket; the counts are summed, exactly. The
   bracket that holds a wanted rank, and how many pairs rank above it, follow.
3. **Gather**: each shard offers only its pairs inside those brackets; sorted, the pair at
   (rank − pairs above the bracket) is the answer.

The largest thing held anywhere is the sample (``SAMPLE_SIZE`` pairs, 1 MB) or one bracket:
about N / 4,096 pairs for N keys (250,000 pairs, 4 MB, at a billion documents). The answer does
not depend on the sample at all, only the work does: the counts are exact, so the result is
the same as a plain sort of every key (ties in the key broken by the smaller id hash), on every
runner and for any split of the input.

Keys are compared as 64-bit codes that sort best-first (``order_codes``): larger key first,
-0.0 equal to 0.0, -inf last; the id hash breaks ties.

**Weighted** ranks (``weighted=True``: each pair carries a non-negative integer weight, such as a
document's tokens): rank r is the first pair, best first, at which the running total of the
weights reaches r; the counts become sums of weights, and the answer also says the total of the
pairs before it. With every weight 1 it is the plain rank.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.featurize import splitmix64

SAMPLE_SIZE = 1 << 16  # pairs kept in the sample, over all key sets together
SAMPLE_PER_BRACKET = 16  # sampled pairs between two boundaries: brackets hold ~N/4,096 pairs
MIN_SAMPLE_PER_SET = 1 << 12  # a key set's sample never shrinks below this (many key sets)
PRIORITY_SALT = np.uint64(0x5A3B1E)  # the sample priority: independent of the tie-break order
SIGN = np.uint64(1 << 63)


def order_codes(keys: np.ndarray) -> np.ndarray:
    """uint64 codes whose ascending order is the keys' descending order (best first)."""
    bits = (np.asarray(keys, np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    ascending = np.where(bits >= SIGN, ~bits, bits | SIGN)
    return ~ascending


def key_of(code: int) -> float:
    """The key a code stands for (``order_codes``' inverse)."""
    ascending = ~np.uint64(code)
    bits = ascending & ~SIGN if ascending >= SIGN else ~ascending
    return float(np.array([bits], np.uint64).view(np.float64)[0])


def _pairs(codes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    out = np.empty(len(codes), dtype=[("c", "<u8"), ("h", "<u8")])
    out["c"], out["h"] = codes, hashes
    return out


def bracket_of(bounds: np.ndarray, codes: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """For each pair, how many boundaries rank strictly before it (its bracket's index)."""
    at = np.searchsorted(bounds["c"], codes, "left")
    tied = np.flatnonzero(np.searchsorted(bounds["c"], codes, "right") > at)
    if len(tied):  # the code alone cannot place a pair whose code a boundary shares
        at[tied] = np.searchsorted(bounds, _pairs(codes[tied], hashes[tied]), "left")
    return at


def sample_size(wanted: dict) -> int:
    return max(MIN_SAMPLE_PER_SET, SAMPLE_SIZE // max(len(wanted), 1))


def _smallest(codes, hashes, n, priority=None):
    """The n pairs with the smallest sample priority, with their priorities."""
    priority = splitmix64(hashes ^ PRIORITY_SALT) if priority is None else priority
    if len(priority) > n:
        idx = np.argpartition(priority, n - 1)[:n]
        return codes[idx], hashes[idx], priority[idx]
    return codes, hashes, priority


def _coded(source, item, names):
    """(name, codes, id hashes, weights) of each of a shard's key sets that ``names`` holds and that
    is not empty; the weights are 1 where the source gives none."""
    for name, (keys, hashes, *weights) in source.keys(item).items():
        if name in names and len(keys):
            w = np.asarray(weights[0], np.int64) if weights else np.ones(len(keys), np.int64)
            yield name, order_codes(keys), np.asarray(hashes, np.uint64), w


class _Sample(beam.DoFn):
    def __init__(self, source):
        self.source = source

    def process(self, item, wanted):
        n = sample_size(wanted)
        yield {name: (*_smallest(codes, hashes, n), n) for name, codes, hashes, _ in _coded(self.source, item, wanted)}


class _KeepSample(beam.CombineFn):
    """Per-shard samples -> per key set, the bracket boundaries from the smallest priorities."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, part):
        for name, (c, h, p, n) in part.items():
            if name in acc:
                a = acc[name]
                c, h, p = np.concatenate([a[0], c]), np.concatenate([a[1], h]), np.concatenate([a[2], p])
            acc[name] = (*_smallest(c, h, n, p), n)
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        bounds = {}
        for name, (c, h, _, _) in acc.items():
            pairs = np.sort(_pairs(c, h))
            bounds[name] = pairs[SAMPLE_PER_BRACKET - 1 :: SAMPLE_PER_BRACKET]
        return bounds


class _Count(beam.DoFn):
    def __init__(self, source):
        self.source = source

    def process(self, item, bounds):
        out = {}
        for name, codes, hashes, weights in _coded(self.source, item, bounds):
            at = bracket_of(bounds[name], codes, hashes)
            if np.all(weights == 1):  # counts (np.add.at is ~10x slower than a bincount)
                out[name] = np.bincount(at, minlength=len(bounds[name]) + 1).astype(np.int64)
            else:
                out[name] = np.zeros(len(bounds[name]) + 1, np.int64)
                np.add.at(out[name], at, weights)  # integer sums: exact however large
        yield out


def locate(counts: dict, wanted: dict) -> dict:
    """{name: {rank: (bracket, pairs ranked above the bracket)}} for each wanted rank that exists."""
    out = {}
    for name, ranks in wanted.items():
        if name not in counts:
            continue
        ends = np.cumsum(counts[name])
        for rank in ranks:
            if rank is not None and 1 <= rank <= ends[-1]:
                j = int(np.searchsorted(ends, rank, "left"))
                out.setdefault(name, {})[int(rank)] = (j, int(ends[j - 1]) if j else 0)
    return out


class _Gather(beam.DoFn):
    def __init__(self, source):
        self.source = source

    def process(self, item, bounds, located):
        out = {}
        for name, codes, hashes, weights in _coded(self.source, item, located):
            at = bracket_of(bounds[name], codes, hashes)
            inside = np.isin(at, [j for j, _ in located[name].values()])
            if inside.any():
                out[name] = (codes[inside], hashes[inside], at[inside], weights[inside])
        yield out


class _Concatenate(beam.CombineFn):
    """{name: (arrays...)} parts -> each name's arrays concatenated (one bracket per rank)."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, part):
        for name, arrays in part.items():
            acc.setdefault(name, []).append(arrays)
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            for name, parts in acc.items():
                out.setdefault(name, []).extend(parts)
        return out

    def extract_output(self, acc):
        return {name: tuple(np.concatenate(cols) for cols in zip(*parts)) for name, parts in acc.items()}


def answer(gathered: dict, located: dict, weighted: bool = False) -> dict:
    """{name: {rank: (key, id hash)}} from the gathered brackets; weighted: {rank: (key, id hash,
    total weight of the pairs before it)}."""
    out = {}
    for name, ranks in located.items():
        codes, hashes, at, weights = gathered[name]
        for rank, (j, above) in ranks.items():
            inside = np.flatnonzero(at == j)
            pairs = _pairs(codes[inside], hashes[inside])
            order = np.argsort(pairs)
            totals = above + np.cumsum(weights[inside][order])
            i = int(np.searchsorted(totals, rank, "left"))
            best = pairs[order[i]]
            found = (key_of(int(best["c"])), int(best["h"]))
            if weighted:
                found += (int(totals[i] - weights[inside][order[i]]),)
            out.setdefault(name, {})[rank] = found
    return out


class ExactRanks(beam.PTransform):
    """Shards -> one element: {name: {rank: (key, id hash)}}, the pair at each wanted rank
    (1-based, best first) of each key set; a rank beyond a set's size is absent.

    ``source.keys(shard)`` -> {name: (keys, id hashes)}: a shard's keys of each set (a picklable
    object; it is called once per pass). ``wanted``: a singleton, {name: [ranks]}. ``weighted``:
    the source gives (keys, id hashes, integer weights) and a rank is a total of weights; each
    answer is (key, id hash, total weight before it).
    """

    def __init__(self, source, wanted, weighted: bool = False):
        super().__init__()
        self.source = source
        self.wanted = wanted
        self.weighted = weighted

    def expand(self, shards):
        wanted = beam.pvalue.AsSingleton(self.wanted)
        bounds = beam.pvalue.AsSingleton(
            shards
            | "Sample" >> beam.ParDo(_Sample(self.source), wanted)
            | "KeepSample" >> beam.CombineGlobally(_KeepSample()).without_defaults(),
            default_value={},
        )
        located = beam.pvalue.AsSingleton(
            shards
            | "CountPerBracket" >> beam.ParDo(_Count(self.source), bounds)
            | "SumCounts" >> beam.CombineGlobally(Sum(start={}))
            | "Locate" >> beam.Map(locate, wanted)
        )
        return (
            shards
            | "GatherBrackets" >> beam.ParDo(_Gather(self.source), bounds, located)
            | "Concatenate" >> beam.CombineGlobally(_Concatenate())
            | "Answer" >> beam.Map(answer, located, self.weighted)
        )
