"""Selecting exactly k documents: Gumbel top-k, seeded by the config seed and the document id.

Sampling k items without replacement with probabilities ∝ w_i is the same as keeping the k
largest keys log w_i + G_i with G_i ~ Gumbel(0, 1) (the Gumbel top-k trick). G_i comes from a
hash of (seed, id), not from a generator that walks the data, so the selection is the same on
every runner and for any number of workers (the reference seeds numpy per process and its
selection changes with ``num_proc``).

The global top-k never gathers the pool: each shard keeps its own k best (key, id hash) pairs,
and a combine merges those lists, keeping k. Ties in the key are broken by the id hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from beamsift.transforms.featurize import splitmix64

SELECT_STREAM = 0x5E1EC7
RANDOM_STREAM = 0x2A2D0A


def uniform01(id_hash: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform number in (0, 1) for each id, fixed by (seed, stream, id)."""
    key = splitmix64(np.array([(seed * 0x9E3779B1 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    bits = splitmix64(np.asarray(id_hash, np.uint64) ^ key) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def gumbel(id_hash: np.ndarray, seed: int, stream: int = SELECT_STREAM) -> np.ndarray:
    """G = −log(−log U): standard Gumbel noise, fixed by (seed, id)."""
    return -np.log(-np.log(uniform01(id_hash, seed, stream)))


def top_k_order(keys: np.ndarray, hashes: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best items, best first: larger key first, then smaller id hash."""
    if len(keys) > k:
        # argpartition on the key alone could cut inside a run of ties; take everything tied
        # with the k-th key, then order exactly.
        kth = np.partition(keys, len(keys) - k)[len(keys) - k]
        idx = np.flatnonzero(keys >= kth)
    else:
        idx = np.arange(len(keys))
    order = np.lexsort((hashes[idx], -keys[idx]))
    return idx[order[:k]]


@dataclass(frozen=True)
class Candidates:
    """The k best (key, id hash) pairs of part of the pool, best first."""

    k: int
    keys: np.ndarray
    hashes: np.ndarray

    @staticmethod
    def of(keys: np.ndarray, hashes: np.ndarray, k: int) -> Candidates:
        idx = top_k_order(keys, hashes, k)
        return Candidates(k, keys[idx], hashes[idx])

    def merge(self, other: Candidates) -> Candidates:
        return Candidates.of(
            np.concatenate([self.keys, other.keys]),
            np.concatenate([self.hashes, other.hashes]),
            max(self.k, other.k),
        )

    def threshold(self) -> tuple[float, int] | None:
        """The k-th best (key, id hash): an item is in the top k iff it is at least as good."""
        if len(self.keys) < self.k:
            return None
        return float(self.keys[self.k - 1]), int(self.hashes[self.k - 1])


def at_or_above(keys: np.ndarray, hashes: np.ndarray, threshold: tuple[float, int] | None) -> np.ndarray:
    if threshold is None:
        return np.zeros(len(keys), dtype=bool)
    key, h = threshold
    return (keys > key) | ((keys == key) & (hashes <= np.uint64(h)))


class MergeCandidates(beam.CombineFn):
    """Per-shard candidate lists (a dict name -> Candidates) -> the global top k of each."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, item):
        for name, cands in item.items():
            acc[name] = acc[name].merge(cands) if name in acc else cands
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return {name: c.threshold() for name, c in acc.items()}
