"""The filter stage: keep part of the documents still in the running by one score column (a
share from the top, from the bottom, a band, or a range); the rest leave with a reason that names
the rule ("filtered: dsir_log_weight_per_ngram below the 60th percentile"). Named ``filter``, or
``filter_<label>`` for another one, each configured by the section of its name."""

from __future__ import annotations

from dataclasses import dataclass

from beamsift.transforms.selectors.cut import Cut, CutStage
from beamsift.transforms.stages.base import Context, Stage, setting


@dataclass(frozen=True)
class FilterSettings:
    column: str | None = setting(None, "the score column the filter reads")
    keep_top: float | None = setting(None, "keep this share of the running with the highest values", share=True)
    keep_bottom: float | None = setting(None, "or this share with the lowest values", share=True)
    drop_top: float = setting(0, "first drop this share with the highest values (a band)", share=True)
    min: float | None = setting(None, "or keep values >= min")
    max: float | None = setting(None, "and/or keep values <= max")


def filter_cut(cfg, name: str) -> Cut:
    c = lambda key: cfg[f"{name}.{key}"]  # noqa: E731
    if c("min") is not None or c("max") is not None:
        return Cut(c("column"), "threshold", low=c("min"), high=c("max"))
    if c("keep_bottom") is not None:
        return Cut(c("column"), "bottom", fraction=c("keep_bottom"))
    return Cut(c("column"), "band" if c("drop_top") else "top", fraction=c("keep_top"), offset=c("drop_top"))


def _check(cfg, name: str, available: list, fail) -> None:
    column = cfg[f"{name}.column"]
    if column is None or column not in available:
        what = "needs" if column is None else f"has {column!r}, not"
        fail(f"{name}.column", f"{name}.column {what} a column of an earlier stage: one of {available}")
    rules = [r for r in ("keep_top", "keep_bottom") if cfg[f"{name}.{r}"] is not None]
    bounds = cfg[f"{name}.min"] is not None or cfg[f"{name}.max"] is not None
    if len(rules) + bounds != 1:
        fail(f"{name}.keep_top", f"{name}: set one of keep_top, keep_bottom, or min/max")
    if cfg[f"{name}.drop_top"] and cfg[f"{name}.keep_top"] is None:
        fail(f"{name}.drop_top", f"{name}.drop_top goes with keep_top (a band: drop the top, keep the next)")


def _build(ctx: Context, name: str, shards):
    cut = CutStage(name, filter_cut(ctx.cfg, name), "filter", ctx.chain, ctx.seed, ctx.progress_dir)
    return shards | "Stage_" + name >> cut


STAGE = Stage(
    kind="filter",
    summary="keep part of the running by a score column (a share, a band or a range)",
    settings=FilterSettings,
    repeatable=True,
    columns=lambda cfg, name: (),
    check=_check,
    build=_build,
)
