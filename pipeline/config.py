"""The run configuration: YAML, validated on load, overridable with ``--set dotted.key=value``.

Every key has a default, a type and a one-line meaning: the core sections here, each stage's
section in its module (``transforms/stages/``); ``docs/guide.md`` is the same list written for
people, and each shipped config explains the keys it sets. An unknown or mistyped key is an
error that names the key and the file, because a silently ignored typo (``select.fracton``) would
change which data a model trains on.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml
from beamsift.transforms.stages import (
    DEFAULT_STAGES,
    STAGES,
    repeatable,
    section_readers,
    stage_kind,
    stage_of,
)
from beamsift.transforms.stages.base import check_section, section_schema

REQUIRED = object()

# key -> (default, allowed types, meaning). Nested dicts are sections.
SCHEMA: dict[str, Any] = {
    "input": {
        "path": (REQUIRED, str, "glob of the raw pool's files, or a HuggingFace dataset folder"),
        "format": ("auto", str, "jsonl, jsonl.gz, jsonl.zst, parquet, txt, hf; auto = by suffix"),
        "text_field": ("text", str, "the field that holds the document's text"),
        "id_field": (
            None,
            (str, type(None)),
            "the field that holds a unique id; null = hash of text",
        ),
        "txt_mode": ("line", str, "for txt input: a document per line, or per file"),
        "label_field": (None, (str, type(None)), "a field with each document's label: the proxy is a classifier"),
        "batch_size": (4096, int, "at most this many documents per batch and staging shard (equal ones)"),
        "split_bytes": (16 * 2**20, int, "uncompressed text files are read in ranges of this size"),
        "max_reject_share": (
            None,
            (int, float, type(None)),
            "fail the run (nothing published) when a larger share of the records is rejected; null: no limit",
        ),
    },
    "target": {
        "path": (None, (str, type(None)), "glob of the target sample (same formats as input)"),
        "format": ("auto", str, "as input.format"),
        "text_field": ("text", str, "as input.text_field"),
        "id_field": (None, (str, type(None)), "as input.id_field (only used in reject records)"),
        "txt_mode": ("line", str, "as input.txt_mode"),
    },
    "featurize": {
        "buckets": (10000, int, "hash buckets of the n-gram model (paper: 10,000)"),
        "max_ngram": (2, int, "n-grams of order 1..max_ngram (paper: unigrams and bigrams)"),
    },
    "stages": (None, (list, type(None)), "the stages, in order; null = [dsir, select]"),
    # ... then a section for each kind of stage, from its settings (transforms/stages/)
    "seed": (0, int, "fixes the selection together with the document ids"),
    "output": {
        "dir": (
            REQUIRED,
            str,
            "where selected/, scores/, rejected/, artifacts/ and the manifest go",
        ),
        "report": (True, bool, "write report.html (charts of the counts, scores and make-up) into output.dir"),
    },
    "beam": {
        "runner": ("FnApiRunner", str, "Beam runner; arguments after -- override it"),
        "options": ([], list, "extra Beam pipeline options, e.g. [--direct_num_workers=2]"),
    },
}

CHOICES = {
    "input.format": {"auto", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "hf"},
    "target.format": {"auto", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt", "hf"},
    "input.txt_mode": {"line", "file"},
    "target.txt_mode": {"line", "file"},
}

# Every kind of stage's section, in the registry's order, after the core sections: a stage declares
# its settings in its own module (transforms/stages/), and the config reads them from there.
_CORE_AFTER = ("seed", "output", "beam")
SCHEMA = {
    **{k: v for k, v in SCHEMA.items() if k not in _CORE_AFTER},
    **{kind: section_schema(s.settings) for kind, s in STAGES.items() if s.settings is not None},
    **{k: SCHEMA[k] for k in _CORE_AFTER},
}
STAGE_KINDS = tuple(STAGES)


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


@dataclass(frozen=True)
class Config:
    """The resolved config: a plain nested dict plus where it came from."""

    data: dict
    source: str
    overridden: tuple = ()  # the dotted keys set with --set
    train_only: bool = False  # `beamsift train`: the chain up to its first model stage, scoring nothing
    given: frozenset = frozenset()  # the dotted keys the file or --set gave (the rest are defaults)

    def __getitem__(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_dict(self) -> dict:
        return copy.deepcopy(self.data)


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML from ``path``, apply ``key=value`` overrides, validate, fill in defaults."""
    raw = read_yaml(path, path, "no such config file")
    return config_from_dict(raw if raw is not None else {}, path, overrides)


def read_yaml(path: str, label: str, missing: str = "no such file"):
    """The YAML document at ``path``; ConfigError, starting with ``label``, if it is not there or
    not YAML (with the line and column of the problem)."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{label}: {missing}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{label}: not valid YAML{where}: {problem}") from None


def config_from_dict(raw: Any, source: str = "<dict>", overrides=()) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections to keys")
    raw = copy.deepcopy(raw)
    origins: dict[str, str] = {}
    for item in overrides:
        key = _apply_override(raw, item, source)
        origins[key] = f"--set {item}"
    # The budget is one of two keys: --set of one replaces the other that the file sets.
    for key, other in (("select.k", "select.fraction"), ("select.fraction", "select.k")):
        if key in origins and other not in origins and isinstance(raw.get("select"), dict):
            if _get(raw, key) is not None:
                raw["select"].pop(other.split(".")[1], None)
    _check_sections_of_unlisted_stages(raw, source, "stages" in origins)
    schema = _schema_with_stage_sections(raw, source)
    data = _resolve(schema, raw, source, prefix="", origins=origins)
    _expand_home(data)
    if data["stages"] is None:
        data["stages"] = list(DEFAULT_STAGES)
    given = frozenset(_dotted_keys(raw))
    _check_choices(data, source, origins, given)
    return Config(data=data, source=source, overridden=tuple(origins), given=given)


# The sections that configure a stage, and the stage kinds that read each: a section that no
# listed stage reads would be ignored while the manifest shows it as configured.
STAGE_SECTIONS = section_readers()


def _check_sections_of_unlisted_stages(raw: dict, source: str, stages_overridden: bool) -> None:
    """Refuse a stage's section that 'stages' does not list (it would be silently ignored).

    With ``--set stages=...`` the file's sections for stages left out are dropped instead: the
    user chose the stages on the command line and cannot remove a section there.
    """
    stages = raw.get("stages")
    if not isinstance(stages, list) or not all(isinstance(n, str) for n in stages):
        stages = list(DEFAULT_STAGES) if stages is None else None
    if stages is None:
        return  # a malformed 'stages' is reported where it is resolved
    listed_kinds = {stage_kind(n) for n in stages}
    for name in list(raw):
        if name in STAGE_SECTIONS:
            if "select" in STAGE_SECTIONS[name]:
                continue  # every chain ends with select: a chain without it is an error of its own
            kinds, label = STAGE_SECTIONS[name], name
        elif stage_kind(str(name)) in repeatable() and name != stage_kind(str(name)):
            kinds, label = None, name  # filter_<label>: read only by the stage of that very name
        else:
            continue
        used = name in stages if kinds is None else bool(listed_kinds & set(kinds))
        if used or raw[name] in (None, {}):
            continue
        if stages_overridden:
            del raw[name]
            continue
        readers = " or ".join(repr(k) for k in (kinds or (name,)))
        raise ConfigError(
            f"{source}: the section {label!r} configures the {readers} stage, which 'stages' does not list "
            f"(stages: {stages}); add the stage to 'stages', or remove the section"
        )


def _schema_with_stage_sections(raw: dict, source: str) -> dict:
    """SCHEMA plus a section for each repeatable stage named kind_<label> (e.g. filter_quality)."""
    stages = raw.get("stages")
    if stages is None:
        return SCHEMA
    if not isinstance(stages, list) or not all(isinstance(n, str) for n in stages):
        raise ConfigError(f"{source}: config key 'stages' must be a list of stage names, e.g. [dsir, select]")
    schema = dict(SCHEMA)
    for name in stages:
        kind = stage_kind(name)
        if kind is None:
            import difflib

            close = difflib.get_close_matches(name, STAGE_KINDS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source}: unknown stage {name!r} in 'stages'{hint}; the stages are {', '.join(STAGE_KINDS)}, "
                f"and {' or '.join(k + '_<label>' for k in repeatable())} for another of a kind"
            )
        if kind != name:
            schema[name] = SCHEMA[kind]
    return schema


# Keys that name a file or folder. A shell expands `~` only at the start of a word, never inside
# a YAML file or after `--set key=`: beamsift does, or `~/out` would be a folder named `~` here.
PATH_KEYS = (
    "input.path",
    "target.path",
    "output.dir",
    "dsir.model",
    "proxy.model",
    "excess_loss.model",
    "cluster.model",
    "embed.model",
)


def _expand_home(data: dict) -> None:
    """``~`` and ``~user`` at the start of a path key, expanded; URLs (gs://) and hub ids never start so."""
    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = data[section][key]
        if isinstance(value, str) and value.startswith("~"):
            data[section][key] = os.path.expanduser(value)


def _dotted_keys(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in raw.items():
        keys += _dotted_keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"]
    return keys


def _get(raw: dict, dotted: str):
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _all_keys(schema: dict = SCHEMA, prefix: str = "") -> list[str]:
    keys = []
    for name, spec in schema.items():
        keys += _all_keys(spec, prefix + name + ".") if isinstance(spec, dict) else [prefix + name]
    return keys


def _apply_override(raw: dict, item: str, source: str) -> str:
    """Apply one ``--set key=value``; return the dotted key."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected --set dotted.key=value, e.g. --set select.k=5000")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    node_schema: Any = SCHEMA
    for part in parts:
        if not isinstance(node_schema, dict) or part not in node_schema:
            import difflib

            close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"--set {item}: unknown config key {key!r}{hint}")
        node_schema = node_schema[part]
    if isinstance(node_schema, dict):
        keys = ", ".join(repr(f"{key}.{k}") for k in node_schema)
        raise ConfigError(f"--set {item}: {key!r} is a section; set one of its keys: {keys}")
    # YAML parsing of the value gives 5000 -> int, 0.1 -> float, null -> None, [a, b] -> list.
    value = yaml.safe_load(text) if text.strip() else ""
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])!r} in {source} is not a section")
    node[parts[-1]] = value
    return key


def _resolve(schema: dict, raw: Any, source: str, prefix: str, origins: dict | None = None) -> dict:
    origins = origins or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')!r} must be a section (a mapping)")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        key = prefix + str(unknown[0])
        close = _closest(str(unknown[0]), schema)
        hint = f" (did you mean {prefix + close!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown config key {key!r}{hint}")
    out = {}
    for name, spec in schema.items():
        key = prefix + name
        if isinstance(spec, dict):
            out[name] = _resolve(spec, raw.get(name, {}) or {}, source, key + ".", origins)
            continue
        default, types, _ = spec
        if name not in raw:
            if default is REQUIRED:
                raise ConfigError(f"{source}: missing required config key {key!r}")
            out[name] = copy.deepcopy(default)
            continue
        value = raw[name]
        allowed = types if isinstance(types, tuple) else (types,)
        if isinstance(value, str) and float in allowed and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-8 (no dot) as text; it is meant as a number
        # bool is an int in Python; a YAML `true` where a number is expected is a mistake.
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            kinds = [t for t in allowed if not (t is int and float in allowed)]  # "a number" says both
            names = " or ".join(_KINDS.get(t, t.__name__) for t in kinds)
            where = origins.get(key, source)
            if value is None and default is REQUIRED:
                raise ConfigError(
                    f"{where}: config key {key!r} must be {names}, got null "
                    "(YAML reads a bare ~ as null; write '~/...' or quote it)"
                )
            raise ConfigError(f"{where}: config key {key!r} must be {names}, got {_kind(value)}: {value!r}")
        out[name] = value
    return out


def _closest(name: str, schema: dict) -> str | None:
    import difflib

    match = difflib.get_close_matches(name, list(schema), n=1, cutoff=0.6)
    return match[0] if match else None


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# Kinds of values in YAML's words, not Python's.
_KINDS = {
    type(None): "null",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "text",
    list: "a list",
    dict: "a mapping",
}


def _check_stages(cfg: Config, fail) -> None:
    """The chain's shape, then each stage's section and its own checks, in the chain's order:
    a stage may read only the columns of the stages before it (and n_tokens, which every run has)."""
    stages = cfg["stages"]
    if not stages or stages[-1] != "select" or stages.count("select") != 1:
        fail("stages", f"'stages' must end with select, once (got {stages})")
    if len(set(stages)) != len(stages):
        fail("stages", f"'stages' names a stage twice; name a second one kind_<label> (got {stages})")
    available = ["n_tokens"]
    for i, name in enumerate(stages):
        stage = stage_of(name)
        missing = [k for k in stage.after if k not in [stage_kind(n) for n in stages[:i]]]
        if missing:
            needs = " and ".join(missing)
            fail("stages", f"the {stage.kind} stage needs {needs} stage{'s' if len(missing) > 1 else ''} before it")
        if stage.settings is not None:
            check_section(stage.settings, name, cfg[name], fail)
        if stage.check is not None:
            stage.check(cfg, name, list(available), fail)
        available += [c for c, _ in stage.columns(cfg, name) if not c.startswith("_") and c not in available]


def _kind(value) -> str:
    return _KINDS.get(type(value), "a value of another kind")


def _check_choices(data: dict, source: str, origins: dict | None = None, given=frozenset()) -> None:
    origins = origins or {}
    cfg = Config(data, source, given=frozenset(given))

    def fail(key: str | tuple, message: str):
        """Name where the value came from: the file, or the --set that gave it (of ``key``, or of
        the first of several keys that one came from)."""
        keys = key if isinstance(key, tuple) else (key,)
        where = next((origins[k] for k in keys if k in origins), source)
        raise ConfigError(f"{where}: {message}")

    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            fail(key, f"config key {key!r} must be one of {sorted(allowed)}, got {cfg[key]!r}")
    _check_stages(cfg, fail)
    positive = ("input.batch_size", "input.split_bytes", "featurize.buckets", "featurize.max_ngram")
    for key in positive:
        if cfg[key] < 1:
            fail(key, f"config key {key!r} must be at least 1, got {cfg[key]}")
    if cfg["featurize.buckets"] > 2**32:
        fail("featurize.buckets", "config key 'featurize.buckets' must be at most 2**32")
    share = cfg["input.max_reject_share"]
    if share is not None and not 0 <= share <= 1:
        fail("input.max_reject_share", f"config key 'input.max_reject_share' is a share: in [0, 1], got {share}")
    label = cfg["input.label_field"]
    if label is not None and label in (cfg["input.text_field"], cfg["input.id_field"]):
        fail("input.label_field", "'input.label_field' names the text or the id field")
    if cfg["input.id_field"] is not None and cfg["input.id_field"] == cfg["input.text_field"]:
        key = "input.text_field" if "input.text_field" in origins else "input.id_field"
        fail(key, "'input.id_field' and 'input.text_field' name the same field")
    if not all(isinstance(o, str) for o in cfg["beam.options"]):
        fail("beam.options", "config key 'beam.options' must be a list of strings")
