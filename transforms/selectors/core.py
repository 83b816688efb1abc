"""What the selectors share: one budget rule, the ranking machinery, the random baseline.

Every selector (the ranked cut, cluster-balanced, sensitivity) keeps ``select.k`` documents, or
``select.fraction`` of those in the running, and fails the same way, with the same words, when
that cannot be done (``Budget``). None gathers the pool, or its best k, to rank it: the pairs
at the cut ranks (``exact_rank.ExactRanks``) decide every document (``at_or_above``); ties in a
key are broken by the id hash. Each also draws the KL reduction's baseline: a seeded random pick
of the same size from every valid document (``random_keys``, ``in_random``).
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain import DUPLICATE, running_total
from beamsift.transforms.chain.seeded import RANDOM_STREAM, gumbel
from beamsift.transforms.io.read import describe_rejects


class SelectionError(ValueError):
    """The selection asked for cannot be made (e.g. k larger than the documents in the running)."""


def top_k_order(keys: np.ndarray, hashes: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best items, best first: larger key first, then smaller id hash."""
    if len(keys) > k:
        # argpartition on the key alone could cut inside a run of ties; take everything tied
        # with the k-th key, then order exactly.
        kth = np.partition(keys, len(keys) - k)[len(keys) - k]
        idx = np.flatnonzero(keys >= kth)
    else:
        idx = np.arange(len(keys))
    order = np.lexsort((hashes[idx], -keys[idx]))
    return idx[order[:k]]


def at_or_above(keys: np.ndarray, hashes: np.ndarray, threshold: tuple[float, int] | None) -> np.ndarray:
    if threshold is None:
        return np.zeros(len(keys), dtype=bool)
    key, h = threshold
    return (keys > key) | ((keys == key) & (hashes <= np.uint64(h)))


def ranks(k: int | None, fraction: float | None, offset: float, running: int) -> tuple[int, int]:
    """(skip, keep) as counts, given how many documents are in the running: keep ``k``, or
    ``fraction`` of the running (rounded half up), or all; skip ``offset`` (below 1: a share)."""
    skip = int(math.floor(offset * running + 0.5)) if 0 < offset < 1 else int(offset)
    if k is not None:
        keep = k
    elif fraction is not None:
        keep = int(math.floor(fraction * running + 0.5))
    else:
        keep = running
    return skip, keep


def check_budget(k, fraction, running_total: int, offset: float = 0, explain=None) -> tuple[int, int]:
    """(skip, keep), or a SelectionError that says why the budget cannot be met (``explain()``:
    why the running is as small as it is) and what to change."""
    skip, keep = ranks(k, fraction, offset, running_total)
    too_many = k is not None and skip + keep > running_total
    too_few = fraction is not None and keep < 1
    why = explain() if (too_many or too_few) and explain is not None else ""
    if too_many:
        after = f" after skipping the top {skip}" if skip else ""
        raise SelectionError(
            f"select.k={k} is larger than the {max(running_total - skip, 0)} eligible documents{after}{why} "
            "(lower select.k)"
        )
    if too_few:
        raise SelectionError(
            f"select.fraction={fraction} of {running_total} eligible documents rounds to none{why} "
            f"(raise select.fraction to at least {1 / max(running_total, 1):.2g}, or set select.k)"
        )
    return skip, keep


class Budget(beam.PTransform):
    """Shards -> one element, (documents in the running, skip, keep): the budget every selector
    takes. ``check``: fail as ``check_budget`` does (a selector; a filter's share may keep none).
    ``explain(total, *context)``: why the running is that small, from side inputs ``context``."""

    def __init__(self, k, fraction, offset: float = 0, check: bool = True, explain=None, context=()):
        super().__init__()
        self.k, self.fraction, self.offset, self.check = k, fraction, offset, check
        self.explain, self.context = explain, context

    def expand(self, shards):
        return running_total(shards, "Count") | "Budget" >> beam.Map(self._budget, *self.context)

    def _budget(self, total: int, *context) -> tuple[int, int, int]:
        if not self.check:
            return (total, *ranks(self.k, self.fraction, self.offset, total))
        explain = (lambda: self.explain(total, *context)) if self.explain is not None else None
        return (total, *check_budget(self.k, self.fraction, total, self.offset, explain))


def valid_mask(reasons: np.ndarray) -> np.ndarray:
    """The documents the KL baseline draws from: every valid one (repeats of an id are not)."""
    return np.not_equal(np.asarray(reasons, dtype=object), DUPLICATE)


def random_keys(id_hash: np.ndarray, seed: int) -> np.ndarray:
    """The KL baseline's keys: its pick of size k is the k largest (a seeded random pick)."""
    return gumbel(id_hash, seed, RANDOM_STREAM)


def in_random(reasons: np.ndarray, id_hash: np.ndarray, seed: int, threshold) -> np.ndarray:
    """Which documents of a shard are in the KL baseline's random pick (``threshold``: its cut;
    None: no pick)."""
    if threshold is None:
        return np.zeros(len(reasons), bool)
    return valid_mask(reasons) & at_or_above(random_keys(id_hash, seed), id_hash, threshold)


def explain_running(total: int, rejects: dict, prior: dict, min_tokens: int | None = None) -> str:
    """Why only ``total`` documents are left for the selector: what was rejected while reading,
    and what each earlier stage took out."""
    stages = prior.get("stages", {})
    first = next(iter(stages.values()), None)
    valid = first["in"] if first else total
    parts = [describe_rejects(rejects, "pool", valid)]
    for counts in stages.values():
        for reason, n in counts.items():
            if reason in ("in", "out", "notes"):
                continue
            if reason == "too short" and min_tokens is not None:
                parts.append(
                    f"{n:,} valid documents have fewer than dsir.min_tokens={min_tokens} tokens (lower it to keep them)"
                )
            else:
                parts.append(f"{n:,} were taken out as {reason!r}")
    return ": " + "; ".join(parts)
