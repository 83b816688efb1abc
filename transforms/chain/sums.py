"""Order-independent sums: what every stage's global values are made of.

A runner combines per-shard parts in any grouping and order. ``Sum`` adds parts of any shape
(numbers, numpy arrays, tuples element by element, dicts key by key, nested); ``fixed_point_sum``
turns floats into integers first, where the result must not depend on that order even in the
last bit (a float sum does: (a + b) + c and a + (b + c) can differ), as every quantity that
decides which documents are selected must.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apache_beam as beam
import numpy as np


def fixed_point_sum(values: np.ndarray, scale: float) -> int:
    """Σ values as an integer in units of 1/scale: a sum that no split of the input or order of
    the partial sums changes (floats added in another order differ in the last bits)."""
    return int(np.round(np.asarray(values, np.float64) * scale).astype(np.int64).sum())


def add(a: Any, b: Any) -> Any:
    """a + b for parts of the same shape; None is nothing. Never changes its arguments."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        out = dict(a)
        for key, value in b.items():
            out[key] = add(out.get(key), value)
        return out
    if isinstance(a, tuple):
        return tuple(add(x, y) for x, y in zip(a, b))
    return a + b


class Sum(beam.CombineFn):
    """The sum of the parts, from ``start`` (None: the first part; also the result of no parts),
    then ``finish`` applied to it, if given."""

    def __init__(self, start: Any = None, finish: Callable | None = None):
        self.start = start
        self.finish = finish

    def create_accumulator(self):
        return self.start

    def add_input(self, acc, part):
        return add(acc, part)

    def merge_accumulators(self, accs):
        out = self.start
        for acc in accs:
            out = add(out, acc)
        return out

    def extract_output(self, acc):
        return self.finish(acc) if self.finish is not None else acc


class SumSummaries(Sum):
    """Add up summary dicts: numbers and count vectors are summed, nested dicts key by key; the
    result always has ``counts``."""

    def __init__(self):
        super().__init__(start={"counts": {}})
