"""Connected components of a graph that arrives as batches of edges, computed over hash partitions.

MinHash finds pairs of candidate duplicates; the duplicate groups are the connected components of
the graph those pairs form, and one document is kept per group. Peers gather every edge on one
worker and run union-find there (datatrove's clustering step), however large the graph; here a
graph of more than ``ONE_WORKER_EDGES`` edges (a fixed bound, 32 MB) is contracted over hash
partitions, so that no worker holds more than a partition of the nodes (~65k, ``partitions_for``)
and the edges of that partition, and only a smaller one goes to one worker whole.

The algorithm is min-label contraction (as in Kiveris et al., "Connected Components in MapReduce
and Beyond", SoCC 2014): each round every node *hooks* to the lowest-ranked node of its closed
neighbourhood, every edge is rewritten between the two nodes' hooks (self-loops dropped), and
every node's label moves along. Ranks are a fixed bijective hash of the node, not the node itself:
with ranks in input order, a chain of near-duplicates in that order would shrink by one node a
round; with random-looking ranks a round keeps about a third of a path's nodes, so the rounds
needed grow with the log of a component's diameter. ``ROUNDS`` rounds finish every component of
a MinHash graph we have seen (bucket stars: diameters of a few edges); what edges are left after
them are finished together on one worker, exactly, as a small graph is whole (both counted:
``residual_edges``).

Each node's label ends at one node of its component; the component's representative is then its
smallest node (for MinHash: the first document in input order), found per label in the last step.
Every step is a keyed shuffle of numpy arrays (one element per partition and batch, not per node),
deterministic whatever the order of arrival.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain.duplicate_ids import partitions_for
from beamsift.transforms.chain.meter import NAMESPACE
from beamsift.transforms.featurize import splitmix64

ROUNDS = 6
# A graph of at most this many edges (16 bytes each: 32 MB) goes to one worker whole, as what the
# rounds leave does: a fixed bound, not the corpus's size. A local runner holds each of the rounds'
# 24 shuffles in memory; MinHash's graphs have ~0.2 edges a document (175k at 1M documents with
# 5% near-copies), and through the rounds they cost a 1M run in one process ~100 MB of it.
ONE_WORKER_EDGES = 1 << 21
_RANK_SALT = np.uint64(0x7F4A7C159E3779B9)
_PART_SALT = np.uint64(0x2545F4914F6CDD1D)
RESIDUAL_EDGES = "residual_edges"  # the Beam counter of the edges finished on one worker


def rank(nodes: np.ndarray) -> np.ndarray:
    """A node's rank in the contraction: a bijective hash, so that no two nodes tie."""
    return splitmix64(np.asarray(nodes, np.int64).view(np.uint64) ^ _RANK_SALT)


def partition(nodes: np.ndarray, partitions: int) -> np.ndarray:
    return (splitmix64(np.asarray(nodes, np.int64).view(np.uint64) ^ _PART_SALT) % np.uint64(partitions)).astype(
        np.int64
    )


def by_partition(keys: np.ndarray, partitions: int, *arrays):
    """(partition, the rows of ``arrays`` whose key falls in it) for each partition with rows."""
    if not len(keys):
        return
    part = partition(keys, partitions)
    idx = np.argsort(part, kind="stable")
    sorted_part = part[idx]
    for rows in np.split(idx, np.flatnonzero(sorted_part[1:] != sorted_part[:-1]) + 1):
        yield int(part[rows[0]]), tuple(a[rows] for a in arrays)


def _concat(batches, width: int) -> tuple:
    batches = list(batches)
    if not batches:
        return tuple(np.zeros(0, np.int64) for _ in range(width))
    return tuple(np.concatenate([b[i] for b in batches]) for i in range(width))


def hooks(nodes: np.ndarray, candidates: np.ndarray):
    """(distinct nodes, sorted; the lowest-ranked candidate of each)."""
    idx = np.lexsort((rank(candidates), nodes))
    n, c = nodes[idx], candidates[idx]
    first = np.r_[True, n[1:] != n[:-1]] if len(n) else np.zeros(0, bool)
    return n[first], c[first]


def lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[keys == q] for each query (keys sorted and distinct); the query itself where absent."""
    if not len(keys):
        return queries.copy()
    pos = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[pos] == queries, values[pos], queries)


def canonical_edges(a: np.ndarray, b: np.ndarray):
    """Distinct undirected edges (low, high), self-loops dropped."""
    keep = a != b
    lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    if not len(lo):
        return lo, hi
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def components_on_one_worker(a: np.ndarray, b: np.ndarray):
    """(nodes, the lowest-ranked node of each one's component), by scipy over the whole graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(np.concatenate([a, b]))
    if not len(nodes):
        return nodes, nodes
    ia, ib = np.searchsorted(nodes, a), np.searchsorted(nodes, b)
    graph = coo_matrix((np.ones(len(a), np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
    _, comp = connected_components(graph, directed=False)
    # Per component, the node of lowest rank.
    idx = np.lexsort((rank(nodes), comp))
    first = np.r_[True, comp[idx][1:] != comp[idx][:-1]]
    best = np.empty(comp.max() + 1, np.int64)
    best[comp[idx][first]] = nodes[idx][first]
    return nodes, best[comp]


class _HookRows(beam.DoFn):
    """An edge batch -> (partition, (node, candidate)) for both ends of each edge and the ends
    themselves (a node is a candidate for its own hook)."""

    def process(self, edges, documents):
        a, b = edges
        nodes = np.concatenate([a, b, a, b])
        yield from by_partition(nodes, partitions_for(documents), nodes, np.concatenate([b, a, a, b]))


class _KeyEdges(beam.DoFn):
    """An edge batch -> (partition of its first end, (a, b))."""

    def process(self, edges, documents):
        a, b = edges
        yield from by_partition(a, partitions_for(documents), a, b)


def _relabel_first(kv, documents):
    """Edges keyed by their first end, with that partition's hooks -> the first end replaced by
    its hook, keyed by the second end."""
    _, g = kv
    a, b = _concat(g["edges"], 2)
    keys, values = _concat(g["hooks"], 2)
    yield from by_partition(b, partitions_for(documents), lookup(keys, values, a), b)


def _relabel_second(kv):
    """... -> both ends replaced: the edges of the contracted graph (distinct, no self-loops)."""
    _, g = kv
    a, b = _concat(g["edges"], 2)
    keys, values = _concat(g["hooks"], 2)
    lo, hi = canonical_edges(a, lookup(keys, values, b))
    if len(lo):
        yield lo, hi


def _labels_start(kv, documents):
    """A partition's nodes (with their payloads) and hooks -> (partition of label, (node,
    payload, label)): every node once, labelled by its first hook."""
    _, g = kv
    nodes = np.concatenate([n for n, _ in g["nodes"]] + [np.zeros(0, np.int64)])
    payloads = np.concatenate([np.asarray(p, object) for _, p in g["nodes"]] + [np.zeros(0, object)])
    nodes, first = np.unique(nodes, return_index=True)
    payloads = payloads[first]
    keys, values = _concat(g["hooks"], 2)
    labels = lookup(keys, values, nodes)
    yield from by_partition(labels, partitions_for(documents), nodes, payloads, labels)


def _labels_move(kv, documents):
    """Labels keyed by label, with that partition's hooks -> each label moved to its hook."""
    _, g = kv
    keys, values = _concat(g["hooks"], 2)
    for nodes, payloads, labels in g["labels"]:
        moved = lookup(keys, values, labels)
        yield from by_partition(moved, partitions_for(documents), nodes, payloads, moved)


def _group_hooks(kv):
    p, rows = kv
    return p, hooks(*_concat(rows, 2))


class _Residual(beam.CombineFn):
    """The edges left after the rounds (none on the graphs MinHash makes), or a small graph's
    every edge, all together."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, edges):
        acc.append(edges)
        return acc

    def merge_accumulators(self, accs):
        return [e for acc in accs for e in acc]

    def extract_output(self, acc):
        a, b = _concat(acc, 2)
        if len(a):
            beam.metrics.Metrics.counter(NAMESPACE, RESIDUAL_EDGES).inc(len(a))
        return components_on_one_worker(a, b)


def _own_labels(batch, few: bool, residual, documents):
    """A node batch, where the graph skips the rounds -> (partition of label, (node, payload,
    label)) of each distinct node, labelled by its component on one worker (``residual``).
    Labelled in one step, not by itself first and moved after: a local runner keeps the largest
    output each step ever buffered, and every node of the graph went through both."""
    if not few:
        return
    nodes, first = np.unique(batch[0], return_index=True)
    payloads = np.asarray(batch[1], object)[first]
    labels = lookup(residual[0], residual[1], nodes)
    yield from by_partition(labels, partitions_for(documents), nodes, payloads, labels)


def _labels_residual(kv, residual, documents):
    """Labels -> labels moved by the residual's components (where any edges were left), keyed anew."""
    _, (nodes, payloads, labels) = kv
    moved = lookup(residual[0], residual[1], labels)
    yield from by_partition(moved, partitions_for(documents), nodes, payloads, moved)


def _finish(kv):
    """A partition of labels -> (node, payload, representative, its payload) for every node whose
    representative (the smallest node with its label) is another node."""
    _, batches = kv
    batches = list(batches)
    nodes = np.concatenate([b[0] for b in batches])
    payloads = np.concatenate([np.asarray(b[1], object) for b in batches])
    labels = np.concatenate([b[2] for b in batches])
    idx = np.lexsort((nodes, labels))
    nodes, payloads, labels = nodes[idx], payloads[idx], labels[idx]
    # A node that came in two node batches is labelled the same twice: once is enough
    once = np.r_[True, (nodes[1:] != nodes[:-1]) | (labels[1:] != labels[:-1])] if len(nodes) else np.zeros(0, bool)
    nodes, payloads, labels = nodes[once], payloads[once], labels[once]
    first = np.r_[True, labels[1:] != labels[:-1]] if len(labels) else np.zeros(0, bool)
    head = np.maximum.accumulate(np.where(first, np.arange(len(labels)), 0))
    for i in np.flatnonzero(~first).tolist():
        h = int(head[i])
        yield int(nodes[i]), payloads[i], int(nodes[h]), payloads[h]


class ConnectedComponents(beam.PTransform):
    """(edge batches (a, b) of int64 node arrays, node batches (nodes, payloads)) -> (node,
    payload, representative, representative's payload) for every node that is not its
    component's representative, the smallest node of its component. Every end of an edge must
    be among the nodes. ``documents``: a singleton side input that bounds the number of nodes
    (it sets the partitions)."""

    def __init__(self, documents, rounds: int = ROUNDS, one_worker_edges: int = ONE_WORKER_EDGES):
        super().__init__()
        self.documents, self.rounds, self.one_worker_edges = documents, rounds, one_worker_edges

    def expand(self, inputs):
        edges, nodes = inputs
        # A small graph skips the rounds: its edges go straight to the one-worker step, and each
        # node starts there labelled by itself (what the rounds would give it without edges).
        count = edges | "CountEdges" >> beam.Map(lambda e: len(e[0])) | "SumEdges" >> beam.CombineGlobally(sum)
        few = beam.pvalue.AsSingleton(
            count | "FewEdges" >> beam.Map(lambda n, bound: n <= bound, self.one_worker_edges)
        )
        whole = edges | "WholeGraph" >> beam.Filter(lambda _, few: few, few)
        edges = edges | "GraphInRounds" >> beam.Filter(lambda _, few: not few, few)
        all_nodes = nodes
        nodes = nodes | "NodesInRounds" >> beam.Filter(lambda _, few: not few, few)
        labels = None
        for r in range(self.rounds):
            hooked = (
                edges
                | f"HookRows{r}" >> beam.ParDo(_HookRows(), self.documents)
                | f"GroupHookRows{r}" >> beam.GroupByKey()
                | f"Hooks{r}" >> beam.Map(_group_hooks)
            )
            if labels is None:
                keyed_nodes = nodes | "KeyNodes" >> beam.FlatMap(
                    lambda batch, documents: by_partition(batch[0], partitions_for(documents), *batch),
                    self.documents,
                )
                labels = {"nodes": keyed_nodes, "hooks": hooked} | "JoinNodes" >> beam.CoGroupByKey()
                labels = labels | "LabelsStart" >> beam.FlatMap(_labels_start, self.documents)
            else:
                labels = (
                    {"labels": labels, "hooks": hooked}
                    | f"JoinLabels{r}" >> beam.CoGroupByKey()
                    | f"LabelsMove{r}" >> beam.FlatMap(_labels_move, self.documents)
                )
            first = (
                {"edges": edges | f"KeyEdges{r}" >> beam.ParDo(_KeyEdges(), self.documents), "hooks": hooked}
                | f"JoinFirst{r}" >> beam.CoGroupByKey()
                | f"RelabelFirst{r}" >> beam.FlatMap(_relabel_first, self.documents)
            )
            edges = (
                {"edges": first, "hooks": hooked}
                | f"JoinSecond{r}" >> beam.CoGroupByKey()
                | f"RelabelSecond{r}" >> beam.FlatMap(_relabel_second)
            )
        left = (edges, whole) | "LeftEdges" >> beam.Flatten()
        residual = beam.pvalue.AsSingleton(left | "Residual" >> beam.CombineGlobally(_Residual()))
        own_labels = all_nodes | "OwnLabels" >> beam.FlatMap(_own_labels, few, residual, self.documents)
        return (
            (labels | "LabelsResidual" >> beam.FlatMap(_labels_residual, residual, self.documents), own_labels)
            | "AllLabels" >> beam.Flatten()
            | "GroupLabels" >> beam.GroupByKey()
            | "Representatives" >> beam.FlatMap(_finish)
        )
