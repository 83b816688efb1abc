"""Resuming an interrupted run after its last finished stage.

Every stage of a run leaves, once all of its shards are written, a done mark in its staging
folder (``_staging/<stage>/_done.pkl``) with what else it gave the run: its summed summary (the
manifest's counts), the values its finishing steps need (DSIR's fitted model, for the KL
reduction) and the settings it made on the pipeline's context. A run that fails or is
interrupted keeps its folder beside ``output.dir`` when a stage has finished (``_staging/_run.json``
says for which fingerprint). The same command then adopts that folder and builds the stages that
finished as a replay: each shard's running count read back from the stage's reasons, its summary
and finishing values from the done mark, its artifacts where it wrote them. Training a proxy
again, fitting the centroids again: none of it. The stages after it run as usual, so the result
is the one an uninterrupted run gives (the run is deterministic for its fingerprint).

Only a prefix of the stages is replayed: a stage reads what the ones before it wrote. Reading and
featurizing the pool is done again (its shard names are fixed by the input, so the same files are
written), which also accounts for every input record again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pickle

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList, AsSingleton
from beamsift.pipeline.output import write_whole
from beamsift.transforms.chain import StageShard, running_mask, shard_of
from beamsift.transforms.chain.sums import SumSummaries

RUN_FILE = "_run.json"  # in _staging: the fingerprint and stages of the run that wrote it
DONE_FILE = "_done.pkl"  # in _staging/<stage>/: the stage finished, and what it gave the run
SUMMARY_FILE = "_summary.pkl"

_LISTS = ("rejected", "summaries", "finishers")
# Built on first use by whichever stage asks first; a resumed run builds them again when asked.
_CACHES = frozenset({"stage_summaries", "_reject_reasons", "_target_texts"})


def snapshot(ctx) -> dict:
    """The context before a stage's build: its lists' lengths and its other values."""
    return {k: len(v) if k in _LISTS else v for k, v in vars(ctx).items()}


def effects_of(ctx, before: dict) -> dict | None:
    """What a stage's build added to the context, in a form a resumed run can repeat; None where
    it cannot (a side input another stage reads, a finishing step that is not a module's function):
    that stage is then never replayed, only run again."""
    new = {k: getattr(ctx, k)[before[k] :] for k in _LISTS}
    if any(r is not ctx.target_rejected for r in new["rejected"]):
        return None
    if not all(_by_reference(fn) for fn, _ in new["finishers"]):
        return None
    attrs = {}
    for key, value in vars(ctx).items():
        if key in _LISTS or key in _CACHES or value is before.get(key, object()):
            continue
        if not isinstance(value, (bool, int, float, str, type(None))):
            return None
        attrs[key] = value
    return {
        "summaries": new["summaries"],
        "finishers": new["finishers"],
        "target_rejected": bool(new["rejected"]),
        "attrs": attrs,
    }


def _by_reference(fn) -> bool:
    """True for a module-level function, which pickle stores as its module and name."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in name or "." in name:
        return False
    return getattr(importlib.import_module(module), name, None) is fn


def keep_stage(ctx, name: str, shards, summary, effects: dict):
    """Write the stage's done mark once every shard of it is written and everything it gave the
    run is saved beside it (a retried bundle writes the same files again); the shards again,
    released to the next stage only once the mark is written. That order makes the marks
    appear as the stages finish (a runner is free to run a branch that nothing waits for last)
    and all of them before the run publishes."""
    folder = FileSystems.join(ctx.chain.staging_dir, name)
    label = f"Keep_{name}"
    # One combine waits for every shard (each a None, which adds nothing) and sums the summaries:
    # fewer steps than a count of the shards beside a sum (each costs a local runner ~10 ms).
    saved_summary = (
        [shards | f"{label}ShardsWritten" >> beam.Map(lambda _: None), summary, *effects["summaries"]]
        | f"{label}AllSummaries" >> beam.Flatten()
        | f"{label}SumSummaries" >> beam.CombineGlobally(SumSummaries())
        | f"{label}SaveSummary" >> beam.Map(save_pickle, FileSystems.join(folder, SUMMARY_FILE))
    )
    saved_finishers = [
        AsList(side.pvalue | f"{label}SaveFinisher{j}" >> beam.Map(save_pickle, finisher_path(folder, j)))
        for j, (_, side) in enumerate(effects["finishers"])
    ]
    record = {
        "stage": name,
        "finishers": [fn for fn, _ in effects["finishers"]],
        "target_rejected": effects["target_rejected"],
        "attrs": effects["attrs"],
    }
    done = saved_summary | f"{label}MarkDone" >> beam.Map(
        _mark_done, FileSystems.join(folder, DONE_FILE), record, *saved_finishers
    )
    return shards | f"{label}Released" >> beam.Map(lambda shard, _: shard, AsSingleton(done))


def finisher_path(folder: str, j: int) -> str:
    return FileSystems.join(folder, f"_finisher{j}.pkl")


def _mark_done(_summary_path, path: str, record: dict, *_finisher_paths) -> str:
    return save_pickle(record, path)


def resume_stage(ctx, name: str, shards):
    """The stage as its done mark left it: (StageShards, its summary), and what it gave the run."""
    folder = FileSystems.join(ctx.chain.staging_dir, name)
    record = load_pickle(FileSystems.join(folder, DONE_FILE))
    label = f"Resumed_{name}"
    resumed = shards | label >> beam.Map(_resumed_shard, ctx.chain, name)
    summary = (
        ctx.p
        | f"{label}Summary" >> beam.Create([FileSystems.join(folder, SUMMARY_FILE)])
        | f"{label}LoadSummary" >> beam.Map(load_pickle)
    )
    for j, fn in enumerate(record["finishers"]):
        value = (
            ctx.p
            | f"{label}Finisher{j}" >> beam.Create([finisher_path(folder, j)])
            | f"{label}LoadFinisher{j}" >> beam.Map(load_pickle)
        )
        ctx.finishers.append((fn, AsSingleton(value)))
    if record["target_rejected"]:
        ctx.rejected.append(ctx.target_rejected)
    for key, value in record["attrs"].items():
        setattr(ctx, key, value)
    return resumed, summary


def _resumed_shard(item, chain, stage: str) -> StageShard:
    shard = shard_of(item)
    running = running_mask(chain.reasons_after(stage, shard))
    return StageShard(shard, int(running.sum()), getattr(item, "duplicates", 0))


def save_pickle(value, path: str) -> str:
    """Whole or not at all: on a local disk into a temporary file, then renamed (an object's
    upload is atomic already), so that an interrupt never leaves half a mark that looks done."""
    write_whole(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def load_pickle(path: str):
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return pickle.loads(f.read())


# ---- the driver's side: which stages a kept folder holds -------------------------------------


def write_run_file(staging: str, fingerprint: str, stages: list[str], resumable: bool) -> None:
    """``resumable``: the job runs inside this command, so that its folder is done with once the
    command is; a job handed to Dataflow or Flink may still be writing there when it is gone."""
    run = {"fingerprint": fingerprint, "stages": list(stages), "code": code_version(), "resumable": resumable}
    with FileSystems.create(FileSystems.join(staging, RUN_FILE)) as f:
        f.write(json.dumps(run).encode())


@functools.cache
def code_version() -> str:
    """A hash of beamsift's own source: an edited checkout (an editable install keeps its version
    number) must not resume from what other code wrote. Computed once a process: the run file and
    the lookup of a kept run both need it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder in ("pipeline", "transforms"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, folder)):
            dirnames.sort()
            for name in sorted(f for f in filenames if f.endswith(".py")):
                digest.update(name.encode())
                with open(os.path.join(dirpath, name), "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


def read_run_file(folder: str) -> dict | None:
    try:
        with FileSystems.open(FileSystems.join(folder, "_staging", RUN_FILE), compression_type="uncompressed") as f:
            return json.loads(f.read())
    except Exception:  # noqa: BLE001 - no run file (or not ours): nothing to resume
        return None


def finished_stages(staging: str, stages: list[str]) -> list[str]:
    """The stages, from the first, whose done marks are in ``staging`` (the prefix a run resumes after)."""
    done = []
    for name in stages:
        try:  # a mark that cannot be read ends the prefix: that stage runs again
            load_pickle(FileSystems.join(staging, name, DONE_FILE))
        except Exception:  # noqa: BLE001
            break
        done.append(name)
    return done


def describe_kept(stages: list[str], total: int) -> str:
    if len(stages) == 1:
        return f"the finished stage {stages[0]}"
    shown = ", ".join(stages) if len(stages) <= 4 else f"{stages[0]} … {stages[-1]}"
    return f"{len(stages)} of {total} stages ({shown})"
