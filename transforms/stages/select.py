"""The selector: the last stage of every chain. It picks the budget (``select.k`` documents, or
``select.fraction`` of those still in the running) by one of the methods of ``selectors/``, and
writes ``selected`` (and, for the KL reduction, which documents a random pick of the same size
would have taken)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.pvalue import AsSingleton
from beamsift.transforms.io.write import SumSummaries
from beamsift.transforms.selectors import balanced, sensitivity
from beamsift.transforms.selectors.core import explain_running
from beamsift.transforms.selectors.cut import METHODS, Cut, CutStage
from beamsift.transforms.stages.base import Context, Stage, setting

SELECT_COLUMNS = (("selected", "bool"), ("_in_random", "bool"))
RANKED = ("top", "bottom", "band", "threshold", "weighted")


@dataclass(frozen=True)
class SelectSettings:
    method: str = setting(
        "importance",
        "importance, top, bottom, band, threshold, weighted, balanced, sensitivity or all",
        choices=(*METHODS, "balanced", "sensitivity"),
    )
    quota: str = setting(
        "proportional",
        "balanced: split the budget over clusters proportional (to size), uniform, sqrt, or score",
        choices=balanced.QUOTAS,
    )
    quota_column: str | None = setting(
        None, "quota score: the column whose per-cluster mean (>= 0) each cluster's share follows"
    )
    column: str | None = setting(None, "the column it ranks by (importance: dsir_log_weight)")
    k: int | None = setting(None, "select exactly k documents", at_least=1)
    fraction: float | None = setting(None, "or this fraction of the eligible documents")
    offset: float = setting(0, "band: skip this many (or this share) of the highest first", at_least=0)
    min: float | None = setting(None, "threshold: keep values >= min")
    max: float | None = setting(None, "threshold: keep values <= max")


def _columns(cfg, name):
    return SELECT_COLUMNS + (sensitivity.COLUMNS if cfg["select.method"] == "sensitivity" else ())


def select_cut(cfg) -> Cut:
    method, column = cfg["select.method"], cfg["select.column"]
    key_column = None
    if method == "importance" and column in (None, "dsir_log_weight"):
        # DSIR's own importance resampling: its key holds the (length-normalised) log weight plus
        # the seeded Gumbel noise.
        column, key_column = "dsir_log_weight", "dsir_key"
    return Cut(
        column or "",
        method,
        k=cfg["select.k"],
        fraction=cfg["select.fraction"],
        offset=cfg["select.offset"],
        low=cfg["select.min"],
        high=cfg["select.max"],
        key_column=key_column,
    )


def _check(cfg, name, available, fail) -> None:
    from beamsift.transforms.stages import stage_kind  # the registry, which lists this module

    stages = cfg["stages"]
    kinds = [stage_kind(s) for s in stages]
    method, column = cfg["select.method"], cfg["select.column"]
    k, fraction = cfg["select.k"], cfg["select.fraction"]
    if k is None and fraction is None and method not in ("threshold", "all"):
        fail("select.k", "set one of 'select.k' and 'select.fraction'")
    if k is not None and fraction is not None:
        fail(
            ("select.k", "select.fraction"),
            "set only one of 'select.k' and 'select.fraction' (the other can be cleared with "
            "--set select.k=null or --set select.fraction=null)",
        )
    if fraction is not None and not 0 < fraction <= 1:
        fail("select.fraction", f"config key 'select.fraction' must be in (0, 1], got {fraction}")
    if method == "importance" and column is None and "dsir" not in stages:
        fail("select.column", "select.method 'importance' needs select.column (a log weight) without a dsir stage")
    if method in RANKED and column is None:
        fail("select.column", f"select.method {method!r} needs select.column: one of {available}")
    if column is not None and column not in available:
        fail("select.column", f"select.column {column!r} is not a column of an earlier stage: one of {available}")
    if method in ("balanced", "sensitivity") and "cluster" not in kinds:
        fail("select.method", f"select.method {method!r} needs a cluster stage before the selector")
    if method == "sensitivity" and "reweight" in kinds:
        fail(
            "select.method",
            "select.method 'sensitivity' writes a weight column, and so does the reweight stage: drop one",
        )
    quota_column = cfg["select.quota_column"]
    if quota_column is not None and not (method == "balanced" and cfg["select.quota"] == "score"):
        fail("select.quota_column", "select.quota_column goes with select.method 'balanced' and select.quota 'score'")
    if method == "balanced" and cfg["select.quota"] == "score" and quota_column is None:
        fail("select.quota_column", f"select.quota 'score' needs select.quota_column: one of {available}")
    if quota_column is not None and quota_column not in available:
        fail(
            "select.quota_column",
            f"select.quota_column {quota_column!r} is not a column of an earlier stage: one of {available}",
        )
    if method == "threshold" and cfg["select.min"] is None and cfg["select.max"] is None:
        fail("select.min", "select.method 'threshold' needs select.min and/or select.max")


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    method = cfg["select.method"]
    # Why the running is as small as it is, should the budget not fit: what was rejected while
    # reading and the earlier stages' summaries, summed (one value, not a list per shard).
    prior = AsSingleton(
        (ctx.stage_summaries or [ctx.p | "NoPriorStages" >> beam.Create([{}])])
        | "PriorSummaries" >> beam.Flatten()
        | "SumPriorSummaries" >> beam.CombineGlobally(SumSummaries())
    )
    min_tokens = cfg["dsir.min_tokens"] if "dsir" in ctx.kinds() else None
    explain = functools.partial(_explain, min_tokens), (ctx.reject_reasons(), prior)
    k, fraction = cfg["select.k"], cfg["select.fraction"]
    if method == "balanced":
        column, rule, quota_column = cfg["select.column"], cfg["select.quota"], cfg["select.quota_column"]
        selector = balanced.BalancedSelection(
            name, ctx.chain, column, k, fraction, rule, quota_column, ctx.seed, ctx.progress_dir, *explain
        )
    elif method == "sensitivity":
        selector = sensitivity.SensitivitySampling(name, ctx.chain, k, fraction, ctx.seed, ctx.progress_dir, *explain)
    else:
        selector = CutStage(name, select_cut(cfg), "select", ctx.chain, ctx.seed, ctx.progress_dir, *explain)
    return shards | "Stage_" + name >> selector


def _explain(min_tokens, total, rejects, prior: dict) -> str:
    return explain_running(total, rejects, prior, min_tokens)


STAGE = Stage(
    kind="select",
    summary="pick the budget: importance resampling, top/bottom/band/threshold, weighted, balanced, sensitivity",
    settings=SelectSettings,
    columns=_columns,
    all_columns=("selected", *(c for c, _ in sensitivity.COLUMNS)),
    check=_check,
    build=_build,
)
