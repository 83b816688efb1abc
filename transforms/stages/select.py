"""The selector: the last stage of every chain. It picks the budget (``select.k`` documents, or
``select.fraction`` of those still in the running) by one of the methods of ``selectors/``, and
writes ``selected`` (and, for the KL reduction, which documents a random pick of the same size
would have taken)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton
from beamsift.transforms.chain.sums import SumSummaries
from beamsift.transforms.selectors import balanced, quad, sensitivity
from beamsift.transforms.selectors.core import explain_running
from beamsift.transforms.selectors.cut import METHODS, Cut, CutStage
from beamsift.transforms.stages.base import Context, Stage, setting

SELECT_COLUMNS = (("selected", "bool"), ("_in_random", "bool"))
RANKED = ("top", "bottom", "band", "threshold", "weighted")


@dataclass(frozen=True)
class SelectSettings:
    method: str = setting(
        "importance",
        "importance, top, bottom, band, threshold, weighted, balanced, sensitivity, quad or all",
        choices=(*METHODS, "balanced", "sensitivity", "quad"),
    )
    quota: str = setting(
        "proportional",
        "balanced: split the budget over clusters proportional (to size), uniform, sqrt, or score",
        choices=balanced.QUOTAS,
    )
    quota_column: str | None = setting(
        None, "quota score: the column whose per-cluster mean (>= 0) each cluster's share follows"
    )
    group_column: str | None = setting(
        None, "balanced: the integer column whose values are the groups (e.g. pc_domain); null: cluster"
    )
    column: str | None = setting(None, "the column it ranks by (importance: dsir_log_weight)")
    k: int | None = setting(None, "select exactly k documents", at_least=1)
    fraction: float | None = setting(None, "or this fraction of the eligible documents")
    offset: float = setting(0, "band: skip this many (or this share) of the highest first", at_least=0)
    min: float | None = setting(None, "threshold: keep values >= min")
    max: float | None = setting(None, "threshold: keep values <= max")
    quad_block: int | None = setting(None, "quad: documents a block (null: a twentieth of the budget)", at_least=1)
    quad_clusters: int = setting(50, "quad: clusters probed a round (the top by Cluster Score)", at_least=1)
    quad_probes: int = setting(10, "quad: documents scored to probe a block", at_least=1)
    quad_alpha: float = setting(1e-4, "quad: alpha, the weight of exploration in the Cluster Score", at_least=0)
    quad_delta: float = setting(
        0.2, "quad: a reward is shared with the clusters whose centroids are this near", at_least=0
    )
    quad_offset: float = setting(0.002, "quad: a block's reward is its probes' mean influence less this")
    quad_rounds: int = setting(200, "quad: at most this many rounds", at_least=1)


QUAD_KEYS = ("quad_block", "quad_clusters", "quad_probes", "quad_alpha", "quad_delta", "quad_offset", "quad_rounds")


def _columns(cfg, name):
    extra = {"sensitivity": sensitivity.COLUMNS, "quad": quad.COLUMNS}.get(cfg["select.method"], ())
    return SELECT_COLUMNS + extra


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
    group = cfg["select.group_column"]
    if group is not None and method != "balanced":
        fail("select.group_column", "select.group_column goes with select.method 'balanced'")
    if group is not None and group not in available:
        what = f"select.group_column {group!r} is not a column of an earlier stage"
        fail("select.group_column", f"{what}: one of {available}")
    if (method == "sensitivity" or (method == "balanced" and group is None)) and "cluster" not in kinds:
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
    if method != "quad":
        for key in QUAD_KEYS:
            if f"select.{key}" in cfg.given:
                fail(f"select.{key}", f"select.{key} goes with select.method 'quad'")
    else:
        _check_quad(cfg, kinds, fail)


def _check_quad(cfg, kinds, fail) -> None:
    if "cluster" not in kinds:
        fail("select.method", "select.method 'quad' needs a cluster stage before the selector (its arms)")
    if "proxy" not in kinds:
        fail("select.method", "select.method 'quad' needs a proxy stage before the selector (the model it probes with)")
    if cfg["input.label_field"] is not None:
        fail("input.label_field", "select.method 'quad' probes with a causal LM proxy: remove input.label_field")
    if cfg["target.path"] is None:
        fail("target.path", "select.method 'quad' rewards influence on the target: set 'target.path'")
    if cfg["select.quad_delta"] <= 0:
        fail("select.quad_delta", "select.quad_delta must be > 0 (0 shares no reward, as a tiny value would not)")


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
            name,
            ctx.chain,
            column,
            k,
            fraction,
            rule,
            quota_column,
            ctx.seed,
            ctx.progress_dir,
            *explain,
            group=cfg["select.group_column"] or "cluster",
        )
    elif method == "sensitivity":
        selector = sensitivity.SensitivitySampling(name, ctx.chain, k, fraction, ctx.seed, ctx.progress_dir, *explain)
    elif method == "quad":
        return _build_quad(ctx, name, shards, explain)
    else:
        selector = CutStage(
            name,
            select_cut(cfg),
            "select",
            ctx.chain,
            ctx.seed,
            ctx.progress_dir,
            *explain,
            random_baseline=ctx.selection_buckets is not None,
        )
    return shards | "Stage_" + name >> selector


def _build_quad(ctx: Context, name: str, shards, explain):
    from beamsift.transforms.stages import stage_kind
    from beamsift.transforms.stages.cluster import CENTROIDS_FILE
    from beamsift.transforms.stages.proxy import ProbeInfluence, settings_of

    cfg = ctx.cfg
    stages = cfg["stages"]
    proxy_stage = [s for s in stages if stage_kind(s) == "proxy"][-1]
    cluster_stage = [s for s in stages if stage_kind(s) == "cluster"][-1]
    models = ctx.given("proxy.model") or FileSystems.join(ctx.artifacts, proxy_stage)
    centroids = ctx.given("cluster.model") or FileSystems.join(ctx.artifacts, cluster_stage, CENTROIDS_FILE)
    influence = ProbeInfluence(proxy_stage, ctx.chain, settings_of(cfg, model=models), models)
    params = quad.QuadParams(
        per_round=cfg["select.quad_clusters"],
        probes=cfg["select.quad_probes"],
        alpha=float(cfg["select.quad_alpha"]),
        delta=float(cfg["select.quad_delta"]),
        offset=float(cfg["select.quad_offset"]),
        rounds=cfg["select.quad_rounds"],
    )
    selector = quad.QuadSelection(
        name, ctx.chain, cfg["select.k"], cfg["select.fraction"], cfg["select.quad_block"], params, influence,
        centroids, ctx.seed, ctx.progress_dir, *explain, target=ctx.target_texts(),
    )  # fmt: skip
    result = shards | "Stage_" + name >> selector
    ctx.cluster_extra = AsSingleton(selector.bandit | "QuadClusters" >> beam.Map(lambda r: r["clusters"]))
    ctx.summaries.append(selector.bandit | "QuadSummary" >> beam.Map(lambda r: {"quad": r["summary"]}))
    return result


def _explain(min_tokens, total, rejects, prior: dict) -> str:
    return explain_running(total, rejects, prior, min_tokens)


STAGE = Stage(
    kind="select",
    summary="pick the budget: importance resampling, top/bottom/band/threshold, weighted, balanced, sensitivity, quad",
    settings=SelectSettings,
    columns=_columns,
    all_columns=("selected", *(c for c, _ in sensitivity.COLUMNS), *(c for c, _ in quad.COLUMNS)),
    needs_target=lambda cfg: cfg["select.method"] == "quad",
    check=_check,
    build=_build,
)
