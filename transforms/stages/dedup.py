"""De-duplication: exact duplicates by a hash of the normalised text, then SemDeDup (Abbas et al.,
"SemDeDup: Data-efficient learning at web-scale through semantic deduplication", arXiv:2303.09540).

- **exact**: the text lower-cased, with punctuation and symbols removed and white space collapsed
  (Unicode classes: letters and digits of every script count), hashed; of the documents with the
  same hash, the first in input order is kept and the others point at it;
- **SemDeDup**: within each cluster (one GroupByKey on the cluster id, never every document
  through one key), the documents are taken in a fixed order (nearest their centroid first, then
  input order) and a document whose cosine similarity to a document already kept exceeds 1 − ε
  (``dedup.epsilon``) is dropped, pointing at the most similar kept one.

k-means on document vectors seldom finds well-separated clusters: most documents lie about as
near their second centroid as their first, so a near-duplicate pair is often split over two
clusters and never compared. Each document is therefore also compared in its next nearest
clusters (``dedup.probes``: 2 = its own and the next one). The order is the same in every
cluster, so a document is only ever dropped for one that comes before it; a document kept in
one cluster but dropped in another is dropped, and who pointed at it points on, to the kept one
that comes first. The first of every group of duplicates (in that order) is always kept, never
none of them (the public SemDeDup code's issue #8).

A dropped document stays in ``scores/`` with ``duplicate_of`` (the id of the kept document it
repeats) and the reason ``exact duplicate`` or ``near duplicate``; ``duplicate_of`` is null for
every kept document. A cluster's documents are compared in blocks against the ones kept so far
(memory: a block times the kept ones), and the work is (probes × n)² / 2 dot products for a
cluster of n documents on one worker: ``cluster.k`` bounds n.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import time
import zlib
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask, shard_of
from beamsift.transforms.chain.duplicate_ids import FirstOccurrences, partitions_for, positions_by
from beamsift.transforms.chain.meter import StageMeter
from beamsift.transforms.chain.side_by_side import SideBySide, windowed
from beamsift.transforms.chain.staging import (
    column_matrix,
    matrix_column,
    read_id_hashes,
    read_orders,
    read_row_run,
    read_staging,
    read_staging_batch,
    read_staging_rows,
    remove_tables,
    write_row_runs,
    write_staging,
)
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.featurize import (
    code_points_at,
    compiled_kernels,
    hash_strings,
    kernel_text,
    over_cores,
    string_bytes,
)
from beamsift.transforms.io.schema import ORDER, TEXT, one_array
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting
from beamsift.transforms.stages.cluster import NEXT_CLUSTER
from beamsift.transforms.stages.embed import (
    document_frequencies,
    embeddings,
    features_of,
    projection,
    projection_tiles,
    referred_rows,
    smooth_idf,
    tfidf_embeddings,
)
from threadpoolctl import ThreadpoolController

COLUMNS = (("duplicate_of", "string"),)
TFIDF_DIM = 512  # projected TF-IDF for dedup.compare: tfidf; cosines kept within ~0.006 (JL)
EXACT = "exact duplicate"
NEAR = "near duplicate"
# RE2's \w and \s are ASCII-only: Unicode classes keep the letters and digits of every script,
# and count every Unicode space (no-break, ideographic) as white space.
PUNCTUATION = r"[^\p{L}\p{M}\p{N}\s\p{Z}]+"
_SPACE = r"[\s\p{Z}]+"


def normalise_text(texts):
    """Case, punctuation, symbols and runs of white space taken out (an Arrow string array)."""
    lowered = pc.utf8_lower(pc.utf8_normalize(texts, "NFKC"))  # é composed or not, full-width forms
    no_punct = pc.replace_substring_regex(lowered, PUNCTUATION, "")
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(no_punct, _SPACE, " "))


def normalised_text_hash(texts) -> np.ndarray:
    """A hash of each text after ``normalise_text``."""
    return hash_strings(normalise_text(texts))


def normalised_hashes(texts) -> tuple[np.ndarray, np.ndarray]:
    """(``normalised_text_hash``, the normalised text's length in bytes) of each text, by the
    compiled loop (``ngram_kernels``): 10x faster than Arrow's Unicode regexes, and the
    normalised texts are never made. Texts with characters beyond ASCII go through Arrow's NFKC
    first; the loop's tables come from Arrow's kernels themselves. Without numba: Arrow's way."""
    texts = one_array(texts)
    kernels = compiled_kernels()
    if kernels is None:
        normalised = normalise_text(texts)
        return hash_strings(normalised), pc.binary_length(normalised).to_numpy(zero_copy_only=False).astype(np.int64)
    if not pc.all(pc.string_is_ascii(texts)).as_py():
        # NFKC (Arrow's, ~11 us a text) only for the texts it may change: most text beyond
        # ASCII (accents, curly quotes, other scripts) is NFKC already.
        changes = over_cores(kernels.texts_holding_compiled, *kernel_text(*string_bytes(texts)), _nfkc_may_change())
        if changes.any():
            mask = pa.array(changes)
            texts = pc.replace_with_mask(texts, mask, pc.utf8_normalize(texts.filter(mask), "NFKC"))
        lowered, klass = _normalise_tables()
    else:
        lowered, klass = _normalise_tables(ascii_only=True)
    # On every core: ~40 ms a 4,096-document shard on one (10 s of a 1M-document run)
    return over_cores(kernels.normalised_hashes_compiled, *kernel_text(*string_bytes(texts)), lowered, klass)


@functools.cache
def _nfkc_may_change() -> np.ndarray:
    """For each code point, whether NFKC may change a text that holds it; a text with none of
    them is its own NFKC. Marked: a character that NFKC changes on its own (Arrow's NFKC, the
    one ``normalise_text`` uses), a combining mark (reordered), the second of a canonical pair
    (composed with what comes before it: a mark, an Indic vowel sign, a Hangul jamo), a
    character whose decomposition starts with either, and every code point that Python's
    Unicode data does not know (Arrow's may be newer). Arrow 25's NFKC leaves letters
    decomposed (é becomes e and U+0301), so a precomposed letter is marked too: what counts is
    what Arrow's kernel does, and ``test_compiled_normalised_hashes_are_arrows`` holds the two
    paths to the same hashes. Once a process, ~0.6 s."""
    import unicodedata

    size = 0x110000
    may = np.ones(size, bool)
    may[:0x80] = False  # ASCII: NFKC's identity, and never the second of a pair
    cps = np.arange(0x80, size)
    cps = cps[(cps < 0xD800) | (cps >= 0xE000)]
    strings = _code_point_strings(cps)
    alone = pc.equal(pc.utf8_normalize(strings, "NFKC"), strings).to_numpy(zero_copy_only=False)
    seconds = set(range(0x1100, 0x1200)) | set(range(0xA960, 0xA980)) | set(range(0xD7B0, 0xD800))  # jamo
    for cp in cps.tolist():
        parts = unicodedata.decomposition(chr(cp)).split()
        if len(parts) == 2 and not parts[0].startswith("<"):
            seconds.add(int(parts[1], 16))
    for cp in cps[alone].tolist():
        ch = chr(cp)
        if cp in seconds or unicodedata.category(ch) == "Cn" or unicodedata.combining(ch):
            continue
        first = ord(unicodedata.normalize("NFKD", ch)[0])
        if first in seconds or unicodedata.combining(chr(first)):
            continue
        may[cp] = False
    return may


def _code_point_strings(code_points: np.ndarray) -> pa.Array:
    """An Arrow string array of one character per code point (no surrogates), built in numpy."""
    cp = code_points.astype(np.int64)
    width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
    offsets = np.zeros(len(cp) + 1, dtype=np.int32)
    np.cumsum(width, out=offsets[1:])
    data = np.zeros(offsets[-1], dtype=np.uint8)
    start = offsets[:-1]
    lead = np.select([width == 1, width == 2, width == 3], [cp, 0xC0 | (cp >> 6), 0xE0 | (cp >> 12)], 0xF0 | (cp >> 18))
    data[start] = lead
    for j in range(1, 4):  # continuation bytes, most significant first
        has = width > j
        data[start[has] + j] = 0x80 | ((cp[has] >> (6 * (width[has] - 1 - j))) & 0x3F)
    return pa.StringArray.from_buffers(len(cp), pa.py_buffer(offsets), pa.py_buffer(data))


@functools.cache
def _normalise_tables(ascii_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(lowered, class) of every code point as ``normalise_text``'s Arrow kernels treat it: the
    code point ``utf8_lower`` makes of it, and whether the punctuation pattern drops it (0), it
    stays (1) or the white space pattern matches it (2). Asked of Arrow for all 1.1M code points
    at once (~0.3 s, once a process, and only where a text goes beyond ASCII; else for ASCII's)."""
    size = 0x80 if ascii_only else 0x110000
    code_points = np.flatnonzero((np.arange(size) < 0xD800) | (np.arange(size) >= 0xE000))
    lowered_text = pc.utf8_lower(_code_point_strings(code_points))
    data, offsets = string_bytes(lowered_text)
    lengths = np.diff(offsets)
    one = lengths > 0  # each lower case is one code point, or none (dropped below)
    lowered = np.full(size, 0x20, dtype=np.int32)  # surrogates, and the one without: never read
    lowered[code_points[one]] = code_points_at(data, offsets[:-1][one])
    klass = np.full(size, _DROP, dtype=np.int8)
    kept = pc.binary_length(pc.replace_substring_regex(lowered_text, PUNCTUATION, "")).to_numpy() > 0
    blank = pc.binary_length(pc.replace_substring_regex(lowered_text, _SPACE, "")).to_numpy() == 0
    klass[code_points[kept]] = _KEEP
    klass[code_points[kept & blank & (lengths > 0)]] = _BLANK
    return lowered, klass


_DROP, _KEEP, _BLANK = 0, 1, 2  # ngram_kernels' classes


@dataclass(frozen=True)
class Dropped:
    """Orders of the dropped documents (sorted), the id each repeats, and why."""

    orders: np.ndarray
    kept_ids: list
    reasons: list

    def lookup(self, orders: np.ndarray):
        return find_sorted(self.orders, orders)


def find_sorted(sorted_orders: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each of ``orders`` is in ``sorted_orders``, its position there where it is)."""
    pos = np.minimum(np.searchsorted(sorted_orders, orders), max(len(sorted_orders) - 1, 0))
    hit = (sorted_orders[pos] == orders) if len(sorted_orders) else np.zeros(len(orders), bool)
    return hit, pos


NONE_DROPPED = Dropped(np.zeros(0, np.int64), [], [])


def semdedup_cluster(items: list, epsilon: float, block: int = 256) -> list:
    """One cluster's [(distance to centroid, order, id, vector[, shard])] -> [(order, kept id,
    reason, (kept distance, kept order)[, shard])] of the documents it drops. Greedy in the order (distance, order):
    keep a document unless its cosine to a kept one exceeds 1 − ε; then it points at the most
    similar kept one. Compared in blocks against the kept ones, never an n × n matrix."""
    if not items:
        return []
    distance = np.array([t[0] for t in items], np.float64)
    orders = np.array([t[1] for t in items], np.int64)
    vectors = np.stack([np.asarray(t[3], np.float32) for t in items])
    drops = compare_members(distance, orders, [t[2] for t in items], vectors, epsilon, block)
    return [(int(orders[i]), kept_id, NEAR, target, *items[i][4:]) for i, kept_id, target in drops]


def compare_members(distance, orders, ids, vectors, epsilon: float, block: int = 256, low_precision=None) -> list:
    """SemDeDup's greedy over one group given as arrays -> [(row dropped, kept id, (kept distance,
    kept order))], the rows in the greedy's order (distance, order)."""
    sequence = np.lexsort((orders, distance))
    drops = []
    pairs = greedy_near_duplicates(vectors, 1 - epsilon, block, sequence, True, low_precision)
    for me, target in zip(*pairs):
        t, r = int(sequence[target]), int(sequence[me])
        drops.append((r, ids[t], (float(distance[t]), int(orders[t]))))
    return drops


def greedy_near_duplicates(
    unit: np.ndarray, threshold: float, block: int = 256, order=None, normalise=False, low_precision=None
):
    """(rows dropped, the kept row each points at) of unit vectors taken in order: a row is kept
    unless its cosine to a kept one exceeds ``threshold``, else it points at the most similar
    kept one (the earliest on a tie; a kept one in an earlier block wins a tie with its own).
    With ``order``, the rows are taken in that order and the positions returned are in it; with
    ``normalise``, each row (of any float type: a group's half precision) is scaled to unit
    length in float32 as its block comes up. A block at a time, not the group: converting and
    scaling all of it first made three more copies of the group (~35 MB each at 17,500
    documents of 512 dimensions) on fresh pages (a quarter of a group's time in a profiled run;
    312 -> 293 ms a group alone).

    Each block of rows is compared at once against the kept rows before it and against itself;
    only the rows with a cosine above the threshold to some earlier row go through the sequential
    step, since a row with none is kept whatever was dropped before it."""
    n, dim = unit.shape

    def rows_of(at) -> np.ndarray:  # at: a slice or the positions of rows in the order
        rows = unit[at] if order is None else unit[order[at]]
        rows = single_precision(rows) if rows.dtype == np.float16 else rows.astype(np.float32, copy=normalise)
        if normalise:
            norms = np.linalg.norm(rows, axis=1)
            rows /= np.where(norms > 0, norms, 1)[:, None]
        return rows

    earlier = _KeptRows(rows_of, n, dim, threshold, low_precision)
    kept = np.empty(n, np.int64)
    n_kept = 0
    dropped, targets = [], []
    # With the bfloat16 bound (torch's OpenMP threads), numpy's own products here run on one
    # thread: two thread pools spinning for the same cores made a group ~2x slower, not faster.
    with one_blas_thread() if earlier.low else contextlib.nullcontext():
        for start in range(0, n, block):
            rows = rows_of(slice(start, start + block))
            m = len(rows)
            bounding = earlier.bounding(rows)
            best_prev, best_prev_sim = earlier.most_similar(rows, bounding)
            near = earlier.near_in_block(rows, bounding)  # j < i whose cosine may exceed the threshold
            candidate = (best_prev_sim > threshold) | near.any(1)
            keep = np.ones(m, bool)
            for i in np.flatnonzero(candidate).tolist():
                sim, target = (float(best_prev_sim[i]), int(kept[best_prev[i]])) if n_kept else (-np.inf, -1)
                # Only the kept ones the bound lets through: any other is under the threshold
                local = np.flatnonzero(keep[:i] & near[i, :i])
                if len(local):
                    s_local = rows[local] @ rows[i]
                    j = int(np.argmax(s_local))
                    if s_local[j] > sim:
                        sim, target = float(s_local[j]), start + int(local[j])
                if sim > threshold:
                    keep[i] = False
                    dropped.append(start + i)
                    targets.append(target)
            rows_kept = np.flatnonzero(keep)
            earlier.add(rows[rows_kept], None if bounding is None else bounding[rows_kept])
            kept[n_kept : n_kept + len(rows_kept)] = rows_kept + start
            n_kept += len(rows_kept)
    return np.asarray(dropped, np.int64), np.asarray(targets, np.int64)


class _KeptRows:
    """The kept rows, and for a block of new rows the most similar kept one of each where the
    cosine exceeds the threshold.

    A fraction of the work of a full product: with x = (x₁, x₂) split after its first r
    coordinates, x·y ≤ x₁·y₁ + ‖x₂‖‖y₂‖ (Cauchy–Schwarz), which is one product of (x₁, ‖x₂‖) and
    (y₁, ‖y₂‖): r + 1 columns instead of all of them bound every cosine, and only the pairs whose
    bound passes the threshold are computed in full. The bound of an unrelated pair is about
    (1 − e) + c·e, e the energy the first r coordinates hold and c the group's typical cosine, so r
    is the fewest coordinates that leave it ``MARGIN`` under the threshold (``head_width``): a
    quarter of a random projection's (energy spread evenly) at ε = 0.15, fewer for an SVD's
    (energy in its first components). Where many pairs pass anyway (a block of near-duplicates),
    or r is all of them (a tight group: the bound would be the product itself), the full product
    is taken instead. Exact either way: the bound only skips pairs that cannot count.

    ``low_precision`` (where the CPU multiplies bfloat16 in hardware, and the group is large):
    the bound's product in bfloat16 with float32 sums (torch; Intel AMX or AVX-512 BF16), ~6x the
    float32 product's speed, its threshold lowered by ``LOW_SLACK`` to cover the rounding, so it
    still skips only pairs that cannot count; the cosines that decide are float32 products of the
    pairs it lets through. The kept rows' bounds are held as bfloat16 bits, transposed, a tile of
    ``TILE`` kept rows a contiguous matrix: the layout in which torch's product runs on the
    matrix units (a row-major right side did not)."""

    SLACK = 1e-4  # float32 rounding of the bound: a pair within this of the threshold is computed
    # bfloat16 keeps 8 significant bits (unit roundoff u = 2⁻⁸): each product of two rounded
    # inputs is off by at most 2u of its size and the terms' sizes sum to at most 1 (unit rows,
    # Cauchy–Schwarz), the float32 sums add ~1e-5, and the result's own rounding u of ~1: under
    # 3u = 0.0117 in all
    LOW_SLACK = 0.0125
    MARGIN = 0.1  # how far under the threshold an unrelated pair's bound should lie
    FULL_PRODUCT_AT = 32  # candidate pairs per row over which the full product is cheaper
    LOW_PRECISION_FROM = 4096  # rows in a group from which the bfloat16 bound pays (torch's import)
    ROWS_STEP, TILE = 256, 2048  # the bfloat16 product's one shape (see _low_candidates)

    SAMPLE = 4096  # rows, evenly spaced, that r is estimated from

    def __init__(self, rows_of, n: int, dim: int, threshold: float, low_precision: bool | None = None):
        """``rows_of(positions)``: the group's rows at those positions, as unit float32 vectors."""
        sample = rows_of(np.arange(0, n, max(1, n // self.SAMPLE)))
        self.threshold, self.r = threshold, head_width(sample, threshold, self.MARGIN)
        self.vectors = np.empty((n, dim), np.float32)  # contiguous: no gather per block
        if low_precision is None:
            # (a cut under 0 would break the bits' order: negative bfloat16 read as int16 reverse)
            low_precision = n >= self.LOW_PRECISION_FROM and threshold > 2 * self.LOW_SLACK and bfloat16_products()
        self.low = low_precision
        self.width = self.r + 1 if self.r < dim else dim  # the bound's columns
        if self.low:
            import torch

            self.torch = torch
            self.padded = -(-self.width // 32) * 32  # whole tiles for the matrix units
            if self.r < dim and self.padded - 1 < dim:
                # The padding's columns hold coordinates instead of zeros: a tighter bound, the same product
                self.r = self.padded - 1
                self.width = self.padded
            # bfloat16 bits held in numpy (every small step there: a torch call per block cost
            # more than the product), the product alone in torch
            # tile-major: each tile of kept rows one contiguous (padded, TILE) matrix
            self.heads = np.zeros((-(-n // self.TILE), self.padded, self.TILE), np.int16)
            self.product = None  # the product's output, reused: (rows, TILE) bfloat16
            self.within = None  # the same for a block against itself
            # The bound's cut as bfloat16 bits: for the positive values that matter, bfloat16
            # orders as its bits read as int16, which numpy compares fast (torch's bfloat16
            # comparison took longer than the product). Rounded down: it only lets more through.
            self.cut_bits = int(np.float32(threshold - self.LOW_SLACK).view(np.int32) >> 16)
            self.bounds = None
        else:
            # (y₁, ‖y₂‖) of each kept row; none where r is every coordinate
            self.bounds = np.empty((n, self.r + 1), np.float32) if self.r < dim else None
        self.n = 0
        self.tri = None

    def bounding(self, rows: np.ndarray):
        """(x₁, ‖x₂‖) of each row (the rows themselves where r is every coordinate; for ``low``,
        as bfloat16 bits padded to ``padded`` columns): computed once a block, for its comparison
        and for the rows it keeps."""
        if not self.low and self.bounds is None:
            return None
        if self.r >= rows.shape[1]:
            out = rows
        else:
            out = np.empty((len(rows), self.r + 1), np.float32)
            out[:, : self.r] = rows[:, : self.r]
            out[:, self.r] = np.linalg.norm(rows[:, self.r :], axis=1)
        if not self.low:
            return out
        head = np.zeros((len(rows), self.padded), np.int16)
        head[:, : self.width] = bfloat16_bits(out)
        return head

    def near_in_block(self, rows: np.ndarray, bounding) -> np.ndarray:
        """(m, m) booleans: for each row i, the rows j < i of its own block whose cosine to it
        may exceed the threshold (the bound's product, as against the kept rows: a third of the
        columns, in bfloat16 where the CPU has it; the block's full float32 product took 15% of
        a group's time)."""
        m = len(rows)
        earlier = self._tri(m)
        if self.low:
            head = self._whole_steps(bounding)
            step = len(head)
            torch, bf16 = self.torch, self.torch.bfloat16
            if self.within is None or self.within.shape[0] != step:
                self.within = torch.empty((step, step), dtype=bf16)
            right = torch.from_numpy(np.ascontiguousarray(head.T)).view(bf16)
            torch.mm(torch.from_numpy(head).view(bf16), right, out=self.within)
            return (self.within.view(torch.int16).numpy()[:m, :m] > self.cut_bits) & earlier
        if bounding is None:  # the bound would be the product itself
            return (rows @ rows.T > self.threshold) & earlier
        return (bounding @ bounding.T > self.threshold - self.SLACK) & earlier

    def _whole_steps(self, bounding: np.ndarray) -> np.ndarray:
        """A block's bfloat16 heads padded with zero rows (under the cut) to a multiple of
        ``ROWS_STEP``: the products' one shape (see ``_low_candidates``)."""
        m = len(bounding)
        rows = -(-m // self.ROWS_STEP) * self.ROWS_STEP
        if rows == m:
            return bounding
        return np.concatenate([bounding, np.zeros((rows - m, bounding.shape[1]), np.int16)])

    def _tri(self, m: int) -> np.ndarray:
        if self.tri is None or self.tri.shape[0] != m:
            self.tri = np.tri(m, k=-1, dtype=bool)
        return self.tri

    def add(self, rows: np.ndarray, bounding) -> None:
        end = self.n + len(rows)
        self.vectors[self.n : end] = rows
        if self.low:
            at = self.n
            while at < end:  # the new rows' columns, tile by tile
                tile, col = divmod(at, self.TILE)
                stop = min(end, at + self.TILE - col)
                self.heads[tile, :, col : col + stop - at] = bounding[at - self.n : stop - self.n].T
                at = stop
        elif self.bounds is not None:
            self.bounds[self.n : end] = bounding
        self.n = end

    def most_similar(self, rows: np.ndarray, bounding):
        """(index of the most similar kept row, its cosine), -inf where none exceeds the threshold."""
        m = len(rows)
        best = np.zeros(m, np.int64)
        best_sim = np.full(m, -np.inf, np.float32)
        if not self.n:
            return best, best_sim
        if self.low:
            r, k = self._low_candidates(bounding)
        elif self.bounds is None:
            return self._full_product(rows)
        else:
            bound = bounding @ self.bounds[: self.n].T  # ≥ each cosine
            r, k = np.divmod(np.flatnonzero(bound > self.threshold - self.SLACK), self.n)
        if len(r) > self.FULL_PRODUCT_AT * m:
            return self._full_product(rows)
        sims = np.einsum("ij,ij->i", rows[r], self.vectors[k])
        over = sims > self.threshold
        r, k, sims = r[over], k[over], sims[over]
        if len(r):
            order = np.lexsort((k, -sims, r))  # per row: the most similar, the earliest on a tie
            first = order[np.r_[True, r[order][1:] != r[order][:-1]]]
            best[r[first]], best_sim[r[first]] = k[first], sims[first]
        return best, best_sim

    def _low_candidates(self, bounding: np.ndarray):
        """(row, kept row) of the pairs whose bfloat16 bound passes the lowered cut, a tile of
        ``TILE`` kept rows at a time, the rows padded to ``ROWS_STEP`` (zeros, under the cut):
        one shape and one layout for every product. torch compiles and keeps a kernel for each
        new shape and stride (~8 ms and ~1-2 MB each): a 1M run grew 0.5 GB of them, and
        compiling one a block took it from 187 to 309 s. A tile's output (1 MB) stays in cache
        for the comparison."""
        m = len(bounding)
        bounding = self._whole_steps(bounding)
        rows = len(bounding)
        torch, bf16 = self.torch, self.torch.bfloat16
        if self.product is None or self.product.shape[0] != rows:
            self.product = torch.empty((rows, self.TILE), dtype=bf16)
        left = torch.from_numpy(bounding).view(bf16)
        bound = self.product.view(torch.int16).numpy()[:m]
        highest = np.empty(m, np.int16)
        found_rows, found_kept = [], []
        for tile in range(-(-self.n // self.TILE)):
            torch.mm(left, torch.from_numpy(self.heads[tile]).view(bf16), out=self.product)
            # Most rows have no pair over the cut in a tile: each row's maximum first (one pass,
            # no mask made), then only the rows that have one are searched
            hit = np.flatnonzero(np.max(bound, axis=1, out=highest) > self.cut_bits)
            if not len(hit):
                continue
            if 4 * len(hit) > m:
                r, k = np.divmod(np.flatnonzero(bound > self.cut_bits), self.TILE)
            else:
                at, k = np.divmod(np.flatnonzero(bound[hit] > self.cut_bits), self.TILE)
                r = hit[at]
            found_rows.append(r)
            found_kept.append(k + tile * self.TILE)
        if not found_rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(found_rows), np.concatenate(found_kept)  # in no order: sorted after

    def _full_product(self, rows: np.ndarray):
        sims = rows @ self.vectors[: self.n].T
        best = sims.argmax(1)
        best_sim = sims[np.arange(len(rows)), best]
        return best, np.where(best_sim > self.threshold, best_sim, -np.inf).astype(np.float32)


HALF_BY_TORCH = 1 << 16  # elements from which a conversion to or from float16 goes through torch


def half_precision(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, rounded to nearest even: the same bits as numpy's ``astype``, which
    converts one element at a time (20,000 unit rows of 512: 30 ms) where torch uses the CPU's
    conversion instructions (7.8 ms). Through torch only where a step before has imported it:
    importing it for this alone (~1 s, and ~150 MB more in the members step, where the peak of a
    one-process run at 1M documents then was) costs more than it saves."""
    torch = _imported_torch()
    if torch is None or x.size < HALF_BY_TORCH:
        return x.astype(np.float16)
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)).half().numpy()


def single_precision(x: np.ndarray) -> np.ndarray:
    """float16 -> float32, exact either way (a block of 256 x 512 in the greedy: numpy's
    ``astype`` ~130 us, torch's ~30 us); through torch where it is imported (as for
    ``half_precision``)."""
    torch = _imported_torch()
    if torch is None or x.size < HALF_BY_TORCH:
        return x.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()


def _imported_torch():
    """torch where it is imported; None where it is not, or is still being imported on another
    thread (a group side by side with the one that imports it): that module has not all its
    names yet (``from_numpy`` failed there, one run in a few)."""
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None
    return torch


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the bits of the nearest bfloat16 (ties to even), as int16 (torch's rounding)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.int16)


@functools.cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def one_blas_thread():
    """A context in which numpy's BLAS runs on one thread. The libraries are found once a process:
    ``threadpool_limits`` walks every loaded library each time (~3 ms a group once torch is loaded)."""
    return _threadpools().limit(limits=1, user_api="blas")


@functools.cache
def bfloat16_products() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX, or AVX-512 BF16),
    where torch's bfloat16 product is several times its float32 one; elsewhere it is slower."""
    try:
        import torch.cpu

        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except Exception:  # an older or newer torch without these checks: float32 as before
        return False


def head_width(unit: np.ndarray, threshold: float, margin: float) -> int:
    """The fewest leading coordinates r (a multiple of 8) for which the bound x₁·y₁ + ‖x₂‖‖y₂‖ of
    a typical pair of these unit rows, (1 − e(r)) + ‖x̄₁(r)‖², lies ``margin`` under the
    threshold: e(r) the mean energy of the first r coordinates, ‖x̄₁(r)‖² the mean product of two
    rows' first r coordinates. All of them (an exact bound) where no r does."""
    n, dim = unit.shape
    if not n:
        return dim
    # In the rows' own float32 (an estimate; no float64 copy of the group)
    energy = np.cumsum(np.einsum("ij,ij->j", unit, unit).astype(np.float64)) / n
    mean = unit.sum(0).astype(np.float64) / n
    together = np.cumsum(mean * mean)
    fits = np.flatnonzero(1 - energy + together <= threshold - margin)
    if not len(fits):
        return dim
    return min(dim, int(-(-(fits[0] + 1) // 8) * 8))


def id_strings(ids) -> pa.Array:
    """Ids as strings, as ``str()`` writes them: Arrow's cast where it writes the same (strings,
    integers), else one at a time."""
    ids = one_array(ids)
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type) or pa.types.is_integer(ids.type):
        return ids.cast(pa.string())
    return pa.array([str(i) for i in ids.to_pylist()], pa.string())


class _ExactKeys:
    """A shard -> (hashes of its normalised texts, orders, shard, ids) of its documents in the
    running that have any text left after normalising. ``hashes`` (the first pass, for the filter
    of repeated hashes) computes them and stages them beside the shard; the call reads them back."""

    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def hashes(self, item) -> np.ndarray:
        shard, running = self.chain.running(self.stage, item)
        table = read_staging(shard.path, [ORDER, "id", TEXT])
        if not running.all():  # only the texts in the running are normalised and hashed
            table = table.take(pa.array(np.flatnonzero(running)))
        hashes, lengths = normalised_hashes(table.column(TEXT))
        # A text with nothing left after normalising (only symbols or punctuation) repeats nothing.
        rows = pa.array(np.flatnonzero(lengths > 0))
        keys = {"hash": pa.array(hashes).take(rows), ORDER: table.column(ORDER).take(rows)}
        keys["id"] = id_strings(table.column("id").take(rows))
        write_staging(pa.table(keys).cast(_KEYS_SCHEMA), self.chain.path(self.stage + KEYS_TABLE, shard.name))
        return np.asarray(keys["hash"], np.uint64)

    def __call__(self, item):
        shard = shard_of(item)
        keys = read_staging(self.chain.path(self.stage + KEYS_TABLE, shard.name))
        ids = keys.column("id").combine_chunks().to_numpy(zero_copy_only=False)
        hashes = np.asarray(keys.column("hash").combine_chunks(), np.uint64)
        return hashes, np.asarray(keys.column(ORDER).combine_chunks(), np.int64), shard.name, ids


def _timed_group(kv, epsilon: float, max_group: int, torch_threads=None) -> tuple:
    started = time.time()
    records = _compare_group(kv, epsilon, max_group, torch_threads)
    return started, time.time(), records


class _CompareGroups(beam.DoFn):
    """(group, its members' references) -> the drop records of SemDeDup's greedy in it. With
    ``threads`` > 1 (one process given several cores: a local runner without worker processes),
    that many groups are compared side by side, each on one math thread: a group's steps are
    mostly single-threaded numpy, so one group at a time left a core idle (the greedy of 1M
    documents in one process took 74 s, with two worker processes 40 s)."""

    def __init__(self, epsilon: float, stage: str, max_group: int, threads: int = 1):
        self.epsilon, self.stage, self.max_group, self.threads = epsilon, stage, max_group, threads

    def setup(self):
        self._meter = StageMeter(self.stage)
        self._meter.setup()
        self._groups = SideBySide(self.threads, "semdedup", self._done)
        self._torch = _OneTorchThread() if self.threads > 1 else None

    # The groups' drops go out together, a batch a bundle (or every this many rows): a batch a
    # group is cut into a piece for each partition of the pointer resolution, ~5k pieces at 1M
    # documents, each held and pickled on its own by the runner.
    BATCH_ROWS = 1 << 16

    def start_bundle(self):
        self._limits = contextlib.ExitStack()
        if self._torch is not None:  # one math thread a group: the groups are the parallelism
            self._limits.enter_context(one_blas_thread())
            self._limits.callback(self._torch.restore)
        self._drops, self._rows = [], 0

    def _done(self, timed) -> list:
        started, ended, batches = timed
        # Timed where the group ran, recorded here: Beam counts metrics on the bundle's thread only
        self._meter.record(started, ended)
        self._drops += batches
        self._rows += sum(len(b["order"]) for b in batches)
        return self._flush() if self._rows >= self.BATCH_ROWS else []

    def _flush(self) -> list:
        batch = [_concat(self._drops)] if self._drops else []
        self._drops, self._rows = [], 0
        return batch

    def process(self, kv):
        limit_torch = self._torch.limit if self._torch is not None else None
        yield from self._groups.submit(_timed_group, kv, self.epsilon, self.max_group, limit_torch)

    def finish_bundle(self):
        try:
            yield from self._groups.rest()
            for batch in self._flush():
                yield windowed(batch)
        finally:
            self._limits.close()

    def teardown(self):
        self._groups.close()


class _OneTorchThread:
    """torch's intra-op threads set to one by each group that takes torch's bfloat16 path, and
    set back after the bundle: only then, as importing torch takes ~1 s, which a run whose
    groups are all small never needs. Each group's thread sets it for itself: torch keeps the
    count per thread (set once, by the first group to come, the other thread's products ran on
    two threads each: the greedy's step at 300k in one process 11.5 -> 15.5 s)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.before, self.limited = None, False

    def limit(self) -> None:
        with self.lock:
            import torch

            if self.before is None:
                self.before = torch.get_num_threads()
            torch.set_num_threads(1)
            self.limited = True

    def restore(self) -> None:
        with self.lock:
            if self.limited:
                import torch

                torch.set_num_threads(self.before)
                self.limited = False


def _compare_group(kv, epsilon: float, max_group: int, torch_threads=None) -> list:
    """``torch_threads``: called before a group's greedy takes torch's path (a large group, on a
    CPU with bfloat16 products)."""
    (cluster, part), members = kv[0], _members(kv[1])
    if torch_threads is not None and len(members[0]) >= _KeptRows.LOW_PRECISION_FROM and bfloat16_products():
        torch_threads()
    if len(members[0]) > max_group:
        logging.getLogger("beamsift").warning(
            "dedup: cluster %d (part %d) has %d documents to compare, more than dedup.max_group=%d "
            "(%.1e dot products on one worker): its split was uneven; a larger cluster.k also bounds it",
            cluster,
            part,
            len(members[0]),
            max_group,
            len(members[0]) ** 2 / 2,
        )
    distance, orders, ids, vectors, shards = members
    drops = compare_members(distance, orders, ids, vectors, epsilon)
    batch = drop_batch((int(orders[r]), shards[r], kept_id, NEAR, target) for r, kept_id, target in drops)
    return [batch] if drops else []


def _exact_drops(kv):
    """(shard, its texts that repeat an earlier one) -> its drop batch (``drop_batch``), if any."""
    shard, (losers, winners, kept_ids) = kv
    n = len(losers)
    if not n:
        return []
    return [drop_columns(losers, [shard] * n, list(kept_ids), [EXACT] * n, np.zeros(n), winners)]


# ---- bounded groups: a cluster larger than dedup.max_group is compared in parts ----------------

SPLIT_SAMPLE_ROWS = 16384  # documents sampled over all clusters for their split directions
SPLIT_STREAM = 0x5D117  # the cuts of a cluster too little of which was sampled
MEMBERS_TABLE = ".members"  # _staging/<stage>.members/<shard>.arrow: a bundle's members (see _ClusterMembers)
KEYS_TABLE = ".keys"  # _staging/<stage>.keys/<shard>.arrow: its texts' hashes, orders and ids
_KEYS_SCHEMA = pa.schema([("hash", pa.uint64()), (ORDER, pa.int64()), ("id", pa.string())])
ROWS_INDEX = ".rows"  # _staging/<stage>.members.rows/<shard>.i32: on local disk, each group's rows (raw int32)
EXACT_TABLE = ".exact"  # _staging/<stage>.exact/<shard>.arrow: the shard's exact duplicates
DROPPED_TABLE = ".dropped"  # _staging/<stage>.dropped/<shard>.arrow: all its dropped documents
POINTER_ROUNDS = 5  # pointer jumping: chains of up to 2**5 links end at a kept document


def split_sample_size(clusters: int) -> int:
    """Documents sampled per cluster for its split directions: ``SPLIT_SAMPLE_ROWS`` shared by
    the clusters (their side input, 16 MB at 512 dimensions), from 64 to 1,024 each."""
    return max(64, min(1024, SPLIT_SAMPLE_ROWS // max(1, clusters)))


class _ClusterShapes(beam.DoFn):
    """A shard -> {cluster: (documents compared in it, Σ embedding of its own documents, own
    documents)}: the group sizes, and the means that a split passes through; and, tagged
    ``sample``, (cluster, (id hashes, orders, embeddings)) of the ``sample`` own documents with
    the lowest id hashes: what ``LowestHashes`` keeps of every shard's, the same whatever the
    shards and bundles, for the directions a split cuts along. Only hashes under a cut that
    ~8 × ``sample`` documents of an average cluster pass are offered (every shard offering its
    lowest made 1 GB of samples at 1M documents): a cluster's ``sample`` lowest are all under
    it wherever that many of its documents are, and otherwise all of its under it are kept."""

    def __init__(self, stage, chain, probes: int, sample: int, clusters: int, threads: int = 1):
        self.stage, self.chain, self.probes, self.sample = stage, chain, probes, sample
        self.clusters, self.threads = clusters, threads

    def setup(self):
        self._shards = SideBySide(self.threads, "shapes")  # one process, several cores: side by side

    def process(self, item, exact_done, documents):
        yield from self._shards.submit(self._shapes, item, exact_done, documents)

    def finish_bundle(self):
        yield from self._shards.rest()

    def teardown(self):
        self._shards.close()

    def _sampled(self, shard: str, embedded: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The sampled rows' embeddings in half precision or, on a local disk, where they are
        (``SHARD_ROWS``): read by ``plan_splits`` (16 MB of samples no longer travel)."""
        if not self.chain.on_local_disk():
            return half_precision(embedded[at])
        refs = np.empty(len(at), SHARD_ROWS)
        refs["shard"], refs["row"] = shard, at
        return refs

    def _shapes(self, item, exact_done, documents) -> list:
        shard, running = self.chain.running(self.stage, item)
        orders = read_orders(shard.path)
        exact, _ = read_drops(self.chain, self.stage + EXACT_TABLE, shard.name, exact_done).lookup(orders)
        rows = running & ~exact
        clusters = self.chain.column("cluster", shard.name)
        embedded = embeddings(self.chain, shard.name)
        vectors = embedded.astype(np.float64)
        hashes = read_id_hashes(shard.path)
        share = 8 * self.sample * self.clusters / max(documents, 1)
        offered = hashes <= (np.uint64(2**64 - 1) if share >= 1 else np.uint64(int(share * 2**64)))
        out, outputs = {}, []
        for c in np.unique(clusters[rows]).astype(np.int64).tolist():
            own = rows & (clusters == c)
            n = int(own.sum())
            out[c] = (n, vectors[own].sum(0), n)
            at = np.flatnonzero(own & offered)
            at = at[np.lexsort((orders[at], hashes[at]))[: self.sample]]
            sample = (hashes[at], orders[at], self._sampled(shard.name, embedded, at))
            outputs.append(beam.pvalue.TaggedOutput("sample", (c, sample)))
        if self.probes > 1:
            probe = self.chain.column(NEXT_CLUSTER, shard.name)
            also = rows & ~np.isnan(probe) & (probe != clusters)
            for c, n in zip(*np.unique(probe[also].astype(np.int64), return_counts=True)):
                size, total, own = out.get(int(c), (0, 0.0, 0))
                out[int(c)] = (size + int(n), total, own)
        return [*outputs, out]


class LowestHashes(beam.CombineFn):
    """(id hashes, orders, rows) -> the ``size`` of them with the lowest (hash, order), sorted:
    a sample that is the same however the parts are grouped."""

    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return None

    def add_input(self, acc, part):
        return self.merge_accumulators([acc, part])

    def merge_accumulators(self, accs):
        accs = [a for a in accs if a is not None]
        if len(accs) < 2:
            return accs[0] if accs else None
        hashes, orders, rows = (np.concatenate(column) for column in zip(*accs))
        keep = np.lexsort((orders, hashes))[: self.size]
        return hashes[keep], orders[keep], rows[keep]

    def extract_output(self, acc):
        return acc


SHARD_ROWS = np.dtype([("shard", object), ("row", np.int64)])  # where a sampled embedding is


def _half_samples(chain, samples: dict) -> dict:
    """The split samples with their embeddings in half precision: as they came, or read where
    they are (every cluster's rows of a shard in one read)."""
    named = sorted(c for c, s in samples.items() if s[2].dtype == SHARD_ROWS)
    if not named:
        return samples
    refs = np.concatenate([samples[c][2] for c in named])
    vectors = half_precision(referred_rows(chain, refs["shard"], refs["row"]))
    bounds = np.cumsum([0] + [len(samples[c][2]) for c in named])
    out = dict(samples)
    for c, lo, hi in zip(named, bounds[:-1], bounds[1:]):
        out[c] = (*samples[c][:2], vectors[lo:hi])
    return out


def plan_splits(shapes: dict, max_group: int, samples: dict, chain=None) -> dict:
    """{cluster: (bits, mean embedding, directions, offsets)} for each cluster with more than
    ``max_group`` documents to compare: 2**bits parts, aimed at half the bound each, cut by the
    cluster's ``bits`` principal directions (of its sample) at the sample's medians along them.

    A near-duplicate pair is lost where a cut other than the nearest separates it, and a cut
    separates it about in proportion to how densely the documents lie at the cut: across the
    directions of most spread they lie least densely (planted near-duplicates at 100k documents,
    4 cuts: recall 0.989 against 0.967 with seeded random hyperplanes through the mean, 0.993
    unsplit; docs/benchmarks.md)."""
    splits = {}
    samples = _half_samples(chain, samples)
    # One thread: the same directions in one process and in workers sized to a core
    with one_blas_thread():
        for c, (size, total, own) in sorted(shapes.items()):
            if size > max_group and own:
                bits = int(np.ceil(np.log2(2 * size / max_group)))
                mean = np.asarray(total, np.float64) / own
                sample = samples.get(c)
                if sample is not None and len(sample[2]) > bits:
                    directions, offsets = _principal_cuts(sample[2].astype(np.float64) - mean, bits)
                else:  # too few of its own documents sampled (most of it probes it): seeded cuts
                    directions = np.random.default_rng(SPLIT_STREAM).normal(size=(bits, len(mean)))
                    offsets = np.zeros(bits)
                splits[c] = (bits, mean, directions, offsets)
    return splits


def _principal_cuts(centred: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``bits`` directions of most variance of the centred rows (unit, each signed so that
    its largest coordinate is positive) and the rows' median along each."""
    values, vectors = np.linalg.eigh(centred.T @ centred)
    directions = vectors[:, np.argsort(-values, kind="stable")[:bits]].T
    largest = np.argmax(np.abs(directions), axis=1)
    directions *= np.sign(directions[np.arange(len(directions)), largest])[:, None]
    return directions, np.median(centred @ directions.T, axis=0)


def parts_of(vectors: np.ndarray, cluster: int, splits: dict, probes: int):
    """(part, part across): each vector's part of ``cluster`` (0 when the cluster is not split)
    and, with two probes, the part across its least certain cut (-1: none), so that
    near-duplicates on either side of a cut still meet."""
    n = len(vectors)
    if cluster not in splits:
        return np.zeros(n, np.int64), np.full(n, -1, np.int64)
    bits, mean, directions, offsets = splits[cluster]
    centred = np.array(vectors, np.float64)  # one float64 copy of these rows alone, centred in place
    centred -= mean
    margins = centred @ directions.T - offsets
    part = ((margins > 0) * (1 << np.arange(bits))).sum(1).astype(np.int64)
    if probes < 2:
        return part, np.full(n, -1, np.int64)
    return part, part ^ (1 << np.argmin(np.abs(margins), axis=1))


def _member_batch(rows, distance, orders, ids, vectors16, shard: str) -> pa.RecordBatch:
    """The members from one shard (``vectors16``: theirs alone, the others' columns whole): what
    SemDeDup compares them by, and where each comes from."""
    return pa.record_batch(
        {
            "distance": pa.array(distance[rows], pa.float64()),
            ORDER: pa.array(orders[rows], pa.int64()),
            "id": id_strings(ids.take(pa.array(rows))),
            "vector": matrix_column(vectors16),
            "shard": pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(rows), np.int32)), pa.array([shard])),
        }
    )


def _members(refs) -> tuple:
    """A group's (distance, order, id, vector, shard) arrays (ids and shards lists) from its (path,
    index, index path) references: the index-th batch of the file, or (with an index path) the rows
    that the index file names from ``index`` = (start, count)."""
    distance, orders, ids, vectors, shards = [], [], [], [], []
    for path, index, index_path in refs:
        # A batch of the group's own, or the rows of a file's one batch that are in the group
        if index_path is None:
            batch = read_staging_batch(path, index)
        else:
            batch = read_staging_rows(path, read_row_run(index_path, *index))
        vectors.append(column_matrix(batch.column("vector"), np.float16))
        distance.append(batch.column("distance").to_numpy())
        orders.append(batch.column(ORDER).to_numpy())
        ids.append(batch.column("id"))
        shard = batch.column("shard")  # a dictionary of a few names: one Python string each
        shards.append(np.asarray(shard.dictionary.to_pylist(), object)[shard.indices.to_numpy()])
    if not refs:
        return np.zeros(0), np.zeros(0, np.int64), [], np.zeros((0, 1), np.float16), []
    vectors, shards = np.concatenate(vectors), np.concatenate(shards)
    return np.concatenate(distance), np.concatenate(orders), _Values(ids), vectors, shards


class _Values:
    """A string column of a group, read one value at a time: only the kept and dropped documents'
    are asked for (a few percent), so the rest never become Python strings (~1 us each)."""

    def __init__(self, arrays: list):
        self.array = pa.concat_arrays(arrays)

    def __getitem__(self, row) -> str:
        return self.array[int(row)].as_py()


class _ClusterMembers(beam.DoFn):
    """A shard -> ((cluster, part), document) for each document in the running and each group it
    is compared in: its own cluster and, with ``probes`` 2, the next nearest (in a split
    cluster: its part and the part across the nearest cut).

    The members go through staging: the shuffle carries only references, so that a local runner,
    which holds a shuffle in memory, never holds every document's vector (1 KB each, in up to
    four groups). The shards of a bundle are written together, ``FILE_DOCS`` documents a file, so
    that a group reads a few files rather than one per shard (each read costs ~0.3 ms before its
    first byte: 62,000 of them at 1M documents). On a local disk a file holds each member once,
    in the order of its own group, and a file beside it lists each group's rows (a group touches
    just those pages of the memory-mapped file, and a reference is a few bytes, however large
    the group);
    on an object store, where a read is a download, each group gets a record batch of its own (its
    bytes alone are fetched), at the cost of writing a vector once per group it is in."""

    FILE_DOCS = 32768  # documents held before their members are written (~35 MB)

    def __init__(self, stage, chain, probes: int = 2, tfidf: tuple | None = None, threads: int = 1):
        self.stage, self.chain, self.probes = stage, chain, probes
        self.tfidf = tfidf  # (num_buckets, dim, seed): compare on projected TF-IDF, not the embedding
        self.threads = threads
        self._proj = None
        self._pending = []

    def setup(self):
        self._lock = threading.Lock()
        # one process given several cores: its shards' members side by side
        self._shards = SideBySide(self.threads, "members", self._held)

    def teardown(self):
        self._shards.close()

    def _vectors(self, shard, rows, frequencies):
        """The vectors compared, of the documents at ``rows`` (those compared: no others computed)."""
        if self.tfidf is None:
            return embeddings(self.chain, shard.name)[rows]
        with self._lock:
            if self._proj is None:
                self._proj = projection(*self.tfidf)
                self._tiles = projection_tiles(self._proj)
        return tfidf_embeddings(features_of(shard, rows), smooth_idf(frequencies), self._proj, self._tiles)

    def start_bundle(self):
        self._pending = []  # [(shard name, its members' batch, {group: rows of the batch}, homes)]

    def process(self, item, exact_done, splits, frequencies=None):
        yield from self._shards.submit(self._members_of, item, exact_done, splits, frequencies)

    def _held(self, members) -> list:
        """A shard's members held for the next file (written, on the bundle's thread, once it holds
        ``FILE_DOCS`` documents) -> (group, reference) of each group in a file written now."""
        if members is None:
            return []
        self._pending.append(members)
        if sum(b.num_rows for _, b, _, _ in self._pending) >= self.FILE_DOCS:
            return list(self._write())
        return []

    def _members_of(self, item, exact_done, splits, frequencies=None):
        """A shard -> (its name, its members' batch, {group: rows of the batch}, homes), or None."""
        shard, running = self.chain.running(self.stage, item)
        table = read_staging(shard.path, [ORDER, "id"])
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
        exact, _ = read_drops(self.chain, self.stage + EXACT_TABLE, shard.name, exact_done).lookup(orders)
        rows = np.flatnonzero(running & ~exact)
        if not len(rows):
            return None
        clusters = self.chain.column("cluster", shard.name)
        distance = self.chain.column("cluster_distance", shard.name)
        vectors = self._vectors(shard, rows, frequencies)
        ids = table.column("id")
        probe = self.chain.column(NEXT_CLUSTER, shard.name) if self.probes > 1 else None
        # Half precision through the shuffle (the runner may hold it all): unit vectors' cosines
        # move by ~1e-3, far inside ε; the greedy computes in float32.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors16 = half_precision(vectors / np.where(norms > 0, norms, 1))
        held = vectors if self.tfidf is None else None  # the embedding's rows, read above
        by_group, home = self._groups(shard, rows, clusters, probe, splits, held)
        batch = _member_batch(rows, distance, orders, ids, vectors16, shard.name)
        return shard.name, batch, by_group, home

    def finish_bundle(self):
        yield from self._shards.rest()
        for key, ref in self._write():
            yield windowed((key, ref))

    def _write(self):
        """The pending shards' members in one file -> (group, reference) of each group in it."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        path = self.chain.path(self.stage + MEMBERS_TABLE, pending[0][0])
        members = pa.Table.from_batches([b for _, b, _, _ in pending]).combine_chunks()
        rows: dict = {}
        start = 0
        for _, batch, by_group, _ in pending:
            for key, at in by_group.items():
                rows.setdefault(key, []).append(np.asarray(at, np.int64) + start)
            start += batch.num_rows
        order = sorted(rows)
        rows = {key: np.concatenate(rows[key]) for key in order}
        if self.chain.on_local_disk():
            # The rows in the order of their own group: a group reads its own members as one run
            # of the memory-mapped file, and those it shares with a neighbour (the part across a
            # cut, the next cluster) from a few runs, several to a page, not one page a member
            # (a page fault each: ~7 us a member, most of the reading).
            by_home = np.argsort(np.concatenate([home for _, _, _, home in pending]), kind="stable")
            members = members.take(pa.array(by_home))
            position = np.empty_like(by_home)
            position[by_home] = np.arange(len(by_home))
            rows = {key: np.sort(position[at]) for key, at in rows.items()}
            # The rows of each group go to a file beside the members, so the shuffle carries a
            # few bytes a group and file, not 4 a membership (a local runner holds all of it).
            index_path = self.chain.path(self.stage + MEMBERS_TABLE + ROWS_INDEX, pending[0][0], suffix=".i32")
            starts = write_row_runs([rows[key] for key in order], index_path)
            write_staging(members, path)
            for index, key in enumerate(order):
                yield key, (path, (int(starts[index]), len(rows[key])), index_path)
            return
        write_staging(
            pa.Table.from_batches([members.take(rows[key]).combine_chunks().to_batches()[0] for key in order]), path
        )
        for index, key in enumerate(order):
            yield key, (path, index, None)

    def _groups(self, shard, rows, clusters, probe, splits, held=None) -> tuple:
        """({(cluster, part): the indices into ``rows`` of its members, ascending}, each row in a
        group once; the home of each row: its own cluster and part, as cluster * 2**32 + part);
        ``held``: the embedding's rows at ``rows`` where the caller has them."""
        space = None
        if splits:  # float32 here, each cluster's rows in float64 in parts_of (the split's planned space)
            space = embeddings(self.chain, shard.name)[rows] if held is None else held
        members = []  # (cluster, part, index) columns
        home = np.full(len(rows), np.iinfo(np.int64).max, np.int64)
        owners = [clusters[rows]] + ([probe[rows]] if probe is not None else [])
        for o, owner in enumerate(owners):
            for c in np.unique(owner[~np.isnan(owner)]).astype(np.int64).tolist():
                at = np.flatnonzero(owner == c)
                part, across = parts_of(space[at] if space is not None else at, c, splits, self.probes)
                if o == 0:
                    home[at] = (c << 32) + part
                two = across >= 0
                members.append(np.stack([np.full(len(at), c), part, at], 1))
                members.append(np.stack([np.full(int(two.sum()), c), across[two], at[two]], 1))
        if not members:
            return {}, home
        members = np.concatenate(members)
        # Sorted by group, then index, each once (np.unique(axis=0)'s result, 10x faster)
        members = members[np.lexsort(members.T[::-1])]
        members = members[np.r_[True, np.any(members[1:] != members[:-1], axis=1)]]
        starts = np.flatnonzero(np.r_[True, np.any(members[1:, :2] != members[:-1, :2], axis=1)])
        ends = np.r_[starts[1:], len(members)]
        return {(int(members[a, 0]), int(members[a, 1])): members[a:b, 2] for a, b in zip(starts, ends)}, home


# ---- the dropped documents, joined back to their shards -------------------------------------


# The drops travel as batches, never one element a document: numbers as numpy arrays, the strings
# (shard, kept id, reason) as Arrow arrays, which pickle as a few buffers. A local runner holds
# every shuffle in memory, and what it holds is a multiple of the drops' bytes: at 1M documents
# (53k drops) a drop record each, every drop through all five rounds, a piece a shard at the end
# peaked ~180 MB over the resolution's start (see docs/scale-history.md).
STRING_COLUMNS = ("shard", "kept_id", "reason")


def drop_columns(orders, shards, kept_ids, reasons, distances, kept_orders) -> dict:
    """The columns of dropped documents (sequences aligned by row) -> one drop batch."""
    return {
        "order": np.asarray(orders, np.int64),
        "shard": pa.array(shards, pa.string()),
        "kept_id": pa.array(kept_ids, pa.string()),
        "reason": pa.array(reasons, pa.string()),
        "distance": np.asarray(distances, np.float64),
        "kept_order": np.asarray(kept_orders, np.int64),
    }


def drop_batch(records) -> dict:
    """Drop records (order, shard, kept id, reason, (kept distance, kept order)) -> one batch."""
    records = list(records)
    return drop_columns(
        [d[0] for d in records],
        [d[1] for d in records],
        [d[2] for d in records],
        [d[3] for d in records],
        [d[4][0] for d in records],
        [d[4][1] for d in records],
    )


def _rows(drops: dict, rows) -> dict:
    rows = np.asarray(rows, np.int64)  # positions (an empty list would be floats)
    return {k: v.take(pa.array(rows)) if k in STRING_COLUMNS else v[rows] for k, v in drops.items()}


def _concat(parts: list) -> dict:
    if not parts:
        return drop_batch([])
    return {
        k: pa.concat_arrays([p[k] for p in parts]) if k in STRING_COLUMNS else np.concatenate([p[k] for p in parts])
        for k in parts[0]
    }


def _ranks(strings: pa.Array) -> np.ndarray:
    """Each string's rank among them (equal strings equal ranks): a numpy sort key."""
    return np.asarray(pc.rank(strings, sort_keys="ascending", tiebreaker="dense"), np.int64)


def _by_partition(drops: dict, column: str, partitions: int):
    """Drop columns -> (partition of ``column``, the rows in it) for each partition with rows."""
    for p, rows in positions_by(drops[column] % partitions):
        yield p, _rows(drops, rows)


def drop_records(batch: dict):
    """A drop batch -> its records (order, shard, kept id, reason, (kept distance, kept order))."""
    numbers = (batch["order"].tolist(), batch["distance"].tolist(), batch["kept_order"].tolist())
    strings = [batch[k].to_pylist() for k in STRING_COLUMNS]
    for order, shard, kept_id, reason, distance, kept_order in zip(numbers[0], *strings, numbers[1], numbers[2]):
        yield order, shard, kept_id, reason, (distance, kept_order)


def _first_pointers(kv) -> tuple:
    """(partition, its drop batches) -> (partition, one batch) with one row per document: a
    document dropped in several groups points at the kept one that comes first (kept distance,
    then kept order; the reason breaks what is left)."""
    part, drops = kv[0], _concat(list(kv[1]))
    by = np.lexsort((_ranks(drops["reason"]), drops["kept_order"], drops["distance"], drops["order"]))
    first = by[np.r_[True, drops["order"][by][1:] != drops["order"][by][:-1]]] if len(by) else by
    return part, _rows(drops, first)


def _follow(kv, partitions: int | None):
    """One round of pointer jumping in one partition of targets: a row that points at a dropped
    document points on at what that one points at (its reason stays). The rows that point into
    the partition go out as one batch for each partition of their own orders (``partitions``),
    or as one batch (None)."""
    target, g = kv
    dropped = _concat(list(g["dropped"]))
    dropped = _rows(dropped, np.argsort(dropped["order"], kind="stable"))  # one row a document
    drops = _concat(list(g["pointing"]))
    hit, pos = find_sorted(dropped["order"], drops["kept_order"])
    for column in ("distance", "kept_order"):
        drops[column][hit] = dropped[column][pos[hit]]
    n = len(drops["order"])
    at = np.where(hit, n + pos, np.arange(n))  # its own kept id, or its target's
    drops["kept_id"] = pa.concat_arrays([drops["kept_id"], dropped["kept_id"]]).take(pa.array(at))
    if partitions is None:
        if n:
            yield target, drops
    else:
        yield from _by_partition(drops, "order", partitions)


def _whole(kv) -> tuple:
    """(partition, its batches from every partition of targets) -> (partition, one batch)."""
    return kv[0], _concat(list(kv[1]))


class ResolvePointers(beam.PTransform):
    """Drop batches (``drop_batch``) from every group -> drop batches with one row per dropped
    document, pointing at a kept document.

    A document kept in one group can be dropped in another; who pointed at it points on, to what
    it points at (always an earlier document, so the chain ends at a kept one). Keyed joins on
    hash partitions of the documents' orders (~65k documents each, from ``documents``, a
    singleton side input), each a few arrays, never a list of every drop in one place."""

    def __init__(self, documents=None):
        super().__init__()
        self.documents = documents

    def expand(self, drops):
        documents = (
            self.documents
            if self.documents is not None
            else beam.pvalue.AsSingleton(drops.pipeline | "NoCount" >> beam.Create([0]))
        )
        drops = (
            drops
            | "ByPartition" >> beam.FlatMap(lambda b, n: _by_partition(b, "order", partitions_for(n)), documents)
            | "PerPartition" >> beam.GroupByKey()
            | "FirstPointer" >> beam.Map(_first_pointers)
        )
        # Only documents that others point at (dropped here, kept in another group) can be links
        # of a chain: the rounds run on their rows alone, a few percent of the drops; the rest
        # follow them once at the end. (53k synthetic drops in the local runner: +143 MB with
        # every drop through every round, +86 MB so; docs/scale-history.md.)
        split = (
            {
                "targets": drops
                | "Targets" >> beam.FlatMap(lambda kv, n: _targets(kv[1], partitions_for(n)), documents),
                "dropped": drops,
            }
            | "JoinPointedAt" >> beam.CoGroupByKey()
            | "PointedAt" >> beam.FlatMap(_split_pointed_at).with_outputs("links", main="rest")
        )
        links = split.links
        for i in range(POINTER_ROUNDS):
            links = _follow_once(links, links, documents, str(i)) | f"ByOrder{i}" >> beam.GroupByKey()
            links = links | f"Whole{i}" >> beam.Map(_whole)
        rest = _follow_once(split.rest, links, documents, "Rest", regroup=False)
        return (
            rest | "RestBatches" >> beam.Values(),
            links | "LinkBatches" >> beam.Values(),
        ) | "Resolved" >> beam.Flatten()


def _follow_once(pointing, dropped, documents, label: str, regroup: bool = True):
    """(partition, batch) rows in ``pointing`` -> the same rows pointing on where their target
    has a row in ``dropped`` (keyed by the partition of its own order); as (partition of its own
    order, batch) pieces, or without ``regroup`` one batch a partition of targets."""
    return (
        {
            "pointing": pointing
            | f"ByTarget{label}"
            >> beam.FlatMap(lambda kv, n: _by_partition(kv[1], "kept_order", partitions_for(n)), documents),
            "dropped": dropped,
        }
        | f"JoinTargets{label}" >> beam.CoGroupByKey()
        | f"Follow{label}" >> beam.FlatMap(lambda kv, n: _follow(kv, partitions_for(n) if regroup else None), documents)
    )


def _targets(drops: dict, partitions: int):
    """A batch -> (partition, the orders its rows point at in that partition) for each partition."""
    for p, rows in positions_by(drops["kept_order"] % partitions):
        yield p, drops["kept_order"][rows]


def _split_pointed_at(kv):
    """(partition, {targets: orders pointed at, dropped: its rows}) -> its rows of documents
    that another row points at (tagged ``links``), and the rest."""
    part, g = kv
    dropped = _concat(list(g["dropped"]))
    pointed_at = np.isin(dropped["order"], np.concatenate([*g["targets"], np.zeros(0, np.int64)]))
    if pointed_at.any():
        yield beam.pvalue.TaggedOutput("links", (part, _rows(dropped, np.flatnonzero(pointed_at))))
    if not pointed_at.all():
        yield part, _rows(dropped, np.flatnonzero(~pointed_at))


def _by_shard(batch: dict):
    """A drop batch -> (shard, its rows of that shard) for each shard it names."""
    encoded = batch["shard"].dictionary_encode()
    shards = encoded.dictionary.to_pylist()
    for at, rows in positions_by(np.asarray(encoded.indices, np.int64)):
        yield shards[at], _rows(batch, rows)


def shard_partitions(names, partitions: int) -> np.ndarray:
    """The hash partition of each shard's name (crc32: the same in every process)."""
    return np.array([zlib.crc32(name.encode()) % partitions for name in names], np.int64)


def _by_shard_partition(batch: dict, partitions: int):
    """A drop batch -> (partition, its rows there) for each hash partition of the shards' names
    it has rows in (crc32: the same partition in every process)."""
    encoded = batch["shard"].dictionary_encode()
    of_name = shard_partitions(encoded.dictionary.to_pylist(), partitions)
    for p, rows in positions_by(of_name[np.asarray(encoded.indices, np.int64)]):
        yield p, _rows(batch, rows)


class _WriteDrops(beam.DoFn):
    """(partition of shards, its drop batches) -> each of its shards' table of dropped documents
    in staging; how many tables."""

    def __init__(self, chain, table: str):
        self.chain, self.table = chain, table

    def process(self, kv):
        tables = 0
        for shard, drops in _by_shard(_concat(list(kv[1]))):
            by = np.lexsort((_ranks(drops["reason"]), _ranks(drops["kept_id"]), drops["order"]))
            columns = {
                ORDER: pa.array(drops["order"][by], pa.int64()),
                "kept_id": drops["kept_id"].take(pa.array(by)),
                "reason": drops["reason"].take(pa.array(by)),
            }
            self.chain.write(self.table, shard, pa.table(columns))
            tables += 1
        yield tables


def write_per_shard(drops, chain, table: str, label: str, documents):
    """Each shard's drops (drop batches) written beside its staging; one element (how many
    tables) once all are. Keyed by hash partitions of the shards (~65k documents each, from
    ``documents``, a singleton side input): a key a shard sent a piece of every batch through
    the shuffle, a few rows each (at 1M documents, ~90 MB of the local runner's buffers)."""
    return (
        drops
        | f"{label}ByShard" >> beam.FlatMap(lambda b, n: _by_shard_partition(b, partitions_for(n)), documents)
        | f"{label}GroupByShard" >> beam.GroupByKey()
        | f"{label}Write" >> beam.ParDo(_WriteDrops(chain, table))
        | f"{label}Written" >> beam.CombineGlobally(sum)
    )


def read_drops(chain, table: str, shard: str, written: int) -> Dropped:
    """A shard's drops from ``table`` (``write_per_shard``); none where it has no table (or no
    table was written at all: then nothing is looked up)."""
    path = chain.path(table, shard)
    if not written or not FileSystems.exists(path):
        return NONE_DROPPED
    t = read_staging(path)
    return Dropped(
        np.asarray(t.column(ORDER).combine_chunks(), np.int64),
        t.column("kept_id").to_pylist(),
        t.column("reason").to_pylist(),
    )


def earlier_duplicate_of(chain, stage: str, shard: str, n: int) -> np.ndarray:
    """The ``duplicate_of`` of an earlier de-duplication stage of the chain (minhash before dedup,
    or the other way round), carried on, so that the column keeps every stage's pointers; all
    null where none came before."""
    for earlier in reversed(chain.stages[: chain.stages.index(stage)]):
        if "duplicate_of" in dict(chain.columns.get(earlier, ())):
            column = chain.read(earlier, shard, ["duplicate_of"]).column(0)
            return np.asarray(column.to_pylist(), dtype=object)
    return np.full(n, None, dtype=object)


class MarkDuplicates(ShardStageFn):
    def score(self, shard, reasons, written: int):
        orders = read_orders(shard.path)
        duplicate_of = earlier_duplicate_of(self.chain, self.name, shard.name, len(orders))
        dropped = read_drops(self.chain, self.name + DROPPED_TABLE, shard.name, written)
        hit, pos = dropped.lookup(orders)
        for r in np.flatnonzero(hit & running_mask(reasons)):
            duplicate_of[r] = dropped.kept_ids[pos[r]]
            reasons[r] = dropped.reasons[pos[r]]
        return {"duplicate_of": pa.array(list(duplicate_of), pa.string())}, reasons


class DeduplicateDocuments(beam.PTransform):
    """Exact duplicates, then SemDeDup within clusters (a large one in parts); the dropped ones
    joined back to their shards by name and marked there."""

    def __init__(
        self,
        name,
        chain,
        epsilon: float,
        progress_dir=None,
        probes: int = 2,
        tfidf=None,
        max_group=20_000,
        clusters=16,
        threads: int = 1,
    ):
        super().__init__()
        self.threads = threads  # groups compared side by side in a worker process
        self.name, self.chain, self.epsilon, self.probes = name, chain, epsilon, probes
        self.tfidf = tfidf  # (num_buckets, dim, seed) to compare on projected TF-IDF
        self.progress_dir = progress_dir
        self.max_group, self.clusters = max_group, clusters

    def expand(self, shards):
        documents = beam.pvalue.AsSingleton(
            shards
            | "Documents" >> beam.Map(lambda item: shard_of(item).num_rows)
            | "CountDocuments" >> beam.CombineGlobally(sum)
        )
        keys = _ExactKeys(self.name, self.chain)
        exact = (
            shards
            | "ExactDuplicateTexts" >> FirstOccurrences(documents, keys, keys.hashes)
            | "ExactDuplicates" >> beam.FlatMap(_exact_drops)
        )
        exact_done = beam.pvalue.AsSingleton(
            write_per_shard(exact, self.chain, self.name + EXACT_TABLE, "Exact", documents), default_value=0
        )
        sample = split_sample_size(self.clusters)
        shaping = _ClusterShapes(self.name, self.chain, self.probes, sample, self.clusters, self.threads)
        shapes = shards | "ClusterShapes" >> beam.ParDo(shaping, exact_done, documents).with_outputs(
            "sample", main="shapes"
        )
        samples = shapes.sample | "SampleClusters" >> beam.CombinePerKey(LowestHashes(sample))
        splits = beam.pvalue.AsSingleton(
            shapes.shapes
            | "SumShapes" >> beam.CombineGlobally(Sum(start={}))
            | "PlanSplits" >> beam.Map(plan_splits, self.max_group, beam.pvalue.AsDict(samples), chain=self.chain)
        )
        side = []
        if self.tfidf is not None:
            side = [document_frequencies(shards, self.name, self.chain, self.tfidf[0])]
        members = _ClusterMembers(self.name, self.chain, self.probes, self.tfidf, self.threads)
        near = (
            shards
            | "ClusterMembers" >> beam.ParDo(members, exact_done, splits, *side)
            | "GroupByCluster" >> beam.GroupByKey()
            | "SemDeDup" >> beam.ParDo(_CompareGroups(self.epsilon, self.name, self.max_group, self.threads))
        )
        dropped = (exact, near) | "AllDropped" >> beam.Flatten() | "Resolve" >> ResolvePointers(documents)
        written = beam.pvalue.AsSingleton(
            write_per_shard(dropped, self.chain, self.name + DROPPED_TABLE, "Dropped", documents), default_value=0
        )
        # The members (1 GB at 1M documents) are dead once every group is compared: removed then,
        # so that the page cache they held serves the writing of the output (which, after them,
        # went at a tenth of the speed on this project's VM: see transforms/io/read.py's _ReadOnce)
        tables = [self.name + MEMBERS_TABLE, self.name + MEMBERS_TABLE + ROWS_INDEX]
        _ = (
            shards.pipeline
            | "MembersDone" >> beam.Create([self.chain.staging_dir])
            | "RemoveMembers" >> beam.Map(remove_tables, tables, written)
        )
        fn = MarkDuplicates(self.name, self.chain, self.progress_dir)
        return shards | "Mark" >> ApplyStage(fn, written=written)


# ---- the stage --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupSettings:
    epsilon: float = setting(
        0.15,
        "drop a document whose cosine to a kept one in its cluster exceeds 1 - epsilon (0-1: above 1, "
        "documents pointing away from each other would count as duplicates)",
        share=True,
    )
    probes: int = setting(
        2,
        "compare each document in its nearest 1 or 2 clusters (2: pairs split by k-means are found)",
        choices=(1, 2),
    )
    compare: str = setting(
        "auto",
        "the vectors compared: embedding (the embed stage's), tfidf (projected TF-IDF, dim 512: keeps "
        "cosines), or auto (tfidf after an svd embedding, which pulls same-topic documents together)",
        choices=("auto", "embedding", "tfidf"),
    )
    max_group: int = setting(
        20000,
        "compare at most about this many documents on one worker: a larger cluster is split along its "
        "principal directions (of a sample of it), each document also compared in the part across its nearest "
        "cut (a pair separated by another is missed: 0.4% of planted near-duplicates at 4 cuts, docs/benchmarks.md)",
        at_least=2,
    )


def _tfidf(cfg) -> tuple | None:
    """(num_buckets, dim, seed) when SemDeDup compares projected TF-IDF rather than the embedding."""
    compare = cfg["dedup.compare"]
    if compare == "auto":
        compare = "tfidf" if cfg["embed.method"] == "svd" else "embedding"
    return (cfg["featurize.buckets"], TFIDF_DIM, cfg["seed"]) if compare == "tfidf" else None


def _build(ctx: Context, name: str, shards):
    cfg = ctx.cfg
    stage = DeduplicateDocuments(
        name,
        ctx.chain,
        float(cfg["dedup.epsilon"]),
        ctx.progress_dir,
        cfg["dedup.probes"],
        _tfidf(cfg),
        cfg["dedup.max_group"],
        cfg["cluster.k"],
        ctx.threads,
    )
    return shards | "Stage_" + name >> stage


STAGE = Stage(
    kind="dedup",
    summary="exact duplicates, then SemDeDup within each document's nearest clusters (Abbas et al. 2023)",
    settings=DedupSettings,
    after=("embed", "cluster"),
    columns=fixed_columns(*COLUMNS),
    all_columns=tuple(c for c, _ in COLUMNS),
    build=_build,
)
