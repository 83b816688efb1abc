"""Duplicate ids: the first record with an id (in input order) wins, the others are rejected.

Input order is the global ``_order`` (file index, then position in the file), so which record
wins does not depend on how the input was split among workers. Ids are compared by a 64-bit
hash; the work is spread over hash partitions so that no worker sees every id, and the repeats
found go back to the shard that holds them by a keyed join: no worker ever holds the list of
every duplicate (it grows with the corpus), only its own shard's.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np

NUM_PARTITIONS = 64


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


def _partition(shard):
    part = (shard.id_hashes % np.uint64(NUM_PARTITIONS)).astype(np.int64)
    for p in np.unique(part):
        rows = part == p
        yield int(p), (shard.id_hashes[rows], shard.orders[rows], shard.ref.name)


class _FirstOccurrence(beam.CombineFn):
    """(hashes, orders, shard) parts of one partition -> [(shard, loser orders, winner orders)]."""

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
        hashes = np.concatenate([h for h, _, _ in acc])
        orders = np.concatenate([o for _, o, _ in acc])
        shards = np.concatenate([np.full(len(o), i, np.int64) for i, (_, o, _) in enumerate(acc)])
        idx = np.lexsort((orders, hashes))  # by hash, then input order
        hashes, orders, shards = hashes[idx], orders[idx], shards[idx]
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(hashes)), 0))
        losers, winners, where = orders[~first], orders[group_start[~first]], shards[~first]
        return [(acc[i][2], (losers[where == i], winners[where == i])) for i in np.unique(where).tolist()]


def _merge_duplicates(parts) -> DuplicateIds:
    losers = np.concatenate([p[0] for p in parts] + [np.zeros(0, np.int64)])
    winners = np.concatenate([p[1] for p in parts] + [np.zeros(0, np.int64)])
    idx = np.argsort(losers)
    return DuplicateIds(losers=losers[idx], winners=winners[idx])


class FindDuplicateIds(beam.PTransform):
    """PCollection[StagedShard] -> (shard name, DuplicateIds of that shard), for the shards that
    hold a repeated id only."""

    def expand(self, shards):
        return (
            shards
            | "PartitionIdHashes" >> beam.FlatMap(_partition)
            | "FirstOccurrencePerPartition" >> beam.CombinePerKey(_FirstOccurrence())
            | "RepeatsByShard" >> beam.FlatMap(lambda kv: kv[1])
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
