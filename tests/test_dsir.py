import dataclasses
import math

import numpy as np
import pyarrow as pa
import pytest
from beamsift.transforms.chain.seeded import gumbel
from beamsift.transforms.featurize import NgramFeatures
from beamsift.transforms.selectors.core import top_k_order
from beamsift.transforms.stages.dsir import DsirModel, dsir_log_weights, kl_divergence, log_probs


def test_log_weight_by_hand():
    # 3 buckets. target counts (2, 1, 1) -> p = (.5, .25, .25); raw counts (1, 1, 2) -> q = (.25, .25, .5)
    model = DsirModel(
        target_counts=np.array([2, 1, 1]),
        raw_counts=np.array([1, 1, 2]),
        smoothing=1e-8,
        num_buckets=3,
        max_ngram=2,
        length_norm="none",
        min_tokens=0,
        mean_ngrams=2.0,
        k=1,
        eligible=2,
    )
    # doc 0 = buckets [0, 0, 2]; doc 1 = [1]
    f = NgramFeatures(buckets=np.array([0, 0, 2, 1]), offsets=np.array([0, 3, 4]), n_tokens=np.array([2, 1]))
    log_w, resampled = model.scores(f)
    eps = 1e-8
    expected0 = 2 * (math.log(0.5 + eps) - math.log(0.25 + eps)) + (math.log(0.25 + eps) - math.log(0.5 + eps))
    assert log_w[0] == pytest.approx(expected0, rel=1e-12)  # = log 2
    assert abs(log_w[0] - math.log(2)) < 1e-6
    assert abs(log_w[1]) < 1e-12
    np.testing.assert_array_equal(resampled, log_w)
    mean = DsirModel(**{**_fields(model), "length_norm": "mean"})
    _, normalised = mean.scores(f)
    assert abs(normalised[0] - log_w[0] / 3 * 2.0) < 1e-12


def _fields(model):
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}


def test_log_weights_equal_count_vector_dot_product():
    rng = np.random.default_rng(0)
    m = 50
    counts = rng.integers(0, 5, size=(20, m))
    buckets = np.concatenate([np.repeat(np.arange(m), c) for c in counts])
    offsets = np.concatenate([[0], np.cumsum(counts.sum(1))])
    f = NgramFeatures(buckets=buckets, offsets=offsets, n_tokens=counts.sum(1))
    ratio = rng.normal(size=m)
    np.testing.assert_allclose(dsir_log_weights(f, ratio), counts @ ratio, rtol=1e-12)


def test_kl_divergence_by_hand():
    p, q = np.array([1, 1]), np.array([1, 3])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(kl_divergence(p, q, 1e-12) - expected) < 1e-9
    assert abs(kl_divergence(p, p, 1e-8)) < 1e-12
    assert np.allclose(np.exp(log_probs(np.array([3, 1]), 0.0)), [0.75, 0.25])


def test_gumbel_top_1_samples_in_proportion_to_weights():
    # Two documents with weights 1 and 3: the second should win 3/4 of the seeds.
    hashes = np.array([11, 22], dtype=np.uint64)
    log_w = np.log([1.0, 3.0])
    wins = sum(int(top_k_order(log_w + gumbel(hashes, seed), hashes, 1)[0]) for seed in range(4000))
    assert abs(wins / 4000 - 0.75) < 0.03


def test_arrow_features_roundtrip():
    from beamsift.transforms.featurize import (
        features_from_arrow,
        features_to_arrow,
        hashed_ngram_features,
    )

    f = hashed_ngram_features(pa.array(["one two three", "four"]), 10000)
    back = features_from_arrow(features_to_arrow(f, 10000), f.n_tokens)
    np.testing.assert_array_equal(back.buckets, f.buckets)
    np.testing.assert_array_equal(back.offsets, f.offsets)


def test_log_weights_of_documents_without_ngrams_are_zero():
    f = NgramFeatures(
        buckets=np.array([1, 1, 0]), offsets=np.array([0, 0, 2, 2, 3, 3]), n_tokens=np.array([0, 2, 0, 1, 0])
    )
    np.testing.assert_allclose(dsir_log_weights(f, np.array([10.0, 1.0])), [0, 2, 0, 10, 0])
    empty = NgramFeatures(np.zeros(0, np.int64), np.zeros(3, np.int64), np.zeros(2, np.int64))
    np.testing.assert_array_equal(dsir_log_weights(empty, np.array([1.0])), [0, 0])


def test_compiled_log_weights_are_numpys_sums_bit_for_bit():
    from beamsift.transforms.featurize import compiled_kernels

    compiled_kernels()  # loaded: dsir_log_weights takes the compiled loop
    rng = np.random.default_rng(4)
    lengths = np.concatenate([np.arange(300), rng.integers(0, 3000, 200)])  # across 8, 128 and their halves
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    log_ratio = rng.standard_normal(65536) * 3
    for dtype in (np.uint16, np.int64):
        buckets = rng.integers(0, 65536, offsets[-1]).astype(dtype)
        f = NgramFeatures(buckets, offsets, lengths)
        values = log_ratio[buckets]
        want = np.add.reduceat(values, np.minimum(offsets[:-1], len(values) - 1))
        want[lengths == 0] = 0.0
        np.testing.assert_array_equal(dsir_log_weights(f, log_ratio), want)
