"""The cut's ranks without gathering the pool (selectors/exact_rank.py) against a plain sort."""

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from beamsift.transforms.selectors import exact_rank
from beamsift.transforms.selectors.exact_rank import ExactRanks, key_of, order_codes
from conftest import TEST_RUNNER


class ArraysSource:
    """Each element is already {name: (keys, hashes)}."""

    def keys(self, item):
        return item


def plain_sort(keys, hashes, rank):
    """The pair at ``rank`` (1-based) when every pair is sorted: larger key first, then smaller hash."""
    order = np.lexsort((hashes, -(keys + 0.0)))
    i = order[rank - 1]
    return float(keys[i]), int(hashes[i])


def check_ranks(parts, wanted, expected):
    """Run ExactRanks on the DirectRunner; its one output must equal ``expected``."""
    with TestPipeline(runner=TEST_RUNNER) as p:
        wanted_pc = p | "Wanted" >> beam.Create([wanted])
        out = p | beam.Create(parts, reshuffle=False) | ExactRanks(ArraysSource(), wanted_pc)
        assert_that(out, equal_to([expected]))


def test_order_codes_sort_keys_best_first_and_back():
    keys = np.array([3.5, -np.inf, 0.0, -0.0, -2.0, np.inf, 1e-300, -1e-300])
    codes = order_codes(keys)
    assert list(np.argsort(codes, kind="stable")) == [5, 0, 6, 2, 3, 7, 4, 1]
    assert codes[2] == codes[3]  # -0.0 ranks as 0.0
    assert [key_of(int(c)) for c in codes] == [3.5, -np.inf, 0.0, 0.0, -2.0, np.inf, 1e-300, -1e-300]


def test_ranks_of_200k_keys_match_a_plain_sort_of_all_keys():
    rng = np.random.default_rng(7)
    n = 200_000
    # Continuous keys, heavy ties (rounded), -inf (no value) and both zeros: every kind of order.
    keys = np.concatenate([rng.normal(size=n // 2), np.round(rng.normal(size=n // 4), 1), np.full(n // 8, -np.inf)])
    keys = np.concatenate([keys, np.where(rng.random(n - len(keys)) < 0.5, 0.0, -0.0)])
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    small_keys = rng.integers(0, 3, size=300).astype(float)  # a second set: all ties, few pairs
    small_hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    # Uneven shards, the second set in a few of them only.
    cuts = np.sort(rng.choice(np.arange(1, n), size=24, replace=False))
    parts = [{"x": (k, h)} for k, h in zip(np.split(keys, cuts), np.split(hashes, cuts))]
    for i, (k, h) in enumerate(zip(np.split(small_keys, 3), np.split(small_hashes, 3))):
        parts[i * 5]["y"] = (k, h)
    ranks = [1, 2, 100, 50_000, 100_000, 123_457, 150_000, 162_500, 187_500, 199_999, 200_000]
    expected = {
        "x": {r: plain_sort(keys, hashes, r) for r in ranks},
        "y": {r: plain_sort(small_keys, small_hashes, r) for r in (1, 150, 300)},
    }
    check_ranks(parts, {"x": [*ranks, 0, n + 1, None], "y": [1, 150, 300, 301]}, expected)


def test_more_keys_than_the_sample_still_exact(monkeypatch):
    # A tiny sample (many pairs per bracket, brackets of ties): the counts alone decide the rank.
    monkeypatch.setattr(exact_rank, "SAMPLE_SIZE", 16)
    monkeypatch.setattr(exact_rank, "MIN_SAMPLE_PER_SET", 16)
    monkeypatch.setattr(exact_rank, "SAMPLE_PER_BRACKET", 4)
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 5, size=5_000).astype(float)
    hashes = rng.integers(0, 2**63, size=5_000, dtype=np.uint64)
    parts = [{"x": (k, h)} for k, h in zip(np.array_split(keys, 7), np.array_split(hashes, 7))]
    ranks = [1, 999, 1000, 1001, 2500, 4999, 5000]
    check_ranks(parts, {"x": ranks}, {"x": {r: plain_sort(keys, hashes, r) for r in ranks}})


@pytest.mark.parametrize("parts", [[], [{"x": (np.array([]), np.array([], np.uint64))}]])
def test_no_keys_no_ranks(parts):
    check_ranks(parts, {"x": [1]}, {})


def test_weighted_ranks_match_a_running_total_over_a_plain_sort(monkeypatch):
    # A rank is a total of weights (tokens): the first pair, best first, whose running total
    # reaches it, and the total before it. Small brackets so that the boundary pairs fall inside.
    monkeypatch.setattr(exact_rank, "SAMPLE_SIZE", 64)
    monkeypatch.setattr(exact_rank, "MIN_SAMPLE_PER_SET", 64)
    rng = np.random.default_rng(3)
    n = 20_000
    keys = np.round(rng.normal(size=n), 2)  # ties
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    weights = rng.integers(0, 50, size=n)  # zero weights too
    order = np.lexsort((hashes, -keys))
    totals = np.cumsum(weights[order])
    ranks = [1, 7, int(totals[-1]) // 3, int(totals[5000]), int(totals[5000]) + 1, int(totals[-1])]
    expected = {}
    for r in ranks:
        i = int(np.searchsorted(totals, r, "left"))
        j = order[i]
        expected[r] = (float(keys[j]), int(hashes[j]), int(totals[i] - weights[j]))
    parts = [{"x": (k, h, w)} for k, h, w in zip(*(np.array_split(a, 9) for a in (keys, hashes, weights)))]
    with TestPipeline(runner=TEST_RUNNER) as p:
        wanted = p | "Wanted" >> beam.Create([{"x": [*ranks, int(totals[-1]) + 1]}])
        out = p | beam.Create(parts, reshuffle=False) | ExactRanks(ArraysSource(), wanted, weighted=True)
        assert_that(out, equal_to([{"x": expected}]))
