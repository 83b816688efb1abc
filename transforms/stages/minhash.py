"""The minhash stage: near-duplicates by MinHash LSH, linear in the corpus (Broder 1997; the banding
of Leskovec, Rajaraman, Ullman, "Mining of Massive Datasets", ch. 3).

- **Shingles**: the text normalised (lower case, NFKC, punctuation and symbols turned into
  spaces, as datatrove's ``simplify_text``), cut into words (``unit: word``; in scripts written without
  spaces, Chinese, Japanese, Thai and the like, each character is a word) or characters
  (``unit: char``); a shingle is ``ngram`` consecutive ones (a shorter document is one shingle).
- **Signature**: ``bands × rows`` min-hashes: for each of them, the smallest of
  ``(a·x + b) mod 2⁶⁴ >> 32`` over the document's shingle hashes x (a odd; a, b seeded), so two
  documents agree on a min-hash with probability close to the Jaccard similarity of their shingle
  sets.
- **Candidates**: two documents are candidates when all ``rows`` min-hashes of one band agree:
  probability ``1 − (1 − s^rows)^bands`` at Jaccard s, steepest near ``(1/bands)^(1/rows)``
  (datatrove's 14 × 8: 0.72; P(0.8) = 0.92, P(0.5) = 0.03). Found per band bucket over hash
  partitions (``FirstOccurrences``: each document points at the first document of every bucket
  it shares), never a list of every document in one place.
- **Groups**: the connected components of the candidate pairs, computed over hash partitions
  (``chain/components.py``); the first document of a group in input order is kept, the others
  leave the running as ``near duplicate`` with ``duplicate_of`` naming the kept one.
- **verify** (optional): a candidate pair counts only when the two signatures agree on at least
  ``threshold`` of their min-hashes (the estimated Jaccard), which takes out most of the pairs
  that met in one band by chance; the pair's signatures travel with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from beamsift.transforms.chain import STAGED, ApplyStage, shard_of
from beamsift.transforms.chain.batches import BatchedOutputs
from beamsift.transforms.chain.components import ConnectedComponents
from beamsift.transforms.chain.duplicate_ids import FirstOccurrences, partitions_for, positions_by
from beamsift.transforms.chain.meter import Metered
from beamsift.transforms.chain.side_by_side import SideBySide
from beamsift.transforms.chain.staging import column_matrix, matrix_column, read_staging, remove_tables
from beamsift.transforms.featurize import hash_strings, splitmix64
from beamsift.transforms.io.schema import ORDER, TEXT, one_array
from beamsift.transforms.stages.base import Context, Stage, fixed_columns, setting
from beamsift.transforms.stages.dedup import (
    DROPPED_TABLE,
    NEAR,
    PUNCTUATION,
    MarkDuplicates,
    drop_columns,
    shard_partitions,
    write_per_shard,
)

COLUMNS = (("duplicate_of", "string"),)
PERM_STREAM = 0x3141_5926  # the seeded stream of the min-hash functions' (a, b)
_CHAIN = np.uint64(0x9E3779B97F4A7C15)  # chains token hashes into a shingle hash
_BAND = np.uint64(0xD6E8FEB86659FD93)
_ASCII_PUNCT = r"[^a-z0-9\s]+"  # PUNCTUATION on lower-cased ASCII text
# Scripts written without spaces between words: each character is a word of its own.
_UNSPACED = r"([\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}])"


def normalise_for_shingles(texts):
    """Case, punctuation and symbols out, as for exact duplicates, but punctuation becomes a space
    (as datatrove's ``simplify_text``): "foo-bar" is two words, so a shingle spans the same words
    whether a text joins them by a hyphen, a slash or a space. Runs of white space are left to the
    split. A batch of ASCII texts takes ASCII kernels, 3x as fast and the same for ASCII text
    (NFKC changes no ASCII character), so a text's shingles never depend on its batch."""
    if _all_ascii(texts):
        return pc.replace_substring_regex(pc.ascii_lower(texts), _ASCII_PUNCT, " ")
    return pc.replace_substring_regex(pc.utf8_lower(pc.utf8_normalize(texts, "NFKC")), PUNCTUATION, " ")


def _all_ascii(texts) -> bool:
    return pc.all(pc.string_is_ascii(texts)).as_py() is not False


def _token_hashes(normalised, unit: str):
    """(hash of each word or character, offsets of each document's tokens)."""
    if unit == "char":
        strings = normalised.to_pylist()
        codes = [np.frombuffer(s.encode("utf-32-le"), np.uint32) for s in strings]
        lengths = np.array([len(c) for c in codes], np.int64)
        flat = np.concatenate(codes + [np.zeros(0, np.uint32)]).astype(np.uint64)
        hashes = splitmix64(flat)
    else:
        if _all_ascii(normalised):
            words = pc.ascii_split_whitespace(normalised)
        else:
            words = pc.utf8_split_whitespace(pc.replace_substring_regex(normalised, _UNSPACED, r" \1 "))
        lengths = np.asarray(pc.list_value_length(words).to_numpy(zero_copy_only=False), np.int64)
        flat = pc.list_flatten(words)
        # Empty pieces (leading spaces) are not words.
        nonempty = np.asarray(pc.greater(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False), bool)
        row = np.repeat(np.arange(len(lengths)), lengths)
        lengths = np.bincount(row[nonempty], minlength=len(lengths)).astype(np.int64)
        encoded = pc.dictionary_encode(flat.filter(pa.array(nonempty)))
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        hashes = hash_strings(encoded.dictionary)[np.asarray(encoded.indices, np.int64)]
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return hashes, offsets


def shingle_hashes(texts, ngram: int, unit: str = "word"):
    """(hash of every shingle, offsets of each document's shingles) of an Arrow string array: the
    shingles of ``ngram`` consecutive tokens; a document with fewer tokens has one shingle of all
    of them, one with none (nothing left after normalising) has none."""
    tokens, offsets = _token_hashes(normalise_for_shingles(texts), unit)
    lengths = np.diff(offsets)
    total = len(tokens)
    # chained[k][i]: the hash of tokens i..i+k (within the flat array; masked per document below)
    chained = [tokens]
    h = tokens
    with np.errstate(over="ignore"):
        for k in range(1, ngram):
            nxt = np.zeros(total, np.uint64)
            nxt[: max(total - k, 0)] = tokens[k:]
            h = (h * _CHAIN) ^ nxt
            chained.append(h)
    full = np.maximum(lengths - ngram + 1, 0)
    short = (lengths > 0) & (lengths < ngram)
    counts = np.where(short, 1, full)
    starts = offsets[:-1]
    # Row-major: each document's shingles together, in order.
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.cumsum(counts) - counts
    within = np.arange(counts.sum()) - first[doc]
    take_from = starts[doc] + within
    order = np.where(short[doc], lengths[doc] - 1, ngram - 1)  # which chain length each shingle uses
    out = np.empty(len(doc), np.uint64)
    for k in np.unique(order).tolist():
        at = order == k
        out[at] = chained[k][take_from[at]]
    shingle_offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(counts, out=shingle_offsets[1:])
    return splitmix64(out), shingle_offsets


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded (a, b) of each min-hash function (a odd: a·x + b is a bijection mod 2⁶⁴)."""
    rng = np.random.default_rng([seed, PERM_STREAM])
    a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    return a, b


def signatures(shingles: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(documents, len(a)) uint32 min-hashes; a document without shingles gets all 0xFFFFFFFF."""
    n = len(offsets) - 1
    out = np.full((n, len(a)), np.iinfo(np.uint32).max, np.uint32)
    has = np.flatnonzero(np.diff(offsets) > 0)
    if not len(has):
        return out
    # Only documents with shingles hold any: the flat array is theirs, one contiguous run each.
    starts = offsets[has] - offsets[has[0]]
    x = shingles[offsets[has[0]] : offsets[has[-1] + 1]]
    values = np.empty(len(x), np.uint64)
    with np.errstate(over="ignore"):
        for p in range(len(a)):
            # One function at a time over a contiguous array: 10x faster than a (shingles, k) block,
            # whose reduceat runs down columns. The top 32 bits of the smallest value are the
            # smallest top 32 bits: shifted after.
            np.multiply(x, a[p], out=values)
            values += b[p]
            out[has, p] = (np.minimum.reduceat(values, starts) >> np.uint64(32)).astype(np.uint32)
    return out


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64: a hash of each band's ``rows`` min-hashes, distinct per band."""
    n = len(sigs)
    parts = sigs[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.zeros((n, bands), np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            h = splitmix64(h ^ parts[:, :, r])
        return splitmix64(h ^ (np.arange(bands, dtype=np.uint64) * _BAND)[None, :])


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """P(two documents of Jaccard ``similarity`` share a band) = 1 − (1 − s^rows)^bands."""
    return 1.0 - (1.0 - similarity**rows) ** bands


@dataclass(frozen=True)
class MinhashSettings:
    ngram: int = setting(5, "tokens per shingle (datatrove: 5 words; NeMo Curator: 24 characters)", at_least=1)
    unit: str = setting(
        "word",
        "what a token is: word (in scripts without spaces, a character) or char",
        choices=("word", "char"),
    )
    bands: int = setting(14, "bands of the signature: candidates share all the rows of one band", at_least=1)
    rows: int = setting(8, "min-hashes per band (bands x rows hashes in all; 14 x 8: threshold ~0.72)", at_least=1)
    verify: bool = setting(
        False, "keep only candidate pairs whose signatures agree on at least `threshold` of their min-hashes"
    )
    threshold: float = setting(0.7, "the estimated Jaccard a verified pair needs (with verify)", share=True)


# ---- per shard: signatures and band keys ---------------------------------------------------

SIGNATURES_TABLE = ".signatures"  # _staging/<stage>.signatures/<shard>.arrow (with verify)
KEYS_TABLE = ".keys"  # _staging/<stage>.keys/<shard>.arrow: each document's order and band keys
# The filter that lets through only the band keys that may repeat: 3 probes of 2**27 positions
# (two 16 MB bitmaps, whatever the corpus). 14 keys a document: at 1M documents 3.4% of the keys
# pass, most of them repeats; through the exact-text filter's one probe of 2**24, 57% would.
BAND_FILTER = (27, 3)


class _StageBandKeys(beam.DoFn):
    """A shard -> the same shard, its running documents' band keys (and with verify their
    signatures) staged: the signatures are the stage's work, and the filter of repeated keys
    and the shuffle after it each read the keys back rather than compute them twice. With
    ``threads`` > 1 (one process, several cores) shards are worked on side by side."""

    def __init__(self, stage, chain, settings: MinhashSettings, seed: int, threads: int = 1):
        self.stage, self.chain, self.settings, self.seed, self.threads = stage, chain, settings, seed, threads

    def setup(self):
        self._shards = SideBySide(self.threads, "bandkeys")

    def process(self, item):
        yield from self._shards.submit(Metered(self.stage, self._staged), item)

    def finish_bundle(self):
        yield from self._shards.rest()

    def teardown(self):
        self._shards.close()

    def _staged(self, item) -> list:
        shard, running = self.chain.running(self.stage, item)
        s = self.settings
        table = read_staging(shard.path, [ORDER, TEXT])
        rows = np.flatnonzero(running)
        texts = one_array(table.column(TEXT)).take(pa.array(rows))
        shingles, offsets = shingle_hashes(texts, s.ngram, s.unit)
        sigs = signatures(shingles, offsets, *permutations(s.bands * s.rows, self.seed))
        has = np.diff(offsets) > 0  # a text with nothing left after normalising repeats nothing
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)[rows][has]
        sigs = sigs[has]
        if s.verify:
            self.chain.write(self.stage + SIGNATURES_TABLE, shard.name, _signature_table(orders, sigs))
        keys = band_keys(sigs, s.bands, s.rows)
        self.chain.write(self.stage + KEYS_TABLE, shard.name, _keys_table(orders, keys))
        return [item]


def _keys_table(orders, keys) -> pa.Table:
    return pa.table({ORDER: pa.array(orders, pa.int64()), "band_keys": matrix_column(keys)})


class _StagedBandKeys:
    """keys_of for FirstOccurrences: a shard -> (band keys of its running documents, their orders,
    the shard's name, payload), read from staging; ``hashes`` the keys alone, for the filter.
    The payload is the shard's name (one string, pickled once however many rows refer to it),
    with verify also the document's signature (read from staging too)."""

    def __init__(self, stage, chain, verify: bool):
        self.stage, self.chain, self.verify = stage, chain, verify

    def _keys(self, shard: str) -> tuple[np.ndarray, np.ndarray]:
        table = self.chain.read(self.stage + KEYS_TABLE, shard)
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
        return orders, column_matrix(table.column("band_keys"), np.uint64)

    def hashes(self, item) -> np.ndarray:
        return self._keys(shard_of(item).name)[1].ravel()

    def __call__(self, item):
        name = shard_of(item).name
        orders, keys = self._keys(name)
        per_doc = np.repeat(np.arange(len(orders)), keys.shape[1])
        payload = np.empty(len(per_doc), object)
        if self.verify:
            _, sigs = _staged_signatures(self.chain, self.stage, name)  # the keys' documents, in their order
            own = np.empty(len(orders), object)  # one tuple a document, shared by its bands
            for i, sig in enumerate(sigs):
                own[i] = (name, sig)
            payload = own[per_doc]
        else:
            payload[:] = name
        return keys.ravel(), orders[per_doc], name, payload


def _signature_table(orders, sigs) -> pa.Table:
    return pa.table({ORDER: pa.array(orders, pa.int64()), "signature": matrix_column(sigs)})


def _staged_signatures(chain, stage: str, shard: str):
    table = chain.read(stage + SIGNATURES_TABLE, shard)
    orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
    return orders, column_matrix(table.column("signature"), np.uint32)


class _Pairs(BatchedOutputs):
    """(a shard, its documents that share a band bucket with an earlier one: (their orders, the
    first document's orders, payloads)) -> edge batches and node batches (orders, shard names)
    for the connected components. With verify, a pair whose signatures agree on fewer than
    ``threshold`` of their min-hashes is left out.

    The shards' pairs go out together, distinct, one edge batch and one node batch a bundle (or
    every ``BATCH_ROWS`` pairs): the shuffle gives each (partition, shard) with a repeat an
    element of its own (~50k at 1M documents, a few pairs each), and the components cut every
    batch once per partition of its nodes, each piece held and pickled on its own by a local
    runner (1M documents in one process: 1,324 -> 911 MB and 153 -> 88 s with the batches)."""

    def __init__(self, stage, chain, settings: MinhashSettings):
        self.stage, self.chain, self.settings = stage, chain, settings

    def _clear(self):
        self._edges, self._nodes = [], []

    def process(self, kv):
        shard, (losers, winners, payloads) = kv
        if self.settings.verify and len(losers):
            orders, sigs = _staged_signatures(self.chain, self.stage, shard)
            mine = sigs[np.searchsorted(orders, losers)]  # staged in input order
            theirs = np.stack([p[1] for p in payloads])
            keep = (mine == theirs).mean(axis=1) >= self.settings.threshold
            losers, winners = losers[keep], winners[keep]
            payloads = [p for p, k in zip(payloads, keep.tolist()) if k]
        if not len(losers):
            return
        names = np.array([p[0] if isinstance(p, tuple) else p for p in payloads] + [shard] * len(losers), object)
        self._edges.append((losers, winners))
        self._nodes.append((np.concatenate([winners, losers]), names))
        yield from self.held(len(losers))

    def _flush(self):
        if not self._edges:
            return
        edges, nodes = self._edges, self._nodes
        self._clear()
        # A pair that shares several bands is one edge; a document in several pairs one node
        pairs = np.unique(
            np.stack([np.concatenate([a for a, _ in edges]), np.concatenate([b for _, b in edges])], 1), axis=0
        )
        orders, first = np.unique(np.concatenate([o for o, _ in nodes]), return_index=True)
        names = np.concatenate([n for _, n in nodes])[first]
        yield beam.pvalue.TaggedOutput("edges", (pairs[:, 0], pairs[:, 1]))
        yield beam.pvalue.TaggedOutput("nodes", (orders, names))


class _ByKeptShardPartition(BatchedOutputs):
    """Dropped documents from the components, one element each ((order, shard, kept order, kept
    shard)) -> (hash partition of the kept shards' names, (orders, shards, kept orders, kept
    shards) of its rows), a bundle's rows at a time (or every ``BATCH_ROWS``). Keyed by the kept
    shard itself, each of ~60k dropped documents at 1M was an element of its own through the
    shuffle, and a local runner keeps the largest output a step ever buffered (its output stream's
    capacity, up to 16 MB) until the run ends."""

    def _clear(self):
        self._rows = []

    def process(self, row, documents):
        self._partitions = partitions_for(documents)
        self._rows.append(row)
        yield from self.held(1)

    def _flush(self):
        rows = self._rows
        self._clear()
        if not rows:
            return
        orders, shards, kept, kept_shards = zip(*rows)
        orders, kept, shards = np.array(orders, np.int64), np.array(kept, np.int64), shared_strings(shards)
        names, at = np.unique(np.asarray(kept_shards, object), return_inverse=True)
        at = at.reshape(-1)
        kept_shards = names[at]  # equal names one object: pickled once
        for p, idx in positions_by(shard_partitions(names.tolist(), self._partitions)[at]):
            yield p, (orders[idx], shards[idx], kept[idx], kept_shards[idx])


def shared_strings(strings) -> np.ndarray:
    """An object array of the strings in which equal strings are one object: pickled once each,
    whatever the number of rows (a shard's name on each of its rows)."""
    names, at = np.unique(np.asarray(strings, object), return_inverse=True)
    return names[at.reshape(-1)]


class _KeptIds(beam.DoFn):
    """(a partition of the kept documents' shards, its batches of (dropped orders, dropped shards,
    kept orders, kept shards)) -> one drop batch (``drop_columns``), the kept ids read from the
    kept shards."""

    def __init__(self, chain):
        self.chain = chain

    def process(self, kv):
        orders, shards, kept, kept_shards = (np.concatenate(c) for c in zip(*kv[1]))
        names, at = np.unique(kept_shards, return_inverse=True)
        kept_ids = np.empty(len(orders), object)
        for i, rows in positions_by(at.reshape(-1)):
            table = self.chain.read(STAGED, names[i], [ORDER, "id"])
            staged = np.asarray(table.column(ORDER).combine_chunks(), np.int64)
            by = np.argsort(staged, kind="stable")
            where = by[np.searchsorted(staged[by], kept[rows])]
            kept_ids[rows] = [str(x) for x in table.column("id").take(pa.array(where)).to_pylist()]
        yield drop_columns(
            orders, shards.tolist(), kept_ids.tolist(), [NEAR] * len(orders), np.zeros(len(orders)), kept
        )


class FindNearDuplicates(beam.PTransform):
    """Shards -> shards with the near-duplicates of each MinHash group out of the running."""

    def __init__(self, name, chain, settings: MinhashSettings, seed: int, progress_dir=None, threads: int = 1):
        super().__init__()
        self.name, self.chain, self.settings, self.seed = name, chain, settings, seed
        self.progress_dir, self.threads = progress_dir, threads

    def expand(self, shards):
        count = (
            shards
            | "Documents" >> beam.Map(lambda item: shard_of(item).num_rows)
            | "CountDocuments" >> beam.CombineGlobally(sum)
        )
        documents = beam.pvalue.AsSingleton(count)
        staged = shards | "BandKeys" >> beam.ParDo(
            _StageBandKeys(self.name, self.chain, self.settings, self.seed, self.threads)
        )
        keys = _StagedBandKeys(self.name, self.chain, self.settings.verify)
        # The partitions are sized by the documents, not by their `bands` keys each: only the keys
        # that may repeat are shuffled (3.4% of them at 1M documents with 5% near-copies). Sized by
        # every key (14 a document: 214 partitions at 1M), each shard's few were cut into ~200
        # pieces, an element each, which a local runner held one by one (911 -> 884 MB at 1M).
        # Where every document repeats, a partition holds `bands` x ~65k keys: still bounded.
        pairs = (
            staged
            | "SameBandBucket" >> FirstOccurrences(documents, keys, keys.hashes, BAND_FILTER)
            | "Pairs" >> beam.ParDo(_Pairs(self.name, self.chain, self.settings)).with_outputs("edges", "nodes")
        )
        dropped = (
            (pairs.edges, pairs.nodes)
            | "Groups" >> ConnectedComponents(documents)
            | "ByKeptShard" >> beam.ParDo(_ByKeptShardPartition(), documents)
            | "GroupByKeptShard" >> beam.GroupByKey()
            | "KeptIds" >> beam.ParDo(_KeptIds(self.chain))
        )
        written = beam.pvalue.AsSingleton(
            write_per_shard(dropped, self.chain, self.name + DROPPED_TABLE, "Dropped", documents), default_value=0
        )
        # The band keys (120 bytes a document) are dead once the buckets are compared
        _ = (
            shards.pipeline
            | "KeysDone" >> beam.Create([self.chain.staging_dir])
            | "RemoveKeys" >> beam.Map(remove_tables, [self.name + KEYS_TABLE], written)
        )
        fn = MarkDuplicates(self.name, self.chain, self.progress_dir)  # dedup's: the same drop tables
        return shards | "Mark" >> ApplyStage(fn, written=written)


def settings_of(cfg) -> MinhashSettings:
    return MinhashSettings(
        ngram=cfg["minhash.ngram"],
        unit=cfg["minhash.unit"],
        bands=cfg["minhash.bands"],
        rows=cfg["minhash.rows"],
        verify=cfg["minhash.verify"],
        threshold=float(cfg["minhash.threshold"]),
    )


def _build(ctx: Context, name: str, shards):
    stage = FindNearDuplicates(name, ctx.chain, settings_of(ctx.cfg), ctx.seed, ctx.progress_dir, ctx.threads)
    return shards | "Stage_" + name >> stage


STAGE = Stage(
    kind="minhash",
    summary="near-duplicates by MinHash LSH: shingles, bands, connected components (one kept per group)",
    settings=MinhashSettings,
    columns=fixed_columns(*COLUMNS),
    all_columns=tuple(c for c, _ in COLUMNS),
    build=_build,
)
