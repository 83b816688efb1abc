"""Samples of the documents in the running: what the fitted models (the proxy, the SVD, the
centroids, reweight's loss quantiles) are fitted on.

Each shard offers its documents with the n smallest seeded keys (``seeded.seeded_sample``) and
``KeepSmallest`` keeps the n smallest of all: a sample of at most n, the same for any split of
the input, that never holds more than n documents' payloads.
"""

from __future__ import annotations

from collections.abc import Callable

import apache_beam as beam
from beamsift.transforms.chain.seeded import seeded_sample
from beamsift.transforms.chain.staging import read_id_hashes


class KeepSmallest(beam.CombineFn):
    """Lists of (key, id hash, payload) -> the n with the smallest (key, id hash), sorted."""

    def __init__(self, n: int):
        self.n = n

    def create_accumulator(self):
        return []

    def add_input(self, acc, items):
        return sorted(acc + list(items), key=lambda t: (t[0], t[1]))[: self.n]

    def merge_accumulators(self, accs):
        out = []
        for acc in accs:
            out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


class SampleShard(beam.DoFn):
    """A shard -> [(key, id hash, payload)] for its documents in the running with the n smallest
    seeded keys. ``payload(chain, shard, rows)``: what the fit needs of each sampled row (a
    module-level function or a partial of one: it travels to the workers); ``eligible(chain,
    shard, running)``: which documents of the running may be sampled (default: all)."""

    def __init__(self, stage: str, chain, n: int, seed: int, stream: int, payload: Callable, eligible=None):
        self.stage, self.chain, self.n, self.seed, self.stream = stage, chain, n, seed, stream
        self.payload, self.eligible = payload, eligible

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        if self.eligible is not None:
            running = running & self.eligible(self.chain, shard, running)
        id_hash = read_id_hashes(shard.path)
        rows, keys = seeded_sample(id_hash, running, self.n, self.seed, self.stream)
        if len(rows):
            payload = self.payload(self.chain, shard, rows)
            yield [(float(keys[r]), int(id_hash[r]), p) for r, p in zip(rows, payload)]


class SampleRunning(beam.PTransform):
    """The sample (a list of at most n (key, id hash, payload), smallest key first) of the
    documents in the running before ``stage``: one element."""

    def __init__(self, stage: str, chain, n: int, seed: int, stream: int, payload: Callable, eligible=None):
        super().__init__()
        self.fn = SampleShard(stage, chain, n, seed, stream, payload, eligible)
        self.n = n

    def expand(self, shards):
        return (
            shards | "SampleShards" >> beam.ParDo(self.fn) | "KeepSample" >> beam.CombineGlobally(KeepSmallest(self.n))
        )
