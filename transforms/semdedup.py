"""De-duplication: exact duplicates by a hash of the normalised text, then SemDeDup (Abbas et al.,
"SemDeDup: Data-efficient learning at web-scale through semantic deduplication", arXiv:2303.09540).

- **exact**: the text lower-cased, with punctuation removed and white space collapsed, hashed;
  of the documents with the same hash, the first in input order is kept and the others point at it;
- **SemDeDup**: within each cluster (one GroupByKey on the cluster id, never every document
  through one key), the documents are taken in a fixed order (nearest the centroid first, then
  input order) and a document whose cosine similarity to a document already kept exceeds 1 − ε
  (``dedup.epsilon``) is dropped, pointing at the most similar kept one. Exactly one document of a
  group of duplicates is kept, never none (the public SemDeDup code's issue #8).

A dropped document stays in ``scores/`` with ``duplicate_of`` (the id of the kept document it
repeats) and the reason ``exact duplicate`` or ``near duplicate``; ``duplicate_of`` is null for
every kept document. Clusters are compared pairwise, so their size bounds a worker's work:
``cluster.k`` sets it (a cluster of n documents costs n²/2 dot products).
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.cluster import embeddings
from beamsift.transforms.featurize import hash_strings
from beamsift.transforms.schema import ORDER, TEXT
from beamsift.transforms.stage import read_staging

COLUMNS = (("duplicate_of", "string"),)
EXACT = "exact duplicate"
NEAR = "near duplicate"
_PUNCT = r"[^\w\s]+"


def normalised_text_hash(texts) -> np.ndarray:
    """A hash of each text with case, punctuation and runs of white space taken out."""
    lowered = pc.utf8_lower(texts)
    no_punct = pc.replace_substring_regex(lowered, _PUNCT, "")
    collapsed = pc.utf8_trim_whitespace(pc.replace_substring_regex(no_punct, r"\s+", " "))
    return hash_strings(collapsed)


@dataclass(frozen=True)
class Dropped:
    """Orders of the dropped documents (sorted), the id each repeats, and why."""

    orders: np.ndarray
    kept_ids: list
    reasons: list

    def lookup(self, orders: np.ndarray):
        pos = np.minimum(np.searchsorted(self.orders, orders), max(len(self.orders) - 1, 0))
        hit = (self.orders[pos] == orders) if len(self.orders) else np.zeros(len(orders), bool)
        return hit, pos


NONE_DROPPED = Dropped(np.zeros(0, np.int64), [], [])


def semdedup_cluster(items: list, epsilon: float) -> list:
    """One cluster's [(distance to centroid, order, id, vector)] -> [(order, kept id, reason)] of
    the documents it drops. Greedy in the fixed order: keep unless too similar to a kept one."""
    items = sorted(items, key=lambda t: (t[0], t[1]))
    vectors = np.stack([t[3] for t in items]).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1)[:, None]
    sims = unit @ unit.T
    kept: list[int] = []
    dropped = []
    for i in range(len(items)):
        if kept:
            s = sims[i, kept]
            j = int(np.argmax(s))
            if s[j] > 1 - epsilon:
                dropped.append((items[i][1], items[kept[j]][2], NEAR))
                continue
        kept.append(i)
    return dropped


class _ExactKeys(beam.DoFn):
    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def process(self, item, duplicates):
        shard, running = self.chain.running(self.stage, item, duplicates)
        table = read_staging(shard.path, [ORDER, "id", TEXT])
        hashes = normalised_text_hash(table.column(TEXT)).view(np.int64)  # keys a runner can encode
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
        ids = table.column("id").to_pylist()
        for r in np.flatnonzero(running):
            yield int(hashes[r]), (int(orders[r]), str(ids[r]))


def _exact_groups(item):
    _, members = item
    members = sorted(members)
    first = members[0]
    return [(order, first[1], EXACT) for order, _ in members[1:]]


class _ClusterMembers(beam.DoFn):
    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def process(self, item, duplicates, exact):
        shard, running = self.chain.running(self.stage, item, duplicates)
        table = read_staging(shard.path, [ORDER, "id"])
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
        hit, _ = exact.lookup(orders)
        rows = np.flatnonzero(running & ~hit)
        if not len(rows):
            return
        clusters = self.chain.column("cluster", shard.name)
        distance = self.chain.column("cluster_distance", shard.name)
        vectors = embeddings(self.chain, shard.name)
        ids = table.column("id").to_pylist()
        for r in rows:
            yield int(clusters[r]), (float(distance[r]), int(orders[r]), str(ids[r]), vectors[r])


def _gather(dropped_lists) -> Dropped:
    flat = sorted(d for part in dropped_lists for d in part)
    if not flat:
        return NONE_DROPPED
    return Dropped(np.array([d[0] for d in flat], np.int64), [d[1] for d in flat], [d[2] for d in flat])


class MarkDuplicates(ShardStageFn):
    def score(self, shard, reasons, dropped: Dropped):
        orders = np.asarray(read_staging(shard.path, [ORDER]).column(0).combine_chunks(), np.int64)
        running = running_mask(reasons)
        hit, pos = dropped.lookup(orders)
        hit &= running
        duplicate_of = np.full(len(orders), None, dtype=object)
        for r in np.flatnonzero(hit):
            duplicate_of[r] = dropped.kept_ids[pos[r]]
            reasons[r] = dropped.reasons[pos[r]]
        return {"duplicate_of": pa.array(list(duplicate_of), pa.string())}, reasons


class DeduplicateDocuments(beam.PTransform):
    """Exact duplicates, then SemDeDup within clusters; the dropped ones marked on every shard."""

    def __init__(self, name, chain, epsilon: float, duplicates, progress_dir=None):
        super().__init__()
        self.name, self.chain, self.epsilon = name, chain, epsilon
        self.duplicates, self.progress_dir = duplicates, progress_dir

    def expand(self, shards):
        exact = (
            shards
            | "ExactKeys" >> beam.ParDo(_ExactKeys(self.name, self.chain), self.duplicates)
            | "GroupExact" >> beam.GroupByKey()
            | "ExactDuplicates" >> beam.FlatMap(_exact_groups)
        )
        exact_side = beam.pvalue.AsSingleton(
            exact | "ExactList" >> beam.combiners.ToList() | "ExactDropped" >> beam.Map(lambda d: _gather([d]))
        )
        near = (
            shards
            | "ClusterMembers" >> beam.ParDo(_ClusterMembers(self.name, self.chain), self.duplicates, exact_side)
            | "GroupByCluster" >> beam.GroupByKey()
            | "SemDeDup" >> beam.FlatMap(lambda kv, eps: semdedup_cluster(list(kv[1]), eps), self.epsilon)
        )
        dropped = beam.pvalue.AsSingleton(
            (exact, near)
            | "AllDropped" >> beam.Flatten()
            | "DroppedList" >> beam.combiners.ToList()
            | "Dropped" >> beam.Map(lambda d: _gather([d]))
        )
        fn = MarkDuplicates(self.name, self.chain, self.progress_dir)
        return shards | "Mark" >> ApplyStage(fn, self.duplicates, dropped)
