"""Running a selection: check the output folder, build and run the pipeline, publish the manifest.

Publishing order is what makes a crashed run recognisable: the manifest is written last, after
every shard, so an output folder without ``manifest.json`` is an incomplete run (``beamsift
query`` refuses it), and a new run into a non-empty folder needs ``--overwrite``, which first
removes the old manifest and then the rest.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import time
from importlib import metadata

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from beamsift.pipeline.build import MODEL_FILE, SUMMARY_FILE, build_pipeline
from beamsift.pipeline.config import Config
from beamsift.transforms.dsir import SelectionError, load_fitted_counts
from beamsift.transforms.read import InputError, expand_input, plan_read_tasks
from beamsift.transforms.schema import REJECTED_SCHEMA
from beamsift.transforms.stage import write_parquet
from beamsift.transforms.write import SCORE_FIELDS, SELECTED_FRONT, SELECTED_SCORES

MANIFEST = "manifest.json"
STAGING = "_staging"
OUTPUT_DIRS = ("selected", "scores", "rejected", "artifacts")

log = logging.getLogger("beamsift")


class OutputExistsError(RuntimeError):
    pass


def run_selection(cfg: Config, overwrite: bool = False, beam_args: list[str] = ()) -> dict:
    """Run the pipeline that ``cfg`` describes; return the manifest (also written to disk)."""
    started = time.time()
    out = cfg["output.dir"].rstrip("/")
    pool_files = expand_input(cfg["input.path"], cfg["input.format"])
    pool_tasks = plan_read_tasks(pool_files, cfg["input.split_bytes"])
    target_tasks = None
    if cfg["target.path"] is not None:
        target_files = expand_input(cfg["target.path"], cfg["target.format"])
        target_tasks = plan_read_tasks(target_files, cfg["input.split_bytes"])
    fitted = _load_model(cfg["dsir.model"]) if cfg["dsir.model"] else None
    if fitted is not None:
        _check_model_matches(fitted[2], cfg)
        target_tasks = None  # the saved model carries the target's counts
    prepare_output_dir(out, overwrite)

    options = PipelineOptions([f"--runner={cfg['beam.runner']}", *cfg["beam.options"], *beam_args])
    staging = FileSystems.join(out, STAGING)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, cfg, pool_tasks, [f[0] for f in pool_files], target_tasks, fitted, staging)
    result = pipeline.run()
    state = result.wait_until_finish()
    if str(state).split(".")[-1] not in ("DONE", "None"):
        raise RuntimeError(f"the pipeline ended in state {state}")
    records_read = _counter(result, "pool_records_read")
    with FileSystems.open(FileSystems.join(staging, SUMMARY_FILE)) as f:
        summary = json.load(f)
    FileSystems.delete([staging])
    _ensure_every_output_has_a_shard(out)
    manifest = _manifest(cfg, summary, records_read, options, pool_files, started)
    with FileSystems.create(FileSystems.join(out, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=2).encode())
    return manifest


def prepare_output_dir(out: str, overwrite: bool) -> None:
    if FileSystems.exists(out):
        entries = FileSystems.match([FileSystems.join(out, "*")])[0].metadata_list
        if entries and not overwrite:
            raise OutputExistsError(f"output.dir {out} is not empty; pass --overwrite to replace it")
        if entries:
            manifest = FileSystems.join(out, MANIFEST)
            if FileSystems.exists(manifest):
                FileSystems.delete([manifest])  # first: the old run no longer looks complete
            FileSystems.delete([out])


def _load_model(path: str):
    model_path = path if path.endswith(".npz") else FileSystems.join(path, MODEL_FILE)
    try:
        with FileSystems.open(model_path) as f:
            return load_fitted_counts(f.read())
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same problem for the user
        raise InputError(f"dsir.model: cannot read a fitted model at {model_path}: {e}") from None


def _check_model_matches(meta: dict, cfg: Config) -> None:
    for key, cfg_key in (
        ("num_buckets", "featurize.buckets"),
        ("max_ngram", "featurize.max_ngram"),
    ):
        if meta[key] != cfg[cfg_key]:
            raise InputError(f"dsir.model was fitted with {cfg_key}={meta[key]}, but the config sets {cfg[cfg_key]}")


def _counter(result, name: str) -> int | None:
    try:
        counters = result.metrics().query(beam.metrics.MetricsFilter().with_name(name))["counters"]
    except Exception:  # noqa: BLE001 - some runners report no metrics
        return None
    values = [c.committed if c.committed is not None else c.attempted for c in counters]
    return int(sum(values)) if values else 0


def _ensure_every_output_has_a_shard(out: str) -> None:
    """An empty output still gets one empty shard, so DuckDB's glob finds its columns."""
    import pyarrow as pa

    schemas = {
        "selected": pa.schema(SELECTED_FRONT + SELECTED_SCORES),
        "scores": pa.schema(SCORE_FIELDS),
        "rejected": REJECTED_SCHEMA,
    }
    for name, schema in schemas.items():
        if not FileSystems.match([FileSystems.join(out, name, "*.parquet")])[0].metadata_list:
            write_parquet(schema.empty_table(), FileSystems.join(out, name, "part-empty.parquet"))


def _manifest(cfg, summary, records_read, options, pool_files, started) -> dict:
    counts = summary["counts"]
    selected = counts.get("selected", 0)
    not_selected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("not selected: ")}
    rejected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("rejected: ")}
    target_rejected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("target rejected: ")}
    accounted = selected + sum(not_selected.values()) + sum(rejected.values())
    finished = time.time()
    return {
        "beamsift_version": _version("beamsift"),
        "created": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(),
        "complete": True,
        "seed": cfg["seed"],
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "beam_options": options.get_all_options(drop_default=True),
        "input_files": len(pool_files),
        "counts": {
            "input_records": records_read if records_read is not None else accounted,
            "selected": selected,
            "not_selected": sum(not_selected.values()),
            "rejected": sum(rejected.values()),
            "not_selected_by_reason": not_selected,
            "rejected_by_reason": rejected,
            "accounted_for": accounted == records_read if records_read is not None else None,
        },
        "target": {
            "documents_used": counts.get("target used", 0),
            "rejected": sum(target_rejected.values()),
            "rejected_by_reason": target_rejected,
        },
        "dsir": {
            "k": summary["k"],
            "eligible": summary["eligible"],
            "mean_ngrams_per_eligible_document": summary["mean_ngrams"],
            "kl": summary.get("kl"),
        },
        "timings": {"total_s": round(finished - started, 3)},
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("apache-beam", "pyarrow", "numpy", "duckdb")},
        },
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


__all__ = ["run_selection", "prepare_output_dir", "OutputExistsError", "SelectionError"]
