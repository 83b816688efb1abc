"""What a stage declares, in one place: its settings, the columns it writes, what it needs, and the
transform that adds its columns.

A stage module ends with ``STAGE = Stage(...)``; the registry (``stages/__init__.py``) lists the
modules. The config's sections, defaults, choices and checks, the chain's columns, the reserved
column names, the `train` command and the pipeline's assembly all read these declarations, so a
new stage is one module and one line in the registry (``docs/contributing.md``).

A stage's settings are a dataclass whose fields are the keys of its config section::

    @dataclass(frozen=True)
    class ReweightSettings:
        column: str = setting("loss", "the loss column an earlier stage writes")
        temperature: float = setting(1.0, "r in softmax(f(h) / r)", above=0)

The field's type is the key's type (``float`` takes an integer too; ``| None`` allows null), its
default the key's default, and the metadata its meaning, its choices and its bounds.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton
from beamsift.transforms.io.read import CountRejectReasons
from beamsift.transforms.io.schema import TEXT, output_column


def setting(
    default: Any,
    doc: str,
    *,
    choices: tuple | None = None,
    at_least: float | None = None,
    above: float | None = None,
    share: bool = False,
) -> Any:
    """A config key of a stage's section: its default, its one-line meaning, and what it allows
    (``choices``; ``at_least``/``above``: a lower bound; ``share``: a value in [0, 1])."""
    meta = {"doc": doc, "choices": choices, "at_least": at_least, "above": above, "share": share}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def key_types(settings: type) -> dict[str, tuple]:
    """{key: the Python types its values may have}, from the dataclass's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(settings).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else (hint,)
        allowed: list = []
        for t in args:
            t = typing.get_origin(t) or t
            allowed += [int, float] if t is float else [t]
        out[name] = tuple(dict.fromkeys(allowed))
    return out


def config_fields(settings: type) -> list:
    """The fields that are config keys (declared with ``setting``); others are filled by the run."""
    return [f for f in dataclasses.fields(settings) if "doc" in f.metadata]


def section_schema(settings: type) -> dict[str, tuple]:
    """The section as the config reads it: {key: (default, allowed types, meaning)}."""
    allowed = key_types(settings)
    out = {}
    for f in config_fields(settings):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kinds = allowed[f.name]
        out[f.name] = (default, kinds if len(kinds) > 1 else kinds[0], f.metadata["doc"])
    return out


def check_section(settings: type, section: str, values: dict, fail: Callable[[str, str], None]) -> None:
    """The checks a section's metadata declares: choices, lower bounds, shares."""
    for f in config_fields(settings):
        key, value, meta = f"{section}.{f.name}", values[f.name], f.metadata
        if meta["choices"] is not None and value not in meta["choices"]:
            fail(key, f"config key {key!r} must be one of {sorted(meta['choices'])}, got {value!r}")
        if value is None or isinstance(value, (bool, str, list)):
            continue
        if meta["at_least"] is not None and value < meta["at_least"]:
            bound = meta["at_least"]
            wording = "at least 1" if bound == 1 else f">= {bound}"
            fail(key, f"config key {key!r} must be {wording}, got {value}")
        if meta["above"] is not None and value <= meta["above"]:
            fail(key, f"config key {key!r} must be > {meta['above']}")
        if meta["share"] and not 0 <= value <= 1:
            fail(key, f"config key {key!r} is a share: it must be in [0, 1], got {value}")


class NoSettings:
    """A stage without a section of its own."""


@dataclass(frozen=True)
class Stage:
    """A kind of stage, as the registry knows it.

    ``kind``: its name in ``stages:`` (and, with ``repeatable``, ``kind_<label>`` for another one).
    ``settings``: the dataclass of its config section (the section is named after the stage), or
    None. ``reads``: other sections it reads as well (excess_loss trains with the proxy's shape).
    ``columns(cfg, name)``: the (column, Arrow type) pairs it writes in this config;
    ``all_columns``: every column it can write, in any config (reserved as output names, offered
    to later stages). ``after``: kinds that must come earlier in the chain. ``needs_target``: the
    run reads the target (``target.path``). ``model_key``: the key of a saved model it can apply
    (``beamsift train`` stops after the first stage that trains one). ``check(cfg, name,
    available, fail)``: checks beyond the section's own. ``build(ctx, name, shards)``: the
    transform, returning (shards, per-shard summaries).
    """

    kind: str
    summary: str
    build: Callable
    columns: Callable
    all_columns: tuple[str, ...] = ()
    settings: type | None = None
    reads: tuple[str, ...] = ()
    repeatable: bool = False
    after: tuple[str, ...] = ()
    needs_target: Callable | None = None
    model_key: str | None = None
    trains: bool = False
    check: Callable | None = None
    after_chain: Callable | None = None  # (ctx, shards) -> summaries: a step after the whole chain
    cluster_stats_skip: tuple[str, ...] = ()  # columns whose per-cluster mean means nothing

    def sections(self) -> tuple[str, ...]:
        """The config sections this stage reads."""
        return ((self.kind,) if self.settings is not None else ()) + self.reads


def fixed_columns(*columns: tuple[str, str]) -> Callable:
    """``columns`` for a stage that writes the same columns in every config."""
    return lambda cfg, name: tuple(columns)


@dataclass
class Context:
    """What a stage's ``build`` works with: the run's config and chain, the side inputs every
    stage shares, and the lists it may add to (what was rejected, the run's summaries, steps
    that finish the report)."""

    p: Any  # the pipeline
    cfg: Any  # the run's Config
    chain: Any  # the Chain
    out: str  # the run's own new output folder
    staging_summary: Any  # one element: (unified field types, raw n-gram totals)
    count_pool: Any  # counts a staged shard's n-grams (DSIR's q̂)
    progress_dir: str | None = None
    target_docs: Any = None  # the target's documents, when the run reads target.path
    rejected: list = field(default_factory=list)  # PCollections of reject records
    summaries: list = field(default_factory=list)  # PCollections of summaries for the manifest
    stage_summaries: list = field(default_factory=list)  # the stages' per-shard summaries so far
    finishers: list = field(default_factory=list)  # (fn(report, summary, value, out), side input)
    selection_buckets: int | None = None  # the writer sums the selection's n-grams (DSIR's KL)
    given_models: dict = field(default_factory=dict)  # {model key: the stage folder it names}
    fields: Any = None  # side input: the unified field types of the input
    fitted_dsir: Any = None  # dsir.model: the saved counts to apply
    target_rejected: Any = None  # the target's reject records (counted by the stage that uses it)
    cluster_extra: Any = None  # side input: more columns of clusters/ ({cluster: {column: value}})
    threads: int = 1  # the cores each worker process may use for itself (run.worker_threads)
    _reject_reasons: Any = None
    _target_texts: Any = None

    @property
    def seed(self) -> int:
        return self.cfg["seed"]

    @property
    def artifacts(self) -> str:
        return FileSystems.join(self.out, "artifacts")

    def kinds(self) -> list[str | None]:
        from beamsift.transforms.stages import stage_kind

        return [stage_kind(n) for n in self.cfg["stages"]]

    def given(self, key: str) -> str | None:
        """The stage folder of a saved model the config names (resolved and checked up front)."""
        return self.given_models.get(key) if self.cfg[key] is not None else None

    def wait_for(self, written, label: str) -> None:
        """A write that nothing downstream reads (saved settings): the run's summary, and so its
        last step, waits for it."""
        self.summaries.append(written | label >> beam.Map(lambda _: {}))

    def target_texts(self):
        """Side input: the target's (text, label) pairs, sorted (the reference model of
        excess_loss, the proxy's target gradient). Built on first use: a run whose stages do not
        read the target's texts gathers none (they are the one side input the target's size sets)."""
        if self._target_texts is None and self.target_docs is not None:
            label = output_column(self.cfg["input.label_field"]) if self.cfg["input.label_field"] else None
            self._target_texts = AsSingleton(
                self.target_docs
                | "TargetTexts" >> beam.Map(_texts_and_labels, label)
                | "AllTargetTexts"
                >> beam.CombineGlobally(lambda parts: sorted((x for part in parts for x in part), key=str))
            )
        return self._target_texts

    def reject_reasons(self):
        """Side input: what was rejected while reading, by reason (an impossible selection and an
        empty DSIR model quote it as their cause). Built on first use, from what was read."""
        if self._reject_reasons is None:
            self._reject_reasons = AsSingleton(
                list(self.rejected)
                | "ReadRejects" >> beam.Flatten()
                | "CountRejectReasons" >> beam.CombineGlobally(CountRejectReasons()).without_defaults(),
                default_value={},
            )
        return self._reject_reasons


def _texts_and_labels(table, label: str | None) -> list[tuple]:
    texts = table.column(TEXT).to_pylist()
    labels = table.column(label).to_pylist() if label in table.column_names else [None] * len(texts)
    return list(zip(texts, labels))
