"""Saved models named in the config (``cluster.model``, ``proxy.model``, ``excess_loss.model``):
found, and checked against the config, before any worker starts (``dsir.model``: run.py).

Each key takes an earlier run's folder, its ``artifacts/`` folder, or the stage's own folder
(``artifacts/cluster``, ``artifacts/proxy``, ...). A model that cannot apply to this run (fitted
with other ``featurize`` settings, another embedding, a classifier where the config has no labels,
...) is refused here with one line naming the difference, rather than failing inside a worker or,
worse, running and giving wrong answers.

Files are read through Beam's FileSystems, so a model on an object store is checked the same way.
"""

from __future__ import annotations

import io
import json
import tarfile

from apache_beam.io.filesystems import FileSystems
from beamsift.pipeline.config import Config
from beamsift.pipeline.output import exists
from beamsift.transforms.io.read import InputError, first_values
from beamsift.transforms.models import CLASSIFIER
from beamsift.transforms.stages import STAGES, cluster, embed, stage_kind
from beamsift.transforms.stages.cluster import encoder_name
from beamsift.transforms.stages.proxy import MODELS_TAR, SETTINGS_FILE

# The saved models a run can apply, checked up front (DSIR's counts are checked by run.py).
MODEL_KEYS = tuple(s.model_key for s in STAGES.values() if s.model_key is not None)


def check_saved_models(cfg: Config, pool_files) -> dict[str, str]:
    """{key: the stage folder it names} for each saved model the run applies, each checked."""
    kinds = [stage_kind(n) for n in cfg["stages"]]
    folders = {}
    for key in MODEL_KEYS:
        stage = key.split(".")[0]
        if stage not in kinds or cfg[key] is None:
            continue
        folder = resolve_model(key, cfg[key])
        if stage == "cluster":
            _check_cluster(cfg, folder)
        else:
            _check_model_stage(cfg, key, folder, pool_files)
        folders[key] = folder
    return folders


def resolve_model(key: str, path: str) -> str:
    """The stage folder that ``path`` names: itself, ``path/<stage>`` or ``path/artifacts/<stage>``."""
    stage = key.split(".")[0]
    if stage == "cluster" and path.endswith(".npy"):  # the centroids file itself
        path = FileSystems.split(path)[0]
    base = path.rstrip("/") or path
    for folder in (base, FileSystems.join(base, stage), FileSystems.join(base, "artifacts", stage)):
        if _holds_model(stage, folder):
            return folder
    where = f"give an earlier run's folder, its artifacts/ folder or artifacts/{stage}"
    if not exists(base):
        hub = "; hub ids are not fetched by the workers: download the model first" if stage != "cluster" else ""
        raise InputError(f"{key} {path}: no such folder; {where}{hub}")
    what = cluster.CENTROIDS_FILE if stage == "cluster" else "proxy-0/, models.tar or config.json"
    raise InputError(
        f"{key} {path}: no saved {stage} model there (no {what} in it, {stage}/ or artifacts/{stage}/); {where}"
    )


def _holds_model(stage: str, folder: str) -> bool:
    if stage == "cluster":
        return FileSystems.exists(FileSystems.join(folder, cluster.CENTROIDS_FILE))
    markers = (MODELS_TAR, "proxy-0/config.json", "config.json")
    return any(FileSystems.exists(FileSystems.join(folder, *m.split("/"))) for m in markers)


# ---- cluster.model ----------------------------------------------------------------------------


def _check_cluster(cfg: Config, folder: str) -> None:
    meta = cluster.read_cluster_meta(folder)
    if meta is None:
        raise InputError(
            f"cluster.model {folder}: no {cluster.META_FILE} beside {cluster.CENTROIDS_FILE} (saved by an earlier "
            "beamsift, without the embedding its centroids need); fit the clusters again"
        )
    method = meta.get("embed.method")
    if method != cfg["embed.method"]:
        raise InputError(
            f"cluster.model was fitted with embed.method={method}, but the config sets {cfg['embed.method']}"
        )
    keys = ("embed.dim", "featurize.buckets", "featurize.max_ngram") if method != "model" else ()
    for key in (*keys, "cluster.k"):
        if meta.get(key) != cfg[key]:
            raise InputError(f"cluster.model was fitted with {key}={meta.get(key)}, but the config sets {cfg[key]}")
    if method == "model":
        _check_cluster_encoder(cfg, meta)
        return
    for name in (embed.IDF_FILE, embed.BASIS_FILE):
        if not FileSystems.exists(FileSystems.join(folder, name)):
            raise InputError(f"cluster.model {folder}: {name} is missing (the embedding its centroids need)")


def _check_cluster_encoder(cfg: Config, meta: dict) -> None:
    from beamsift.transforms.models.encoder import encoder_width, resolve_encoder

    name = encoder_name(cfg["embed.model"])
    if meta.get("embed.model") != name:
        raise InputError(
            f"cluster.model was fitted with the encoder {meta.get('embed.model')}, but the config's is {name}"
        )
    width = encoder_width(resolve_encoder(cfg["embed.model"]))
    if meta.get("width") != width:
        raise InputError(
            f"cluster.model's centroids have {meta.get('width')} dimensions, but the encoder gives {width}"
        )


# ---- proxy.model, excess_loss.model ---------------------------------------------------------


class _SavedModels:
    """A model stage's saved folder: save_pretrained folders (or one model at its top), or the
    models.tar that a run on an object store writes instead."""

    def __init__(self, folder: str):
        self.folder = folder
        self.members = None
        packed = FileSystems.join(folder, MODELS_TAR)
        if FileSystems.exists(packed):
            with FileSystems.open(packed) as f, tarfile.open(fileobj=io.BytesIO(f.read())) as tar:
                self.members = {
                    m.name: tar.extractfile(m).read() if m.isfile() and m.name.endswith(".json") else b""
                    for m in tar.getmembers()
                }

    def has(self, name: str) -> bool:
        if self.members is not None:
            return name in self.members
        return FileSystems.exists(FileSystems.join(self.folder, *name.split("/")))

    def json(self, name: str) -> dict | None:
        if name == SETTINGS_FILE or self.members is None:
            path = FileSystems.join(self.folder, name)
            if not FileSystems.exists(path):
                return None
            with FileSystems.open(path) as f:
                return json.loads(f.read())
        data = self.members.get(name)
        return json.loads(data) if data else None


def _check_model_stage(cfg: Config, key: str, folder: str, pool_files) -> None:
    saved = _SavedModels(folder)
    top = not saved.has("proxy-0/config.json")  # one save_pretrained model, not a run's proxies
    config = saved.json("config.json" if top else "proxy-0/config.json") or {}
    classifier = config.get("model_type") == CLASSIFIER
    label = cfg["input.label_field"]
    if key == "excess_loss.model":
        if classifier:
            raise InputError(f"excess_loss.model {folder} holds classifiers; excess_loss compares language models")
        if not saved.has("reference-0/config.json"):
            raise InputError(
                f"excess_loss.model {folder} has no reference model (reference-0/): give the artifacts/excess_loss "
                "of a run with an excess_loss stage"
            )
    if classifier and label is None:
        raise InputError(
            f"{key} {folder} holds classifiers (trained with input.label_field); set input.label_field to the "
            "field with the documents' labels, or give language models"
        )
    if not classifier and label is not None:
        raise InputError(
            f"{key} {folder} holds language models (trained without input.label_field), but the config sets "
            f"input.label_field {label!r}: remove it, or give classifiers"
        )
    settings = saved.json(SETTINGS_FILE) or {}
    if classifier:
        settings.setdefault("featurize.buckets", config.get("num_buckets"))
        _check_settings(key, settings, cfg, ("featurize.buckets", "featurize.max_ngram"))
        _check_known_labels(key, folder, config.get("label_names") or [], pool_files, label, "input")
    else:
        if not saved.has("tokenizer/tokenizer.json" if not top else "tokenizer.json"):
            raise InputError(f"{key} {folder} has no tokenizer (tokenizer/tokenizer.json) beside its models")
        positions = config.get("n_positions") or config.get("max_position_embeddings")
        if positions is not None and cfg["proxy.context"] > positions:
            raise InputError(
                f"{key} was trained with proxy.context={positions}, but the config sets {cfg['proxy.context']}"
            )
    if key == "proxy.model" and cfg["proxy.self_influence"] and not saved.has("ckpt-0-0/config.json"):
        raise InputError(
            f"proxy.self_influence sums over the training checkpoints, and proxy.model {folder} has none: "
            "train it with proxy.self_influence: true"
        )


def _check_settings(key: str, saved: dict, cfg: Config, names: tuple) -> None:
    for name in names:
        if saved.get(name) is not None and saved[name] != cfg[name]:
            raise InputError(f"{key} was trained with {name}={saved[name]}, but the config sets {cfg[name]}")


def _check_known_labels(key, folder, known: list, files, field: str, section: str) -> None:
    """Some of the first records' labels must be ones the classifier knows: the others are rejected."""
    values, where = first_values(files, field)
    seen = sorted({str(v) for v in values if v is not None})
    if seen and not set(seen) & set(known):
        raise InputError(
            f"{key} {folder} knows the labels {_shown(known)}, but {where} ({section}) have none of them in "
            f"input.label_field {field!r} (they have {_shown(seen)})"
        )


def _shown(names: list, limit: int = 8) -> str:
    return "[" + ", ".join(repr(n) for n in names[:limit]) + (", ...]" if len(names) > limit else "]")


def check_target_labels(cfg: Config, target_files, folders: dict) -> None:
    """proxy.target_influence with labels: the target's first records must have labels (and ones
    a given classifier knows), known before the proxies train rather than after."""
    field = cfg["input.label_field"]
    values, where = first_values(target_files, field)
    if values and all(v is None for v in values):
        raise InputError(
            f"input.label_field {field!r} is in none of {where} (the target): proxy.target_influence needs the "
            "target's labels; add the field to the target's records"
        )
    if "proxy.model" in folders:
        config = _SavedModels(folders["proxy.model"])
        labels = (config.json("proxy-0/config.json") or config.json("config.json") or {}).get("label_names") or []
        _check_known_labels("proxy.model", folders["proxy.model"], labels, target_files, field, "target")
