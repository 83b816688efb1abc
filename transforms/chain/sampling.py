"""Samples of the documents in the running: what the fitted models (the proxy, the SVD, the
centroids, reweight's loss quantiles) are fitted on.

Each shard offers its documents with the n smallest seeded keys (``seeded.seeded_sample``), and
of those only the ones under ``offer_bound`` when the population is the whole running (its size
is known), and ``KeepSmallest`` keeps the n smallest of all: a sample of at most n, the same for
any split of the input, that never holds more than n documents' payloads and one shard's offer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import itemgetter

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain import running_total
from beamsift.transforms.chain.seeded import seeded_sample
from beamsift.transforms.chain.staging import read_id_hashes

_KEY = itemgetter(0, 1)  # (key, id hash): never the payload


class SampleRows(list):
    """A sample: a list of (key, id hash, payload), pickled as columns, with payloads that are
    arrays of one shape as one array. Beam's coder pickled each row's array on its own (~20,000
    a sample, 8 passes between the workers and the fit): 1.5 s of a 1M run's clustering."""

    def __reduce__(self):
        if any(len(t) != 3 for t in self):
            return (SampleRows, (list(self),))
        try:
            keys = np.fromiter((t[0] for t in self), np.float64, len(self))
            hashes = np.fromiter((t[1] for t in self), np.uint64, len(self))
        except (TypeError, ValueError, OverflowError):  # not (float, 64-bit hash, ...) rows: as a list
            return (SampleRows, (list(self),))
        payloads = [t[2] for t in self]
        if payloads and all(isinstance(p, np.ndarray) for p in payloads):
            if len({(p.shape, p.dtype.str) for p in payloads}) == 1:
                payloads = np.stack(payloads)
        return (_sample_rows, (keys, hashes, payloads))


def _sample_rows(keys: np.ndarray, hashes: np.ndarray, payloads) -> SampleRows:
    return SampleRows(zip(keys.tolist(), hashes.tolist(), list(payloads)))


class KeepSmallest(beam.CombineFn):
    """Lists of (key, id hash, payload) -> the n with the smallest (key, id hash), sorted; with
    ``then``, ``then(sample)`` instead (see ``SampleRunning``)."""

    def __init__(self, n: int, then: Callable | None = None):
        self.n, self.then = n, then

    def create_accumulator(self):
        return SampleRows()

    def add_input(self, acc, items):
        # Sorted only once more than n are held (a sort a shard took 0.6 s of 420 shards' adds)
        acc = acc if isinstance(acc, SampleRows) else SampleRows(acc)
        acc.extend(items)
        if len(acc) > self.n:
            acc.sort(key=_KEY)
            del acc[self.n :]
        return acc

    def merge_accumulators(self, accs):
        out = SampleRows()
        for acc in accs:
            out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        acc = acc if isinstance(acc, SampleRows) else SampleRows(acc)
        acc.sort(key=_KEY)
        return acc if self.then is None else self.then(acc)


class SampleShard(beam.DoFn):
    """A shard -> [(key, id hash, payload)] for its documents in the running with the n smallest
    seeded keys. ``payload(chain, shard, rows)``: what the fit needs of each sampled row (a
    module-level function or a partial of one: it travels to the workers); ``eligible(chain,
    shard, running)``: which documents of the running may be sampled (default: all)."""

    def __init__(self, stage: str, chain, n: int, seed: int, stream: int, payload: Callable, eligible=None):
        self.stage, self.chain, self.n, self.seed, self.stream = stage, chain, n, seed, stream
        self.payload, self.eligible = payload, eligible

    def process(self, item, population=None):
        shard, running = self.chain.running(self.stage, item)
        if self.eligible is not None:
            running = running & self.eligible(self.chain, shard, running)
        id_hash = read_id_hashes(shard.path)
        rows, keys = seeded_sample(id_hash, running, self.n, self.seed, self.stream)
        if population:
            rows = rows[keys[rows] <= offer_bound(self.n, population)]
        if len(rows):
            payload = self.payload(self.chain, shard, rows)
            yield [(float(keys[r]), int(id_hash[r]), p) for r, p in zip(rows, payload)]


class SampleRunning(beam.PTransform):
    """The sample (a list of at most n (key, id hash, payload), smallest key first) of the
    documents in the running before ``stage``: one element; with ``then``, ``then(sample)``.

    ``then`` (what is fitted on the sample) runs where the sample is merged: a sample of
    embeddings is large (20,000 x 512 float32: 40 MB), and as the combine's output it went back
    through the runner and out to the fit (a global combine's output reaches the step after it
    through a side input): 6.9 s from the merge's start to the fit's end at 1M documents with two
    workers, for a 2.3 s fit."""

    def __init__(self, stage: str, chain, n: int, seed: int, stream: int, payload: Callable, eligible=None, then=None):
        super().__init__()
        self.fn = SampleShard(stage, chain, n, seed, stream, payload, eligible)
        self.n, self.then = n, then

    def expand(self, shards):
        side = []
        if self.fn.eligible is None:  # the population is the running: its size is known
            side = [beam.pvalue.AsSingleton(running_total(shards, "Population"))]
        return (
            shards
            | "SampleShards" >> beam.ParDo(self.fn, *side)
            | "KeepSample" >> beam.CombineGlobally(KeepSmallest(self.n, self.then))
        )


def offer_bound(n: int, population: int) -> float:
    """The key below which a shard offers its documents to a sample of n from ``population``:
    the keys are uniform, so n + 8·√n + 64 are expected below it and fewer than n only with a
    probability under 1e-15 (8 standard deviations); each shard then offers ~n/N of its
    documents, not up to n of them (at 1M documents and n = 20,000: 2%, not all)."""
    return (n + 8 * math.sqrt(n) + 64) / population
