"""Seeded randomness: every random choice of a run is a function of (seed, stream, document id).

Nothing walks the data with a generator: a document's draw depends on its id alone, so the same
documents get the same draws on every runner, for any number of workers and any split of the
input (the reference DSIR seeds numpy per process, and its selection changes with ``num_proc``).
Each use has its own stream, so that draws for one purpose are independent of another's.
"""

from __future__ import annotations

import numpy as np
from beamsift.transforms.featurize import splitmix64

# One stream per use; a new use takes a new constant.
SELECT_STREAM = 0x5E1EC7  # the selector's Gumbel noise (importance resampling, weighted sampling)
RANDOM_STREAM = 0x2A2D0A  # the KL baseline: a random pick of the selection's size
PROXY_SAMPLE_STREAM = 0x5A4D91  # the proxy's training sample
EMBED_SAMPLE_STREAM = 0xC1A57  # the samples the SVD and the centroids are fitted on
BOUNDS_STREAM = 0xB0DD5  # reweight: the sample its loss quantiles come from
SENSITIVITY_STREAM = 0x5E25171  # sensitivity sampling's logistic noise
PRESENCE_STREAM = 0x9E5E7CE  # reweight's PRESENCE groups
QUAD_BLOCK_STREAM = 0x0AD0B1  # Quad: a document's block in its cluster
QUAD_PROBE_STREAM = 0x0AD9B0  # Quad: the order within a block (the probes are its first)
PC_SAMPLE_STREAM = 0x9C5A3  # perplexity correlations: each domain's scored sample
PC_CLASSIFIER_STREAM = 0x9CC1A5  # perplexity correlations: the include/exclude classifier's sample


def seeded_bits(id_hash: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """64 random bits for each id, fixed by (seed, stream, id): every seeded draw starts here."""
    key = splitmix64(np.array([(seed * 0x9E3779B1 + stream) & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
    return splitmix64(np.asarray(id_hash, np.uint64) ^ key)


def uniform01(id_hash: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform number in (0, 1) for each id, fixed by (seed, stream, id)."""
    bits = seeded_bits(id_hash, seed, stream) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def gumbel(id_hash: np.ndarray, seed: int, stream: int = SELECT_STREAM) -> np.ndarray:
    """G = −log(−log U): standard Gumbel noise, fixed by (seed, id)."""
    return -np.log(-np.log(uniform01(id_hash, seed, stream)))


def seeded_sample(id_hash: np.ndarray, eligible: np.ndarray, n: int, seed: int, stream: int):
    """(rows, keys): the rows of the eligible documents with the n smallest seeded keys. Merged
    over shards by keeping the n smallest (key, id hash), a sample that no runner or split changes."""
    keys = uniform01(id_hash, seed, stream)
    rows = np.flatnonzero(eligible)
    return rows[np.argsort(keys[rows], kind="stable")[:n]], keys
