"""Loss-based sample reweighting (Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved
Large Language Model Pretraining", ICLR 2025, arXiv:2502.06733).

Each document's loss l (from an earlier stage: ``proxy`` or ``excess_loss``) is normalised into
[−δ, δ] with bounds taken over the corpus, h = 2δ(l − l_lo)/(l_hi − l_lo) − δ, clipped; a
strategy f maps it to a preference:

    LinUpper  f(h) = min(h + δ, δ)       (the paper's best: down-weight the low-loss, learned ones)
    Upper     f(h) = h/2 + δ/2
    Mid       f(h) = 1 − h²/δ²
    Extremes  f(h) = |h|

and the weights are w = softmax(f(h)/r) over the corpus, r a temperature (the paper's kl_reg),
written times the number of documents so that they average 1: what a trainer's weighted sampler
takes, and what ``select.method: weighted`` resamples by. The paper's group is a training
batch, with its min and max; over a corpus the bounds are robust quantiles (``reweight.bounds``,
default the 1st and 99th percentiles), estimated on a seeded sample of the losses.

``strategy: presence`` weighs by self-influence instead, within seeded groups (PRESENCE,
Thakkar et al. 2023; ``presence.py``): there ``temperature`` is the paper's τ, a factor, not a
divisor, and its sign chooses the phase.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.sampling import SampleRunning
from beamsift.transforms.chain.seeded import BOUNDS_STREAM
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting
from beamsift.transforms.stages.presence import ReweightBySelfInfluence

LOSS_STRATEGIES = ("linupper", "upper", "mid", "extremes")
STRATEGIES = LOSS_STRATEGIES + ("presence",)
COLUMNS = (("weight", "double"),)
BOUNDS_SAMPLE = 20000


def preference(losses: np.ndarray, low: float, high: float, strategy: str, delta: float = 1.0) -> np.ndarray:
    """f(h) for each loss, h the loss normalised into [−δ, δ] by the bounds (and clipped)."""
    span = high - low
    h = np.zeros_like(losses) if span <= 0 else 2 * delta * (losses - low) / span - delta
    h = np.clip(h, -delta, delta)
    if strategy == "linupper":
        return np.minimum(h + delta, delta)
    if strategy == "upper":
        return h / 2 + delta / 2
    if strategy == "mid":
        return 1 - h**2 / delta**2
    if strategy == "extremes":
        return np.abs(h)
    raise ValueError(f"unknown loss reweighting strategy {strategy!r}; one of {LOSS_STRATEGIES}")


def softmax_weights(f: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(f / r) times the number of items: weights that average 1 (all at once, for tests;
    the stage computes the same with the normaliser summed over the shards)."""
    z = f / temperature
    e = np.exp(z - z.max())
    return e / e.sum() * len(f)


def _has_value(chain, shard, running, column: str) -> np.ndarray:
    return ~np.isnan(chain.column(column, shard.name))


def _values(chain, shard, rows, column: str) -> list:
    return chain.column(column, shard.name)[rows].tolist()


class _Preferences(beam.DoFn):
    """A shard -> Σ exp(f/r − c) over its documents in the running (c: a fixed shift for range)."""

    def __init__(self, stage, chain, column, params):
        self.stage, self.chain, self.column, self.params = stage, chain, column, params

    def process(self, item, bounds):
        shard, running = self.chain.running(self.stage, item)
        values = self.chain.column(self.column, shard.name)
        ok = running & ~np.isnan(values)
        f = preference(values[ok], *bounds, self.params["strategy"])
        yield (float(np.exp(f / self.params["temperature"] - self.params["shift"]).sum()), int(ok.sum()))


class WriteWeights(ShardStageFn):
    def __init__(self, name, chain, column, params, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.column, self.params = column, params

    def score(self, shard, reasons, bounds, normaliser):
        total, count = normaliser
        values = self.chain.column(self.column, shard.name)
        ok = running_mask(reasons) & ~np.isnan(values)
        weight = np.full(len(reasons), np.nan)
        f = preference(values[ok], *bounds, self.params["strategy"])
        weight[ok] = np.exp(f / self.params["temperature"] - self.params["shift"]) / total * count
        return {"weight": weight}, reasons


class ReweightByLoss(beam.PTransform):
    """The reweight stage: bounds from a sample, the softmax's normaliser over all shards, weights."""

    def __init__(self, name, chain, column, strategy, temperature, bounds, seed, progress_dir=None):
        super().__init__()
        self.name, self.chain, self.column, self.seed = name, chain, column, seed
        self.progress_dir, self.quantiles = progress_dir, bounds
        # exp(f/r) with f ≤ δ = 1: shifting by 1/r keeps every term ≤ 1 (no overflow at small r).
        self.params = {"strategy": strategy, "temperature": temperature, "shift": 1.0 / temperature}

    def expand(self, shards):
        q_lo, q_hi = self.quantiles
        bounds = beam.pvalue.AsSingleton(
            shards
            | "SampleLosses"
            >> SampleRunning(
                self.name,
                self.chain,
                BOUNDS_SAMPLE,
                self.seed,
                BOUNDS_STREAM,
                functools.partial(_values, column=self.column),
                functools.partial(_has_value, column=self.column),
            )
            | "Bounds" >> beam.Map(lambda s: _bounds([v for _, _, v in s], q_lo, q_hi))
        )
        normaliser = beam.pvalue.AsSingleton(
            shards
            | "Preferences" >> beam.ParDo(_Preferences(self.name, self.chain, self.column, self.params), bounds)
            | "Normaliser" >> beam.CombineGlobally(Sum(start=(0.0, 0), finish=_normaliser))
        )
        fn = WriteWeights(self.name, self.chain, self.column, self.params, self.progress_dir)
        return shards | "Weigh" >> ApplyStage(fn, bounds=bounds, normaliser=normaliser)


def _bounds(values: list[float], q_lo: float, q_hi: float) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    lo, hi = np.quantile(np.asarray(values), [q_lo, q_hi])
    return float(lo), float(hi)


def _normaliser(total: tuple) -> tuple:
    """(Σ exp(f/r − c), documents); an empty running has no normaliser (every weight 0)."""
    return total if total[0] > 0 else (math.inf, 0)


# ---- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReweightSettings:
    column: str | None = setting(
        None, "the column weighed: null = loss (an earlier proxy or excess_loss), self_influence for presence"
    )
    strategy: str = setting(
        "linupper", "linupper (the paper's best), upper, mid, extremes; presence (self-influence)", choices=STRATEGIES
    )
    temperature: float = setting(
        1.0, "loss strategies: r in softmax(f(h) / r), > 0; presence: tau in softmax(tau * s), sign = phase"
    )
    bounds: list = setting([0.01, 0.99], "the loss quantiles that map to -1 and +1")
    group_size: int = setting(64, "presence: documents per seeded group (the paper's microbatch)", at_least=2)


def weighed_column(cfg) -> str:
    if cfg["reweight.column"] is not None:
        return cfg["reweight.column"]
    return "self_influence" if cfg["reweight.strategy"] == "presence" else "loss"


def _check(cfg, name, available, fail) -> None:
    column = weighed_column(cfg)
    presence = cfg["reweight.strategy"] == "presence"
    if column not in available:
        before = "a proxy with self_influence: true" if presence else "a proxy or excess_loss stage"
        fail(
            "reweight.column",
            f"reweight.column {column!r} is not a column of an earlier stage: one of {available} "
            f"(put {before} before it)",
        )
    temperature = cfg["reweight.temperature"]
    if presence and (temperature == 0 or not math.isfinite(temperature)):
        fail("reweight.temperature", f"reweight.temperature is PRESENCE's tau: finite and not 0, got {temperature}")
    if not presence and not temperature > 0:
        fail("reweight.temperature", f"'reweight.temperature' must be > 0, got {temperature}")
    if not presence and "reweight.group_size" in cfg.given:
        fail("reweight.group_size", "reweight.group_size is for strategy: presence (loss strategies weigh the corpus)")
    bounds = cfg["reweight.bounds"]
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or not 0 <= bounds[0] < bounds[1] <= 1:
        fail("reweight.bounds", f"'reweight.bounds' must be two quantiles [low, high] in [0, 1], got {bounds}")


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    if cfg["reweight.strategy"] == "presence":
        stage = ReweightBySelfInfluence(
            name,
            ctx.chain,
            weighed_column(cfg),
            float(cfg["reweight.temperature"]),
            int(cfg["reweight.group_size"]),
            ctx.seed,
            ctx.progress_dir,
        )
    else:
        stage = ReweightByLoss(
            name,
            ctx.chain,
            weighed_column(cfg),
            cfg["reweight.strategy"],
            float(cfg["reweight.temperature"]),
            tuple(cfg["reweight.bounds"]),
            ctx.seed,
            ctx.progress_dir,
        )
    return shards | "Stage_" + name >> stage


STAGE = Stage(
    kind="reweight",
    summary="sample weights for weighted training: by loss (Sow et al. 2025) or self-influence (PRESENCE)",
    settings=ReweightSettings,
    columns=fixed_columns(*COLUMNS),
    all_columns=tuple(c for c, _ in COLUMNS),
    check=_check,
    build=_build,
)
