"""PRESENCE: weights from self-influence within seeded groups (Thakkar et al., "Self-Influence
Guided Data Reweighting for Language Model Pre-training", EMNLP 2023, arXiv:2311.00913).

Within a group of B documents (the paper's microbatch), each document's self-influence SI (the
proxy's ``self_influence``: ‖∇ℓ‖² over chosen layers) is z-normalised and softmaxed:

    s_i = (SI_i − μ) / √(σ² + ε)        μ, σ² the group's mean and (population) variance
    w_i = B · e^{τ s_i} / Σ_j e^{τ s_j}  so that a group's weights average 1

τ > 0 favours the high-SI, novel documents (the paper's first, "direct" phase); τ < 0
down-weights them as likely noise (its second, "inverse" phase).

The groups are seeded batches of the documents in the running: each document's 64-bit key is a
hash of (seed, id); the documents go to hash partitions by key (``FirstOccurrences``' partitions,
~65k documents each), and within a partition, sorted by key, consecutive runs of B make the
groups (the partition's last, short run joins the group before it: groups hold B to 2B − 1
documents, or the whole partition where it holds fewer than B). The same groups on every runner
and for any split of the input; no worker holds more than a partition. The weights go back to
their shards as small per-shard tables beside the staging, then into the ``weight`` column.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask, shard_of
from beamsift.transforms.chain.duplicate_ids import PartitionKeys, partition_rows, positions_by
from beamsift.transforms.chain.seeded import PRESENCE_STREAM, seeded_bits
from beamsift.transforms.chain.staging import read_orders, read_staging, rows_of
from beamsift.transforms.io.schema import ID_HASH, ORDER

# ε in √(σ² + ε), relative to the group's mean square: it keeps a group of equal values finite
# (all s = 0) without depending on SI's scale (lr · ‖∇ℓ‖² can be ~1e-4, its variance ~1e-8).
EPSILON = 1e-12
GROUPS_TABLE = ".presence"  # per shard: _order and weight of its documents that have one


def presence_weights(si: np.ndarray, tau: float, epsilon: float = EPSILON) -> np.ndarray:
    """w = B · softmax(τ · (SI − μ)/√(σ² + ε·mean(SI²))) for one group of B self-influences."""
    si = np.asarray(si, np.float64)
    scale = np.sqrt(si.var() + epsilon * np.mean(si * si))
    s = (si - si.mean()) / scale if scale > 0 else np.zeros_like(si)
    z = tau * s
    e = np.exp(z - z.max())
    return len(si) * e / e.sum()


def group_of(keys: np.ndarray, orders: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows sorted by (key, order), each sorted row's group): runs of ``size``, the last short
    run merged into the one before it."""
    idx = np.lexsort((orders, keys))
    groups = max(1, len(idx) // size)
    return idx, np.minimum(np.arange(len(idx)) // size, groups - 1)


def grouped_weights(keys, orders, si, size: int, tau: float) -> np.ndarray:
    """PRESENCE weights of a partition's documents (aligned with the inputs)."""
    idx, group = group_of(keys, orders, size)
    weights = np.empty(len(idx))
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    for rows in np.split(idx, starts[1:]):
        weights[rows] = presence_weights(si[rows], tau)
    return weights


def seeded_keys(id_hash: np.ndarray, seed: int) -> np.ndarray:
    """Each document's place in the seeded order its groups are cut from."""
    return seeded_bits(id_hash, seed, PRESENCE_STREAM)


class _SelfInfluenceKeys:
    """A shard -> (seeded keys, orders, name, self-influences) of its documents in the running
    that have a value."""

    def __init__(self, stage, chain, column, seed):
        self.stage, self.chain, self.column, self.seed = stage, chain, column, seed

    def __call__(self, item):
        shard, running = self.chain.running(self.stage, item)
        values = self.chain.column(self.column, shard.name)
        rows = np.flatnonzero(running & ~np.isnan(values))
        table = read_staging(shard.path, [ID_HASH, ORDER])
        hashes = np.asarray(table.column(ID_HASH).combine_chunks(), np.uint64)[rows]
        orders = np.asarray(table.column(ORDER).combine_chunks(), np.int64)[rows]
        return seeded_keys(hashes, self.seed), orders, shard.name, values[rows]


def _weigh_partition(kv, size: int, tau: float):
    """(partition, its parts) -> (shard, (orders, weights)) for each shard with documents in it."""
    keys, orders, shards, names, si = partition_rows(kv[1])
    weights = grouped_weights(keys, orders, np.asarray(si, np.float64), size, tau)
    for i, rows in positions_by(shards):
        yield names[i], (orders[rows], weights[rows])


class _WriteShardWeights(beam.DoFn):
    def __init__(self, chain, table: str):
        self.chain, self.table = chain, table

    def process(self, kv):
        shard, parts = kv
        parts = list(parts)
        orders = np.concatenate([o for o, _ in parts])
        weights = np.concatenate([w for _, w in parts])
        idx = np.argsort(orders)
        self.chain.write(self.table, shard, pa.table({ORDER: orders[idx], "weight": weights[idx]}))
        yield 1


class WritePresenceWeights(ShardStageFn):
    def score(self, shard, reasons, written: int):
        weight = np.full(len(reasons), np.nan)
        path = self.chain.path(self.name + GROUPS_TABLE, shard.name)
        if written and FileSystems.exists(path):
            table = read_staging(path)
            pos = rows_of(read_orders(shard.path), table.column(ORDER).combine_chunks())
            weight[pos] = np.asarray(table.column("weight").combine_chunks())
            weight[~running_mask(reasons)] = np.nan
        return {"weight": weight}, reasons


class ReweightBySelfInfluence(beam.PTransform):
    """The reweight stage with ``strategy: presence``: seeded groups, PRESENCE weights, ``weight``."""

    def __init__(self, name, chain, column, temperature, group_size, seed, progress_dir=None):
        super().__init__()
        self.name, self.chain, self.column = name, chain, column
        self.tau, self.size, self.seed, self.progress_dir = temperature, group_size, seed, progress_dir

    def expand(self, shards):
        documents = beam.pvalue.AsSingleton(
            shards
            | "Documents" >> beam.Map(lambda item: shard_of(item).num_rows)
            | "CountDocuments" >> beam.CombineGlobally(sum)
        )
        keys_of = _SelfInfluenceKeys(self.name, self.chain, self.column, self.seed)
        written = beam.pvalue.AsSingleton(
            shards
            | "Partition" >> beam.ParDo(PartitionKeys(keys_of), documents)
            | "GroupByPartition" >> beam.GroupByKey()
            | "WeighGroups" >> beam.FlatMap(_weigh_partition, self.size, self.tau)
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteWeights" >> beam.ParDo(_WriteShardWeights(self.chain, self.name + GROUPS_TABLE))
            | "Written" >> beam.CombineGlobally(sum),
            default_value=0,
        )
        fn = WritePresenceWeights(self.name, self.chain, self.progress_dir)
        return shards | "Weigh" >> ApplyStage(fn, written=written)
