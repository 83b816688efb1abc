"""λ of sensitivity sampling without gathering the k largest probabilities.

π(e) = min(1, λ·p(e)) with Σ π = k: sorted by p (largest first), document m is taken for sure
while h(m) = (k − m)·p_m − R_m ≥ 0 (R_m: the sum of p_m and all smaller ones, 1 − S_m), and
λ = (k − M) / R_M at the first M where it is not. h never grows along the order (h(m+1) − h(m) =
(k − m − 1)(p_{m+1} − p_m) ≤ 0), so the documents taken for sure are a prefix and the boundary is
found as a quantile is (``ExactRanks`` does the same for ranks):

1. a histogram of p in log-spaced bins (16 an octave): per bin the count, the sum (fixed point:
   the same for any split and order), the largest and the smallest p. From the top, a bin whose
   first document fails h is the boundary (λ from the bins above); a bin whose last one passes is
   all certain; the bin in between holds the boundary;
2. the same in 4,096 linear sub-bins of that bin;
3. the (value, count) pairs of the one sub-bin that holds the boundary, where the loop finishes.

What is held anywhere: two histograms (a few thousand numbers) and the distinct values of one
sub-bin. ``inclusion_scale`` (all k largest in one place) stays the reference: the tests compare.
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np

P_FIXED = float(1 << 62)  # Σ p = 1: sums of p·2^62 as integers fit in int64, the same in any order
BINS_PER_OCTAVE = 16
LOG_BINS = 64 * BINS_PER_OCTAVE + 1  # p below 2^-64 shares the last
SUB_BINS = 4096


def log_bins(p: np.ndarray) -> np.ndarray:
    """The log bin of each p in (0, 1]: 0 holds the largest."""
    with np.errstate(divide="ignore"):
        b = np.floor(-np.log2(p) * BINS_PER_OCTAVE)
    return np.clip(np.nan_to_num(b, nan=LOG_BINS - 1, posinf=LOG_BINS - 1), 0, LOG_BINS - 1).astype(np.int64)


def sub_bins(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The linear sub-bin of each p in [lo, hi]: 0 holds the largest."""
    if hi <= lo:
        return np.zeros(len(p), np.int64)
    b = np.floor((hi - p) / (hi - lo) * SUB_BINS)
    return np.clip(b, 0, SUB_BINS - 1).astype(np.int64)


def histogram(bins: np.ndarray, p: np.ndarray, size: int) -> tuple:
    """(count, fixed-point sum, largest, smallest) per bin."""
    count = np.bincount(bins, minlength=size).astype(np.int64)
    total = np.zeros(size, np.int64)
    np.add.at(total, bins, np.round(p * P_FIXED).astype(np.int64))
    largest = np.zeros(size)
    np.maximum.at(largest, bins, p)
    smallest = np.full(size, np.inf)
    np.minimum.at(smallest, bins, p)
    return count, total, largest, smallest


class MergeHistograms(beam.CombineFn):
    def create_accumulator(self):
        return None

    def add_input(self, acc, h):
        if acc is None:
            return h
        return acc[0] + h[0], acc[1] + h[1], np.maximum(acc[2], h[2]), np.minimum(acc[3], h[3])

    def merge_accumulators(self, accs):
        out = None
        for acc in accs:
            if acc is not None:
                out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


def _certain(k: int, m: int, p: float, rest: float) -> bool:
    """h(m) ≥ 0, with 1 − S_m as ``rest``: the sum of the p not yet taken (measured, not 1 − a sum
    close to 1, which would lose the digits that matter when k is close to n)."""
    return (k - m) * p - rest >= 0


def lam_at(k: int, m: int, rest_fixed: int) -> float:
    return math.inf if m >= k or rest_fixed <= 0 else (k - m) / (rest_fixed / P_FIXED)


def scan(hist: tuple, k: int, m: int, rest_fixed: int) -> tuple:
    """Walk the bins from the top, starting with ``m`` documents certain and ``rest_fixed`` the
    fixed-point sum of the others: ("lambda", λ) where the boundary is at a bin's start, or
    ("inside", bin, m, rest_fixed) for the bin that holds it."""
    count, total, largest, smallest = hist
    for b in np.flatnonzero(count).tolist():
        if m >= k or rest_fixed <= 0:
            return "lambda", math.inf
        if not _certain(k, m, largest[b], rest_fixed / P_FIXED):  # its first document is not
            return "lambda", lam_at(k, m, rest_fixed)
        last_m = m + int(count[b]) - 1
        last_rest = (rest_fixed - int(total[b])) / P_FIXED + smallest[b]
        if last_m < k and _certain(k, last_m, smallest[b], last_rest):  # all of it certain
            m, rest_fixed = m + int(count[b]), rest_fixed - int(total[b])
            continue
        return "inside", b, m, rest_fixed
    return "lambda", lam_at(k, m, rest_fixed)


def finish(values: np.ndarray, counts: np.ndarray, k: int, m: int, rest_fixed: int) -> tuple[float | None, int, int]:
    """The loop over the boundary sub-bin's distinct values (largest first) with their counts:
    (λ, ...) where it stops inside, else (None, m, rest_fixed) after it."""
    order = np.argsort(-values, kind="stable")
    for v, c in zip(values[order].tolist(), counts[order].tolist()):
        if m >= k or rest_fixed <= 0:
            return math.inf, m, rest_fixed
        if not _certain(k, m, v, rest_fixed / P_FIXED):  # ties pass or fail together: h is constant over them
            return lam_at(k, m, rest_fixed), m, rest_fixed
        m, rest_fixed = m + int(c), rest_fixed - int(c) * int(round(v * P_FIXED))
    return None, m, rest_fixed


def scale_in_passes(parts: list[np.ndarray], k: int, n: int) -> float:
    """λ from parts of the p values (the shards'), in the passes the selector makes: the reference
    for the tests, and the algorithm in one place."""
    merge = MergeHistograms()
    parts = [np.asarray(p, np.float64) for p in parts if len(p)]
    if not parts or k >= n:
        return math.inf
    hist = merge.merge_accumulators([histogram(log_bins(p), p, LOG_BINS) for p in parts])
    found = scan(hist, k, 0, int(hist[1].sum()))
    if found[0] == "lambda":
        return found[1]
    _, b, m, rest_fixed = found
    in_bin = [p[log_bins(p) == b] for p in parts]
    lo, hi = hist[3][b], hist[2][b]
    sub = merge.merge_accumulators([histogram(sub_bins(p, lo, hi), p, SUB_BINS) for p in in_bin if len(p)])
    found = scan(sub, k, m, rest_fixed)
    if found[0] == "lambda":
        return found[1]
    _, sb, m, rest_fixed = found
    values = np.concatenate([p[sub_bins(p, lo, hi) == sb] for p in in_bin])
    v, c = np.unique(values, return_counts=True)
    lam, m, rest_fixed = finish(v, c, k, m, rest_fixed)
    return lam_at(k, m, rest_fixed) if lam is None else lam
