"""The perplexity_correlations stage (Thrush, Potts, Hashimoto 2024, arXiv:2409.05816): weigh the
pool's domains by how well, across existing LMs, a low loss on a domain goes with a low benchmark
error. No training of an LM of our own.

    staged shards ─ per domain: documents, bytes, tokens ────────────────────────────┐
    staged shards ─ a seeded sample per domain ─ bits per byte under every LM ──────┤
                                       X (models × domains), y (errors) ─ estimate ─ linear projection
    staged shards ─ a seeded sample, labelled include/exclude by domain ─ classifier ─┘
    staged shards ─────────────── pc_domain, pc_estimate, pc_weight, pc_score, bpb_<model> ─ columns

- bits per byte of a model on a domain: Σ loss (nats, every token of the sampled documents, the
  first predicted from the tokenizer's BOS/EOS) / Σ UTF-8 bytes / ln 2
  (``models.correlations`` has the estimators and the projection);
- ``pc_weight``: the domain's share p_d of the linear projection, τ_d = (tokens_d / Σ tokens) /
  ``desired_fraction`` (``featurize``'s token counts);
- ``pc_score``: the paper's scaling step. A bag-of-n-grams classifier (the proxy's, on the hashed
  n-grams) trained on a seeded sample labelled by whether its domain has p_d > 0: P(include) for
  every document, so that a selection can rank inside a domain and new data can be scored;
- the per-domain table (``domains/``, a ``beamsift query`` view, and the manifest's
  ``perplexity_correlations``).

The per-domain table is one value (a row per domain): a domain field with more than a million
values (a URL per document) is refused. Documents without a value for ``domain_field`` are not
weighed (their columns stay null). Without a ``domain_field`` each document is its own domain
(``perplexity_documents``).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.meter import Metered, MeteredDoFn, StageMeter
from beamsift.transforms.chain.sampling import KeepSmallest, SampleRunning
from beamsift.transforms.chain.seeded import PC_CLASSIFIER_STREAM, PC_SAMPLE_STREAM, uniform01
from beamsift.transforms.chain.staging import read_id_hashes, read_orders, read_staging, rows_of, write_parquet
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.featurize import features_from_arrow
from beamsift.transforms.io.schema import BUCKETS, N_TOKENS, ORDER, TEXT, output_column
from beamsift.transforms.models.correlations import ESTIMATORS, caps, estimate, linear_projection
from beamsift.transforms.selectors.core import SelectionError
from beamsift.transforms.stages.base import Context, Stage, setting

FIXED_COLUMNS = (
    ("pc_domain", "int64"),
    ("pc_estimate", "double"),
    ("pc_weight", "double"),
    ("pc_score", "double"),
)
DOMAINS_FILE = "domains/part-00000.parquet"
BPB_TABLE = ".bpb"  # per shard: the sampled documents' bits per byte under each model
MAX_DOMAINS = 1_000_000  # the per-domain table is one value: more than this is refused
LN2 = math.log(2)


@dataclass(frozen=True)
class PerplexityCorrelationsSettings:
    models: list = setting(
        [], "the existing LMs: a list of {path: a local folder or a hub id, error: its benchmark error, name: optional}"
    )
    domain_field: str | None = setting(None, "the input field that names each document's domain; null: each its own")
    sample_per_domain: int = setting(25, "documents of each domain every model is scored on (seeded)", at_least=1)
    estimator: str = setting("spearmanr", "spearmanr or sign_cdf", choices=ESTIMATORS)
    desired_fraction: float | None = setting(
        None, "the share of the pool's tokens to keep (tau = token share / this); null: select.fraction"
    )
    context: int = setting(512, "tokens of a document a model scores (longer ones are cut)", at_least=2)
    classifier_sample: int = setting(20000, "documents the include/exclude classifier trains on", at_least=2)


def model_names(models: list) -> list[str]:
    """Each model's column name: ``name``, or its folder's last part, as [a-z0-9_]."""
    out = []
    for m in models:
        raw = m.get("name") or str(m["path"]).rstrip("/").split("/")[-1]
        out.append(re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_") or "model")
    return out


def _columns(cfg, name):
    bpb = tuple((f"bpb_{n}", "double") for n in model_names(cfg["perplexity_correlations.models"]))
    return FIXED_COLUMNS + bpb


# ---- the models -----------------------------------------------------------------------------


class LanguageModels:
    """The configured causal LMs, loaded once per worker process; bits per byte of texts."""

    def __init__(self, specs: list, context: int):
        self.paths = [str(m["path"]) for m in specs]
        self.context = context

    def load(self):
        from beamsift.transforms.models import quiet_transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        quiet_transformers()
        loaded = []
        for path in self.paths:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            loaded.append((tok, model))
        return loaded

    def nats_and_bytes(self, loaded, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(models × texts) total loss in nats of each text, and (models × texts) its scored bytes."""
        nats = np.zeros((len(loaded), len(texts)))
        nbytes = np.zeros((len(loaded), len(texts)))
        for m, (tok, model) in enumerate(loaded):
            for start in range(0, len(texts), 8):
                part = texts[start : start + 8]
                n, b = _score(tok, model, part, self.context)
                nats[m, start : start + len(part)] = n
                nbytes[m, start : start + len(part)] = b
        return nats, nbytes


def _score(tok, model, texts: list[str], context: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from beamsift.transforms.models import pad

    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    rows, nbytes = [], []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        keep = context - (start is not None)
        ids, offsets = ids[:keep], offsets[:keep]
        end = offsets[-1][1] if offsets else 0
        nbytes.append(len(text[:end].encode("utf-8")))
        rows.append(([start] if start is not None else []) + list(ids))
    x, mask = pad(rows)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        nats = (losses * mask[:, 1:]).sum(1).numpy()
    return nats, np.asarray(nbytes, np.float64)


# ---- the domains ----------------------------------------------------------------------------


def _domains_of(chain, shard, column: str) -> list:
    values = read_staging(shard.path, [column]).column(0).to_pylist()
    return [None if v is None else str(v) for v in values]


def domain_index(chain, shard, column: str, mask: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(the rows where ``mask`` that have a domain, the distinct domains among them (sorted),
    each such row's index into those): per-domain work as array operations, not a loop a row."""
    values = _domains_of(chain, shard, column)
    rows = np.asarray([r for r in np.flatnonzero(mask) if values[r] is not None], np.int64)
    if not len(rows):
        return rows, [], np.zeros(0, np.int64)
    names, inverse = np.unique(np.array([values[r] for r in rows], dtype=str), return_inverse=True)
    return rows, names.tolist(), inverse.astype(np.int64)


class _DomainCounts(beam.DoFn):
    """A shard -> {domain: [documents, tokens]} over its documents in the running."""

    def __init__(self, stage, chain, column):
        self.stage, self.chain, self.column = stage, chain, column

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        rows, names, inverse = domain_index(self.chain, shard, self.column, running)
        tokens = np.asarray(read_staging(shard.path, [N_TOKENS]).column(0).combine_chunks(), np.int64)[rows]
        documents = np.bincount(inverse, minlength=len(names))
        total = np.zeros(len(names), np.int64)
        np.add.at(total, inverse, tokens)
        yield {d: np.array([documents[i], total[i]], np.int64) for i, d in enumerate(names)}


class _DomainSample(beam.DoFn):
    """A shard -> (domain, [(key, id hash, (shard, order, text))]) for the documents of each domain
    with the smallest seeded keys."""

    def __init__(self, stage, chain, column, n, seed):
        self.stage, self.chain, self.column, self.n, self.seed = stage, chain, column, n, seed

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        rows, names, inverse = domain_index(self.chain, shard, self.column, running)
        if not len(rows):
            return
        id_hash = read_id_hashes(shard.path)
        keys = uniform01(id_hash, self.seed, PC_SAMPLE_STREAM)
        # Each domain's rows by (key, id hash); its first n are its sample.
        order = np.lexsort((id_hash[rows], keys[rows], inverse))
        rows, inverse = rows[order], inverse[order]
        starts = np.flatnonzero(np.r_[True, inverse[1:] != inverse[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        table = read_staging(shard.path, [ORDER, TEXT])
        orders, texts = table.column(ORDER).to_pylist(), table.column(TEXT)
        for start, end in zip(starts.tolist(), ends.tolist()):
            picked = rows[start : min(end, start + self.n)]
            yield (
                names[inverse[start]],
                [(float(keys[r]), int(id_hash[r]), (shard.name, orders[r], texts[r].as_py())) for r in picked],
            )


class _Loaded:
    def __init__(self, models: list):
        self.models = models


class WithModels(MeteredDoFn):
    """A DoFn that scores with the configured LMs: loaded once per worker process (``self.loaded``),
    its work counted in the stage's time. A subclass implements ``score(element)``."""

    def __init__(self, lms: LanguageModels, stage: str):
        self.lms = lms
        self._shared = shared.Shared()
        self.meter = StageMeter(stage)

    def setup(self):
        super().setup()
        self.loaded = self._shared.acquire(lambda: _Loaded(self.lms.load()), tag=repr(self.lms.paths)).models

    def process(self, element):
        started = self.meter.start()
        yield from self.score(element)
        self.meter.done(started)

    def score(self, element):
        raise NotImplementedError


class _ScoreSample(WithModels):
    """(domain, its sample) -> (domain, Σ nats per model, Σ bytes per model, [(shard, order, bpb per model)])."""

    def score(self, kv):
        domain, sample = kv
        docs = [p for _, _, p in sample]
        nats, nbytes = self.lms.nats_and_bytes(self.loaded, [t for _, _, t in docs])
        with np.errstate(divide="ignore", invalid="ignore"):
            bpb = nats / nbytes / LN2
        per_doc = [(s, o, bpb[:, i].tolist()) for i, (s, o, _) in enumerate(docs)]
        yield domain, nats.sum(1), nbytes.sum(1), per_doc


def domain_table(scored: list, counts: dict, errors: list, estimator: str, fraction: float) -> dict:
    """{domain: row} with its index, documents, tokens, bits per byte under each model, estimate,
    weight (p_d) and include (p_d > 0). A domain whose sample has no bytes is left out."""
    if len(counts) > MAX_DOMAINS:
        raise SelectionError(
            f"perplexity_correlations.domain_field names {len(counts):,} domains; at most {MAX_DOMAINS:,} "
            "(a field with a value per document, such as a URL, is not a domain: use its host)"
        )
    bpb = {d: nats / b / LN2 for d, nats, b, _ in scored if np.all(b > 0)}
    domains = sorted(d for d in counts if d in bpb)
    if not domains:
        raise SelectionError("perplexity_correlations: no domain has a document in the running")
    X = np.stack([bpb[d] for d in domains], axis=1)  # models × domains
    est = estimate(X, np.asarray(errors, np.float64), estimator)
    tokens = np.array([max(int(counts[d][1]), 1) for d in domains], np.float64)
    weight = linear_projection(est, caps(tokens, fraction))
    return {
        d: {
            "index": i,
            "documents": int(counts[d][0]),
            "tokens": int(counts[d][1]),
            "bpb": X[:, i].tolist(),
            "estimate": float(est[i]),
            "weight": float(weight[i]),
            "include": bool(weight[i] > 0),
        }
        for i, d in enumerate(domains)
    }


def _write_domains(table: dict, out: str, names: list[str]) -> dict:
    domains = sorted(table, key=lambda d: table[d]["index"])
    columns = {
        "domain": pa.array(domains, pa.string()),
        "pc_domain": pa.array([table[d]["index"] for d in domains], pa.int64()),
        "documents": pa.array([table[d]["documents"] for d in domains], pa.int64()),
        "tokens": pa.array([table[d]["tokens"] for d in domains], pa.int64()),
        **{f"bpb_{n}": pa.array([table[d]["bpb"][m] for d in domains], pa.float64()) for m, n in enumerate(names)},
        "pc_estimate": pa.array([table[d]["estimate"] for d in domains], pa.float64()),
        "pc_weight": pa.array([table[d]["weight"] for d in domains], pa.float64()),
        "include": pa.array([table[d]["include"] for d in domains], pa.bool_()),
    }
    write_parquet(pa.table(columns), FileSystems.join(out, DOMAINS_FILE))
    included = [d for d in domains if table[d]["include"]]
    return {"perplexity_correlations": {"domains": len(domains), "included": len(included)}}


# ---- the include/exclude classifier ---------------------------------------------------------


def _classifier_payload(chain, shard, rows, column: str) -> list:
    table = read_staging(shard.path, [N_TOKENS, BUCKETS, column]).take(rows)
    f = features_from_arrow(table.column(BUCKETS), np.asarray(table.column(N_TOKENS).combine_chunks()))
    domains = [None if v is None else str(v) for v in table.column(2).to_pylist()]
    return [(f.buckets[f.offsets[i] : f.offsets[i + 1]], domains[i]) for i in range(len(rows))]


def train_include_classifier(sample: list, table: dict, num_buckets: int, seed: int) -> bytes | None:
    """The classifier of a sample of (buckets, domain), labelled by whether the domain is included."""
    return train_classifier([(b, int(table[d]["include"])) for _, _, (b, d) in sample if d in table], num_buckets, seed)


def train_classifier(rows: list, num_buckets: int, seed: int) -> bytes | None:
    """A bag-of-n-grams classifier of include (1) against exclude (0) from (buckets, label) rows,
    pickled state; None where every row has the same label (nothing to learn: pc_score is that
    label)."""
    import io

    import torch
    from beamsift.transforms import models

    labels = {y for _, y in rows}
    if len(labels) < 2:
        return None
    x_buckets = [b for b, _ in rows]
    y = torch.tensor([v for _, v in rows])
    model = models.new_classifier(num_buckets, 2, ["exclude", "include"], 64, seed)

    def loss_of(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0])[0], batch[1])

    model, _ = models.train(
        model,
        lambda idx: (models.dense_features([x_buckets[i] for i in idx], num_buckets), y[idx]),
        len(rows),
        models.TrainSettings(epochs=5, learning_rate=1e-3),
        seed,
        loss_of,
    )
    buffer = io.BytesIO()
    torch.save({"state": model.state_dict()}, buffer)
    return buffer.getvalue()


class ApplyPerplexityCorrelations(ShardStageFn):
    def __init__(self, name, chain, column, names, num_buckets, seed, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.column, self.names, self.num_buckets, self.seed = column, names, num_buckets, seed
        self._model_key = None

    def _classifier(self, data):
        import io

        import torch
        from beamsift.transforms import models

        if self._model_key != id(data):
            self._model = None
            if data is not None:
                model = models.new_classifier(self.num_buckets, 2, ["exclude", "include"], 64, self.seed)
                model.load_state_dict(torch.load(io.BytesIO(data))["state"])
                self._model = model.eval()
            self._model_key = id(data)
        return self._model

    def score(self, shard, reasons, table, classifier, written):
        n = len(reasons)
        running = running_mask(reasons)
        out = {name: np.full(n, np.nan) for name, _ in self.chain.columns[self.name]}
        out["pc_domain"] = np.full(n, -1, np.int64)
        rows, names, inverse = domain_index(self.chain, shard, self.column, running)
        known = np.array([d in table for d in names], bool)
        rows, inverse = rows[known[inverse]], inverse[known[inverse]]
        for key, column in (("index", "pc_domain"), ("estimate", "pc_estimate"), ("weight", "pc_weight")):
            per_domain = np.array([table[d][key] if d in table else 0 for d in names])
            out[column][rows] = per_domain[inverse] if len(names) else per_domain
        labels = np.array([float(table[d]["include"]) if d in table else 0.0 for d in names])[inverse]
        out["pc_score"][rows] = self.include_scores(shard, rows, classifier, labels)
        self._sampled_bpb(shard, out, written)
        out["pc_domain"] = pa.array(out["pc_domain"], pa.int64(), mask=out["pc_domain"] < 0)
        return out, reasons

    def include_scores(self, shard, rows: np.ndarray, classifier, labels) -> np.ndarray:
        """P(include) of the shard's ``rows`` under the classifier; their own labels where there is
        no classifier (every sampled document had the same label)."""
        import torch
        from beamsift.transforms import models

        model = self._classifier(classifier)
        if not len(rows) or model is None:
            return np.asarray(labels, np.float64)
        t = read_staging(shard.path, [N_TOKENS, BUCKETS]).take(rows)
        f = features_from_arrow(t.column(BUCKETS), np.asarray(t.column(N_TOKENS).combine_chunks()))
        scores = []
        for start in range(0, len(rows), 256):
            idx = range(start, min(start + 256, len(rows)))
            x = models.dense_features([f.buckets[f.offsets[i] : f.offsets[i + 1]] for i in idx], self.num_buckets)
            with torch.no_grad():
                scores.append(torch.softmax(model(x)[0], -1)[:, 1].numpy())
        return np.concatenate(scores)

    def _sampled_bpb(self, shard, out, written):
        path = self.chain.path(self.name + BPB_TABLE, shard.name)
        if not written or not FileSystems.exists(path):
            return
        t = read_staging(path)
        pos = rows_of(read_orders(shard.path), t.column(ORDER).combine_chunks())
        for m, name in enumerate(self.names):
            out[f"bpb_{name}"][pos] = np.asarray(t.column(f"m{m}").combine_chunks())


class _WriteBpb(beam.DoFn):
    def __init__(self, chain, table, models: int):
        self.chain, self.table, self.models = chain, table, models

    def process(self, kv):
        shard, docs = kv
        docs = sorted(docs, key=lambda d: d[0])
        columns = {ORDER: pa.array([d[0] for d in docs], pa.int64())}
        for m in range(self.models):
            columns[f"m{m}"] = pa.array([d[1][m] for d in docs], pa.float64())
        self.chain.write(self.table, shard, pa.table(columns))
        yield 1


class WeighDomains(beam.PTransform):
    """The stage: domain counts, a scored sample per domain, the estimate and projection, the
    classifier, the columns."""

    def __init__(self, name, chain, settings, column, fraction, out, num_buckets, seed, progress_dir=None):
        super().__init__()
        self.name, self.chain, self.s, self.column = name, chain, settings, column
        self.fraction, self.out, self.num_buckets, self.seed = fraction, out, num_buckets, seed
        self.progress_dir = progress_dir
        self.report = None  # the manifest's part (one element)

    def expand(self, shards):
        s = self.s
        names = model_names(s["models"])
        errors = [float(m["error"]) for m in s["models"]]
        counts = beam.pvalue.AsSingleton(
            shards
            | "DomainCounts" >> beam.ParDo(_DomainCounts(self.name, self.chain, self.column))
            | "SumDomainCounts" >> beam.CombineGlobally(Sum(start={}))
        )
        lms = LanguageModels(s["models"], s["context"])
        scored = (
            shards
            | "DomainSample"
            >> beam.ParDo(_DomainSample(self.name, self.chain, self.column, s["sample_per_domain"], self.seed))
            | "KeepDomainSample" >> beam.CombinePerKey(KeepSmallest(s["sample_per_domain"]))
            | "BitsPerByte" >> beam.ParDo(_ScoreSample(lms, self.name))
        )
        table_pc = (
            scored
            | "AllDomains" >> beam.combiners.ToList()
            | "DomainTable" >> beam.Map(domain_table, counts, errors, s["estimator"], self.fraction)
        )
        table = beam.pvalue.AsSingleton(table_pc)
        self.report = table_pc | "WriteDomains" >> beam.Map(_write_domains, self.out, names)
        written = beam.pvalue.AsSingleton(
            scored
            | "SampledDocs" >> beam.FlatMap(lambda t: [(shard, (order, bpb)) for shard, order, bpb in t[3]])
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteBpb" >> beam.ParDo(_WriteBpb(self.chain, self.name + BPB_TABLE, len(names)))
            | "Written" >> beam.CombineGlobally(sum),
            default_value=0,
        )
        payload = functools.partial(_classifier_payload, column=self.column)
        classifier = beam.pvalue.AsSingleton(
            shards
            | "ClassifierSample"
            >> SampleRunning(self.name, self.chain, s["classifier_sample"], self.seed, PC_CLASSIFIER_STREAM, payload)
            | "TrainClassifier"
            >> beam.Map(Metered(self.name, train_include_classifier), table, self.num_buckets, self.seed)  # fmt: skip
        )
        fn = ApplyPerplexityCorrelations(self.name, self.chain, self.column, names, self.num_buckets, self.seed,
                                         self.progress_dir)  # fmt: skip
        return shards | "Weigh" >> ApplyStage(fn, table=table, classifier=classifier, written=written)


# ---- the stage --------------------------------------------------------------------------------


def desired_fraction(cfg) -> float | None:
    given = cfg["perplexity_correlations.desired_fraction"]
    return given if given is not None else cfg["select.fraction"]


def _check(cfg, name, available, fail) -> None:
    key = "perplexity_correlations"
    models = cfg[f"{key}.models"]
    if len(models) < 2 or not all(isinstance(m, dict) and "path" in m and "error" in m for m in models):
        fail(
            f"{key}.models",
            f"{key}.models needs at least 2 models, each {{path: a folder or hub id, error: its benchmark error}}",
        )
    for m in models if isinstance(models, list) else []:
        if isinstance(m, dict) and not isinstance(m.get("error"), (int, float)):
            fail(
                f"{key}.models",
                f"{key}.models: {m.get('path')!r} has error {m.get('error')!r}: a number (lower is better)",
            )
    names = model_names([m for m in models if isinstance(m, dict) and "path" in m])
    if len(set(names)) != len(names):
        fail(f"{key}.models", f"{key}.models: two models are both named {sorted(names)}; give each a distinct name")
    if cfg[f"{key}.domain_field"] is None and cfg["select.group_column"] == "pc_domain":
        fail(
            "select.group_column",
            f"{key}.domain_field is null, so each document is its own domain and pc_domain stays empty: "
            "select the documents the projection keeps with select.method: threshold, select.column: "
            "pc_weight, select.min: 1.0e-300 (any weight above 0), or set the domain field",
        )
    fraction = desired_fraction(cfg)
    if fraction is None or not 0 < fraction <= 1:
        fail(
            f"{key}.desired_fraction",
            f"set {key}.desired_fraction (the share of the pool's tokens to keep, in (0, 1]) or select.fraction",
        )


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    section = {
        k: cfg[f"perplexity_correlations.{k}"]
        for k in ("models", "sample_per_domain", "estimator", "context", "classifier_sample")
    }
    fraction = float(desired_fraction(cfg))
    field = cfg["perplexity_correlations.domain_field"]
    if field is None:  # each document its own domain
        from beamsift.transforms.stages.perplexity_documents import WeighDocuments

        stage = WeighDocuments(name, ctx.chain, section, fraction, cfg["featurize.buckets"], ctx.seed, ctx.progress_dir)
    else:
        stage = WeighDomains(name, ctx.chain, section, output_column(field), fraction, ctx.out,
                             cfg["featurize.buckets"], ctx.seed, ctx.progress_dir)  # fmt: skip
    result = shards | "Stage_" + name >> stage
    ctx.summaries.append(stage.report)
    return result


STAGE = Stage(
    kind="perplexity_correlations",
    summary="domains weighed by how their loss across existing LMs goes with benchmark error (Thrush et al. 2024)",
    settings=PerplexityCorrelationsSettings,
    columns=_columns,
    all_columns=tuple(c for c, _ in FIXED_COLUMNS),
    check=_check,
    build=_build,
    cluster_stats_skip=("pc_domain",),
)
