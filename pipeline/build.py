"""Assembling a run's pipeline from its config: read and stage the pool once, then the stages in
the order ``stages:`` lists them, then the writers.

    read pool ─ featurize ─ stage ─┬─ find duplicate ids ──────────── side input of every stage
                                   └─ unify field types, count raw n-grams (one combine)
    read target (when a stage needs it) ─────────────────────────────── the stages that read it
    staged shards ─ stage 1 ─ stage 2 ─ ... ─ select ─ write selected/ + scores/ ─┐
    rejected records ─ write rejected/ ────────────────────────────────────────────┴─ summary

A scorer adds columns, a filter takes documents out of the running with a reason, the selector
picks the budget from what is left (``transforms/chain/``). Each stage is a module of
``transforms/stages/`` that builds its own transform; this module only wires them in order.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton
from apache_beam.transforms.combiners import TupleCombineFn
from beamsift.pipeline.beam_costs import keep_dofn_specs_per_class, keep_option_views
from beamsift.pipeline.config import Config
from beamsift.pipeline.resume import effects_of, keep_stage, resume_stage, snapshot
from beamsift.transforms.chain import STAGED, Chain, MarkDuplicateIds, spread_of
from beamsift.transforms.chain.duplicate_ids import FindDuplicateIds, join_shards
from beamsift.transforms.chain.meter import StageMeter
from beamsift.transforms.chain.staging import WriteStagingShards
from beamsift.transforms.chain.sums import SumSummaries
from beamsift.transforms.featurize import FeaturizeHashedNgrams
from beamsift.transforms.io.read import InputSpec, ReadDocuments, ReadTask
from beamsift.transforms.io.schema import UnifyFieldTypes
from beamsift.transforms.io.write import WriteRejectedShard, WriteSelectionShards
from beamsift.transforms.stages import stage_of
from beamsift.transforms.stages.base import Context
from beamsift.transforms.stages.dsir import MODEL_FILE, CountNgrams, SumNgramTotals

__all__ = ["MODEL_FILE", "build_pipeline", "make_chain"]


def input_spec(cfg: Config, section: str) -> InputSpec:
    return InputSpec(
        text_field=cfg[f"{section}.text_field"],
        id_field=cfg[f"{section}.id_field"],
        txt_mode=cfg[f"{section}.txt_mode"],
        batch_size=cfg["input.batch_size"],
        split_bytes=cfg["input.split_bytes"],
    )


def make_chain(cfg: Config, staging_dir: str) -> Chain:
    columns = {name: stage_of(name).columns(cfg, name) for name in cfg["stages"]}
    return Chain(staging_dir, tuple(cfg["stages"]), columns)


def build_pipeline(
    p: beam.Pipeline,
    cfg: Config,
    pool_tasks: list[ReadTask],
    pool_files: list[str],
    target_tasks: list[ReadTask] | None,
    fitted_model: tuple | None,
    out: str,
    staging_dir: str,
    progress_dir: str | None = None,
    given_models: dict | None = None,
    finish=None,
    threads: int = 1,
    resumed: tuple[str, ...] = (),
) -> None:
    """Add the run's transforms to ``p``; outputs go to ``out`` (the run's own new folder).

    ``finish``: the job's last step, called with the run's summary once everything else is
    written (``finish.py``: the manifest, then the folder published). ``threads``: the cores
    each worker process may use for itself (``run.worker_threads``). ``resumed``: the first stages,
    finished by an interrupted run whose folder this one adopted."""
    keep_dofn_specs_per_class()
    keep_option_views()
    buckets, max_ngram = cfg["featurize.buckets"], cfg["featurize.max_ngram"]

    # 1. Read, validate, featurize and stage the pool.
    pool_docs, pool_rejected = p | "ReadPool" >> ReadDocuments(
        pool_tasks, input_spec(cfg, "input"), "pool", progress_dir
    )
    count_pool = CountNgrams(buckets, cfg["dsir.min_tokens"])
    staged = (
        pool_docs
        | "FeaturizePool"
        >> beam.ParDo(FeaturizeHashedNgrams(buckets, max_ngram, StageMeter("featurize", progress_dir), threads))
        | "StagePool" >> beam.ParDo(WriteStagingShards(FileSystems.join(staging_dir, STAGED), count_pool, progress_dir))
    )
    # The repeats of an id are found by a keyed shuffle over id hashes and joined back to their
    # shard by name: no worker holds the list of every repeat. Only shard references travel on,
    # each with who starts in the running (all but the repeats of an id).
    chain = make_chain(cfg, staging_dir)
    refs = staged | "ShardRefs" >> beam.Map(lambda s: s.ref)
    repeats = refs | "FindDuplicateIds" >> FindDuplicateIds()
    shards = join_shards(refs, repeats) | "MarkDuplicateIds" >> beam.ParDo(MarkDuplicateIds(chain))

    # One combine over the staged shards: the unified field types and the raw n-gram totals.
    staging_summary = (
        staged
        | "ShardSummaries" >> beam.Map(lambda s: (s.fields, s.totals))
        | "SummarizeStaging" >> beam.CombineGlobally(TupleCombineFn(UnifyFieldTypes(), SumNgramTotals(buckets)))
    )
    ctx = Context(
        p=p,
        cfg=cfg,
        chain=chain,
        out=out,
        staging_summary=staging_summary,
        count_pool=count_pool,
        progress_dir=progress_dir,
        rejected=[pool_rejected],
        given_models=dict(given_models or {}),
        fields=AsSingleton(staging_summary | "FieldTypes" >> beam.Map(lambda summary: summary[0])),
        fitted_dsir=fitted_model,
        threads=threads,
    )

    # 2. The target, when a stage reads it: its documents (DSIR's p̂), its texts (the reference
    # model of excess_loss, the proxy's target gradient).
    if target_tasks is not None:
        ctx.target_docs, ctx.target_rejected = p | "ReadTarget" >> ReadDocuments(
            target_tasks, input_spec(cfg, "target"), "target", progress_dir
        )

    # 3. The stages, in order; then what a stage does once the chain is done.
    # A stage that an interrupted run finished is replayed from what it kept (``resume.py``);
    # every other stage leaves a done mark for a run that may have to resume after it.
    for name in cfg["stages"]:
        if name in resumed:
            shards, summary = resume_stage(ctx, name, shards)
        else:
            before = snapshot(ctx)
            shards, summary = stage_of(name).build(ctx, name, shards)
            effects = effects_of(ctx, before)
            if effects is not None:
                shards = keep_stage(ctx, name, shards, summary, effects)
        ctx.stage_summaries.append(summary)
    for name in cfg["stages"]:
        if stage_of(name).after_chain is not None:
            ctx.summaries.append(stage_of(name).after_chain(ctx, shards))

    if cfg.train_only:  # `beamsift train`: the models (artifacts/) and the summary, no selection
        ctx.summaries.append(ctx.stage_summaries | "AllStageSummaries" >> beam.Flatten())
        _summarize(ctx, finish)
        return

    # 4. Write selected/ and scores/ for every shard, and rejected/.
    write = WriteSelectionShards(
        out,
        ctx.chain,
        pool_files,
        cfg["input.text_field"],
        cfg["input.id_field"],
        ctx.selection_buckets,
        progress_dir,
        ctx.threads,
    )
    written = shards | "WriteSelection" >> beam.ParDo(write, ctx.fields).with_outputs("rejected", main="summary")
    rejected_summary = (
        [*ctx.rejected, written.rejected]
        | "AllRejected" >> beam.Flatten()
        | "BatchRejected" >> beam.BatchElements(min_batch_size=1, max_batch_size=10000)
        | "WriteRejected" >> beam.ParDo(WriteRejectedShard(out))
    )
    # Each writer's summaries are summed where they are made (a combine right after its ParDo
    # is lifted into the same stage), so per-shard n-gram vectors never pile up in the runner.
    ctx.summaries += [
        written.summary | "SumSelectionSummaries" >> beam.CombineGlobally(SumSummaries()).without_defaults(),
        rejected_summary | "SumRejectedSummaries" >> beam.CombineGlobally(SumSummaries()).without_defaults(),
        ctx.stage_summaries | "AllStageSummaries" >> beam.Flatten(),
    ]
    _summarize(ctx, finish)


def _summarize(ctx: Context, finish) -> None:
    """5. One summary for the manifest, finished by the stages that add to it (DSIR's KL); then
    the job's last step, once every write is done."""
    finishers = [fn for fn, _ in ctx.finishers]
    report = (
        ctx.summaries
        | "AllSummaries" >> beam.Flatten()
        | "SumSummaries" >> beam.CombineGlobally(SumSummaries())
        | "Report" >> beam.Map(_report, finishers, ctx.out, *[side for _, side in ctx.finishers])
    )
    _ = report | "FinishRun" >> beam.Map(finish)


def _report(summary: dict, finishers: list, out: str, *values) -> dict:
    report = {"counts": summary["counts"], "stages": summary.get("stages", {})}
    if "clusters" in summary:
        report["clusters"] = summary["clusters"]
    for key in ("quad", "perplexity_correlations"):  # what a selector's bandit, a stage's domains did
        if key in summary:
            report[key] = summary[key]
    if "examples" in summary:  # {score column: its documents at both ends}, for examples/
        report["examples"] = summary["examples"]
    if "training" in summary:  # {stage: [how each of its models trained]}
        report["training"] = summary["training"]
    if "spread" in summary:  # {stage: {ranking column: its spread over the running}}
        report["spread"] = {
            stage: {column: spread_of(part) for column, part in columns.items()}
            for stage, columns in summary["spread"].items()
        }
    for finish, value in zip(finishers, values):
        finish(report, summary, value, out)
    return report
