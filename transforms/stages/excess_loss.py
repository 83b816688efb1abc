"""The excess_loss stage: two causal LMs of the proxy's shape (the ``proxy`` section) and one
tokenizer, one trained on a sample of the pool and one on the target sample; every document is
scored under both. ``excess_loss`` = loss − reference_loss (Moore & Lewis 2010; the reference-
model form of RHO-LOSS, Mindermann et al. 2022): low where the target's model finds a document
easier than the pool's. The training and scoring machinery is the proxy's (``proxy.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from beamsift.transforms.stages.base import Stage, setting
from beamsift.transforms.stages.proxy import build_model_stage

COLUMNS = (("loss", "double"), ("perplexity", "double"), ("reference_loss", "double"), ("excess_loss", "double"))


@dataclass(frozen=True)
class ExcessLossSettings:
    model: str | None = setting(None, "a run's folder (or its artifacts/excess_loss): apply, don't train")


def _check(cfg, name, available, fail) -> None:
    if cfg["target.path"] is None and cfg["excess_loss.model"] is None:
        fail("target.path", "set 'target.path': the excess_loss stage trains its reference model on it")
    if cfg["input.label_field"] is not None:
        fail("input.label_field", "excess_loss compares language models: it takes no input.label_field")
    if "proxy.seeds" in cfg.given and cfg["proxy.seeds"] != 1 and "proxy" not in cfg["stages"]:
        fail(
            "proxy.seeds",
            f"proxy.seeds={cfg['proxy.seeds']}: the excess_loss stage trains one model on the pool and one on "
            "the target, not one per seed (remove proxy.seeds)",
        )


STAGE = Stage(
    kind="excess_loss",
    summary="loss under a model of the pool minus loss under a model of the target (two small GPT-2s)",
    settings=ExcessLossSettings,
    reads=("proxy",),  # both models have the proxy's shape and training
    columns=lambda cfg, name: COLUMNS,
    all_columns=tuple(c for c, _ in COLUMNS),
    needs_target=lambda cfg: cfg["excess_loss.model"] is None,
    model_key="excess_loss.model",
    trains=True,
    check=_check,
    build=lambda ctx, name, shards: build_model_stage(ctx, name, shards, excess=True),
)
