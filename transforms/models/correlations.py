"""Perplexity correlations (Thrush, Potts, Hashimoto, "Improving Pretraining Data Using Perplexity
Correlations", arXiv:2409.05816): which domains' losses, across many existing LMs, go with those
LMs' benchmark performance, and how much of each domain to take.

X is N × D: bits per byte of N models on D domains; y holds the N models' benchmark **errors**
(lower is better). A domain where the models with lower loss are the models with lower error has
a high estimate. Only the estimates' ranks are to be trusted (the paper's model is y = f(⟨w, X⟩ + e)
with f monotone and unknown), so both estimators are rank statistics:

- ``spearmanr``: per domain, Spearman's correlation of its column of X with y;
- ``sign_cdf``: (2 / (N(N−1))) Σ_{i<j} sign(y_j − y_i) (F(x_j) − F(x_i)), F the column's empirical
  CDF (rank / N).

The ``linear`` projection turns estimates into sampling weights p: maximise ⟨estimate, p⟩ with
Σ p = 1 and 0 ≤ p_d ≤ τ_d: sort the domains by estimate, give each its cap until the total reaches
1, the boundary domain the remainder. τ_d = (tokens_d / Σ tokens) / desired_fraction: the most of a
domain that can be taken without repeating any of its text when the selection keeps
``desired_fraction`` of the pool's tokens.

The same formulas as the paper's package (``perplexity-correlations``, which pins numpy 1.26.4: it
is a reference, not a dependency).
"""

from __future__ import annotations

import numpy as np

ESTIMATORS = ("spearmanr", "sign_cdf")


def _check(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != len(y):
        raise ValueError(f"X must be models × domains and y one error per model; got {X.shape} and {y.shape}")
    if len(y) < 2:
        raise ValueError("perplexity correlations need at least 2 models")
    return X, y


def spearmanr(X, y) -> np.ndarray:
    """Spearman's ρ of each column of X with y (average ranks for ties; 0 for a constant column)."""
    X, y = _check(X, y)
    from scipy.stats import rankdata  # here: scipy.stats costs 0.5 s to import, every CLI run

    rx = rankdata(X, axis=0)
    ry = rankdata(y)
    rx = rx - rx.mean(axis=0)
    ry = ry - ry.mean()
    denom = np.sqrt((rx * rx).sum(axis=0) * (ry * ry).sum())
    return np.divide((rx * ry[:, None]).sum(axis=0), denom, out=np.zeros(X.shape[1]), where=denom > 0)


def sign_cdf(X, y) -> np.ndarray:
    """(2 / (N(N−1))) Σ_{i<j} sign(y_j − y_i) (F(x_j) − F(x_i)) per column, F = rank / N."""
    X, y = _check(X, y)
    n = len(y)
    from scipy.stats import rankdata

    F = rankdata(X, axis=0, method="max") / n  # the empirical CDF at each value
    i, j = np.triu_indices(n, k=1)
    s = np.sign(y[j] - y[i])
    return 2.0 / (n * (n - 1)) * (s[:, None] * (F[j] - F[i])).sum(axis=0)


def estimate(X, y, estimator: str = "spearmanr") -> np.ndarray:
    if estimator == "spearmanr":
        return spearmanr(X, y)
    if estimator == "sign_cdf":
        return sign_cdf(X, y)
    raise ValueError(f"unknown estimator {estimator!r}; one of {ESTIMATORS}")


def caps(tokens, desired_fraction: float) -> np.ndarray:
    """τ_d = (tokens_d / Σ tokens) / desired_fraction: a domain's weight that takes all of it."""
    tokens = np.asarray(tokens, np.float64)
    if not 0 < desired_fraction <= 1:
        raise ValueError(f"desired_fraction must be in (0, 1], got {desired_fraction}")
    return tokens / tokens.sum() / desired_fraction


def linear_projection(estimates, tau) -> np.ndarray:
    """p maximising ⟨estimates, p⟩ with Σp = 1, 0 ≤ p ≤ τ: the highest estimates get their caps
    until the total reaches 1, the boundary domain the rest (ties: the lower index first)."""
    estimates, tau = np.asarray(estimates, np.float64), np.asarray(tau, np.float64)
    p = np.zeros(len(estimates))
    left = 1.0
    for d in np.lexsort((np.arange(len(estimates)), -estimates)):
        if left <= 0:
            break
        p[d] = min(tau[d], left)
        left -= p[d]
    return p
