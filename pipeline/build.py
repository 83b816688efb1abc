"""Assembling a run's pipeline from its config: read and stage the pool once, then the stages in
the order ``stages:`` lists them, then the writers.

    read pool ─ featurize ─ stage ─┬─ find duplicate ids ──────────────┐ side inputs
                                   ├─ unify field types                 │
                                   └─ count raw n-grams (DSIR's q̂) ─┐   │
    read target ─ featurize ─ count target n-grams (DSIR's p̂) ─────┴─ DSIR model
    staged shards ─ stage 1 ─ stage 2 ─ ... ─ select ─ write selected/ + scores/ ─┐
    rejected records ─ write rejected/ ────────────────────────────────────────────┴─ summary

A scorer adds columns, a filter takes documents out of the running with a reason, the selector
picks the budget from what is left (``transforms/chain.py``). This module holds no algorithm:
each step is a transform from ``beamsift.transforms``; it only wires them as the config says.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList, AsSingleton
from apache_beam.transforms.combiners import TupleCombineFn
from beamsift.pipeline.config import Config, stage_kind
from beamsift.pipeline.saved import cluster_meta, resolve_model
from beamsift.transforms import balance, cluster, clusterstats, dsir, proxy, reweight, semdedup, sensitivity
from beamsift.transforms.chain import STAGED, ApplyStage, Chain, spread_of
from beamsift.transforms.dedup import NO_DUPLICATES, FindDuplicateIds
from beamsift.transforms.featurize import FeaturizeHashedNgrams
from beamsift.transforms.meter import StageMeter
from beamsift.transforms.read import CountRejectReasons, InputSpec, ReadDocuments, ReadTask
from beamsift.transforms.schema import TEXT, UnifyFieldTypes, output_column
from beamsift.transforms.select import Cut, CutStage, explain_running
from beamsift.transforms.stage import WriteStagingShards
from beamsift.transforms.write import SumSummaries, WriteRejectedShard, WriteSelectionShards

SUMMARY_FILE = "summary.json"
MODEL_FILE = "dsir_model.npz"
SELECT_COLUMNS = (("selected", "bool"), ("_in_random", "bool"))


def input_spec(cfg: Config, section: str) -> InputSpec:
    return InputSpec(
        text_field=cfg[f"{section}.text_field"],
        id_field=cfg[f"{section}.id_field"],
        txt_mode=cfg[f"{section}.txt_mode"],
        batch_size=cfg["input.batch_size"],
        split_bytes=cfg["input.split_bytes"],
    )


def make_chain(cfg: Config, staging_dir: str) -> Chain:
    columns = {}
    for name in cfg["stages"]:
        kind = stage_kind(name)
        if kind == "dsir":
            columns[name] = dsir.COLUMNS
        elif kind == "select":
            columns[name] = SELECT_COLUMNS + (sensitivity.COLUMNS if cfg["select.method"] == "sensitivity" else ())
        elif kind == "proxy":
            columns[name] = proxy.proxy_columns(proxy_settings(cfg))
        elif kind == "excess_loss":
            columns[name] = proxy.EXCESS_COLUMNS
        elif kind == "reweight":
            columns[name] = reweight.COLUMNS
        elif kind == "embed":
            columns[name] = cluster.EMBED_COLUMNS
        elif kind == "cluster":
            columns[name] = cluster.CLUSTER_COLUMNS
        elif kind == "dedup":
            columns[name] = semdedup.COLUMNS
    return Chain(staging_dir, tuple(cfg["stages"]), columns)


def proxy_settings(cfg: Config, model: str | None = None) -> proxy.ProxySettings:
    label = cfg["input.label_field"]
    return proxy.ProxySettings(
        train_only=cfg.train_only,
        model=model if model is not None else cfg["proxy.model"],
        seeds=cfg["proxy.seeds"],
        sample=cfg["proxy.sample"],
        epochs=cfg["proxy.epochs"],
        batch_size=cfg["proxy.batch_size"],
        learning_rate=cfg["proxy.learning_rate"],
        holdout=float(cfg["proxy.holdout"]),
        patience=cfg["proxy.patience"],
        hidden=cfg["proxy.hidden"],
        vocab_size=cfg["proxy.vocab_size"],
        layers=cfg["proxy.layers"],
        dim=cfg["proxy.dim"],
        heads=cfg["proxy.heads"],
        context=cfg["proxy.context"],
        grand=cfg["proxy.grand"],
        self_influence=cfg["proxy.self_influence"],
        target_influence=cfg["proxy.target_influence"],
        max_ngram=cfg["featurize.max_ngram"],
        label_column=output_column(label) if label is not None else None,
        num_buckets=cfg["featurize.buckets"],
        threads=cfg["proxy.threads"],
    )


def filter_cut(cfg: Config, name: str) -> Cut:
    c = lambda key: cfg[f"{name}.{key}"]  # noqa: E731
    if c("min") is not None or c("max") is not None:
        return Cut(c("column"), "threshold", low=c("min"), high=c("max"))
    if c("keep_bottom") is not None:
        return Cut(c("column"), "bottom", fraction=c("keep_bottom"))
    return Cut(c("column"), "band" if c("drop_top") else "top", fraction=c("keep_top"), offset=c("drop_top"))


def select_cut(cfg: Config) -> Cut:
    method, column = cfg["select.method"], cfg["select.column"]
    key_column = None
    if method == "importance" and column in (None, "dsir_log_weight"):
        # DSIR's own importance resampling: its key holds the (length-normalised) log weight plus
        # the seeded Gumbel noise.
        column, key_column = "dsir_log_weight", "dsir_key"
    return Cut(
        column or "",
        method,
        k=cfg["select.k"],
        fraction=cfg["select.fraction"],
        offset=cfg["select.offset"],
        low=cfg["select.min"],
        high=cfg["select.max"],
        key_column=key_column,
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
    kinds = [stage_kind(name) for name in cfg["stages"]]
    chain = make_chain(cfg, staging_dir)

    # 1. Read, validate, featurize and stage the pool.
    pool_docs, pool_rejected = p | "ReadPool" >> ReadDocuments(
        pool_tasks, input_spec(cfg, "input"), "pool", progress_dir
    )
    count_pool = dsir.CountNgrams(buckets, cfg["dsir.min_tokens"])
    staged = (
        pool_docs
        | "FeaturizePool"
        >> beam.ParDo(FeaturizeHashedNgrams(buckets, max_ngram, StageMeter("featurize", progress_dir)))
        | "StagePool" >> beam.ParDo(WriteStagingShards(FileSystems.join(staging_dir, STAGED), count_pool, progress_dir))
    )
    # Global values that may be empty are combined without defaults (each default costs the
    # runner a stage) and given their empty value at the side input.
    duplicates = AsSingleton(staged | "FindDuplicateIds" >> FindDuplicateIds(), default_value=NO_DUPLICATES)
    # Only shard references travel on. No reshuffle is needed to spread them: every pass over
    # them waits on a side input computed from all shards, which materialises them anyway.
    shards = staged | "ShardRefs" >> beam.Map(lambda s: s.ref)

    # One combine over the staged shards: the unified field types and the raw n-gram totals.
    sum_totals = dsir.SumNgramTotals(buckets)
    staging_summary = (
        staged
        | "ShardSummaries" >> beam.Map(lambda s: (s.fields, s.totals))
        | "SummarizeStaging" >> beam.CombineGlobally(TupleCombineFn(UnifyFieldTypes(), sum_totals))
    )
    fields = AsSingleton(staging_summary | "FieldTypes" >> beam.Map(lambda summary: summary[0]))
    rejected = [pool_rejected]
    summaries = []

    # 2. The target, read and featurized for DSIR's p̂; its texts for excess_loss's reference model.
    target_totals = target_texts = None
    if target_tasks is not None:
        target_docs, target_rejected = p | "ReadTarget" >> ReadDocuments(
            target_tasks, input_spec(cfg, "target"), "target", progress_dir
        )
        label = output_column(cfg["input.label_field"]) if cfg["input.label_field"] else None
        target_texts = AsSingleton(
            target_docs
            | "TargetTexts" >> beam.Map(_texts_and_labels, label)
            | "AllTargetTexts"
            >> beam.CombineGlobally(lambda parts: sorted((x for part in parts for x in part), key=str))
        )
    if "dsir" in kinds and target_tasks is not None:
        target_totals = (
            target_docs
            | "FeaturizeTarget"
            >> beam.ParDo(FeaturizeHashedNgrams(buckets, max_ngram, StageMeter("featurize_target", progress_dir)))
            | "CountTargetNgrams" >> beam.Map(dsir.CountNgrams(buckets))
            | "FitTargetModel" >> beam.CombineGlobally(sum_totals)
        )
        rejected.append(target_rejected)
        summaries.append(target_totals | "TargetSummary" >> beam.Map(lambda t: {"counts": {"target used": t.docs}}))

    # What was rejected while reading, by reason: an impossible selection quotes it as its cause.
    reject_reasons = AsSingleton(
        list(rejected)
        | "ReadRejects" >> beam.Flatten()
        | "CountRejectReasons" >> beam.CombineGlobally(CountRejectReasons()).without_defaults(),
        default_value={},
    )
    model = None
    if "dsir" in kinds:
        model = _fit_dsir(
            cfg,
            staging_summary,
            shards,
            duplicates,
            sum_totals,
            count_pool,
            target_totals,
            fitted_model,
            reject_reasons,
        )

    # 3. The stages, in order.
    stage_summaries = []
    for name, kind in zip(cfg["stages"], kinds):
        if kind == "dsir":
            fn = dsir.ScoreDsirShard(name, chain, seed, progress_dir)
            shards, summary = shards | "Stage_" + name >> ApplyStage(fn, duplicates, model)
        elif kind in ("proxy", "excess_loss"):
            excess = kind == "excess_loss"
            # Each stage applies its own saved model, if any (the excess_loss stage never the proxy's).
            settings = dataclasses.replace(proxy_settings(cfg), model=_given(cfg, f"{kind}.model"))
            shards, summary = shards | "Stage_" + name >> proxy.ModelStage(
                name,
                chain,
                settings,
                seed,
                duplicates,
                FileSystems.join(out, "artifacts"),
                excess,
                target_texts,
                progress_dir,
            )
        elif kind == "embed":
            shards, summary = shards | "Stage_" + name >> cluster.EmbedDocuments(
                name,
                chain,
                cfg["embed.dim"],
                seed,
                buckets,
                duplicates,
                cfg["embed.method"],
                cfg["embed.sample"],
                progress_dir,
                _encoder(cfg),
                *_embedding_folders(cfg, kinds, out),
            )
        elif kind == "cluster":
            shards, summary = shards | "Stage_" + name >> cluster.ClusterDocuments(
                name,
                chain,
                cfg["cluster.k"],
                cfg["cluster.sample"],
                seed,
                duplicates,
                FileSystems.join(out, "artifacts"),
                _given(cfg, "cluster.model"),
                progress_dir,
                cfg["cluster.passes"],
                cluster_meta(cfg),
            )
        elif kind == "dedup":
            shards, summary = shards | "Stage_" + name >> semdedup.DeduplicateDocuments(
                name,
                chain,
                float(cfg["dedup.epsilon"]),
                duplicates,
                progress_dir,
                cfg["dedup.probes"],
                _dedup_tfidf(cfg, buckets),
            )
        elif kind == "reweight":
            shards, summary = shards | "Stage_" + name >> reweight.ReweightByLoss(
                name,
                chain,
                cfg["reweight.column"],
                cfg["reweight.strategy"],
                float(cfg["reweight.temperature"]),
                tuple(cfg["reweight.bounds"]),
                seed,
                duplicates,
                progress_dir,
            )
        elif kind == "filter":
            shards, summary = shards | "Stage_" + name >> CutStage(
                name, filter_cut(cfg, name), "filter", chain, seed, duplicates, progress_dir
            )
        else:  # select
            # The earlier stages' per-shard summaries, summed only if the budget cannot be met.
            prior = AsList(
                (stage_summaries or [p | "NoPriorStages" >> beam.Create([{}])]) | "PriorSummaries" >> beam.Flatten()
            )
            explain = functools.partial(_explain, cfg["dsir.min_tokens"] if "dsir" in kinds else None)
            if cfg["select.method"] == "balanced":
                shards, summary = shards | "Stage_" + name >> balance.BalancedSelection(
                    name,
                    chain,
                    cfg["select.column"],
                    cfg["select.k"],
                    cfg["select.fraction"],
                    cfg["select.quota"],
                    cfg["select.quota_column"],
                    seed,
                    duplicates,
                    progress_dir,
                )
                stage_summaries.append(summary)
                continue
            if cfg["select.method"] == "sensitivity":
                shards, summary = shards | "Stage_" + name >> sensitivity.SensitivitySampling(
                    name, chain, cfg["select.k"], cfg["select.fraction"], seed, duplicates, progress_dir
                )
                stage_summaries.append(summary)
                continue
            shards, summary = shards | "Stage_" + name >> CutStage(
                name,
                select_cut(cfg),
                "select",
                chain,
                seed,
                duplicates,
                progress_dir,
                explain,
                (reject_reasons, prior),
            )
        stage_summaries.append(summary)

    if "cluster" in kinds:
        statistics = clusterstats.ClusterStatistics(chain, cfg["stages"][-1], out, fields)
        summaries.append(shards | "ClusterStatistics" >> statistics)

    if cfg.train_only:  # `beamsift train`: the models (artifacts/) and the summary, no selection
        summaries.append(stage_summaries | "AllStageSummaries" >> beam.Flatten())
        _summarize(summaries, model, staging_dir, out)
        return

    # 4. Write selected/ and scores/ for every shard, and rejected/.
    write = WriteSelectionShards(
        out,
        chain,
        pool_files,
        cfg["input.text_field"],
        cfg["input.id_field"],
        buckets if "dsir" in kinds else None,
        progress_dir,
    )
    written = shards | "WriteSelection" >> beam.ParDo(write, duplicates, fields).with_outputs(
        "rejected", main="summary"
    )
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
        stage_summaries | "AllStageSummaries" >> beam.Flatten(),
    ]

    _summarize(summaries, model, staging_dir, out)


def _summarize(summaries: list, model, staging_dir: str, out: str) -> None:
    """5. One summary for the manifest; the fitted models to artifacts/."""
    (
        summaries
        | "AllSummaries" >> beam.Flatten()
        | "SumSummaries" >> beam.CombineGlobally(SumSummaries())
        | "WriteSummary" >> beam.Map(_write_summary, model, staging_dir, out)
    )


def _dedup_tfidf(cfg: Config, num_buckets: int) -> tuple | None:
    """(num_buckets, dim, seed) when SemDeDup compares projected TF-IDF rather than the embedding."""
    compare = cfg["dedup.compare"]
    if compare == "auto":
        compare = "tfidf" if cfg["embed.method"] == "svd" else "embedding"
    return (num_buckets, semdedup.TFIDF_DIM, cfg["seed"]) if compare == "tfidf" else None


def _given(cfg: Config, key: str) -> str | None:
    """The stage folder of a saved model the config names (a run's folder, its artifacts/, ...)."""
    return resolve_model(key, cfg[key]) if cfg[key] is not None else None


def _embedding_folders(cfg: Config, kinds: list, out: str) -> tuple:
    """(where the fitted embedding is saved, the saved one to apply): the cluster stage's folders,
    since its centroids are only meaningful in the space of that embedding."""
    if "cluster" not in kinds or cfg["embed.method"] == "model":
        return None, None
    given = _given(cfg, "cluster.model")
    return (FileSystems.join(out, "artifacts", "cluster") if given is None else None), given


def _encoder(cfg: Config) -> tuple | None:
    if cfg["embed.method"] != "model":
        return None
    # The model is resolved on the worker (setup): the package's folder is the worker's own.
    return (cfg["embed.model"], cfg["embed.max_tokens"], cfg["embed.batch_size"], cfg["embed.threads"])


def _texts_and_labels(table, label: str | None) -> list[tuple]:
    texts = table.column(TEXT).to_pylist()
    labels = table.column(label).to_pylist() if label in table.column_names else [None] * len(texts)
    return list(zip(texts, labels))


def _explain(min_tokens, total, rejects, prior: list) -> str:
    summed = SumSummaries()
    return explain_running(total, rejects, summed.extract_output(summed.merge_accumulators(prior)), min_tokens)


def _fit_dsir(cfg, staging_summary, shards, duplicates, sum_totals, count_pool, target_totals, fitted, rejects):
    """DSIR's model as a side input: the pool's n-gram totals less the duplicates' (q̂), and the
    target's (p̂), or a saved model's counts."""
    duplicate_totals = (
        shards
        | "CountDuplicateNgrams" >> beam.ParDo(dsir.CountDuplicateNgrams(count_pool), duplicates)
        | "SumDuplicateTotals" >> beam.CombineGlobally(sum_totals).without_defaults()
    )
    pool_totals = staging_summary | "FitRawModel" >> beam.Map(
        lambda summary, dups: dsir.subtract_totals(summary[1], dups),
        AsSingleton(duplicate_totals, default_value=sum_totals.create_accumulator()),
    )
    params = {
        "smoothing": float(cfg["dsir.smoothing"]),
        "num_buckets": cfg["featurize.buckets"],
        "max_ngram": cfg["featurize.max_ngram"],
        "length_norm": cfg["dsir.length_norm"],
        "min_tokens": cfg["dsir.min_tokens"],
    }
    target_side = AsSingleton(target_totals) if target_totals is not None else None
    model = pool_totals | "BuildDsirModel" >> beam.Map(dsir.build_model, target_side, fitted, params, rejects)
    return AsSingleton(model)


def _write_summary(summary: dict, model, staging_dir: str, out: str) -> None:
    report = {"counts": summary["counts"], "stages": summary.get("stages", {})}
    if "clusters" in summary:
        report["clusters"] = summary["clusters"]
    if "training" in summary:  # {stage: [how each of its models trained]}
        report["training"] = summary["training"]
    if "spread" in summary:  # {stage: {ranking column: its spread over the running}}
        report["spread"] = {
            stage: {column: spread_of(part) for column, part in columns.items()}
            for stage, columns in summary["spread"].items()
        }
    if model is not None:
        report["dsir"] = {"eligible": model.eligible, "mean_ngrams": model.mean_ngrams}
        if "selected_ngrams" in summary:
            eps = model.smoothing
            kl_random = dsir.kl_divergence(model.target_counts, summary["random_ngrams"], eps)
            kl_selected = dsir.kl_divergence(model.target_counts, summary["selected_ngrams"], eps)
            report["dsir"]["kl"] = {
                "target_vs_random": kl_random,
                "target_vs_selected": kl_selected,
                "reduction": kl_random - kl_selected,
            }
        with FileSystems.create(FileSystems.join(out, "artifacts", MODEL_FILE)) as f:
            f.write(model.to_bytes())
    with FileSystems.create(FileSystems.join(staging_dir, SUMMARY_FILE)) as f:
        f.write(json.dumps(report).encode())
