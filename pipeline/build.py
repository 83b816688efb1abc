"""Assembling the DSIR selection pipeline from the transforms, top to bottom.

    read pool ─ featurize ─ stage ─┬─ find duplicate ids ─────────────┐
                                   ├─ unify field types                │ side inputs
                                   └─ count raw n-grams (fit q̂) ──┐   │
    read target ─ featurize ─ count target n-grams (fit p̂) ──────┴─ DSIR model
    staged shards ─ rank (per-shard top k) ─ merge ─ thresholds
    staged shards ─ write selected/ + scores/ ─┐
    rejected records ─ write rejected/ ────────┴─ run summary (counts, KL reduction)

This module holds no algorithm: each step is a transform from ``beamsift.transforms``.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsSingleton
from apache_beam.transforms.combiners import TupleCombineFn
from beamsift.pipeline.config import Config
from beamsift.transforms.dedup import NO_DUPLICATES, FindDuplicateIds
from beamsift.transforms.dsir import (
    CountDuplicateNgrams,
    CountNgrams,
    RankShard,
    SumNgramTotals,
    build_model,
    kl_divergence,
    subtract_totals,
)
from beamsift.transforms.featurize import FeaturizeHashedNgrams
from beamsift.transforms.meter import StageMeter
from beamsift.transforms.read import CountRejectReasons, InputSpec, ReadDocuments, ReadTask
from beamsift.transforms.schema import UnifyFieldTypes
from beamsift.transforms.select import MergeCandidates
from beamsift.transforms.stage import WriteStagingShards
from beamsift.transforms.write import SumSummaries, WriteRejectedShard, WriteSelectionShards

SUMMARY_FILE = "summary.json"
MODEL_FILE = "dsir_model.npz"


def input_spec(cfg: Config, section: str) -> InputSpec:
    return InputSpec(
        text_field=cfg[f"{section}.text_field"],
        id_field=cfg[f"{section}.id_field"],
        txt_mode=cfg[f"{section}.txt_mode"],
        batch_size=cfg["input.batch_size"],
        split_bytes=cfg["input.split_bytes"],
    )


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
) -> None:
    """Add the run's transforms to ``p``; outputs go to ``out`` (the run's own new folder)."""
    buckets, max_ngram = cfg["featurize.buckets"], cfg["featurize.max_ngram"]
    seed = cfg["seed"]

    # 1. Read, validate, featurize and stage the pool.
    pool_docs, pool_rejected = p | "ReadPool" >> ReadDocuments(
        pool_tasks, input_spec(cfg, "input"), "pool", progress_dir
    )
    count_pool = CountNgrams(buckets, cfg["dsir.min_tokens"])
    staged = (
        pool_docs
        | "FeaturizePool"
        >> beam.ParDo(FeaturizeHashedNgrams(buckets, max_ngram, StageMeter("featurize", progress_dir)))
        | "StagePool" >> beam.ParDo(WriteStagingShards(staging_dir, count_pool, progress_dir))
    )
    # Global values that may be empty are combined without defaults (each default costs the
    # runner a stage) and given their empty value at the side input.
    duplicates = AsSingleton(staged | "FindDuplicateIds" >> FindDuplicateIds(), default_value=NO_DUPLICATES)

    # Only shard references travel on. No reshuffle is needed to spread them: every pass over
    # them waits on a side input computed from all shards, which materialises them anyway.
    shards = staged | "ShardRefs" >> beam.Map(lambda s: s.ref)

    # 2. Fit the raw model q̂ over the pool (duplicates excluded) and the target model p̂.
    # One combine over the staged shards: the unified field types and the raw n-gram totals.
    sum_totals = SumNgramTotals(buckets)
    staging_summary = (
        staged
        | "ShardSummaries" >> beam.Map(lambda s: (s.fields, s.totals))
        | "SummarizeStaging" >> beam.CombineGlobally(TupleCombineFn(UnifyFieldTypes(), sum_totals))
    )
    fields = AsSingleton(staging_summary | "FieldTypes" >> beam.Map(lambda summary: summary[0]))
    duplicate_totals = (
        shards
        | "CountDuplicateNgrams" >> beam.ParDo(CountDuplicateNgrams(count_pool), duplicates)
        | "SumDuplicateTotals" >> beam.CombineGlobally(sum_totals).without_defaults()
    )
    pool_totals = staging_summary | "FitRawModel" >> beam.Map(
        lambda summary, dups: subtract_totals(summary[1], dups),
        AsSingleton(duplicate_totals, default_value=sum_totals.create_accumulator()),
    )
    summaries = []
    rejected = [pool_rejected]
    if target_tasks is not None:
        target_docs, target_rejected = p | "ReadTarget" >> ReadDocuments(
            target_tasks, input_spec(cfg, "target"), "target", progress_dir
        )
        target_totals = (
            target_docs
            | "FeaturizeTarget"
            >> beam.ParDo(FeaturizeHashedNgrams(buckets, max_ngram, StageMeter("featurize_target", progress_dir)))
            | "CountTargetNgrams" >> beam.Map(CountNgrams(buckets))
            | "FitTargetModel" >> beam.CombineGlobally(sum_totals)
        )
        rejected.append(target_rejected)
        summaries.append(target_totals | "TargetSummary" >> beam.Map(lambda t: {"counts": {"target used": t.docs}}))
        target_side = AsSingleton(target_totals)
    else:
        target_side = None
    params = {
        "k": cfg["select.k"],
        "fraction": cfg["select.fraction"],
        "smoothing": float(cfg["dsir.smoothing"]),
        "num_buckets": buckets,
        "max_ngram": max_ngram,
        "length_norm": cfg["dsir.length_norm"],
        "min_tokens": cfg["dsir.min_tokens"],
    }
    # What was rejected while reading, by reason: an impossible selection quotes it as its cause.
    reject_reasons = AsSingleton(
        list(rejected)
        | "ReadRejects" >> beam.Flatten()
        | "CountRejectReasons" >> beam.CombineGlobally(CountRejectReasons()).without_defaults(),
        default_value={},
    )
    model_pc = pool_totals | "BuildDsirModel" >> beam.Map(
        build_model, target_side, fitted_model, params, reject_reasons
    )
    model = AsSingleton(model_pc)

    # 3. Importance resampling: per-shard top k, merged into the global k-th key.
    thresholds = AsSingleton(
        shards
        | "RankShards" >> beam.ParDo(RankShard(seed, progress_dir), model, duplicates)
        | "MergeTopK" >> beam.CombineGlobally(MergeCandidates()).without_defaults(),
        default_value={},
    )

    # 4. Write selected/ and scores/ for every shard, and rejected/.
    written = shards | "WriteSelection" >> beam.ParDo(
        WriteSelectionShards(out, seed, pool_files, cfg["input.text_field"], cfg["input.id_field"], progress_dir),
        model,
        duplicates,
        thresholds,
        fields,
    ).with_outputs("rejected", main="summary")
    rejected.append(written.rejected)
    rejected_summary = (
        rejected
        | "AllRejected" >> beam.Flatten()
        | "BatchRejected" >> beam.BatchElements(min_batch_size=1, max_batch_size=10000)
        | "WriteRejected" >> beam.ParDo(WriteRejectedShard(out))
    )
    # Each writer's summaries are summed where they are made (a combine right after its ParDo
    # is lifted into the same stage), so per-shard n-gram vectors never pile up in the runner.
    summaries += [
        written.summary | "SumSelectionSummaries" >> beam.CombineGlobally(SumSummaries()).without_defaults(),
        rejected_summary | "SumRejectedSummaries" >> beam.CombineGlobally(SumSummaries()).without_defaults(),
    ]

    # 5. One summary for the manifest; the fitted model to artifacts/.
    (
        summaries
        | "AllSummaries" >> beam.Flatten()
        | "SumSummaries" >> beam.CombineGlobally(SumSummaries())
        | "WriteSummary" >> beam.Map(_write_summary, model, AsSingleton(pool_totals), staging_dir, out)
    )


def _write_summary(summary: dict, model, pool_totals, staging_dir: str, out: str) -> None:
    eps = model.smoothing
    report = {"counts": summary["counts"], "k": model.k, "eligible": model.eligible}
    if "selected_ngrams" in summary:
        kl_random = kl_divergence(model.target_counts, summary["random_ngrams"], eps)
        kl_selected = kl_divergence(model.target_counts, summary["selected_ngrams"], eps)
        report["kl"] = {
            "target_vs_random": kl_random,
            "target_vs_selected": kl_selected,
            "reduction": kl_random - kl_selected,
        }
    report["mean_ngrams"] = model.mean_ngrams
    report["pool_valid"] = pool_totals.docs
    with FileSystems.create(FileSystems.join(out, "artifacts", MODEL_FILE)) as f:
        f.write(model.to_bytes())
    with FileSystems.create(FileSystems.join(staging_dir, SUMMARY_FILE)) as f:
        f.write(json.dumps(report).encode())
