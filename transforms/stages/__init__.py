"""The stages of a chain, one module each, and the registry that lists them.

Each module declares ``STAGE`` (``base.Stage``): its settings (the config section of its name),
the columns it writes, what it needs and the transform that adds its columns. Everything that
knows about stages reads this registry: the config (sections, defaults, choices, checks), the
chain (columns), the pipeline (its assembly is a loop over ``stages:``), the reserved column names,
the per-cluster statistics and ``beamsift train``. Adding a stage: a module, and a line below
(``docs/contributing.md``).
"""

from __future__ import annotations

from beamsift.transforms.stages import (
    cluster,
    dedup,
    doc_length,
    dsir,
    embed,
    excess_loss,
    filter,
    minhash,
    perplexity_correlations,
    proxy,
    reweight,
    select,
)
from beamsift.transforms.stages.base import Stage

# In the order the docs list them; a chain orders them as its 'stages:' says.
STAGES: dict[str, Stage] = {
    m.STAGE.kind: m.STAGE
    for m in (
        dsir,
        doc_length,
        filter,
        proxy,
        excess_loss,
        reweight,
        perplexity_correlations,
        embed,
        cluster,
        dedup,
        minhash,
        select,
    )
}
DEFAULT_STAGES = ["dsir", "select"]


def stage_kind(name: str) -> str | None:
    """The kind of the stage named ``name`` in 'stages:' (``filter_quality`` is a filter), or None."""
    if name in STAGES:
        return name
    kind = name.split("_", 1)[0]
    return kind if kind in STAGES and STAGES[kind].repeatable and name != kind else None


def stage_of(name: str) -> Stage:
    return STAGES[stage_kind(name)]


def repeatable() -> tuple[str, ...]:
    return tuple(kind for kind, s in STAGES.items() if s.repeatable)


def section_readers() -> dict[str, tuple[str, ...]]:
    """{config section: the stage kinds that read it}."""
    out: dict[str, list] = {}
    for kind, s in STAGES.items():
        for section in s.sections():
            out.setdefault(section, []).append(kind)
    return {section: tuple(kinds) for section, kinds in out.items()}


def stage_columns() -> frozenset[str]:
    """Every output column any stage can write: reserved, so that an input field of that name is
    carried as ``input_<name>`` rather than colliding with it."""
    return frozenset(c for s in STAGES.values() for c in s.all_columns)


def cluster_stats_skip() -> tuple[str, ...]:
    """Columns whose per-cluster mean means nothing (a cluster's id, a key with noise in it)."""
    return tuple(c for s in STAGES.values() for c in s.cluster_stats_skip)
