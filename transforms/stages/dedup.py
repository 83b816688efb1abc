"""De-duplication: exact duplicates by a hash of the normalised text, then SemDeDup (Abbas et al.,
"SemDeDup: Data-efficient learning at web-scale through semantic deduplication", arXiv:2303.09540).

- **exact**: the text lower-cased, with punctuation and symbols removed and white space collapsed
  (Unicode classes: letters and digits of every script count), hashed; of the documents with the
  same hash, the first in input order is kept and the others point at it;
- **SemDeDup**: within each cluster (one GroupByKey on the cluster id, never every document
  through one key), the documents are taken in a fixed order (nearest their centroid first, then
  input order) and a document whose cosine similarity to a document already kept exceeds 1 − ε
  (``dedup.epsilon``) is dropped, pointing at the most similar kept one.

k-means on document vectors seldom finds well-separated clusters: most documents lie about as
near their second centroid as their first, so a near-duplicate pair is often split over two
clusters and never compared. Each document is therefore also compared in its next nearest
clusters (``dedup.probes``: 2 = its own and the next one). The order is the same in every
cluster, so a document is only ever dropped for one that comes before it; a document kept in
one cluster but dropped in another is dropped, and who pointed at it points on, to the kept one
that comes first. The first of every group of duplicates (in that order) is always kept, never
none of them (the public SemDeDup code's issue #8).

A dropped document stays in ``scores/`` with ``duplicate_of`` (the id of the kept document it
repeats) and the reason ``exact duplicate`` or ``near duplicate``; ``duplicate_of`` is null for
every kept document. A cluster's documents are compared in blocks against the ones kept so far
(memory: a block times the kept ones), and the work is (probes × n)² / 2 dot products for a
cluster of n documents on one worker: ``cluster.k`` bounds n.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.meter import Metered
from beamsift.transforms.chain.staging import read_staging
from beamsift.transforms.featurize import hash_strings
from beamsift.transforms.io.schema import ORDER, TEXT
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting
from beamsift.transforms.stages.cluster import NEXT_CLUSTER
from beamsift.transforms.stages.embed import (
    document_frequencies,
    embeddings,
    features_of,
    projection,
    smooth_idf,
    tfidf_embeddings,
)

COLUMNS = (("duplicate_of", "string"),)
TFIDF_DIM = 512  # projected TF-IDF for dedup.compare: tfidf; cosines kept within ~0.006 (JL)
EXACT = "exact duplicate"
NEAR = "near duplicate"
# RE2's \w and \s are ASCII-only: Unicode classes keep the letters and digits of every script,
# and count every Unicode space (no-break, ideographic) as white space.
_PUNCT = r"[^\p{L}\p{M}\p{N}\s\p{Z}]+"
_SPACE = r"[\s\p{Z}]+"


def normalise_text(texts):
    """Case, punctuation, symbols and runs of white space taken out (an Arrow string array)."""
    lowered = pc.utf8_lower(pc.utf8_normalize(texts, "NFKC"))  # é composed or not, full-width forms
    no_punct = pc.replace_substring_regex(lowered, _PUNCT, "")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(no_punct, _SPACE, " "))


def normalised_text_hash(texts) -> np.ndarray:
    """A hash of each text after ``normalise_text``."""
    return hash_strings(normalise_text(texts))


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


def semdedup_cluster(items: list, epsilon: float, block: int = 256) -> list:
    """One cluster's [(distance to centroid, order, id, vector)] -> [(order, kept id, reason,
    (kept distance, kept order))] of the documents it drops. Greedy in the order (distance, order):
    keep a document unless its cosine to a kept one exceeds 1 − ε; then it points at the most
    similar kept one. Compared in blocks against the kept ones, never an n × n matrix."""
    if not items:
        return []
    items = sorted(items, key=lambda t: (t[0], t[1]))
    vectors = np.stack([t[3] for t in items]).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > 0, norms, 1)[:, None]
    threshold = 1 - epsilon
    kept = np.zeros(len(items), dtype=np.int64)  # indices of the kept items, in order
    n_kept = 0
    dropped = []
    for start in range(0, len(items), block):
        rows = unit[start : start + block]
        if n_kept:
            earlier = rows @ unit[kept[:n_kept]].T
            best_prev = earlier.argmax(1)
            best_prev_sim = earlier[np.arange(len(rows)), best_prev]
        within = rows @ rows.T
        local: list[int] = []
        for i in range(len(rows)):
            sim, target = (float(best_prev_sim[i]), int(kept[best_prev[i]])) if n_kept else (-np.inf, -1)
            if local:
                s_local = within[i, local]
                j = int(np.argmax(s_local))
                if s_local[j] > sim:
                    sim, target = float(s_local[j]), start + local[j]
            if sim > threshold:
                t = items[target]
                dropped.append((items[start + i][1], t[2], NEAR, (float(t[0]), int(t[1]))))
            else:
                local.append(i)
        kept[n_kept : n_kept + len(local)] = np.asarray(local, np.int64) + start
        n_kept += len(local)
    return dropped


class _ExactKeys(beam.DoFn):
    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        table = read_staging(shard.path, [ORDER, "id", TEXT])
        hashes = normalised_text_hash(table.column(TEXT)).view(np.int64)  # keys a runner can encode
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
        ids = table.column("id").to_pylist()
        # A text with nothing left after normalising (only symbols or punctuation) repeats nothing.
        empty = np.asarray(
            pc.equal(pc.utf8_length(normalise_text(table.column(TEXT))), 0).to_numpy(zero_copy_only=False)
        )
        for r in np.flatnonzero(running & ~empty):
            yield int(hashes[r]), (int(orders[r]), str(ids[r]))


LARGE_GROUP = 50_000


def _semdedup_group(kv, epsilon: float, stage: str) -> list:
    return Metered(stage, _compare_group)(kv, epsilon)


def _compare_group(kv, epsilon: float) -> list:
    cluster, members = kv[0], list(kv[1])
    if len(members) > LARGE_GROUP:
        logging.getLogger("beamsift").warning(
            "dedup: cluster %d has %d documents to compare (%.1e dot products on one worker); "
            "a larger cluster.k bounds the work (about one cluster per 10,000 documents)",
            cluster,
            len(members),
            len(members) ** 2 / 2,
        )
    return semdedup_cluster(members, epsilon)


def _exact_groups(item):
    _, members = item
    members = sorted(members)
    first = members[0]
    return [(order, first[1], EXACT, first[0]) for order, _ in members[1:]]


class _ClusterMembers(beam.DoFn):
    """A shard -> (cluster, document) for each document in the running and each of the clusters it
    is compared in: its own and, with ``probes`` 2, the next nearest."""

    def __init__(self, stage, chain, probes: int = 2, tfidf: tuple | None = None):
        self.stage, self.chain, self.probes = stage, chain, probes
        self.tfidf = tfidf  # (num_buckets, dim, seed): compare on projected TF-IDF, not the embedding
        self._proj = None

    def _vectors(self, shard, frequencies):
        if self.tfidf is None:
            return embeddings(self.chain, shard.name)
        if self._proj is None:
            self._proj = projection(*self.tfidf)
        return tfidf_embeddings(features_of(shard), smooth_idf(frequencies), self._proj)

    def process(self, item, exact, frequencies=None):
        shard, running = self.chain.running(self.stage, item)
        table = read_staging(shard.path, [ORDER, "id"])
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
        hit, _ = exact.lookup(orders)
        rows = np.flatnonzero(running & ~hit)
        if not len(rows):
            return
        clusters = self.chain.column("cluster", shard.name)
        distance = self.chain.column("cluster_distance", shard.name)
        vectors = self._vectors(shard, frequencies)
        ids = table.column("id").to_pylist()
        probe = self.chain.column(NEXT_CLUSTER, shard.name) if self.probes > 1 else None
        # Half precision through the shuffle (the runner may hold it all): unit vectors' cosines
        # move by ~1e-3, far inside ε; the greedy computes in float32.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors16 = (vectors / np.where(norms > 0, norms, 1)).astype(np.float16)
        for r in rows:
            doc = (float(distance[r]), int(orders[r]), str(ids[r]), vectors16[r].copy())
            yield int(clusters[r]), doc
            if probe is not None and not np.isnan(probe[r]) and probe[r] != clusters[r]:
                yield int(probe[r]), doc


def _gather(dropped_lists) -> Dropped:
    """All dropped documents, each pointing at a kept one.

    A document dropped in two clusters keeps the pointer to the one that comes first; a pointer
    at a document that was itself dropped elsewhere is followed on (it always leads to an earlier
    document, so it ends at a kept one); an exact duplicate of a document SemDeDup dropped points
    at the one that document points at."""
    exact, near = {}, {}
    for part in dropped_lists:
        for d in part:
            if d[2] == EXACT:
                exact[d[0]] = (d[1], d[3])  # (kept id, kept order)
            else:
                order, kept_id, _, target = d
                if order not in near or target < near[order][0]:
                    near[order] = (target, kept_id)
    for order in near:
        (target_key, kept_id), seen = near[order], 0
        while target_key[1] in near and seen <= len(near):
            target_key, kept_id = near[target_key[1]]
            seen += 1
        near[order] = (target_key, kept_id)
    # The first of an exact group can itself be a near duplicate of another: point on at that one.
    exact = {o: near[k][1] if k in near else i for o, (i, k) in exact.items()}
    flat = sorted([(o, i, EXACT) for o, i in exact.items()] + [(o, v[1], NEAR) for o, v in near.items()])
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

    def __init__(self, name, chain, epsilon: float, progress_dir=None, probes: int = 2, tfidf=None):
        super().__init__()
        self.name, self.chain, self.epsilon, self.probes = name, chain, epsilon, probes
        self.tfidf = tfidf  # (num_buckets, dim, seed) to compare on projected TF-IDF
        self.progress_dir = progress_dir

    def expand(self, shards):
        exact = (
            shards
            | "ExactKeys" >> beam.ParDo(_ExactKeys(self.name, self.chain))
            | "GroupExact" >> beam.GroupByKey()
            | "ExactDuplicates" >> beam.FlatMap(_exact_groups)
        )
        exact_side = beam.pvalue.AsSingleton(
            exact | "ExactList" >> beam.combiners.ToList() | "ExactDropped" >> beam.Map(lambda d: _gather([d]))
        )
        side = []
        if self.tfidf is not None:
            side = [document_frequencies(shards, self.name, self.chain, self.tfidf[0])]
        members = _ClusterMembers(self.name, self.chain, self.probes, self.tfidf)
        near = (
            shards
            | "ClusterMembers" >> beam.ParDo(members, exact_side, *side)
            | "GroupByCluster" >> beam.GroupByKey()
            | "SemDeDup" >> beam.FlatMap(_semdedup_group, self.epsilon, self.name)
        )
        dropped = beam.pvalue.AsSingleton(
            (exact, near)
            | "AllDropped" >> beam.Flatten()
            | "DroppedList" >> beam.combiners.ToList()
            | "Dropped" >> beam.Map(lambda d: _gather([d]))
        )
        fn = MarkDuplicates(self.name, self.chain, self.progress_dir)
        return shards | "Mark" >> ApplyStage(fn, dropped=dropped)


# ---- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupSettings:
    epsilon: float = setting(0.15, "drop a document whose cosine to a kept one in its cluster exceeds 1 - epsilon")
    probes: int = setting(
        2,
        "compare each document in its nearest 1 or 2 clusters (2: pairs split by k-means are found)",
        choices=(1, 2),
    )
    compare: str = setting(
        "auto",
        "the vectors compared: embedding (the embed stage's), tfidf (projected TF-IDF, dim 512: keeps "
        "cosines), or auto (tfidf after an svd embedding, which pulls same-topic documents together)",
        choices=("auto", "embedding", "tfidf"),
    )


def _tfidf(cfg) -> tuple | None:
    """(num_buckets, dim, seed) when SemDeDup compares projected TF-IDF rather than the embedding."""
    compare = cfg["dedup.compare"]
    if compare == "auto":
        compare = "tfidf" if cfg["embed.method"] == "svd" else "embedding"
    return (cfg["featurize.buckets"], TFIDF_DIM, cfg["seed"]) if compare == "tfidf" else None


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    stage = DeduplicateDocuments(
        name,
        ctx.chain,
        float(cfg["dedup.epsilon"]),
        ctx.progress_dir,
        cfg["dedup.probes"],
        _tfidf(cfg),
    )
    return shards | "Stage_" + name >> stage


STAGE = Stage(
    kind="dedup",
    summary="exact duplicates, then SemDeDup within each document's nearest clusters (Abbas et al. 2023)",
    settings=DedupSettings,
    after=("embed", "cluster"),
    columns=fixed_columns(*COLUMNS),
    all_columns=tuple(c for c, _ in COLUMNS),
    build=_build,
)
