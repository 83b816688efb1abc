"""The pieces every selector and stage shares, as Beam transforms: the budget rule, the sums, and
who starts in the running (Beam's TestPipeline and assert_that: the contract of one transform)."""

from __future__ import annotations

import io

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to
from beamsift.transforms.chain import START, Chain, MarkDuplicateIds, StageShard, staging
from beamsift.transforms.chain.duplicate_ids import (
    DOCS_PER_PARTITION,
    FILTER_BITS,
    DuplicateIds,
    FindDuplicateIds,
    FirstOccurrences,
    PartitionKeys,
    RepeatedHashes,
    at_repeated,
    join_shards,
    partition_rows,
    partitions_for,
)
from beamsift.transforms.chain.staging import ShardRef, write_staging
from beamsift.transforms.chain.sums import Sum, add
from beamsift.transforms.io.schema import ID_HASH
from beamsift.transforms.selectors.core import Budget, SelectionError, check_budget
from conftest import TEST_RUNNER


def _shards(runnings: list[int]) -> list[StageShard]:
    return [StageShard(ShardRef(f"/nowhere/{i}.arrow", f"s{i}", n, 0, 0), n) for i, n in enumerate(runnings)]


@pytest.mark.parametrize(
    "k, fraction, expected",
    [(5, None, (30, 0, 5)), (None, 0.1, (30, 0, 3)), (None, 0.05, (30, 0, 2)), (30, None, (30, 0, 30))],
)
def test_the_budget_counts_the_running_over_all_shards(k, fraction, expected):
    # 0.05 of 30 is 1.5: rounded half up to 2, whatever the shards' split.
    with BeamPipeline(runner=TEST_RUNNER) as p:
        out = p | beam.Create(_shards([10, 0, 20])) | Budget(k, fraction)
        assert_that(out, equal_to([expected]))


def test_a_budget_that_cannot_be_met_fails_with_the_reason_and_the_fix():
    with pytest.raises(
        Exception, match=r"select.k=31 is larger than the 30 eligible documents: why \(lower select.k\)"
    ):
        with BeamPipeline(runner=TEST_RUNNER) as p:
            _ = p | beam.Create(_shards([10, 20])) | Budget(31, None, explain=lambda total: ": why")
    with pytest.raises(SelectionError, match=r"select.fraction=0.01 of 30 eligible documents rounds to none"):
        check_budget(None, 0.01, 30)
    # A filter's share may keep none: the same rule, unchecked.
    with BeamPipeline(runner=TEST_RUNNER) as p:
        out = p | beam.Create(_shards([10, 20])) | Budget(None, 0.01, check=False)
        assert_that(out, equal_to([(30, 0, 0)]))


def test_sum_adds_parts_of_any_shape_in_any_grouping():
    parts = [
        {"counts": {"a": 1}, "v": np.array([1, 2]), "pair": (1, 0.5)},
        {"counts": {"a": 2, "b": 1}, "pair": (2, 0.25)},
        {"v": np.array([10, 20]), "pair": (0, 0.25)},
    ]
    whole = add(add(parts[0], parts[1]), parts[2])
    assert whole["counts"] == {"a": 3, "b": 1} and whole["pair"] == (3, 1.0)
    assert whole["v"].tolist() == [11, 22]
    assert add(parts[0], add(parts[1], parts[2]))["counts"] == whole["counts"]
    assert parts[0]["counts"] == {"a": 1}  # the parts are never changed
    with BeamPipeline(runner=TEST_RUNNER) as p:
        out = p | beam.Create([(1, 2), (3, 4), (5, 6)]) | beam.CombineGlobally(Sum(start=(0, 0), finish=list))
        assert_that(out, equal_to([[9, 12]]))


def test_the_chain_starts_with_every_document_but_the_repeats_of_an_id(tmp_path):
    shard = str(tmp_path / "docs" / "s0.arrow")
    (tmp_path / "docs").mkdir()
    write_staging(pa.table({"_order": pa.array([0, 1, 2, 3], pa.int64())}), shard)
    ref = ShardRef(shard, "s0", 4, 0, 3)
    chain = Chain(str(tmp_path), ("select",))
    repeats = DuplicateIds(losers=np.array([2], np.int64), winners=np.array([0], np.int64))
    with BeamPipeline(runner=TEST_RUNNER) as p:
        out = p | beam.Create([(ref, repeats)]) | beam.ParDo(MarkDuplicateIds(chain))
        assert_that(out | beam.Map(lambda s: (s.running, s.duplicates)), equal_to([(3, 1)]))
    reasons = chain.read(START, "s0", ["_reason"]).column(0).to_pylist()
    assert reasons == [None, None, "duplicate id", None]
    assert chain.reasons("select", ref).tolist() == reasons
    kept = chain.duplicates(StageShard(ref, 3, 1))
    assert kept.losers.tolist() == [2] and kept.winners.tolist() == [0]


def test_each_shard_gets_its_own_repeats_of_ids_first_seen_in_any_shard(tmp_path):
    # Shard a: ids x, y, x (orders 0, 1, 2); shard b: ids y, z, z (orders 10, 11, 12).
    def staged(name, ids, orders):
        hashes = np.array([{"x": 7, "y": 8, "z": 9}[i] for i in ids], np.uint64)
        path = str(tmp_path / f"{name}.arrow")
        write_staging(pa.table({ID_HASH: pa.array(hashes), "_order": pa.array(orders, pa.int64())}), path)
        return ShardRef(path, name, len(ids), orders[0], orders[-1])

    refs = [staged("a", ["x", "y", "x"], [0, 1, 2]), staged("b", ["y", "z", "z"], [10, 11, 12])]
    with BeamPipeline(runner=TEST_RUNNER) as p:
        shard_refs = p | beam.Create(refs)
        joined = join_shards(shard_refs, shard_refs | FindDuplicateIds())
        out = joined | beam.MapTuple(lambda ref, d: (ref.name, d.losers.tolist(), d.winners.tolist()))
        # x repeats at 2 (first at 0); y at 10 (first at 1, in the other shard); z at 12 (first at 11).
        assert_that(out, equal_to([("a", [2], [0]), ("b", [10, 12], [1, 11])]))


def _as_given(keys):
    return keys


def _hashes_only(keys):
    return keys[0]


def _at(*positions):  # a 64-bit hash at a filter position (its top FILTER_BITS bits), low bits 1
    return np.array([(p << (64 - FILTER_BITS)) | 1 for p in positions], np.uint64)


def test_repeated_hashes_marks_the_positions_hit_twice_across_inputs_and_merges():
    # Position 5 twice in one input, 7 in two inputs, 9 and 2**24 - 1 once each: 5 and 7 are
    # marked, whether the inputs meet in one accumulator or in two merged.
    fn = RepeatedHashes()
    inputs = [_at(5, 5, 9), _at(7), _at(7, (1 << FILTER_BITS) - 1)]
    one = fn.create_accumulator()
    for h in inputs:
        one = fn.add_input(one, h)
    a = fn.add_input(fn.create_accumulator(), inputs[0])
    b = fn.add_input(fn.add_input(fn.create_accumulator(), inputs[1]), inputs[2])
    for acc in (one, fn.merge_accumulators([fn.create_accumulator(), a, b])):
        repeated = fn.extract_output(acc)
        marked = [p for p in (5, 7, 9, (1 << FILTER_BITS) - 1, 6) if at_repeated(_at(p), repeated)[0]]
        assert marked == [5, 7]
    assert not fn.extract_output(fn.create_accumulator()).any()


def test_repeated_hashes_with_three_probes_pass_every_repeat_and_few_others():
    # A Bloom filter of the hashes seen twice: 2,000 hashes that repeat (within an input, across
    # inputs, across accumulators merged) all pass; of 100,000 that occur once (a tenth of the
    # 2**20 positions, as MinHash's 14M band keys at 1M documents are of 2**27), one probe lets
    # those through whose position another hash hit (18% here), three only those whose 3
    # positions all did, in a bitmap that few hashes fill (0.2%; 0.7% after a merge).
    rng = np.random.default_rng(3)
    repeats = rng.integers(0, 2**63, 2000, dtype=np.int64).view(np.uint64)
    once = rng.integers(0, 2**63, 100_000, dtype=np.int64).view(np.uint64)
    inputs = [
        np.concatenate([repeats[:500], repeats[:500], once[:30_000]]),  # repeated within one input
        np.concatenate([repeats[500:], once[30_000:60_000]]),
        np.concatenate([repeats[500:], once[60_000:]]),  # ... and across inputs
    ]
    for probes in (1, 3):
        fn = RepeatedHashes(20, probes)
        one = fn.create_accumulator()
        for h in inputs:
            one = fn.add_input(one, h)
        merged = fn.merge_accumulators(
            [fn.add_input(fn.create_accumulator(), inputs[0]), fn.add_input(fn.create_accumulator(), inputs[1])]
        )
        merged = fn.merge_accumulators([merged, fn.add_input(fn.create_accumulator(), inputs[2])])
        for acc in (one, merged):
            repeated = fn.extract_output(acc)
            assert len(repeated) * 64 == 2**20
            assert at_repeated(repeats, repeated, probes).all()
            passed = at_repeated(once, repeated, probes).mean()
            if probes == 1:
                one_probe = passed
            else:  # merged accumulators set a little more: positions hit in both, by any hashes
                assert passed < min(0.01, one_probe / 10)


def test_partition_keys_sends_a_partition_of_a_bundle_s_shards_as_one_element():
    # 50 shards of 300 keys over 4 partitions: one element a partition at the bundle's end (not
    # 50 x 4), every 1,000 rows with a smaller batch, and partition_rows gives back each row with
    # its own shard and payload.
    rng = np.random.default_rng(3)
    shards = []
    for i in range(50):
        hashes = rng.integers(0, 2**63, 300, dtype=np.int64)
        orders = np.arange(i * 1000, i * 1000 + 300, dtype=np.int64)
        shards.append((hashes, orders, f"s{i}", orders * 10))
    documents = 4 * DOCS_PER_PARTITION

    def elements(batch_rows):
        fn = PartitionKeys(_as_given)
        fn.BATCH_ROWS = batch_rows
        fn.start_bundle()
        out = [e for shard in shards for e in fn.process(shard, documents)]
        return out + [w.value for w in fn.finish_bundle()]

    out = elements(PartitionKeys.BATCH_ROWS)
    assert sorted(p for p, _ in out) == [0, 1, 2, 3]
    # a flush every 4 shards (1,200 rows): 12, and the last 2 shards at the end; 4 partitions each
    assert len(elements(1000)) == 4 * 13
    rows = {}
    for p, part in out:
        hashes, orders, at, names, payload = partition_rows([part])
        assert (hashes.view(np.uint64) % np.uint64(4) == p).all()
        for h, o, shard, value in zip(hashes.tolist(), orders.tolist(), at.tolist(), payload.tolist()):
            rows[o] = (h, names[shard], value)
    expected = {
        o: (h, name, v) for hs, os_, name, vs in shards for h, o, v in zip(hs.tolist(), os_.tolist(), vs.tolist())
    }
    assert rows == expected


@pytest.mark.parametrize("filtered", [False, True, (20, 3)])
@pytest.mark.parametrize("documents", [10, 40 * DOCS_PER_PARTITION])
def test_first_occurrences_are_the_same_over_any_number_of_hash_partitions(documents, filtered):
    # 3 shards of 400 keys drawn from 300 values: every key after its first (by order) loses to
    # it, with the first's payload; 1 partition for 10 documents, 40 for 40 x 65,536. Filtered:
    # only keys at repeated positions are shuffled (here plus 2,000 keys that occur once).
    assert partitions_for(documents) == (1 if documents == 10 else 40)
    rng = np.random.default_rng(5)
    values = rng.integers(0, 2**63, 300, dtype=np.int64)
    parts = []
    for i in range(3):
        hashes = values[rng.integers(0, 300, 400)]
        if i == 2:
            hashes = np.concatenate([hashes, rng.integers(0, 2**63, 2000, dtype=np.int64)])
        orders = np.arange(i * 10000, i * 10000 + len(hashes), dtype=np.int64)
        parts.append((hashes, orders, f"s{i}", np.array([f"p{o}" for o in orders], object)))
    first: dict = {}
    expected: dict = {}
    for hashes, orders, shard, _ in parts:  # by hand: in order, the first of each value wins
        for h, o in zip(hashes.tolist(), orders.tolist()):
            if h in first:
                expected.setdefault(shard, []).append((o, first[h], f"p{first[h]}"))
            else:
                first[h] = o
    with BeamPipeline(runner=TEST_RUNNER) as p:
        count = beam.pvalue.AsSingleton(p | "Count" >> beam.Create([documents]))
        out = (
            p
            | beam.Create(parts)
            | FirstOccurrences(
                count,
                _as_given,
                _hashes_only if filtered else None,
                *([filtered] if isinstance(filtered, tuple) else []),
            )
            | beam.FlatMapTuple(lambda shard, lost: [(shard, o, w, k) for o, w, k in zip(*lost)])
        )
        assert_that(out, equal_to([(shard, *t) for shard, ts in expected.items() for t in ts]))
    assert sum(len(ts) for ts in expected.values()) > 800  # most keys repeat: the test has teeth


def _payload_rows(chain, shard, rows):  # module level: it travels to the workers
    return [int(r) for r in rows]


def _sample_shards(tmp_path):
    """8 staged shards of 1,000 documents, every 3rd out of the running -> (chain, shards, every
    document in the running as (seeded key, id hash, row))."""
    from beamsift.transforms.chain.seeded import uniform01

    chain = Chain(str(tmp_path), ("fit",))
    shards, every = [], []
    for i in range(8):
        hashes = np.arange(i * 1000, (i + 1) * 1000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        path = str(tmp_path / f"s{i}.arrow")
        write_staging(pa.table({ID_HASH: pa.array(hashes)}), path)
        running = np.arange(1000) % 3 != 0
        chain.write(
            START, f"s{i}", pa.table({"_reason": pa.array([None if r else "out" for r in running], pa.string())})
        )
        shards.append(StageShard(ShardRef(path, f"s{i}", 1000, i * 1000, i * 1000 + 999), int(running.sum())))
        keys = uniform01(hashes, 7, 0x51)
        every += [(float(keys[r]), int(hashes[r]), int(r)) for r in np.flatnonzero(running)]
    return chain, shards, every


def test_a_sample_offered_under_the_bound_is_the_n_smallest_keys_of_all(tmp_path):
    # n = 100 of 5,336: each shard offers only the documents under offer_bound (~5%), and the
    # sample is still exactly the 100 smallest seeded keys of the whole running, as a plain sort
    # of every key finds them.
    from beamsift.transforms.chain.sampling import SampleRunning, offer_bound

    chain, shards, every = _sample_shards(tmp_path)
    assert offer_bound(100, len(every)) < 0.05
    with BeamPipeline(runner=TEST_RUNNER) as p:
        sample = p | beam.Create(shards) | SampleRunning("fit", chain, 100, 7, 0x51, _payload_rows)
        assert_that(sample, equal_to([sorted(every)[:100]]))


def _rows_and_size(sample) -> tuple:
    return [row for _, _, row in sample], len(sample)


def test_what_is_fitted_on_a_sample_is_given_that_sample_even_an_empty_one(tmp_path):
    # ``then`` (a fit) runs where the sample is merged, on the very sample, not after it; of no
    # shards it runs on an empty sample (CombineGlobally's default), where the fits raise their
    # own error ("cluster.k=16 is more than the 0 documents sampled").
    from beamsift.transforms.chain.sampling import SampleRunning

    chain, shards, every = _sample_shards(tmp_path)
    with BeamPipeline(runner=TEST_RUNNER) as p:
        fitted = p | beam.Create(shards) | SampleRunning("fit", chain, 100, 7, 0x51, _payload_rows, then=_rows_and_size)
        assert_that(fitted, equal_to([([row for _, _, row in sorted(every)[:100]], 100)]))
    with BeamPipeline(runner=TEST_RUNNER) as p:
        fitted = p | beam.Create([]) | SampleRunning("fit", chain, 100, 7, 0x51, _payload_rows, then=_rows_and_size)
        assert_that(fitted, equal_to([([], 0)]))


def test_a_sample_of_vectors_travels_as_one_array():
    # A sample of 2,000 rows of 64 float32s pickles as its columns (~520 KB of numbers, not 2,000
    # pickled arrays) and comes back the same rows, in order; other payloads as they are.
    import pickle

    from beamsift.transforms.chain.sampling import KeepSmallest

    rng = np.random.default_rng(5)
    rows = [
        (float(rng.random()), int(rng.integers(1 << 63)) * 2 + 1, rng.random(64).astype(np.float32))
        for _ in range(2000)
    ]
    keep = KeepSmallest(1500)
    acc = keep.merge_accumulators(
        [keep.add_input(keep.create_accumulator(), rows[:900]), keep.add_input(keep.create_accumulator(), rows[900:])]
    )
    sample = pickle.loads(pickle.dumps(keep.extract_output(acc)))
    expected = sorted(rows, key=lambda t: (t[0], t[1]))[:1500]
    assert [(k, h) for k, h, _ in sample] == [(k, h) for k, h, _ in expected]
    assert all(np.array_equal(v, w) and v.dtype == np.float32 for (_, _, v), (_, _, w) in zip(sample, expected))
    assert len(pickle.dumps(sample)) < 1500 * (64 * 4 + 16) + 1000
    texts = keep.extract_output(keep.add_input(keep.create_accumulator(), [(0.5, 3, "b"), (0.25, 9, "a")]))
    assert pickle.loads(pickle.dumps(texts)) == [(0.25, 9, "a"), (0.5, 3, "b")]


class _ShortWrites(io.RawIOBase):
    """A file that takes at most 7 bytes a write, as a raw file may."""

    def __init__(self):
        super().__init__()
        self.data, self.sizes = bytearray(), []

    def writable(self):
        return True

    def write(self, data):
        piece = bytes(memoryview(data)[:7])
        self.data += piece
        self.sizes.append(len(memoryview(data)))
        return len(piece)


def test_staging_files_are_written_in_pieces_and_read_back_whole(tmp_path, monkeypatch):
    # Each write gets at most WRITE_PIECE bytes (a large write() fills the page cache with
    # large folios, slow where free memory goes back to the host), and a short write goes on
    # where it stopped: every byte lands once, in order.
    monkeypatch.setattr(staging, "WRITE_PIECE", 1000)
    data = bytes(range(256)) * 10
    short = _ShortWrites()
    staging.write_in_pieces(short, data)
    assert bytes(short.data) == data
    assert max(short.sizes) == 1000 and len(short.sizes) > len(data) // 7
    # Staging (Arrow IPC) and Parquet shards of a table of ~80 KB, 1,000 bytes a write
    table = pa.table({"v": np.arange(10_000, dtype=np.int64), "s": [f"doc {i}" for i in range(10_000)]})
    writes = []
    real = staging.write_in_pieces
    monkeypatch.setattr(staging, "write_in_pieces", lambda f, d: (writes.append(memoryview(d).nbytes), real(f, d)))
    write_staging(table, str(tmp_path / "shard.arrow"))
    staging.write_parquet(table, str(tmp_path / "shard.parquet"))
    assert staging.read_staging(str(tmp_path / "shard.arrow")).equals(table)
    assert pq.read_table(tmp_path / "shard.parquet").equals(table)
    assert sum(writes) >= (tmp_path / "shard.arrow").stat().st_size + (tmp_path / "shard.parquet").stat().st_size
