"""What a run's ``manifest.json`` says: the config and options it ran with, how many documents
were selected, not selected and rejected (by reason), per stage what went in and out, how the
models trained, and every file of the result.

The manifest is written by the pipeline's own last step (``finish.py``), on a worker, from the
run's summary, so that a job that outlives the command that launched it still describes itself.
What only the runner knows (the records each reader counted, the stages' wall times) is added by
``add_metrics`` when the command waited for the job.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata

import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.pipeline.output import files_under
from beamsift.transforms.chain.meter import STAGING_READ, stage_timings
from beamsift.transforms.chain.staging import write_parquet
from beamsift.transforms.io.read import InputError
from beamsift.transforms.io.schema import REJECTED_SCHEMA
from beamsift.transforms.io.write import score_fields, selected_fields, with_text_named


@dataclass(frozen=True)
class RunFacts:
    """What the launching command knew before the job ran: carried to the job's last step."""

    run_id: str
    started: float
    beam_options: dict
    input_files: int
    inputs: dict = field(default_factory=dict)  # {config key: [{path, modified, bytes}]}
    warnings: tuple = ()
    runner: dict = field(default_factory=dict)  # name, worker processes, who chose them
    fingerprint: str = ""  # the inputs, the config and beamsift's version (``run.fingerprint``)
    resumed: tuple = ()  # the first stages, replayed from an interrupted run's folder


def selection_manifest(cfg, summary: dict, facts: RunFacts) -> dict:
    counts = summary["counts"]
    selected = counts.get("selected", 0)
    not_selected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("not selected: ")}
    rejected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("rejected: ")}
    target_rejected = {k.split(": ", 1)[1]: v for k, v in counts.items() if k.startswith("target rejected: ")}
    accounted = selected + sum(not_selected.values()) + sum(rejected.values())
    finished = time.time()
    return {
        **header(cfg, facts, finished),
        "counts": {
            "input_records": accounted,
            "selected": selected,
            "not_selected": sum(not_selected.values()),
            "rejected": sum(rejected.values()),
            "not_selected_by_reason": not_selected,
            "rejected_by_reason": rejected,
            "accounted_for": None,  # the readers' own count, from the runner: add_metrics
        },
        "target": {
            "documents_used": counts.get("target used", 0),
            "rejected": sum(target_rejected.values()),
            "rejected_by_reason": target_rejected,
        },
        "stages": stage_report(cfg, summary.get("stages", {}), facts.resumed),
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
        **{key: summary[key] for key in ("quad", "perplexity_correlations") if key in summary},
        "timings": {"total_s": round(finished - facts.started, 3)},
        "versions": versions("apache-beam", "pyarrow", "numpy", "duckdb"),
    }


def train_manifest(cfg, summary: dict, facts: RunFacts, folder: str) -> dict:
    """`beamsift train`: what was trained and where, not a selection (there is none)."""
    stage = cfg["stages"][-2]
    finished = time.time()
    artifacts = f"artifacts/{stage}"
    return {
        **header(cfg, facts, finished, command="train"),
        "trained": {
            "stage": stage,
            "models": artifacts,
            "files": files_under(FileSystems.join(folder, artifacts)),
            "apply_with": f"{stage}.model",
        },
        "input_records": None,
        "stages": stage_report(cfg, summary.get("stages", {}), facts.resumed)[:-1],
        "timings": {"total_s": round(finished - facts.started, 3)},
        "versions": versions("apache-beam", "pyarrow", "numpy", "duckdb", "torch", "transformers"),
    }


def header(cfg, facts: RunFacts, finished: float, command: str | None = None) -> dict:
    """What every manifest opens with: the version, when, the config and the options it ran with."""
    return {
        "beamsift_version": version("beamsift"),
        **({"command": command} if command else {}),
        "run_id": facts.run_id,
        "fingerprint": facts.fingerprint,
        "created": dt.datetime.fromtimestamp(finished, dt.timezone.utc).isoformat(),
        "complete": True,
        "seed": cfg["seed"],
        "config": cfg.to_dict(),
        "config_file": cfg.source,
        "beam_options": facts.beam_options,
        "runner": facts.runner,
        "input_files": facts.input_files,
        **({"resumed": {"stages": list(facts.resumed)}} if facts.resumed else {}),
    }


def stage_report(cfg, stages: dict, resumed: tuple = ()) -> list[dict]:
    """Per stage, in order: documents in, out, and taken out by reason; ``resumed``: those that an
    interrupted run finished (no wall time of this run)."""
    report = []
    for name in cfg["stages"]:
        counts = dict(stages.get(name, {"in": 0, "out": 0}))
        notes = counts.pop("notes", {})
        entry = {"name": name, "in": counts.pop("in", 0), "out": counts.pop("out", 0), "taken_out": counts}
        if notes:
            entry["notes"] = notes
        if name in resumed:
            entry["resumed"] = True
        report.append(entry)
    return report


def add_metrics(manifest: dict, metrics: dict, total_s: float) -> dict:
    """What the runner counted, added once the job is done: the records each reader read (the
    check that every one is accounted for) and the stages' wall times."""
    timings = stage_timings(metrics)
    records_read = metrics.get("pool_records_read")
    if "counts" in manifest and records_read is not None:
        c = manifest["counts"]
        accounted = c["selected"] + c["not_selected"] + c["rejected"]
        c["input_records"], c["accounted_for"] = records_read, accounted == records_read
        if not c["accounted_for"]:
            manifest.setdefault("warnings", []).append("the counts do not add up to the input records")
    if "trained" in manifest:
        manifest["input_records"] = records_read
    for entry in manifest.get("stages", []):
        if "wall_s" in timings.get(entry["name"], {}):
            entry["wall_s"] = timings[entry["name"]]["wall_s"]
    manifest["timings"] = {"total_s": round(total_s, 3), "stages": timings}
    read = {k[len(STAGING_READ) :]: v for k, v in sorted(metrics.items()) if k.startswith(STAGING_READ)}
    if read:  # bytes of the columns the stages read back, by the staging table (docs: the documents)
        manifest["timings"]["staging_read_bytes"] = read
    return manifest


def check_reject_share(cfg, manifest: dict) -> None:
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


def result_warnings(manifest: dict) -> list[str]:
    """What a person should not miss in a result that is otherwise complete."""
    out = []
    c = manifest["counts"]
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


def ensure_every_output_has_a_shard(out: str, chain, text_column: str) -> None:
    """An empty output still gets one empty shard, so DuckDB's glob finds its columns."""
    schemas = {
        "selected": with_text_named(pa.schema(selected_fields(chain)).empty_table(), text_column).schema,
        "scores": pa.schema(score_fields(chain)),
        "rejected": REJECTED_SCHEMA,
    }
    for name, schema in schemas.items():
        if not FileSystems.match([FileSystems.join(out, name, "*.parquet")])[0].metadata_list:
            write_parquet(schema.empty_table(), FileSystems.join(out, name, "part-empty.parquet"))


def versions(*packages: str) -> dict:
    return {"python": platform.python_version(), **{p: version(p) for p in packages}}


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
