"""perplexity_correlations without a domain field: each document its own domain.

The paper's package allows it (a pool without domains: each text is one), and the method stays
the same, only at the document level:

    staged shards ─ every document in the running under every LM: bits per byte, its estimate ─┐
      ─ total tokens T ─ the token-weighted cut: best estimate first, the first document at which ┤
        the running total of tokens reaches desired_fraction · T (``ExactRanks``, weighted)     │
      ─ a seeded sample labelled by the cut ─ the include/exclude classifier ───────────────────┤
    staged shards ───────────────────────────── pc_estimate, pc_weight, pc_score, bpb_<model> ──┘

- the estimate of a document: ``spearmanr`` or ``sign_cdf`` of its column of bits per byte (one
  per model) against the models' errors;
- ``pc_weight``: the linear projection with a domain per document. τ_d = (tokens_d / T) /
  desired_fraction, so the documents before the cut get τ_d, the one at the cut the rest of 1,
  the others 0: the kept documents (pc_weight > 0) hold desired_fraction of the tokens. Ties in
  the estimate are broken by the id hash, as every cut of beamsift's is;
- ``pc_score``: the classifier of the domain mode, trained on the cut's labels;
- ``pc_domain`` stays null and no ``domains/`` table is written (it would have a row a document).

Every document is scored by every model (there is no sample to take of a domain of one), so the
cost is N × models forward passes: the stage for a pool that can afford that, or for a
pre-filtered one.
"""

from __future__ import annotations

import functools
import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from beamsift.transforms.chain import ApplyStage, shard_of
from beamsift.transforms.chain.meter import Metered
from beamsift.transforms.chain.sampling import SampleRunning
from beamsift.transforms.chain.seeded import PC_CLASSIFIER_STREAM
from beamsift.transforms.chain.staging import read_id_hashes, read_orders, read_staging, rows_of
from beamsift.transforms.featurize import features_from_arrow
from beamsift.transforms.io.schema import BUCKETS, N_TOKENS, ORDER, TEXT
from beamsift.transforms.models.correlations import estimate
from beamsift.transforms.selectors.exact_rank import ExactRanks
from beamsift.transforms.stages.perplexity_correlations import (
    LN2,
    ApplyPerplexityCorrelations,
    LanguageModels,
    WithModels,
    model_names,
    train_classifier,
)

DOCS_TABLE = ".documents"  # per shard: each scored document's order, id hash, tokens, bpb per model, estimate
KEY_SET = "estimate"


def _scored(chain, stage: str, shard_name: str) -> pa.Table:
    return chain.read(stage + DOCS_TABLE, shard_name)


class _ScoreDocuments(WithModels):
    """A shard -> the same shard, once every document of it in the running is scored by every
    model (bits per byte) and has its estimate, staged beside it."""

    def __init__(self, stage, chain, lms: LanguageModels, errors: list, estimator: str):
        super().__init__(lms, stage)
        self.stage, self.chain = stage, chain
        self.errors, self.estimator = np.asarray(errors, np.float64), estimator

    def score(self, item):
        shard, running = self.chain.running(self.stage, item)
        rows = np.flatnonzero(running)
        table = read_staging(shard.path, [ORDER, TEXT, N_TOKENS]).take(rows)
        nats, nbytes = self.lms.nats_and_bytes(self.loaded, table.column(TEXT).to_pylist())
        with np.errstate(divide="ignore", invalid="ignore"):
            bpb = nats / nbytes / LN2  # models × documents
        est = np.full(len(rows), np.nan)
        scorable = np.all(nbytes > 0, axis=0)  # a document with no bytes to score has no estimate
        if scorable.any():
            est[scorable] = estimate(bpb[:, scorable], self.errors, self.estimator)
        columns = {
            ORDER: table.column(ORDER),
            "id_hash": pa.array(read_id_hashes(shard.path)[rows], pa.uint64()),
            "tokens": pa.array(np.maximum(np.asarray(table.column(N_TOKENS), np.int64), 1), pa.int64()),
            **{f"m{m}": pa.array(bpb[m], pa.float64(), mask=~scorable) for m in range(len(bpb))},
            KEY_SET: pa.array(est, pa.float64(), mask=~scorable),
        }
        self.chain.write(self.stage + DOCS_TABLE, shard.name, pa.table(columns))
        yield item


class _EstimateKeys:
    """A shard -> its scored documents' (estimate, id hash, tokens): what the weighted cut ranks."""

    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def keys(self, item) -> dict:
        t = _scored(self.chain, self.stage, shard_of(item).name).filter(pc.is_valid(pc.field(KEY_SET)))
        return {KEY_SET: tuple(np.asarray(t.column(c)) for c in (KEY_SET, "id_hash", "tokens"))}


def _totals(item, stage, chain) -> np.ndarray:
    """(documents with an estimate, their tokens) of a shard."""
    t = _scored(chain, stage, shard_of(item).name)
    ok = np.asarray(t.column(KEY_SET).is_valid())
    return np.array([ok.sum(), np.asarray(t.column("tokens"))[ok].sum()], np.int64)


def _wanted(totals, fraction: float) -> dict:
    documents, tokens = (int(v) for v in totals)
    return {KEY_SET: [max(1, math.ceil(fraction * tokens))]} if documents else {}


def the_cut(totals, found: dict, fraction: float) -> dict:
    """The cut every shard applies: the boundary (estimate, id hash, tokens before it) and the
    budget in tokens, F · T."""
    documents, tokens = (int(v) for v in totals)
    boundary = next(iter(found.get(KEY_SET, {}).values()), None)
    return {"boundary": boundary, "budget": fraction * tokens, "documents": documents, "tokens": tokens}


def kept_and_weights(est, id_hash, tokens, cut: dict) -> tuple[np.ndarray, np.ndarray]:
    """Which documents the projection keeps (those ranked at or before the boundary) and their
    weight p_d: tokens / budget before the boundary, the rest of 1 at it, 0 after; NaN where there
    is no estimate."""
    if cut["boundary"] is None:
        return np.zeros(len(est), bool), np.where(np.isnan(est), np.nan, 0.0)
    key, hash_, before = cut["boundary"]
    at = (est == key) & (id_hash == np.uint64(hash_))
    kept = (est > key) | ((est == key) & (id_hash <= np.uint64(hash_)))
    weight = np.where(kept, tokens / cut["budget"], 0.0)
    weight[at] = (cut["budget"] - before) / cut["budget"]
    return kept, np.where(np.isnan(est), np.nan, weight)


def _classifier_payload(chain, shard, rows, stage: str) -> list:
    """(buckets, (estimate, id hash)) of each sampled row: its label waits for the cut."""
    t = read_staging(shard.path, [ORDER, N_TOKENS, BUCKETS]).take(rows)
    f = features_from_arrow(t.column(BUCKETS), np.asarray(t.column(N_TOKENS).combine_chunks()))
    scored = _scored(chain, stage, shard.name)
    pos = rows_of(np.asarray(scored.column(ORDER)), np.asarray(t.column(ORDER)))
    est, hashes = np.asarray(scored.column(KEY_SET))[pos], np.asarray(scored.column("id_hash"))[pos]
    return [(f.buckets[f.offsets[i] : f.offsets[i + 1]], (float(est[i]), int(hashes[i]))) for i in range(len(rows))]


def _has_estimate(chain, shard, running, stage: str) -> np.ndarray:
    scored = _scored(chain, stage, shard.name)
    orders = read_orders(shard.path)
    out = np.zeros(len(orders), bool)
    out[rows_of(orders, np.asarray(scored.column(ORDER)))] = np.asarray(scored.column(KEY_SET).is_valid())
    return out


def train_on_cut(sample: list, cut: dict, num_buckets: int, seed: int) -> bytes | None:
    est = np.array([e for _, _, (_, (e, _)) in sample], np.float64)
    hashes = np.array([h for _, _, (_, (_, h)) in sample], np.uint64)
    kept, _ = kept_and_weights(est, hashes, np.ones(len(est)), cut)
    return train_classifier([(b, int(k)) for (_, _, (b, _)), k in zip(sample, kept)], num_buckets, seed)


class ApplyPerDocument(ApplyPerplexityCorrelations):
    def score(self, shard, reasons, cut, classifier):
        n = len(reasons)
        out = {name: np.full(n, np.nan) for name, _ in self.chain.columns[self.name]}
        scored = _scored(self.chain, self.name, shard.name)
        orders = read_orders(shard.path)
        rows = rows_of(orders, np.asarray(scored.column(ORDER)))
        est = _estimates(scored)
        kept, weight = _apply_cut(scored, cut)
        out["pc_estimate"][rows], out["pc_weight"][rows] = est, weight
        for m, name in enumerate(self.names):
            out[f"bpb_{name}"][rows] = np.asarray(scored.column(f"m{m}").to_numpy(zero_copy_only=False), np.float64)
        ok = ~np.isnan(est)
        out["pc_score"][rows[ok]] = self.include_scores(shard, rows[ok], classifier, kept[ok].astype(np.float64))
        out["pc_domain"] = pa.nulls(n, pa.int64())
        return out, reasons


def _estimates(scored: pa.Table) -> np.ndarray:
    return np.asarray(scored.column(KEY_SET).to_numpy(zero_copy_only=False), np.float64)


def _apply_cut(scored: pa.Table, cut: dict) -> tuple[np.ndarray, np.ndarray]:
    """``kept_and_weights`` of a shard's scored documents."""
    hashes, tokens = np.asarray(scored.column("id_hash")), np.asarray(scored.column("tokens"))
    return kept_and_weights(_estimates(scored), hashes, tokens, cut)


def _kept(item, stage, chain, cut) -> int:
    return int(_apply_cut(_scored(chain, stage, shard_of(item).name), cut)[0].sum())


def _report(kept: int, cut: dict) -> dict:
    return {
        "perplexity_correlations": {
            "per_document": True,
            "documents": cut["documents"],
            "included": kept,
            "tokens": cut["tokens"],
            "budget_tokens": cut["budget"],
        }
    }


class WeighDocuments(beam.PTransform):
    """The stage with a domain a document: score all, the token-weighted cut, the classifier, the columns."""

    def __init__(self, name, chain, settings, fraction, num_buckets, seed, progress_dir=None):
        super().__init__()
        self.name, self.chain, self.s, self.fraction = name, chain, settings, fraction
        self.num_buckets, self.seed, self.progress_dir = num_buckets, seed, progress_dir
        self.report = None

    def expand(self, shards):
        s, name, chain = self.s, self.name, self.chain
        errors = [float(m["error"]) for m in s["models"]]
        lms = LanguageModels(s["models"], s["context"])
        scored = shards | "ScoreEveryDocument" >> beam.ParDo(_ScoreDocuments(name, chain, lms, errors, s["estimator"]))
        totals = (
            scored
            | "ShardTotals" >> beam.Map(_totals, name, chain)
            | "Totals" >> beam.CombineGlobally(lambda parts: sum(parts, np.zeros(2, np.int64)))
        )
        wanted = totals | "Budget" >> beam.Map(_wanted, self.fraction)
        found = beam.pvalue.AsSingleton(
            scored | "TokenWeightedCut" >> ExactRanks(_EstimateKeys(name, chain), wanted, weighted=True),
            default_value={},
        )
        cut_pc = totals | "Cut" >> beam.Map(the_cut, found, self.fraction)
        cut = beam.pvalue.AsSingleton(cut_pc)
        self.report = (
            scored
            | "KeptPerShard" >> beam.Map(_kept, name, chain, cut)
            | "Kept" >> beam.CombineGlobally(sum)
            | "Report" >> beam.Map(_report, cut)
        )
        payload = functools.partial(_classifier_payload, stage=name)
        eligible = functools.partial(_has_estimate, stage=name)
        classifier = beam.pvalue.AsSingleton(
            scored
            | "ClassifierSample"
            >> SampleRunning(name, chain, s["classifier_sample"], self.seed, PC_CLASSIFIER_STREAM, payload, eligible)
            | "TrainClassifier" >> beam.Map(Metered(name, train_on_cut), cut, self.num_buckets, self.seed)
        )
        names = model_names(s["models"])
        fn = ApplyPerDocument(name, chain, None, names, self.num_buckets, self.seed, self.progress_dir)
        return shards | "Weigh" >> ApplyStage(fn, cut=cut, classifier=classifier)
