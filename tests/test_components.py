"""Connected components over hash partitions against union-find on the whole graph."""

from __future__ import annotations

import apache_beam as beam
import numpy as np
from apache_beam.testing.util import assert_that, equal_to
from beamsift.transforms.chain.components import ConnectedComponents, canonical_edges, hooks, rank
from conftest import TEST_RUNNER


def union_find_representatives(edges) -> dict:
    """{node: the smallest node of its component} for every node not its own representative."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent) if find(x) != x}


def run_components(edge_batches, rounds=None, documents=10**6, one_worker_edges=0):
    """``one_worker_edges`` 0: every edge through the rounds (the default bound would send these
    small graphs to one worker whole, tested on its own below)."""
    nodes = sorted({int(n) for a, b in edge_batches for n in (*a, *b)})
    # Each node once or twice, in batches of its own, with its name as the payload.
    node_batches = [
        (np.asarray(nodes[i::3], np.int64), np.asarray([f"n{x}" for x in nodes[i::3]], object)) for i in range(3)
    ] + [(np.asarray(nodes[:2], np.int64), np.asarray([f"n{x}" for x in nodes[:2]], object))]
    kwargs = {"one_worker_edges": one_worker_edges, **({} if rounds is None else {"rounds": rounds})}
    got = []
    with beam.Pipeline(runner=TEST_RUNNER) as p:
        docs = beam.pvalue.AsSingleton(p | "Docs" >> beam.Create([documents]))
        edges = p | "Edges" >> beam.Create(edge_batches, reshuffle=False)
        node_pc = p | "Nodes" >> beam.Create(node_batches, reshuffle=False)
        out = (edges, node_pc) | ConnectedComponents(docs, **kwargs)
        expected = union_find_representatives((int(a), int(b)) for ea, eb in edge_batches for a, b in zip(ea, eb))
        assert_that(
            out | beam.MapTuple(lambda n, pn, r, pr: (n, pn, r, pr)),
            equal_to([(n, f"n{n}", r, f"n{r}") for n, r in expected.items()]),
        )
    return got


def test_hooks_take_the_lowest_ranked_candidate_of_each_node():
    nodes = np.array([5, 5, 5, 2, 2], np.int64)
    cands = np.array([5, 9, 1, 2, 7], np.int64)
    n, h = hooks(nodes, cands)
    assert n.tolist() == [2, 5]
    r = {c: int(rank(np.array([c]))[0]) for c in (1, 2, 5, 7, 9)}
    assert h.tolist() == [min((2, 7), key=r.get), min((5, 9, 1), key=r.get)]


def test_canonical_edges_are_distinct_undirected_and_without_loops():
    lo, hi = canonical_edges(np.array([3, 1, 4, 4, 2]), np.array([1, 3, 4, 2, 4]))
    assert list(zip(lo.tolist(), hi.tolist())) == [(1, 3), (2, 4)]


def test_a_few_components_by_hand():
    # {1, 4, 7} (7-4, 4-1), {2, 9}, {3, 5, 6, 8} (a star on 8 and a tail 3-5): representatives the smallest
    a = np.array([7, 4, 9, 8, 8, 8, 5], np.int64)
    b = np.array([4, 1, 2, 3, 5, 6, 3], np.int64)
    run_components([(a[:3], b[:3]), (a[3:], b[3:])])


def test_random_graphs_match_union_find():
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(5):  # sparse: many small components and some large ones
        a = rng.integers(0, 3000, 400)
        b = rng.integers(0, 3000, 400)
        batches.append((a.astype(np.int64), b.astype(np.int64)))
    run_components(batches, documents=3000 * 40)  # two partitions


def test_a_chain_longer_than_the_rounds_is_finished_by_the_residual_step():
    # A path of 300 nodes in input order takes 9 rounds of contraction: after two, the residual
    # step finishes it, exactly.
    nodes = np.arange(10, 310, dtype=np.int64)
    run_components([(nodes[1:], nodes[:-1])], rounds=2, documents=200_000)


def test_a_graph_under_the_bound_goes_to_one_worker_whole_with_the_same_groups():
    # The random graphs and the long chain again, each under the bound (no rounds at all), and
    # one just over it (the rounds, as above): the same representatives as union-find. Nodes
    # come in several batches, some twice: each is labelled once.
    rng = np.random.default_rng(1)
    batches = [
        (rng.integers(0, 3000, 400).astype(np.int64), rng.integers(0, 3000, 400).astype(np.int64)) for _ in range(5)
    ]
    run_components(batches, documents=3000 * 40, one_worker_edges=2000)
    run_components(batches, documents=3000 * 40, one_worker_edges=1999)
    nodes = np.arange(10, 310, dtype=np.int64)
    run_components([(nodes[1:], nodes[:-1])], rounds=2, documents=200_000, one_worker_edges=10**6)
