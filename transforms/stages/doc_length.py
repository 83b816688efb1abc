"""The doc_length stage: how long each document is, in characters and in words.

``n_chars`` counts Unicode code points; ``mean_word_length`` is n_chars of the words over their
number, a word being a maximal run of non-space characters (the Gopher rules keep documents whose
mean word length lies in [3, 10]: Rae et al. 2021, "Scaling Language Models", appendix A). Both
are plain columns for a filter (``column: mean_word_length``, ``min: 3``, ``max: 10``) or a SQL
query; a document without words has a mean word length of null. Computed with Arrow's string
kernels, a shard at a time.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
from beamsift.transforms.chain import ApplyStage, ShardStageFn
from beamsift.transforms.chain.staging import read_staging
from beamsift.transforms.io.schema import TEXT, one_array
from beamsift.transforms.stages.base import Context, Stage, fixed_columns

COLUMNS = (("n_chars", "int64"), ("mean_word_length", "double"))


def length_columns(texts) -> dict[str, np.ndarray]:
    """{n_chars, mean_word_length} of each text (an Arrow string array)."""
    n_chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    words = pc.utf8_split_whitespace(texts)
    pieces = pc.list_value_length(words).to_numpy(zero_copy_only=False).astype(np.int64)
    row = np.repeat(np.arange(len(texts)), pieces)
    flat = pc.utf8_length(pc.list_flatten(words)).to_numpy(zero_copy_only=False).astype(np.int64)
    # Splitting leaves empty pieces at the ends and between runs of spaces: not words.
    n_words = np.bincount(row, weights=flat > 0, minlength=len(texts)).astype(np.int64)
    word_chars = np.bincount(row, weights=flat, minlength=len(texts)).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n_words > 0, word_chars / np.maximum(n_words, 1), np.nan)
    return {"n_chars": n_chars, "mean_word_length": mean}


class MeasureLengthShard(ShardStageFn):
    """A shard -> the lengths of every document (in the running or not: a length is a fact)."""

    def score(self, shard, reasons):
        texts = one_array(read_staging(shard.path, [TEXT]).column(TEXT))
        return length_columns(texts), reasons


def _build(ctx: Context, name: str, shards):
    fn = MeasureLengthShard(name, ctx.chain, ctx.progress_dir)
    return shards | "Stage_" + name >> ApplyStage(fn)


STAGE = Stage(
    kind="doc_length",
    summary="document length: n_chars and mean_word_length (for Gopher-style length rules)",
    columns=fixed_columns(*COLUMNS),
    all_columns=tuple(c for c, _ in COLUMNS),
    build=_build,
)
