"""Running a selection: check the inputs and the output folder, run the pipeline into a new
folder beside ``output.dir``, and publish it in one step when it is complete.

What can be checked before reading the corpus is checked first (the files, the fields of the
first records, a ``k`` the input's size already rules out, whether ``output.dir`` may be
written), so that a mistake costs a second, not a run. The output folder's rules, and why a
failed or interrupted run leaves the previous result as it was, are in ``output.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
from importlib import metadata

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from beamsift.pipeline.build import MODEL_FILE, SUMMARY_FILE, build_pipeline, input_spec, make_chain
from beamsift.pipeline.config import Config
from beamsift.pipeline.diagnostics import diagnose, diagnostic_warnings
from beamsift.pipeline.output import (
    MANIFEST,
    STAGING,
    OutputDirError,
    PendingOutput,
    check_output_dir,
    files_under,
    is_local,
    remove_tree,
)
from beamsift.pipeline.saved import check_saved_models, check_target_labels
from beamsift.transforms.chain.meter import NAMESPACE, stage_timings
from beamsift.transforms.chain.staging import write_parquet
from beamsift.transforms.io.read import InputError, check_fields, expand_input, max_records, plan_read_tasks
from beamsift.transforms.io.schema import REJECTED_SCHEMA, output_column
from beamsift.transforms.io.write import score_fields, selected_fields, with_text_named
from beamsift.transforms.stages import stage_of
from beamsift.transforms.stages.dsir import SelectionError, load_fitted_counts

OutputExistsError = OutputDirError  # the name earlier versions used

# Runners whose workers share this machine's disk, so that progress can travel through files.
LOCAL_RUNNERS = {"FnApiRunner", "DirectRunner", "SwitchingDirectRunner", "PortableRunner"}

log = logging.getLogger("beamsift")


def run_selection(
    cfg: Config,
    overwrite: bool = False,
    beam_args: list[str] = (),
    progress=None,
) -> dict:
    """Run the pipeline that ``cfg`` describes; return the manifest (also written to disk).

    ``progress``: a callable ``(progress_dir, total_bytes) -> context manager`` that shows live
    progress from the files that the workers write into ``progress_dir`` (see
    ``transforms/chain/meter.py``); None for no progress.
    """
    started = time.time()
    out = cfg["output.dir"].rstrip("/") or cfg["output.dir"]
    warnings: list[str] = []
    pool_files = _expand(cfg, "input", warnings)
    check_fields(pool_files, _spec(cfg, "input"), "input", cfg["input.label_field"])
    _check_k_possible(cfg, pool_files)
    inputs = {"input.path": _read_paths(cfg["input.path"], pool_files)}
    target_tasks = None
    fitted = None
    stages = cfg["stages"]
    if "dsir" in stages and cfg["dsir.model"]:
        fitted, model_path = _load_model(cfg["dsir.model"])
        _check_model_matches(fitted[2], cfg)
        inputs["dsir.model"] = [model_path]
    if "embed" in stages and cfg["embed.method"] == "model":
        inputs["embed.model"] = [_check_encoder(cfg["embed.model"])]
    saved = check_saved_models(cfg, pool_files)
    inputs.update({key: [os.path.abspath(f) if is_local(f) else f] for key, f in saved.items()})
    needs_target = any(stage_of(n).needs_target is not None and stage_of(n).needs_target(cfg) for n in stages)
    if needs_target and cfg["target.path"] is not None:
        target_files = _expand(cfg, "target", warnings)
        check_fields(target_files, _spec(cfg, "target"), "target")
        if "proxy" in stages and cfg["proxy.target_influence"] and cfg["input.label_field"]:
            check_target_labels(cfg, target_files, saved)
        target_tasks = plan_read_tasks(target_files, cfg["input.split_bytes"])
        inputs["target.path"] = _read_paths(cfg["target.path"], target_files)
    check_output_dir(out, overwrite, inputs)
    pool_tasks = plan_read_tasks(pool_files, cfg["input.split_bytes"])

    options = PipelineOptions([f"--runner={cfg['beam.runner']}", *cfg["beam.options"], *beam_args])
    pending = PendingOutput(out)
    pending.create()
    try:
        staging = FileSystems.join(pending.path, STAGING)
        with _progress_channel(progress, options, pool_tasks, cfg["stages"]) as progress_dir:
            pipeline = beam.Pipeline(options=options)
            build_pipeline(
                pipeline,
                cfg,
                pool_tasks,
                [f[0] for f in pool_files],
                target_tasks,
                fitted,
                pending.path,
                staging,
                progress_dir,
                saved,
            )
            result = pipeline.run()
            state = result.wait_until_finish()
        if str(state).split(".")[-1] not in ("DONE", "None"):
            raise RuntimeError(f"the pipeline ended in state {state}")
        metrics = _query_metrics(result)
        with FileSystems.open(FileSystems.join(staging, SUMMARY_FILE)) as f:
            summary = json.load(f)
        remove_tree(staging)
        if cfg.train_only:
            manifest = _train_manifest(cfg, summary, metrics, options, pool_files, started, pending.path)
        else:
            chain = make_chain(cfg, staging)
            _ensure_every_output_has_a_shard(pending.path, chain, output_column(cfg["input.text_field"]))
            manifest = _manifest(cfg, summary, metrics, options, pool_files, started)
            _check_reject_share(cfg, manifest)
        manifest["inputs"] = {key: _describe(paths) for key, paths in inputs.items()}
        diagnose(manifest, summary)  # how the models trained; whether the ranked columns spread
        manifest["warnings"] = (
            warnings + diagnostic_warnings(manifest) + ([] if cfg.train_only else _result_warnings(manifest))
        )
        # Every file of the result, so that a later --overwrite removes these and nothing else.
        manifest["files"] = [f for f in files_under(pending.path) if f != MANIFEST]
        with FileSystems.create(FileSystems.join(pending.path, MANIFEST)) as f:
            f.write(json.dumps(manifest, indent=2).encode())
    except BaseException:
        pending.discard()
        raise
    try:
        with _signals_deferred():  # a Ctrl-C now would land between two renames
            pending.publish()
    except Exception as e:  # noqa: BLE001
        if is_local(out):
            pending.discard()
            raise
        # On an object store the copy may have begun: the complete result is kept where it is.
        raise OutputDirError(
            f"publishing to {out} failed ({e}); the complete new result is in {pending.path}"
        ) from None
    return manifest


def _spec(cfg: Config, section: str):
    return input_spec(cfg, section)


def _expand(cfg: Config, section: str, warnings: list[str]) -> list[tuple[str, str, int]]:
    pattern, key = cfg[f"{section}.path"], f"{section}.path"
    try:
        files = expand_input(pattern, cfg[f"{section}.format"], key)
    except InputError as e:
        if "no files match" not in str(e) or not is_local(pattern) or os.path.isabs(pattern):
            raise
        # Relative paths are read from the current folder (as every path on the command line
        # is), not from the config's: say so, and where the file is if it is there instead.
        hint = f" (relative paths are read from the current folder, {os.getcwd()}"
        config_dir = os.path.dirname(os.path.abspath(cfg.source)) if cfg.source.endswith((".yaml", ".yml")) else None
        if config_dir and config_dir != os.getcwd():
            beside = os.path.join(config_dir, pattern)
            if FileSystems.match([beside])[0].metadata_list or os.path.exists(beside):
                shown = os.path.relpath(beside)
                shown = os.path.normpath(beside) if shown.startswith("..") else shown
                hint += f"; the config's folder has it: write {shown}"
        raise InputError(str(e) + hint + ")") from None
    shadowed = _shadowed_beside_config(cfg, pattern, files)
    if shadowed:
        warnings.append(
            f"{key} {pattern} was read from the current folder ({os.path.abspath(files[0][0])}), but the config's "
            f"folder holds a different file by that path ({shadowed}); relative paths are read from the current "
            "folder: write the path you mean"
        )
    return files


def _config_dir(cfg: Config) -> str | None:
    return os.path.dirname(os.path.abspath(cfg.source)) if cfg.source.endswith((".yaml", ".yml")) else None


def _shadowed_beside_config(cfg: Config, pattern: str, files) -> str | None:
    """A file that the same relative path names beside the config, where it is not what was read."""
    config_dir = _config_dir(cfg)
    if not is_local(pattern) or os.path.isabs(pattern) or config_dir in (None, os.getcwd()):
        return None
    beside = os.path.join(config_dir, pattern)
    try:
        matched = [m.path for m in FileSystems.match([beside])[0].metadata_list]
    except Exception:  # noqa: BLE001 - an unreadable folder beside the config: nothing to say
        return None
    if os.path.isdir(beside.rstrip("/")):
        matched = [beside.rstrip("/")]
    read = {os.path.realpath(f[0]) for f in files} | {os.path.realpath(pattern.rstrip("/"))}
    other = [m for m in matched if os.path.realpath(m) not in read]
    return os.path.abspath(other[0]) if other else None


def _describe(paths: list[str]) -> list[dict]:
    """What a run read, as absolute paths with sizes and modification times: enough to tell later
    which files those were."""
    out = []
    for path in paths:
        if not is_local(path):
            out.append({"path": path})
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append({"path": os.path.abspath(path)})
            continue
        modified = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).isoformat()
        entry = {"path": os.path.abspath(path), "modified": modified}
        if not os.path.isdir(path):
            entry["bytes"] = st.st_size
        out.append(entry)
    return out


def _check_reject_share(cfg: Config, manifest: dict) -> None:
    """``input.max_reject_share``: a run that rejects more of its records fails, unpublished."""
    limit, c = cfg["input.max_reject_share"], manifest["counts"]
    if limit is None or not c["input_records"] or c["rejected"] / c["input_records"] <= limit:
        return
    top = max(c["rejected_by_reason"].items(), key=lambda kv: kv[1])
    raise InputError(
        f"input.max_reject_share={limit}: {c['rejected']:,} of the {c['input_records']:,} input records "
        f"({c['rejected'] / c['input_records']:.0%}) were rejected, most as {top[0]!r} ({top[1]:,}); nothing was "
        "published (check input.text_field, input.id_field and input.format, or raise the limit)"
    )


def _result_warnings(manifest: dict) -> list[str]:
    """What a person should not miss in a result that is otherwise complete."""
    out = []
    c = manifest["counts"]
    if c["accounted_for"] is False:
        out.append("the counts do not add up to the input records")
    if c["input_records"] and c["rejected"] > c["input_records"] / 2:
        top = max(c["rejected_by_reason"].items(), key=lambda kv: kv[1])[0]
        folder = manifest["config"]["output"]["dir"]
        out.append(
            f"{c['rejected'] / c['input_records']:.0%} of the input records were rejected, most as {top!r}: see "
            f'`beamsift query {folder} "SELECT reason, detail, count(*) FROM rejected GROUP BY ALL"` '
            "(input.max_reject_share makes such a run fail)"
        )
    kl = manifest.get("dsir", {}).get("kl")
    if kl and kl["reduction"] < 0:
        out.append(
            f"the KL reduction is negative ({kl['reduction']:.4f}): the selection's n-grams are further from the "
            "target's than a random pick's; the target may be unlike every document of the pool, or a later "
            "stage (a filter, the selector's column) works against it"
        )
    return out


def _read_paths(pattern: str, files: list[tuple[str, str, int]]) -> list[str]:
    """What an input reads: its files, and a HuggingFace dataset's folder as a whole."""
    paths = [f[0] for f in files]
    if files and files[0][1] == "hf":
        paths.append(pattern.rstrip("/"))
    return paths


def _check_k_possible(cfg: Config, pool_files) -> None:
    k = cfg["select.k"]
    if k is None:
        return
    bound = max_records(pool_files, cfg["input.txt_mode"])
    if bound is not None and k > bound:
        raise InputError(
            f"select.k={k} is more than the input holds: {cfg['input.path']} has at most {bound:,} records; "
            "lower select.k (or use select.fraction)"
        )


def _load_model(path: str):
    """A fitted DSIR model from a run folder, its artifacts/ folder, or the .npz file itself."""
    if path.endswith(".npz"):
        candidates = [path]
    else:
        candidates = [FileSystems.join(path, MODEL_FILE), FileSystems.join(path, "artifacts", MODEL_FILE)]
    for model_path in candidates:
        if not FileSystems.exists(model_path):
            continue
        try:
            with FileSystems.open(model_path) as f:
                return load_fitted_counts(f.read()), model_path
        except Exception as e:  # noqa: BLE001 - any failure to read it is the same problem for the user
            raise InputError(f"dsir.model: cannot read a fitted model at {model_path}: {e}") from None
    raise InputError(
        f"dsir.model {path}: no {MODEL_FILE} there; give an earlier run's folder, its artifacts/ folder or the file"
    )


def _check_encoder(model: str | None) -> str:
    """The encoder for ``embed.method: model`` must load its config before any worker starts."""
    from beamsift.transforms.models.encoder import EncoderNotFound, encoder_width, resolve_encoder

    try:
        path = resolve_encoder(model)
    except EncoderNotFound as e:
        raise InputError(str(e)) from None
    if is_local(path) and (os.sep in path or path.startswith(".")) and not os.path.isdir(path):
        raise InputError(f"embed.model {path}: no such folder; give a transformers model folder or a hub id")
    try:
        encoder_width(path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"embed.model {path}: cannot load an encoder there: {first}") from None
    return os.path.abspath(path) if os.path.isdir(path) else path


def _check_model_matches(meta: dict, cfg: Config) -> None:
    for key, cfg_key in (
        ("num_buckets", "featurize.buckets"),
        ("max_ngram", "featurize.max_ngram"),
    ):
        if meta[key] != cfg[cfg_key]:
            raise InputError(f"dsir.model was fitted with {cfg_key}={meta[key]}, but the config sets {cfg[cfg_key]}")


@contextlib.contextmanager
def _progress_channel(progress, options: PipelineOptions, tasks, stages):
    """A local folder for the workers' progress files, shown by ``progress`` while the run lasts."""
    runner = options.get_all_options().get("runner") or "FnApiRunner"
    if progress is None or runner.split(".")[-1] not in LOCAL_RUNNERS:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="beamsift-progress-")
    try:
        with progress(folder, sum(t.nbytes for t in tasks), list(stages)):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done, then act on them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            os.kill(os.getpid(), caught[0])


def _query_metrics(result) -> dict:
    """beamsift's metrics by name: counters summed, distributions as (min, max)."""
    try:
        results = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # noqa: BLE001 - some runners report no metrics
        return {}
    out: dict = {}
    for c in results.get("counters", []):
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    for d in results.get("distributions", []):
        value = d.committed if d.committed is not None else d.attempted
        if value is None or not value.count:
            continue
        lo, hi = out.get(d.key.metric.name, (value.min, value.max))
        out[d.key.metric.name] = (min(lo, value.min), max(hi, value.max))
    return out


def _ensure_every_output_has_a_shard(out: str, chain, text_column: str) -> None:
    """An empty output still gets one empty shard, so DuckDB's glob finds its columns."""
    schemas = {
        "selected": with_text_named(pa.schema(selected_fields(chain)).empty_table(), text_column).schema,
        "scores": pa.schema(score_fields(chain)),
        "rejected": REJECTED_SCHEMA,
    }
    for name, schema in schemas.items():
        if not FileSystems.match([FileSystems.join(out, name, "*.parquet")])[0].metadata_list:
            write_parquet(schema.empty_table(), FileSystems.join(out, name, "part-empty.parquet"))


def _manifest(cfg, summary, metrics, options, pool_files, started) -> dict:
    counts = summary["counts"]
    records_read = metrics.get("pool_records_read")
    selected = counts.get("selected", 0)
    not_selected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("not selected: ")}
    rejected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("rejected: ")}
    target_rejected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("target rejected: ")}
    accounted = selected + sum(not_selected.values()) + sum(rejected.values())
    finished = time.time()
    return {
        **_header(cfg, options, pool_files, finished),
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
        "stages": _stage_report(cfg, summary.get("stages", {}), stage_timings(metrics)),
        **(
            {
                "dsir": {
                    "k": selected,
                    "eligible": summary["dsir"]["eligible"],
                    "mean_ngrams_per_eligible_document": summary["dsir"]["mean_ngrams"],
                    "kl": summary["dsir"].get("kl"),
                }
            }
            if "dsir" in summary
            else {}
        ),
        **({"clusters": summary["clusters"]} if "clusters" in summary else {}),
        "timings": {"total_s": round(finished - started, 3), "stages": stage_timings(metrics)},
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("apache-beam", "pyarrow", "numpy", "duckdb")},
        },
    }


def _header(cfg, options, pool_files, finished: float, command: str | None = None) -> dict:
    """What every manifest opens with: the version, when, the config and the options it ran with."""
    return {
        "beamsift_version": _version("beamsift"),
        **({"command": command} if command else {}),
        "created": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(),
        "complete": True,
        "seed": cfg["seed"],
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "beam_options": options.get_all_options(drop_default=True),
        "input_files": len(pool_files),
    }


def _train_manifest(cfg, summary, metrics, options, pool_files, started, folder: str) -> dict:
    """`beamsift train`: what was trained and where, not a selection (there is none)."""
    stage = cfg["stages"][-2]
    finished = time.time()
    artifacts = f"artifacts/{stage}"
    return {
        **_header(cfg, options, pool_files, finished, command="train"),
        "trained": {
            "stage": stage,
            "models": artifacts,
            "files": [f for f in files_under(FileSystems.join(folder, artifacts))],
            "apply_with": f"{stage}.model",
        },
        "input_records": metrics.get("pool_records_read"),
        "stages": _stage_report(cfg, summary.get("stages", {}), stage_timings(metrics))[:-1],
        "timings": {"total_s": round(finished - started, 3), "stages": stage_timings(metrics)},
        "versions": {
            "python": platform.python_version(),
            **{p: _version(p) for p in ("apache-beam", "pyarrow", "numpy", "duckdb", "torch", "transformers")},
        },
    }


def _stage_report(cfg, stages: dict, timings: dict) -> list[dict]:
    """Per stage, in order: documents in, out, taken out by reason, and wall time."""
    report = []
    for name in cfg["stages"]:
        counts = dict(stages.get(name, {"in": 0, "out": 0}))
        notes = counts.pop("notes", {})
        entry = {"name": name, "in": counts.pop("in", 0), "out": counts.pop("out", 0), "taken_out": counts}
        if notes:
            entry["notes"] = notes
        if name in timings and "wall_s" in timings[name]:
            entry["wall_s"] = timings[name]["wall_s"]
        report.append(entry)
    return report


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


__all__ = ["run_selection", "OutputDirError", "OutputExistsError", "SelectionError", "InputError"]
