"""The model stages: a proxy model trained in the run (or given), and scores under it.

    staged shards ─ sample (seeded by (seed, id), ≤ proxy.sample docs) ─ train K proxies ─┐
    staged shards ────────────────────── score every document in the running ────────────┴─ columns

``proxy``: with labels (``input.label_field``) a bag-of-n-grams classifier, without a small
GPT-2; K seeds (``proxy.seeds``), each trained with early stopping on a held-out share of the
sample. Columns: ``loss``, ``perplexity``, ``el2n``, ``grand_last_layer`` and, with
``proxy.grand: true``, the exact ``grand`` (``models.py`` has the formulas), each the mean over
the K proxies.

``excess_loss``: the same kind of model trained on the pool's sample and a reference model trained
on the target sample, with one tokenizer trained on both; columns ``loss``, ``perplexity``,
``reference_loss`` and ``excess_loss`` = loss − reference_loss (Moore & Lewis 2010: high where the
target's model explains a document better than the pool's).

The sample is the documents with the smallest seeded hash key, taken by a combine that keeps
the n smallest: the same documents on every runner. The trained models are saved to
``artifacts/`` and travel to the scoring workers as one side input (a tar of their
``save_pretrained`` folders), loaded once per worker. The training step also returns how each model
trained (per-epoch losses, the stopping epoch, a baseline that needs no training): it joins the
stage's summaries and reaches the manifest's ``training`` (``pipeline/diagnostics.py``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field, fields, replace

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared
from beamsift.transforms import models
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask
from beamsift.transforms.chain.meter import Metered, StageMeter
from beamsift.transforms.chain.sampling import SampleRunning
from beamsift.transforms.chain.seeded import PROXY_SAMPLE_STREAM
from beamsift.transforms.chain.staging import read_staging
from beamsift.transforms.featurize import features_from_arrow, hashed_ngram_features
from beamsift.transforms.io.schema import BUCKETS, N_TOKENS, TEXT, input_field, output_column
from beamsift.transforms.models import INFLUENCE_LAYERS
from beamsift.transforms.selectors.core import SelectionError
from beamsift.transforms.stages.base import Context, Stage, setting

MODELS_TAR = "models.tar"  # the trained models on an object store: one tar of their folders
SETTINGS_FILE = "settings.json"  # beside the models: the settings applying them needs
NO_LABEL = "no label"
UNKNOWN_LABEL = "unknown label"

PROXY_COLUMNS = (
    ("loss", "double"),
    ("perplexity", "double"),
    ("el2n", "double"),
    ("grand_last_layer", "double"),
)


@dataclass(frozen=True)
class ProxySettings:
    """The ``proxy`` section (the fields declared with ``setting``): what model, how it is
    trained, what is computed; and what the run adds to it (the other fields)."""

    model: str | None = setting(None, "a run's folder (or its artifacts/, artifacts/proxy): apply, don't train")
    seeds: int = setting(3, "K proxies from K seeds; scores are their mean (EL2N: K = 10)", at_least=1)
    sample: int = setting(20000, "train on at most this many documents of the pool (seeded)", at_least=1)
    epochs: int = setting(10, "at most this many epochs; training stops early (held-out loss)", at_least=1)
    batch_size: int = setting(32, "training batch size", at_least=1)
    learning_rate: float | None = setting(None, "Adam's; null: 1e-3 classifier, 3e-3 causal LM")
    holdout: float = setting(0.1, "share of the sample held out to decide when to stop")
    patience: int = setting(1, "epochs without a better held-out loss before stopping")
    hidden: int = setting(64, "classifier: hidden units")
    vocab_size: int = setting(8000, "causal LM: BPE vocabulary trained on the sample")
    layers: int = setting(2, "causal LM: GPT-2 layers")
    dim: int = setting(128, "causal LM: width")
    heads: int = setting(4, "causal LM: attention heads")
    context: int = setting(256, "causal LM: tokens per document; longer ones are truncated (counted)", at_least=1)
    grand: bool = setting(False, "also the exact GraNd over all parameters (per-example gradients; slower)")
    self_influence: bool = setting(False, "also TracIn self-influence over the epochs' checkpoints")
    influence_layers: str = setting(
        "last", "the layers self_influence sums ||grad||^2 over: first (PRESENCE), last, all", choices=INFLUENCE_LAYERS
    )
    target_influence: bool = setting(False, "also the alignment with the target's mean gradient (last layer)")
    threads: int = setting(0, "torch threads per worker; 0: all cores")
    # From the rest of the config:
    max_ngram: int = 2
    train_only: bool = False  # `beamsift train`: fit and save the models, score nothing
    label_column: str | None = None  # the staged column with the labels (input.label_field)
    num_buckets: int = 10000
    extra: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.label_column is not None

    def train_settings(self) -> models.TrainSettings:
        lr = self.learning_rate or (1e-3 if self.labelled else 3e-3)
        return models.TrainSettings(self.epochs, self.batch_size, lr, self.holdout, self.patience)


def settings_of(cfg, model: str | None = None) -> ProxySettings:
    """The settings of the proxy (or excess_loss) stage of the run ``cfg``."""
    label = cfg["input.label_field"]
    keys = {f.name: cfg[f"proxy.{f.name}"] for f in fields(ProxySettings) if "doc" in f.metadata}
    return ProxySettings(
        **{**keys, "model": model if model is not None else cfg["proxy.model"]},
        # With the quad selector the proxy only trains: Quad scores its probes, never the pool.
        train_only=cfg.train_only or cfg["select.method"] == "quad",
        max_ngram=cfg["featurize.max_ngram"],
        label_column=output_column(label) if label is not None else None,
        num_buckets=cfg["featurize.buckets"],
    )


def proxy_columns(settings: ProxySettings) -> tuple:
    extra = [
        (c, "double")
        for c, on in (
            ("grand", settings.grand),
            ("self_influence", settings.self_influence),
            ("target_influence", settings.target_influence),
        )
        if on
    ]
    return PROXY_COLUMNS + tuple(extra)


# ---- the sample -----------------------------------------------------------------------------


def _payload(chain, shard, rows: np.ndarray, settings: ProxySettings) -> list:
    """What a proxy trains on of each sampled document: its n-grams and label, or its text."""
    if settings.labelled:
        cols = [N_TOKENS, BUCKETS, settings.label_column]
        table = read_staging(shard.path, cols).take(rows)
        n_tokens = np.asarray(table.column(N_TOKENS).combine_chunks())
        f = features_from_arrow(table.column(BUCKETS), n_tokens)
        labels = table.column(settings.label_column).to_pylist()
        return [(f.buckets[f.offsets[i] : f.offsets[i + 1]], _label(labels[i])) for i in range(len(rows))]
    texts = read_staging(shard.path, [TEXT]).take(rows).column(0).to_pylist()
    return [(t, None) for t in texts]


def _label(value) -> str | None:
    return None if value is None else str(value)


# ---- training -------------------------------------------------------------------------------


def _set_threads(settings: ProxySettings) -> None:
    import torch

    torch.set_num_threads(settings.threads or os.cpu_count() or 1)


def train_proxies(
    sample: list, settings: ProxySettings, seed: int, artifacts: str | None, target=None, report=None
) -> tuple[bytes, list[dict]]:
    """The K proxies (and, with ``target``, the tokenizer's and a reference model), packed; and
    how each model's training went, against its baseline (the manifest's ``training``).

    ``sample``: [(key, id hash, (payload, label))]; ``target``: the target's texts; ``report``:
    a callable told what is being trained (keywords model, seed, epoch, loss...), for the live display."""
    _set_threads(settings)
    report = report or (lambda **state: None)
    payload = [p for _, _, p in sample]
    if settings.labelled:
        objects, records = _train_classifiers(payload, settings, seed, report)
    else:
        objects, records = _train_lms([t for t, _ in payload], settings, seed, target, report)
    data = models.pack(objects)
    if artifacts is not None:
        _save_artifacts(data, artifacts)
    return data, records


def _reporter(report, model: str, seed: int, epochs: int):
    """``models.train``'s report callback for one model."""

    def on_step(epoch, step, steps, loss):
        report(model=model, seed=seed, epoch=epoch, epochs=epochs, step=step, steps=steps, loss=loss)

    return on_step


def _record(name: str, kind: str, seed: int, record: models.TrainRecord, settings: ProxySettings, **extra) -> dict:
    unit = "nats per document" if kind == "classifier" else "nats per token"
    return {"model": name, "kind": kind, "seed": seed, "loss_unit": unit, **record.as_dict(settings.epochs), **extra}


def _train_classifiers(payload, settings: ProxySettings, seed: int, report):
    import torch

    labelled = [(b, y) for b, y in payload if y is not None]
    names = sorted({y for _, y in labelled})
    if len(names) < 2:
        raise SelectionError(
            f"input.label_field: the proxy's training sample has {len(names)} label(s) ({names}); "
            "a classifier needs at least 2"
        )
    if len(names) == len(labelled):
        # No class has a second document: a held-out document's class is never trained on.
        raise SelectionError(
            f"input.label_field {input_field(settings.label_column)!r}: each of the proxy's {len(labelled)} "
            f"training documents has a label of its own (e.g. {names[0][:40]!r}); a label must name a class "
            "that documents share"
        )
    index = {n: i for i, n in enumerate(names)}
    buckets = [b for b, _ in labelled]
    y = torch.tensor([index[label] for _, label in labelled])

    def batch_of(idx):
        return models.dense_features([buckets[i] for i in idx], settings.num_buckets), y[idx]

    def loss_of(model, batch):
        logits, _ = model(batch[0])
        return torch.nn.functional.cross_entropy(logits, batch[1])

    objects, records = {}, []
    for k in range(settings.seeds):
        model_seed = seed * 1000 + k
        model = models.new_classifier(settings.num_buckets, len(names), names, settings.hidden, model_seed)
        checkpoints = [] if settings.self_influence else None
        model, record = models.train(
            model,
            batch_of,
            len(labelled),
            settings.train_settings(),
            model_seed,
            loss_of,
            checkpoints,
            report=_reporter(report, f"proxy-{k}", model_seed, settings.epochs),
        )
        objects[f"proxy-{k}"] = model
        objects.update(_checkpoint_models(model, checkpoints, k))
        prior_loss, majority = models.prior_baseline(y.numpy(), record.train_idx, record.held_idx, len(names))
        entry = _record(
            f"proxy-{k}",
            "classifier",
            model_seed,
            record,
            settings,
            held_out_accuracy=_accuracy(model, batch_of, record.held_idx),
            baseline={"name": "label prior", "accuracy": None if majority is None else round(majority, 4)},
        )
        records.append(models.judge(entry, prior_loss))
    return objects, records


def _accuracy(model, batch_of, idx) -> float | None:
    """The share of ``idx`` whose most probable label is theirs."""
    import torch

    if not len(idx):
        return None
    right = 0
    with torch.no_grad():
        for start in range(0, len(idx), 256):
            x, y = models.on_device(model, *batch_of(idx[start : start + 256]))
            right += int((model(x)[0].argmax(-1) == y).sum())
    return round(right / len(idx), 4)


def _checkpoint_models(model, checkpoints, k: int) -> dict:
    """TracIn's checkpoints as models of their own, each with its learning rate in its config."""
    out = {}
    for e, (lr, state) in enumerate(checkpoints or []):
        ckpt = copy.deepcopy(model)
        ckpt.load_state_dict(state)
        ckpt.config.tracin_learning_rate = lr
        out[f"ckpt-{k}-{e}"] = ckpt
    return out


def _train_lms(texts: list[str], settings: ProxySettings, seed: int, target: list[str] | None, report):
    report(model="tokenizer", seed=seed)
    tokenizer = models.train_tokenizer(texts + list(target or []), settings.vocab_size)
    objects, records = {"tokenizer": tokenizer}, []
    seeds = 1 if target is not None else settings.seeds
    for name, corpus, count in (("proxy", texts, seeds), ("reference", target, 1)):
        if corpus is None:
            continue
        ids, _ = models.encode(tokenizer, corpus, settings.context)
        ids = [i for i in ids if len(i) >= 2]
        for k in range(count):
            model_seed = seed * 1000 + k
            model = models.new_causal_lm(
                len(tokenizer), settings.layers, settings.dim, settings.heads, settings.context, model_seed
            )
            checkpoints = [] if settings.self_influence and name == "proxy" else None
            model, record = models.train(
                model,
                lambda idx, ids=ids: models.pad([ids[i] for i in idx]),
                len(ids),
                settings.train_settings(),
                model_seed,
                _lm_loss,
                checkpoints,
                weight_of=_lm_tokens,
                report=_reporter(report, f"{name}-{k}", model_seed, settings.epochs),
            )
            objects[f"{name}-{k}"] = model
            objects.update(_checkpoint_models(model, checkpoints, k))
            unigram = models.unigram_loss(ids, record.train_idx, record.held_idx, len(tokenizer))
            entry = _record(
                f"{name}-{k}",
                "causal_lm",
                model_seed,
                record,
                settings,
                trained_on_texts="target" if name == "reference" else "pool sample",
                baseline={"name": "unigram"},
            )
            records.append(models.judge(entry, unigram))
    return objects, records


def _lm_loss(model, batch):
    losses, w, *_ = models.lm_token_losses(model, *batch)
    return (losses * w).sum() / w.sum().clamp(min=1)


def _lm_tokens(batch) -> float:
    """The next tokens a batch predicts: its weight in a causal LM's mean loss per token."""
    return float(batch[1][:, 1:].sum())


def _save_artifacts(data: bytes, artifacts: str) -> None:
    """The packed models, unpacked under artifacts/ (local) or as one tar (object stores)."""
    if FileSystems.get_filesystem(artifacts).scheme() in (None, "file"):
        models.unpack(data, artifacts)
    else:
        with FileSystems.create(FileSystems.join(artifacts, MODELS_TAR)) as f:
            f.write(data)


def save_settings(_, artifacts: str, settings: ProxySettings) -> None:
    """What the models need to be applied again that their configs do not say (the n-grams)."""
    saved = {
        "featurize.buckets": settings.num_buckets,
        "featurize.max_ngram": settings.max_ngram,
        "proxy.context": settings.context,
    }
    with FileSystems.create(FileSystems.join(artifacts, SETTINGS_FILE)) as f:
        f.write(json.dumps(saved, indent=2).encode())


# A single save_pretrained model given whole: these files of its folder are its tokenizer's.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_given(path: str) -> bytes:
    """A saved model stage folder packed like trained models: a run's artifacts/proxy (its models'
    save_pretrained folders, or their models.tar), or one save_pretrained model with its tokenizer."""
    packed = FileSystems.join(path, MODELS_TAR)
    if FileSystems.exists(packed):
        with FileSystems.open(packed) as f:
            return f.read()
    prefix = path.rstrip("/") + "/"
    files = sorted(m.path for m in FileSystems.match([FileSystems.join(path, "**")])[0].metadata_list)
    relative = [f[len(prefix) :] if f.startswith(prefix) else os.path.relpath(f, path) for f in files]
    single = "config.json" in relative
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for full, name in zip(files, relative):
            if "/" in name:
                names = [name]
            elif single:
                names = ["proxy-0/" + name] + (["tokenizer/" + name] if name in _TOKENIZER_FILES else [])
            else:
                continue  # settings.json and the like
            with FileSystems.open(full) as f:
                data = f.read()
            for arcname in names:
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ---- scoring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelsAt:
    """Where a stage's models are (its artifacts folder, or a saved model's), and a key that
    changes when they do: what the scoring workers get, instead of the models' bytes."""

    folder: str
    key: str


class _Loaded:
    """Models unpacked from a bundle, loaded once per worker process (Beam's ``shared.Shared``,
    as RunInference does) and used by every DoFn instance there."""

    def __init__(self, data: bytes):
        # Unpacked only to be loaded: everything is in memory afterwards, and nothing is left in
        # the temp dir (a worker may be killed without running any clean-up).
        with tempfile.TemporaryDirectory(prefix="beamsift-models-") as folder:
            models.unpack(data, folder)
            self._load(folder)

    def _load(self, folder: str) -> None:
        names = sorted(os.listdir(folder))
        self.proxies = [models.load_model(os.path.join(folder, n)) for n in names if n.startswith("proxy-")]
        self.references = [models.load_model(os.path.join(folder, n)) for n in names if n.startswith("reference-")]
        self.tokenizer = None
        if "tokenizer" in names:
            from transformers import PreTrainedTokenizerFast

            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "tokenizer"))
        self.checkpoints = [
            (m, float(m.config.tracin_learning_rate))
            for m in (models.load_model(os.path.join(folder, n)) for n in names if n.startswith("ckpt-"))
        ]
        self.target_grads = None  # per proxy: the target's mean last-layer gradient, once computed
        self.labels = None
        if self.proxies and hasattr(self.proxies[0].config, "label_names"):
            self.labels = {n: i for i, n in enumerate(self.proxies[0].config.label_names)}


class ScoreWithModels(ShardStageFn):
    """A shard -> model scores of its documents in the running (NaN for the others)."""

    def __init__(self, name, chain, settings: ProxySettings, excess: bool = False, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.settings = settings
        self.excess = excess
        self._shared = shared.Shared()  # one copy of the models per worker process
        self._loaded = None
        self._loaded_key = None

    def _models(self, at: ModelsAt) -> _Loaded:
        if self._loaded_key != at.key:
            _set_threads(self.settings)
            self._loaded = self._shared.acquire(lambda: _Loaded(load_given(at.folder)), tag=at.key)
            self._loaded_key = at.key
        return self._loaded

    def score(self, shard, reasons, models_at, target=None):
        if self.settings.train_only:
            return {name: np.full(len(reasons), np.nan) for name, _ in self.chain.columns[self.name]}, reasons
        loaded = self._models(models_at)
        if self.settings.target_influence and loaded.target_grads is None:
            loaded.target_grads = self._target_grads(loaded, target or [])
        running = running_mask(reasons)
        n = len(reasons)
        columns = {name: np.full(n, np.nan) for name, _ in self.chain.columns[self.name]}
        rows = np.flatnonzero(running)
        extra = {}
        if self.settings.labelled:
            rows, reasons = self._labels_known(shard, rows, reasons, loaded)
            scores = self._classify(shard, rows, loaded)
        else:
            scores, truncated = self._lm(shard, rows, loaded)
            if truncated:
                extra["truncated to proxy.context tokens"] = truncated
        for name, values in scores.items():
            if name in columns:
                columns[name][rows] = values
        return columns, reasons, extra

    def _labels_known(self, shard, rows, reasons, loaded):
        labels = read_staging(shard.path, [self.settings.label_column]).column(0).to_pylist()
        keep = []
        for r in rows:
            label = _label(labels[r])
            if label is None:
                reasons[r] = NO_LABEL
            elif label not in loaded.labels:
                reasons[r] = UNKNOWN_LABEL
            else:
                keep.append(r)
        return np.asarray(keep, dtype=np.int64), reasons

    def _classify(self, shard, rows, loaded) -> dict:
        import torch

        if not len(rows):
            return {}
        table = read_staging(shard.path, [N_TOKENS, BUCKETS, self.settings.label_column]).take(rows)
        f = features_from_arrow(table.column(BUCKETS), np.asarray(table.column(N_TOKENS).combine_chunks()))
        labels = [loaded.labels[_label(v)] for v in table.column(2).to_pylist()]
        buckets = [f.buckets[f.offsets[i] : f.offsets[i + 1]] for i in range(len(rows))]

        def run(idx):
            x = models.dense_features([buckets[i] for i in idx], self.settings.num_buckets)
            y = torch.tensor([labels[i] for i in idx])
            out = _mean([models.classifier_scores(m, x, y, self.settings.grand) for m in loaded.proxies])
            out.update(self._influence(loaded, (x, y)))
            return out

        # Exact GraNd materialises one gradient per example: smaller batches.
        out = _in_batches(run, len(rows), 32 if self.settings.grand else 256)
        out["perplexity"] = np.exp(out["loss"])
        return out

    def _lm(self, shard, rows, loaded) -> tuple[dict, int]:
        if not len(rows):
            return {}, 0
        texts = read_staging(shard.path, [TEXT]).take(rows).column(0).to_pylist()
        ids, truncated = models.encode(loaded.tokenizer, texts, self.settings.context)
        order = np.argsort([len(i) for i in ids], kind="stable")  # similar lengths together: less padding

        def run(idx):
            x, mask = models.pad([ids[order[i]] for i in idx])
            if self.excess:  # two losses, nothing else: the output layer's softmax is most of the cost
                loss = np.mean([models.lm_losses(m, x, mask) for m in loaded.proxies], axis=0)
                ref = np.mean([models.lm_losses(m, x, mask) for m in loaded.references], axis=0)
                return {"loss": loss, "perplexity": np.exp(loss), "reference_loss": ref, "excess_loss": loss - ref}
            out = _mean([models.lm_scores(m, x, mask, self.settings.grand) for m in loaded.proxies])
            out.update(self._influence(loaded, (x, mask)))
            return out

        sorted_scores = _in_batches(run, len(ids), 16)
        back = np.empty(len(order), dtype=np.int64)
        back[order] = np.arange(len(order))
        return {k: v[back] for k, v in sorted_scores.items()}, truncated

    def _influence(self, loaded, batch) -> dict:
        """self_influence (TracIn: Σ over checkpoints of η_t ‖∇_W ℓ‖², mean over the seeds) and
        target_influence (cosine with the target's mean gradient, mean over the seeds)."""
        out = {}
        labelled = self.settings.labelled
        if self.settings.self_influence:
            total = 0.0
            for model, lr in loaded.checkpoints:
                total = total + lr * models.layer_grad_squares(model, batch, labelled, self.settings.influence_layers)
            out["self_influence"] = total / max(len(loaded.proxies), 1)
        if self.settings.target_influence:
            out["target_influence"] = np.mean(
                [
                    models.gradient_alignment(models.last_layer_grads(m, batch, labelled), d)
                    for m, d in zip(loaded.proxies, loaded.target_grads)
                ],
                axis=0,
            )
        return out

    def _target_grads(self, loaded, target: list) -> list:
        """Each proxy's mean last-layer gradient over the target sample."""
        import torch

        if self.settings.labelled:
            target = [(t, _label(y)) for t, y in target if _label(y) in (loaded.labels or {})]
            if not target:
                raise SelectionError(
                    "proxy.target_influence: no target document has a label the proxy knows "
                    f"(the target needs the field input.label_field; the proxy's labels: {sorted(loaded.labels)})"
                )
            f = hashed_ngram_features(
                pa.array([t for t, _ in target]), self.settings.num_buckets, self.settings.max_ngram
            )
            buckets = [f.buckets[f.offsets[i] : f.offsets[i + 1]] for i in range(len(target))]
            labels = torch.tensor([loaded.labels[y] for _, y in target])

            def batch_of(idx):
                return models.dense_features([buckets[i] for i in idx], self.settings.num_buckets), labels[idx]
        else:
            ids, _ = models.encode(loaded.tokenizer, [t for t, _ in target], self.settings.context)
            ids = [i for i in ids if len(i) >= 2]

            def batch_of(idx):
                return models.pad([ids[i] for i in idx])

            target = ids
        grads = []
        for model in loaded.proxies:
            total = None
            for start in range(0, len(target), 16):
                g = models.last_layer_grads(
                    model, batch_of(np.arange(start, min(start + 16, len(target)))), self.settings.labelled
                ).sum(0)
                total = g if total is None else total + g
            grads.append(total / max(len(target), 1))
        return grads


class ProbeInfluence:
    """The target influence of given texts under a stage's saved causal LMs (the quad selector's
    probes): the proxy's ``target_influence``, for these texts only. Picklable; the models load
    once per worker process."""

    def __init__(self, name, chain, settings: ProxySettings, folder: str):
        settings = replace(settings, target_influence=True, self_influence=False, grand=False, train_only=False)
        self.scorer = ScoreWithModels(name, chain, settings)
        self.at = ModelsAt(folder, f"probes:{folder}")

    def of(self, texts: list[str], target: list) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        scorer, settings = self.scorer, self.scorer.settings
        loaded = scorer._models(self.at)
        if loaded.target_grads is None:
            loaded.target_grads = scorer._target_grads(loaded, target)
        ids, _ = models.encode(loaded.tokenizer, texts, settings.context)

        def run(idx):
            return scorer._influence(loaded, models.pad([ids[i] for i in idx]))

        values = _in_batches(run, len(ids), 16)["target_influence"]
        values[[len(i) < 2 for i in ids]] = np.nan  # no next token: no gradient
        return values


def _mean(per_model: list[dict]) -> dict:
    return {k: np.mean([m[k] for m in per_model], axis=0) for k in per_model[0]}


def _in_batches(run, n: int, size: int) -> dict:
    """run(indices) over batches of ``size``; a batch that runs out of memory is split in two."""
    parts = []

    def go(idx):
        try:
            parts.append((idx, run(idx)))
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if "out of memory" not in str(e).lower() and not isinstance(e, MemoryError) or len(idx) == 1:
                raise
            half = len(idx) // 2
            go(idx[:half])
            go(idx[half:])

    for start in range(0, n, size):
        go(np.arange(start, min(start + size, n)))
    out = {}
    for idx, scores in parts:
        for k, v in scores.items():
            out.setdefault(k, np.full(n, np.nan))[idx] = v
    return out


class ModelStage(beam.PTransform):
    """The proxy (or excess-loss) stage: sample, train (or load), score. -> (shards, summaries)."""

    def __init__(
        self,
        name,
        chain,
        settings: ProxySettings,
        seed,
        artifacts,
        excess=False,
        target_texts=None,
        progress_dir=None,
    ):
        super().__init__()
        self.name = name
        self.chain = chain
        self.settings = settings
        self.seed = seed
        self.artifacts = artifacts
        self.excess = excess
        self.target_texts = target_texts  # a side input: the target's texts (excess_loss)
        self.progress_dir = progress_dir
        self.saved = None  # the settings written beside trained models

    def expand(self, shards):
        s = self.settings
        training = None
        if s.model is not None:
            bundle = shards.pipeline | "GivenModel" >> beam.Create([ModelsAt(s.model, f"given:{s.model}")])
        else:
            payload = functools.partial(_payload, settings=s)
            sample = shards | "Sample" >> SampleRunning(
                self.name, self.chain, s.sample, self.seed, PROXY_SAMPLE_STREAM, payload
            )
            extra = (self.target_texts,) if self.excess else ()
            artifacts = FileSystems.join(self.artifacts, self.name)
            trained = sample | "Train" >> beam.Map(Metered(self.name, self._train), artifacts, *extra)
            bundle = trained | "Models" >> beam.Map(lambda t: t[0])
            # How training went reaches the manifest as part of the run's summary.
            training = trained | "TrainingReport" >> beam.Map(lambda t, name=self.name: {"training": {name: t[1]}})
            self.saved = bundle | "SaveSettings" >> beam.Map(save_settings, artifacts, s)
        fn = ScoreWithModels(self.name, self.chain, s, self.excess, self.progress_dir)
        target = {"target": self.target_texts} if s.target_influence else {}
        scored, summary = shards | "Score" >> ApplyStage(fn, models_at=beam.pvalue.AsSingleton(bundle), **target)
        if training is not None:
            summary = (summary, training) | "WithTrainingReport" >> beam.Flatten()
        return scored, summary

    def _train(self, sample, artifacts, target=None):
        texts = [t for t, _ in target] if target is not None else None
        meter = StageMeter(self.name, self.progress_dir)  # what is being trained, for the live display
        meter.setup()
        try:
            data, records = train_proxies(sample, self.settings, self.seed, artifacts, texts, meter.status)
            return ModelsAt(artifacts, hashlib.blake2b(data, digest_size=16).hexdigest()), records
        finally:
            meter.status()


# ---- the stage --------------------------------------------------------------------------------

INFLUENCE_COLUMNS = ("grand", "self_influence", "target_influence")


def build_model_stage(ctx: Context, name: str, shards, excess: bool):
    """The proxy or the excess_loss stage: each applies its own saved model, if any (the
    excess_loss stage never the proxy's), or trains its models on a sample of the running."""
    kind = "excess_loss" if excess else "proxy"
    settings = replace(settings_of(ctx.cfg), model=ctx.given(f"{kind}.model"))
    stage = ModelStage(
        name,
        ctx.chain,
        settings,
        ctx.seed,
        ctx.artifacts,
        excess,
        ctx.target_texts() if excess or settings.target_influence else None,
        ctx.progress_dir,
    )
    result = shards | "Stage_" + name >> stage
    if stage.saved is not None:
        ctx.wait_for(stage.saved, f"SettingsSaved_{name}")
    return result


def _check(cfg, name, available, fail) -> None:
    if cfg["proxy.target_influence"] and cfg["target.path"] is None:
        fail("target.path", "set 'target.path': proxy.target_influence aligns with the target's gradient")
    if cfg["proxy.influence_layers"] != "last" and not cfg["proxy.self_influence"]:
        fail("proxy.influence_layers", "proxy.influence_layers is for self_influence: set 'proxy.self_influence: true'")


STAGE = Stage(
    kind="proxy",
    summary="a proxy model trained on a sample (classifier with input.label_field, else a causal LM): "
    "loss, EL2N, GraNd, influence",
    settings=ProxySettings,
    columns=lambda cfg, name: proxy_columns(settings_of(cfg)),
    all_columns=tuple(c for c, _ in PROXY_COLUMNS) + INFLUENCE_COLUMNS,
    needs_target=lambda cfg: cfg["proxy.target_influence"],
    model_key="proxy.model",
    trains=True,
    check=_check,
    build=lambda ctx, name, shards: build_model_stage(ctx, name, shards, excess=False),
)
