"""Duplicate ids: the first record with an id (in input order) wins, the others are rejected.

Input order is the global ``_order`` (file index, then position in the file), so which record
wins does not depend on how the input was split among workers. Ids are compared by a 64-bit
hash; the work is spread over hash partitions (``FirstOccurrences``, also what finds texts that
repeat for the dedup stage) so that no worker sees every id, and the repeats
found go back to the shard that holds them by a keyed join: no worker ever holds the list of
every duplicate (it grows with the corpus), only its own shard's. Before that shuffle a fixed-size
filter (``RepeatedHashes``: a 2 MB bitmap of the hash positions hit twice) lets only the keys that
may repeat through, so that what is shuffled follows the repeats, not the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from beamsift.transforms.chain.batches import BatchedOutputs
from beamsift.transforms.chain.staging import ShardRef, read_id_hashes, read_staging
from beamsift.transforms.io.schema import ID_HASH, ORDER


@dataclass(frozen=True)
class DuplicateIds:
    """Orders of the records (of one shard) that lose to an earlier record with the same id, sorted."""

    losers: np.ndarray  # int64 _order of each duplicate
    winners: np.ndarray  # int64 _order of the first record with that id, aligned with losers

    def mask(self, orders: np.ndarray) -> np.ndarray:
        """True where a record is a duplicate."""
        if len(self.losers) == 0:
            return np.zeros(len(orders), dtype=bool)
        pos = np.searchsorted(self.losers, orders)
        pos = np.minimum(pos, len(self.losers) - 1)
        return self.losers[pos] == orders

    def winner_of(self, order: int) -> int:
        return int(self.winners[np.searchsorted(self.losers, order)])


NO_DUPLICATES = DuplicateIds(losers=np.zeros(0, np.int64), winners=np.zeros(0, np.int64))


DOCS_PER_PARTITION = 1 << 16  # about how many keys one worker compares at once


def partitions_for(documents: int) -> int:
    """Hash partitions for a corpus of ``documents``: enough that each holds ~65k keys (a
    partition's group must not grow with the corpus), and few on a small one (each partition of
    each shard is one element through the shuffle)."""
    return max(1, -(-int(documents) // DOCS_PER_PARTITION))


class PartitionKeys(BatchedOutputs):
    """Elements -> (partition, (hashes, orders, shard names, each row's shard: an index into
    them, payloads or None)) for each partition the rows of a bundle's elements fall in, every
    ``BATCH_ROWS`` rows and at the bundle's end. ``keys_of(element)`` -> (hashes, orders, shard
    name, payload or None) of an element's rows: called here, after the count (``documents``, a
    side input) is known, so that a local runner, which holds a stage's input until its side
    inputs are ready, holds only the small elements. ``partition_rows`` reads an element back.

    A partition of a bundle's shards is one element, not a partition of each shard: that made
    shards x partitions elements, both growing with the corpus (34k of them for MinHash at 3M
    documents), each held and pickled on its own by a local runner."""

    BATCH_ROWS = 1 << 18  # rows held before they go out: ~5 MB of keys and orders

    def __init__(self, keys_of, probes: int = 1):
        self.keys_of, self.probes = keys_of, probes

    def _clear(self):
        self._parts = {}

    def process(self, item, documents, repeated=None):
        hashes, orders, shard, payload = self.keys_of(item)
        if repeated is not None:  # only keys that may repeat go through the shuffle
            rows = np.flatnonzero(at_repeated(hashes, repeated, self.probes))
            hashes, orders = hashes[rows], orders[rows]
            payload = None if payload is None else payload[rows]
        if not len(hashes):
            return
        part = (hashes.view(np.uint64) % np.uint64(partitions_for(documents))).astype(np.int64)
        for p, rows in positions_by(part):
            values = None if payload is None else payload[rows]
            # one shard's rows, in the form partition_rows reads
            piece = (hashes[rows], orders[rows], [shard], np.zeros(len(rows), np.int32), values)
            self._parts.setdefault(p, []).append(piece)
        yield from self.held(len(hashes))

    def _flush(self):
        parts = self._parts
        self._clear()
        for p in sorted(parts):
            hashes, orders, at, names, payload = partition_rows(parts[p])
            yield p, (hashes, orders, names, at.astype(np.int32), payload)


def partition_rows(parts) -> tuple:
    """A partition's elements from ``PartitionKeys`` -> (hashes, orders, each row's shard as an
    index into the names, the shard names, payloads or None), all the elements' rows together."""
    parts = list(parts)
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, [], None
    index: dict[str, int] = {}
    at = []
    for _, _, names, rows_at, _ in parts:
        codes = np.array([index.setdefault(name, len(index)) for name in names], np.int64)
        at.append(codes[rows_at])
    hashes = np.concatenate([h for h, *_ in parts])
    orders = np.concatenate([o for _, o, *_ in parts])
    payload = None if parts[0][4] is None else np.concatenate([np.asarray(p[4]) for p in parts])
    return hashes, orders, np.concatenate(at), list(index), payload


def positions_by(keys: np.ndarray):
    """(key, the positions that hold it, ascending) for each distinct key, in the keys' order."""
    by = np.argsort(keys, kind="stable")
    ordered = keys[by]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(keys) else by
    for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(keys)]):
        yield ordered[start].item(), by[start:end]


FILTER_BITS = 24  # positions of the filter of repeated hashes: two 2 MB bitmaps, whatever the corpus


def _positions(hashes: np.ndarray, bits: int = FILTER_BITS, probes: int = 1) -> np.ndarray:
    """(keys, probes) filter positions of each hash: its top ``bits`` bits, and with more probes
    the steps of an odd stride from its low ``bits`` bits (double hashing: bits of the hash that
    the first position does not use)."""
    h = np.asarray(hashes).view(np.uint64)
    first = (h >> np.uint64(64 - bits)).astype(np.int64)
    if probes == 1:
        return first[:, None]
    stride = ((h & np.uint64((1 << bits) - 1)) | np.uint64(1)).astype(np.int64)
    return (first[:, None] + np.arange(probes) * stride[:, None]) & ((1 << bits) - 1)


def _bits(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return positions >> 6, np.left_shift(np.uint64(1), (positions & 63).astype(np.uint64))


def _filter_bits(bitmap: np.ndarray) -> int:
    return int(len(bitmap) * 64).bit_length() - 1


def at_repeated(hashes: np.ndarray, repeated: np.ndarray, probes: int = 1) -> np.ndarray:
    """True for each hash whose filter positions ``RepeatedHashes`` marked (all ``probes`` of
    them): every hash that occurs twice or more, and the few whose positions others hit too."""
    words, bits = _bits(_positions(hashes, _filter_bits(repeated), probes))
    return np.all((repeated[words] & bits) != 0, axis=1)


class RepeatedHashes(beam.CombineFn):
    """Arrays of 64-bit hashes -> a bitmap (uint64 words) over 2**``bits`` positions, with the
    positions of every hash that occurs twice or more set. Only the hashes whose positions are
    all set need the shuffle that finds first occurrences: the bitmap's size is fixed, where the
    shuffle of every key grows with the corpus (and a local runner holds it in memory).

    One probe (a hash's top bits), 2**24 positions: at a million distinct keys ~6% share a
    position by chance. With ``probes`` k a hash has k positions and passes only where all k are
    set (a Bloom filter of the hashes seen twice). MinHash's 14 band keys a document, 15M at 1M
    documents, would pass ~57% of the time through one probe of 2**24 positions (1 - e^(-15/16.8));
    through 3 probes of 2**27 (16 MB), 3.4% passed, most of them repeats (5% near-copies)."""

    def __init__(self, bits: int = FILTER_BITS, probes: int = 1):
        self.bits, self.probes = bits, probes

    def create_accumulator(self):
        return None  # (positions hit, positions hit twice), made on the first input

    def add_input(self, acc, hashes):
        if not len(hashes):
            return acc
        once, twice = acc if acc is not None else _empty_bitmaps(self.bits)
        if self.probes == 1:
            positions, counts = np.unique(_positions(hashes, self.bits)[:, 0], return_counts=True)
            words, bits = _bits(positions[:, None])
        else:  # a hash seen before has all its positions in ``once``; one repeated here, twice in it
            distinct, counts = np.unique(np.asarray(hashes).view(np.uint64), return_counts=True)
            words, bits = _bits(_positions(distinct, self.bits, self.probes))
        hit = np.all((once[words] & bits) != 0, axis=1) | (counts > 1)
        np.bitwise_or.at(twice, words[hit].ravel(), bits[hit].ravel())
        np.bitwise_or.at(once, words.ravel(), bits.ravel())
        return once, twice

    def merge_accumulators(self, accs):
        # A hash seen in two accumulators has all its positions in both ``once``: their AND
        merged = None
        for acc in accs:
            if acc is None:
                continue
            if merged is None:
                merged = (acc[0].copy(), acc[1].copy())
                continue
            once, twice = merged
            twice |= acc[1]
            twice |= once & acc[0]
            once |= acc[0]
        return merged

    def extract_output(self, acc):
        return _empty_bitmaps(self.bits)[1] if acc is None else acc[1]


def _empty_bitmaps(bits: int = FILTER_BITS) -> tuple[np.ndarray, np.ndarray]:
    words = 1 << (bits - 6)
    return np.zeros(words, np.uint64), np.zeros(words, np.uint64)


class _FirstOccurrence(beam.CombineFn):
    """``PartitionKeys`` elements of one partition -> [(shard, (loser orders, winner
    orders, winner payloads or None))]: among equal hashes the smallest order wins."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, item):
        acc.append(item)
        return acc

    def merge_accumulators(self, accs):
        return [item for acc in accs for item in acc]

    def extract_output(self, acc):
        if not acc:
            return []
        hashes, orders, shards, names, payload = partition_rows(acc)
        hashes = hashes.view(np.uint64)
        idx = np.lexsort((orders, hashes))  # by hash, then input order
        hashes, orders, shards = hashes[idx], orders[idx], shards[idx]
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(hashes)), 0))
        losers, winners, where = orders[~first], orders[group_start[~first]], shards[~first]
        won = payload[idx][group_start[~first]] if payload is not None else None
        return [
            (names[i], (losers[rows], winners[rows], None if won is None else won[rows].tolist()))
            for i, rows in positions_by(where)
        ]


class FirstOccurrences(beam.PTransform):
    """PCollection[element] -> (shard name, (loser orders, winner orders, winner payloads)) for
    each shard with a loser: every row whose hash an earlier row (by order) has, and that row.
    ``keys_of(element)`` -> (hashes, orders, shard name, payload or None) of an element's rows
    (a shard's, or some of them). Spread over hash partitions, as many as ``documents`` (a
    singleton side input: all the rows there can be) needs: no worker sees every key, none more
    than ~65k at once. With ``hashes_of(element)`` (its hashes alone, in a pass of their own
    before ``keys_of``) only the keys that may repeat (``RepeatedHashes`` of ``filter``: (bits,
    probes)) are shuffled."""

    def __init__(self, documents, keys_of, hashes_of=None, filter: tuple = (FILTER_BITS, 1)):
        super().__init__()
        self.documents, self.keys_of, self.hashes_of = documents, keys_of, hashes_of
        self.filter = filter

    def expand(self, items):
        side = []
        if self.hashes_of is not None:
            hashes = items | "HashesOf" >> beam.Map(self.hashes_of)
            repeated = hashes | "RepeatedHashes" >> beam.CombineGlobally(RepeatedHashes(*self.filter))
            side = [beam.pvalue.AsSingleton(repeated)]
        return (
            items
            | "Partition" >> beam.ParDo(PartitionKeys(self.keys_of, self.filter[1]), self.documents, *side)
            | "FirstPerPartition" >> beam.CombinePerKey(_FirstOccurrence())
            | "LosersByShard" >> beam.FlatMap(lambda kv: kv[1])
        )


def _merge_duplicates(parts) -> DuplicateIds:
    losers = np.concatenate([p[0] for p in parts] + [np.zeros(0, np.int64)])
    winners = np.concatenate([p[1] for p in parts] + [np.zeros(0, np.int64)])
    idx = np.argsort(losers)
    return DuplicateIds(losers=losers[idx], winners=winners[idx])


def _id_keys(ref: ShardRef):
    """A staged shard's (id hashes, orders, name, no payload), read from its staging file."""
    table = read_staging(ref.path, [ID_HASH, ORDER])
    hashes = np.asarray(table.column(ID_HASH).combine_chunks(), np.uint64)
    return hashes, np.asarray(table.column(ORDER).combine_chunks(), np.int64), ref.name, None


def _id_hashes(ref: ShardRef) -> np.ndarray:
    return read_id_hashes(ref.path)


class FindDuplicateIds(beam.PTransform):
    """PCollection[ShardRef] -> (shard name, DuplicateIds of that shard), for the shards that
    hold a repeated id only."""

    def expand(self, refs):
        documents = beam.pvalue.AsSingleton(
            refs | "Records" >> beam.Map(lambda r: r.num_rows) | "CountRecords" >> beam.CombineGlobally(sum)
        )
        return (
            refs
            | "FirstOccurrences" >> FirstOccurrences(documents, _id_keys, _id_hashes)
            | "GroupByShard" >> beam.GroupByKey()
            | "SortRepeats" >> beam.MapTuple(lambda name, parts: (name, _merge_duplicates(list(parts))))
        )


def join_shards(refs, duplicates):
    """(ShardRef, its DuplicateIds) for every shard: the repeats joined to their shard by name."""
    return (
        {"ref": refs | "KeyByName" >> beam.Map(lambda r: (r.name, r)), "repeats": duplicates}
        | "JoinRepeats" >> beam.CoGroupByKey()
        | "ShardWithRepeats"
        >> beam.MapTuple(lambda _, g: (list(g["ref"])[0], (list(g["repeats"]) or [NO_DUPLICATES])[0]))
    )
