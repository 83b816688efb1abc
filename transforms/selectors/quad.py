"""Quad: quality and diversity by a multi-armed bandit over clusters (Zhang et al., "Harnessing
Diversity for Important Data Selection in Pretraining Large Language Models", ICLR 2025,
arXiv:2409.16986; the authors' code, iTheresaApocalypse/Quad, for the constants).

Each cluster's documents are cut into blocks of about ``quad_block`` documents (the paper's
20,000), in a seeded order. Each round the ``quad_clusters`` clusters with the highest Cluster Score

    CS_i = R_i / n_i + α √(2 ln Σ_j n_j / (n_i + 1))      (R_i / n_i = 0 while n_i = 0)

each have their next block probed: the target influence of its first ``quad_probes`` documents is
computed (with the proxy model), and the block's reward is their mean less ``quad_offset``. A block
with a positive reward is chosen (all of its documents); probed or chosen, the block is used up.
The reward is shared with every cluster whose centroid lies within ``quad_delta`` (the cluster
itself included): R_j += reward · (1 − d_ij / δ), n_j += 1 (Σ n counts every such update). Rounds go
on until the chosen blocks hold the budget (``quad_rounds`` at most, or until every block is
probed); the last block chosen is cut to fit, by the seeded order. Short of the budget after the
rounds, the rest is filled from the blocks not chosen: probed ones by reward, then the others by
their cluster's score (counted in the manifest).

Only probed documents are scored: the cost is rounds × clusters × probes model passes, not the
pool. Everything is seeded: the blocks (a hash of (seed, id)), the probes (another hash), the
order of clusters on a tie (the lower index first). The bandit runs on one worker; what it holds
is one value per cluster and, while probing a cluster, that cluster's probe list (blocks ×
probes texts, written beside the staging by a combine over the shards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import apache_beam as beam
import numpy as np
import pyarrow as pa
from beamsift.transforms.chain import ApplyStage, ShardStageFn, running_mask, shard_of
from beamsift.transforms.chain.seeded import QUAD_BLOCK_STREAM, QUAD_PROBE_STREAM, uniform01
from beamsift.transforms.chain.staging import read_id_hashes, read_staging
from beamsift.transforms.chain.sums import Sum
from beamsift.transforms.io.schema import TEXT
from beamsift.transforms.selectors.core import Budget, at_or_above, in_random, random_keys, valid_mask
from beamsift.transforms.selectors.exact_rank import ExactRanks

QUAD = "quad"  # the key set of the selection's order (next to the random baseline's)
RANDOM = "random"
PROBES_TABLE = ".quad_probes"  # per cluster: each block's size and its probe documents' texts
KEYS_TABLE = ".quad_keys"  # per shard: each document's place in the selection's order
COLUMNS = (("quad_influence", "double"),)


@dataclass(frozen=True)
class QuadParams:
    """The bandit's constants (the authors' code: 50 clusters a round, 10 probes, α = 1e-4,
    δ = 0.2, offset 0.002)."""

    per_round: int = 50
    probes: int = 10
    alpha: float = 1e-4
    delta: float = 0.2
    offset: float = 0.002
    rounds: int = 200


@dataclass
class Bandit:
    """What the rounds did: the blocks chosen in order, each probe's reward, the clusters' state."""

    chosen: list = field(default_factory=list)  # [(cluster, block)] in the order chosen
    filled: list = field(default_factory=list)  # [(cluster, block)] added after the rounds
    probed: list = field(default_factory=list)  # [(round, cluster, block, reward)]
    score: dict = field(default_factory=dict)  # R_i
    count: dict = field(default_factory=dict)  # n_i
    cs: dict = field(default_factory=dict)  # CS_i after the last round
    rounds: int = 0
    probed_docs: dict = field(default_factory=dict)  # id hash -> influence, of every probe scored


def cluster_scores(score: dict, count: dict, total: int, alpha: float) -> dict:
    """CS_i = R_i / n_i + α √(2 ln Σn / (n_i + 1)); all 0 before the first update (Σn = 0)."""
    if total <= 0:
        return {c: 0.0 for c in score}
    return {
        c: (score[c] / count[c] if count[c] else 0.0) + alpha * math.sqrt(2 * math.log(total) / (count[c] + 1))
        for c in score
    }


def run_bandit(sizes: dict, distances: np.ndarray, budget: int, reward_of, params: QuadParams) -> Bandit:
    """The rounds. ``sizes``: {cluster: [documents in each of its blocks]}; ``distances``: the
    centroids' pairwise distances (indexed by cluster); ``reward_of(cluster, block)``: the mean
    influence of the block's probes (before the offset)."""
    clusters = sorted(sizes)
    state = Bandit(score={c: 0.0 for c in clusters}, count={c: 0 for c in clusters})
    state.cs = {c: 0.0 for c in clusters}
    # A cluster's blocks in order, empty ones (a hash can leave one so) skipped.
    queue = {c: [b for b, n in enumerate(sizes[c]) if n > 0] for c in clusters}
    taken, total_updates = 0, 0
    for r in range(params.rounds):
        open_ = [c for c in clusters if queue[c]]
        if not open_ or taken >= budget:
            break
        state.rounds = r + 1
        picked = sorted(open_, key=lambda c: (-state.cs[c], c))[: params.per_round]
        results = []
        for c in picked:
            b = queue[c].pop(0)
            reward = reward_of(c, b) - params.offset
            state.probed.append((r, c, b, reward))
            results.append((c, reward))
            if reward > 0:
                state.chosen.append((c, b))
                taken += sizes[c][b]
        for c, reward in results:
            for j in clusters:
                d = 0.0 if j == c else float(distances[c, j])
                if j == c or d < params.delta:
                    state.score[j] += reward * (1 - d / params.delta)
                    state.count[j] += 1
                    total_updates += 1
        state.cs = cluster_scores(state.score, state.count, total_updates, params.alpha)
    if taken < budget:
        probed = {(c, b): reward for _, c, b, reward in state.probed}
        rest = sorted((k for k in probed if k not in set(state.chosen)), key=lambda k: (-probed[k], k))
        rest += sorted(((c, b) for c in clusters for b in queue[c]), key=lambda k: (-state.cs[k[0]], k))
        for c, b in rest:
            if taken >= budget:
                break
            state.filled.append((c, b))
            taken += sizes[c][b]
    return state


def blocks_of(n: int, block: int) -> int:
    return max(1, -(-int(n) // int(block)))


def doc_blocks(id_hash: np.ndarray, clusters: np.ndarray, blocks: dict, seed: int) -> np.ndarray:
    """Each document's block in its cluster: ⌊u · B_c⌋, u a seeded uniform of its id."""
    u = uniform01(id_hash, seed, QUAD_BLOCK_STREAM)
    b = np.array([blocks.get(int(c), 1) for c in clusters], dtype=np.float64)
    return np.minimum(np.floor(u * b), b - 1).astype(np.int64)


def order_keys(clusters, block, id_hash, chosen_rank: dict, seed: int) -> np.ndarray:
    """The selection's order: blocks in the order chosen, within a block by the probe order (the
    seeded uniform); -inf for documents of blocks not chosen. The top k of it is the selection."""
    u = uniform01(id_hash, seed, QUAD_PROBE_STREAM)
    rank = np.array([chosen_rank.get((int(c), int(b)), -1) for c, b in zip(clusters, block)], dtype=np.float64)
    n = max(len(chosen_rank), 1)
    return np.where(rank >= 0, (n - rank) + (1 - u), -np.inf)


# ---- the pipeline ---------------------------------------------------------------------------


class _ClusterCounts(beam.DoFn):
    def __init__(self, stage, chain):
        self.stage, self.chain = stage, chain

    def process(self, item):
        shard, running = self.chain.running(self.stage, item)
        clusters = self.chain.column("cluster", shard.name)
        ok = running & ~np.isnan(clusters)
        values, counts = np.unique(clusters[ok].astype(np.int64), return_counts=True)
        yield {int(c): int(n) for c, n in zip(values, counts)}


def _plan(counts: dict, budget: tuple, block: int | None) -> dict:
    """{cluster: its number of blocks}, and the block size (null: a twentieth of the budget)."""
    size = int(block) if block else max(1, -(-int(budget[2]) // 20))
    return {"block": size, "blocks": {c: blocks_of(n, size) for c, n in sorted(counts.items())}}


class _BlockProbes(beam.DoFn):
    """A shard -> ((cluster, block), (documents, its probe candidates)) for each block it has
    documents of: the ``probes`` with the smallest probe order, with their texts."""

    def __init__(self, stage, chain, seed, probes):
        self.stage, self.chain, self.seed, self.probes = stage, chain, seed, probes

    def process(self, item, plan):
        shard, running = self.chain.running(self.stage, item)
        clusters = self.chain.column("cluster", shard.name)
        rows = np.flatnonzero(running & ~np.isnan(clusters))
        if not len(rows):
            return
        id_hash = read_id_hashes(shard.path)[rows]
        c = clusters[rows].astype(np.int64)
        b = doc_blocks(id_hash, c, plan["blocks"], self.seed)
        u = uniform01(id_hash, self.seed, QUAD_PROBE_STREAM)
        texts = None
        order = np.lexsort((id_hash, u, b, c))
        keys = np.stack([c[order], b[order]], axis=1)
        starts = np.flatnonzero(np.r_[True, np.any(keys[1:] != keys[:-1], axis=1)])
        ends = np.r_[starts[1:], len(order)]
        for s, e in zip(starts, ends):
            first = order[s : min(e, s + self.probes)]
            if texts is None:
                texts = read_staging(shard.path, [TEXT]).column(0)
            probes = [(float(u[i]), int(id_hash[i]), texts[int(rows[i])].as_py()) for i in first]
            yield (int(c[order[s]]), int(b[order[s]])), (int(e - s), probes)


class _MergeBlock(beam.CombineFn):
    def __init__(self, probes):
        self.probes = probes

    def create_accumulator(self):
        return 0, []

    def add_input(self, acc, item):
        n, probes = item
        return acc[0] + n, sorted(acc[1] + list(probes), key=lambda p: (p[0], p[1]))[: self.probes]

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for acc in accs:
            out = self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        return acc


class _WriteProbes(beam.DoFn):
    """(cluster, its blocks) -> the cluster's probe table beside the staging; {cluster: sizes}."""

    def __init__(self, chain, table):
        self.chain, self.table = chain, table

    def process(self, kv):
        cluster, blocks = kv
        blocks = sorted(blocks)
        rows = [(b, p[1], p[2]) for b, (_, probes) in blocks for p in probes]
        table = pa.table(
            {
                "block": pa.array([r[0] for r in rows], pa.int64()),
                "id_hash": pa.array([r[1] for r in rows], pa.uint64()),
                "text": pa.array([r[2] for r in rows], pa.string()),
            }
        )
        self.chain.write(self.table, str(cluster), table)
        top = max(b for b, _ in blocks) + 1
        sizes = [0] * top
        for b, (n, _) in blocks:
            sizes[b] = n
        yield {cluster: sizes}


class _RunBandit(beam.DoFn):
    """One element -> the Bandit, probing with the proxy's models (``influence``: a
    proxy.ProbeInfluence, picklable, that loads them once)."""

    def __init__(self, chain, table, influence, centroids_path, params: QuadParams):
        self.chain, self.table, self.influence = chain, table, influence
        self.centroids_path, self.params = centroids_path, params

    def process(self, _, sizes, budget, target=None):
        from beamsift.transforms.stages.cluster import load_centroids

        centroids = load_centroids(self.centroids_path).astype(np.float64)
        distances = np.linalg.norm(centroids[:, None, :] - centroids[None, :, :], axis=-1)
        cache: dict = {}
        scored: dict = {}

        def reward_of(c, b):
            if c not in cache:
                cache.clear()  # one cluster's probe list at a time
                t = self.chain.read(self.table, str(c))
                cache[c] = (
                    np.asarray(t.column("block").combine_chunks()),
                    np.asarray(t.column("id_hash").combine_chunks(), np.uint64),
                    t.column("text").to_pylist(),
                )
            blocks, hashes, texts = cache[c]
            rows = np.flatnonzero(blocks == b)
            values = self.influence.of([texts[i] for i in rows], target or [])
            scored.update(zip(hashes[rows].tolist(), values.tolist()))
            values = values[~np.isnan(values)]
            return float(values.mean()) if len(values) else 0.0

        state = run_bandit(sizes, distances, int(budget[2]), reward_of, self.params)
        state.probed_docs = scored
        yield state


def bandit_result(state: Bandit, sizes: dict) -> dict:
    """What the shards need of the bandit, and the per-cluster table for clusters/ and the manifest."""
    order = state.chosen + state.filled
    clusters = {
        c: {"quad_reward": None, "quad_probed": 0, "quad_chosen": 0, "quad_score": state.cs.get(c)} for c in sizes
    }
    for _, c, _, _ in state.probed:
        clusters[c]["quad_probed"] += 1
    for c, _ in order:
        clusters[c]["quad_chosen"] += 1
    for c in sizes:
        clusters[c]["quad_reward"] = state.score[c] / state.count[c] if state.count.get(c) else None
    return {
        "rank": {k: i for i, k in enumerate(order)},
        "probed_docs": state.probed_docs,
        "clusters": clusters,
        "summary": {
            "rounds": state.rounds,
            "blocks_probed": len(state.probed),
            "blocks_chosen": len(state.chosen),
            "blocks_filled": len(state.filled),
            "documents_scored": len(state.probed_docs),
        },
    }


class _OrderKeys(beam.DoFn):
    """A shard -> its documents' place in the selection's order, written beside the staging."""

    def __init__(self, stage, chain, seed, table):
        self.stage, self.chain, self.seed, self.table = stage, chain, seed, table

    def process(self, item, plan, result):
        shard, running = self.chain.running(self.stage, item)
        clusters = self.chain.column("cluster", shard.name)
        ok = running & ~np.isnan(clusters)
        id_hash = read_id_hashes(shard.path)
        c = np.nan_to_num(clusters, nan=-1).astype(np.int64)
        b = doc_blocks(id_hash, c, plan["blocks"], self.seed)
        keys = np.where(ok, order_keys(c, b, id_hash, result["rank"], self.seed), -np.inf)
        self.chain.write(self.table, shard.name, pa.table({"key": keys}))
        yield item


class _Keys:
    def __init__(self, stage, chain, seed, table):
        self.stage, self.chain, self.seed, self.table = stage, chain, seed, table

    def keys(self, item) -> dict:
        shard = shard_of(item)
        reasons = self.chain.reasons(self.stage, shard)
        id_hash = read_id_hashes(shard.path)
        keys = np.asarray(self.chain.read(self.table, shard.name, ["key"]).column(0).combine_chunks())
        chosen = np.isfinite(keys)
        valid = valid_mask(reasons)
        return {
            QUAD: (keys[chosen], id_hash[chosen]),
            RANDOM: (random_keys(id_hash[valid], self.seed), id_hash[valid]),
        }


class ApplyQuad(ShardStageFn):
    def __init__(self, name, chain, seed, table, progress_dir=None):
        super().__init__(name, chain, progress_dir)
        self.seed, self.table = seed, table

    def score(self, shard, reasons, cuts, result):
        running = running_mask(reasons)
        id_hash = read_id_hashes(shard.path)
        keys = np.asarray(self.chain.read(self.table, shard.name, ["key"]).column(0).combine_chunks())
        kept = running & np.isfinite(keys)
        if cuts.get(QUAD) is not None:  # None: the chosen blocks hold no more than the budget
            kept &= at_or_above(keys, id_hash, cuts[QUAD])
        reasons[running & ~kept] = "not chosen by the bandit"
        influence = np.full(len(reasons), np.nan)
        probed = result["probed_docs"]  # {id hash: influence}: rounds × clusters × probes, never N
        if probed:
            hashes = np.fromiter(probed.keys(), np.uint64, len(probed))
            values = np.fromiter(probed.values(), np.float64, len(probed))
            order = np.argsort(hashes)
            hashes, values = hashes[order], values[order]
            pos = np.minimum(np.searchsorted(hashes, id_hash), len(hashes) - 1)
            hit = running & (hashes[pos] == id_hash)
            influence[hit] = values[pos[hit]]
        return {
            "selected": kept,
            "_in_random": in_random(reasons, id_hash, self.seed, cuts.get(RANDOM)),
            "quad_influence": influence,
        }, reasons


def _cuts(found: dict, budget: tuple) -> dict:
    keep = int(budget[2])
    return {name: found.get(name, {}).get(keep) for name in (QUAD, RANDOM)}


class QuadSelection(beam.PTransform):
    """The quad selector: plan the blocks, list each block's probes, run the bandit, cut the
    chosen blocks' order at the budget."""

    def __init__(self, name, chain, k, fraction, block, params, influence, centroids_path, seed, progress_dir=None,
                 explain=None, context=(), target=None):  # fmt: skip
        super().__init__()
        self.name, self.chain, self.k, self.fraction, self.block = name, chain, k, fraction, block
        self.params, self.influence, self.centroids_path = params, influence, centroids_path
        self.seed, self.progress_dir, self.explain, self.context = seed, progress_dir, explain, context
        self.target = target
        self.bandit = None  # the bandit's result (a PCollection of one), for clusters/ and the manifest

    def expand(self, shards):
        budget_pc = shards | "Budget" >> Budget(self.k, self.fraction, explain=self.explain, context=self.context)
        budget = beam.pvalue.AsSingleton(budget_pc)
        plan = beam.pvalue.AsSingleton(
            shards
            | "ClusterCounts" >> beam.ParDo(_ClusterCounts(self.name, self.chain))
            | "SumCounts" >> beam.CombineGlobally(Sum(start={}))
            | "PlanBlocks" >> beam.Map(_plan, budget, self.block)
        )
        probes_table = self.name + PROBES_TABLE
        sizes = beam.pvalue.AsSingleton(
            shards
            | "BlockProbes" >> beam.ParDo(_BlockProbes(self.name, self.chain, self.seed, self.params.probes), plan)
            | "MergeBlocks" >> beam.CombinePerKey(_MergeBlock(self.params.probes))
            | "ByCluster" >> beam.MapTuple(lambda cb, v: (cb[0], (cb[1], v)))
            | "GroupByCluster" >> beam.GroupByKey()
            | "WriteProbes" >> beam.ParDo(_WriteProbes(self.chain, probes_table))
            | "AllSizes" >> beam.CombineGlobally(Sum(start={})),
            default_value={},
        )
        side = [self.target] if self.target is not None else []
        run = _RunBandit(self.chain, probes_table, self.influence, self.centroids_path, self.params)
        result_pc = (
            budget_pc
            | "Bandit" >> beam.ParDo(run, sizes, budget, *side)
            | "BanditResult" >> beam.Map(bandit_result, sizes)
        )
        self.bandit = result_pc
        result = beam.pvalue.AsSingleton(result_pc)
        keys_table = self.name + KEYS_TABLE
        order_keys_fn = _OrderKeys(self.name, self.chain, self.seed, keys_table)
        ordered = shards | "OrderKeys" >> beam.ParDo(order_keys_fn, plan, result)
        wanted = budget_pc | "Wanted" >> beam.Map(lambda b: {QUAD: [int(b[2])], RANDOM: [max(int(b[2]), 1)]})
        cuts = beam.pvalue.AsSingleton(
            ordered
            | "Rank" >> ExactRanks(_Keys(self.name, self.chain, self.seed, keys_table), wanted)
            | "Cuts" >> beam.Map(_cuts, budget),
        )
        fn = ApplyQuad(self.name, self.chain, self.seed, keys_table, self.progress_dir)
        return ordered | "Cut" >> ApplyStage(fn, cuts=cuts, result=result)
