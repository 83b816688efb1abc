"""Exact and semantic de-duplication on planted duplicates: each planted pair loses exactly one
document, which points at the other, and nothing else is dropped."""

from __future__ import annotations

import random

import apache_beam as beam
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.stages.dedup import (
    LowestHashes,
    ResolvePointers,
    bfloat16_bits,
    bfloat16_products,
    compare_members,
    drop_batch,
    drop_records,
    greedy_near_duplicates,
    head_width,
    id_strings,
    normalise_text,
    normalised_hashes,
    normalised_text_hash,
    parts_of,
    plan_splits,
    semdedup_cluster,
)
from conftest import TEST_RUNNER, demo_records, make_config, write_jsonl


def test_greedy_keeps_one_of_each_group_by_hand():
    # (distance to centroid, order, id, vector): a and b are near-duplicates, c is not; a is
    # nearest the centroid, so a is kept and b points at it.
    items = [
        (0.3, 2, "b", np.array([1.0, 0.05])),
        (0.1, 5, "a", np.array([1.0, 0.0])),
        (0.2, 1, "c", np.array([0.0, 1.0])),
    ]
    assert semdedup_cluster(items, epsilon=0.05) == [(2, "a", "near duplicate", (0.1, 5))]
    assert semdedup_cluster(items, epsilon=0.0001) == []


def test_blocked_greedy_is_the_greedy():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(60, 8))
    vectors = np.concatenate([base, base[:40] + 0.15 * rng.normal(size=(40, 8))])
    items = [(float(rng.random()), i, f"d{i}", v) for i, v in enumerate(vectors)]
    one = semdedup_cluster(items, 0.05, block=1)
    assert len(one) > 10
    assert semdedup_cluster(items, 0.05, block=7) == one == semdedup_cluster(items, 0.05, block=1000)


def _plain_greedy(unit: np.ndarray, threshold: float):
    """SemDeDup's greedy as defined: each row against every kept row before it."""
    kept, dropped, targets = [], [], []
    for i, row in enumerate(unit):
        sims = unit[kept] @ row
        if len(kept) and sims.max() > threshold:
            dropped.append(i)
            targets.append(kept[int(np.argmax(sims))])  # the most similar, the earliest on a tie
        else:
            kept.append(i)
    return dropped, targets


@pytest.mark.parametrize("low_precision", [False, True], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ["spread", "leading", "tight"])
def test_the_bounded_greedy_is_the_plain_greedy(shape, low_precision):
    """The block products compare only the pairs whose Cauchy–Schwarz bound on r leading
    coordinates passes the threshold: the same drops and pointers as every pair compared, for
    energy spread evenly (a random projection: r about a quarter), held by the leading coordinates
    (an SVD: r small), and a tight group whose typical cosine is high (r all, or the full product).
    The same with the bound's product in bfloat16 (its cut lowered for the rounding), where the
    CPU has it."""
    if low_precision and not bfloat16_products():
        pytest.skip("this CPU has no bfloat16 matrix products")
    rng = np.random.default_rng(7)
    dim = 128
    base = rng.normal(size=(900, dim))
    if shape == "leading":
        base /= np.sqrt(np.arange(1, dim + 1))  # energy falls with the coordinate, as an SVD's
    if shape == "tight":
        base = 0.35 * base / np.linalg.norm(base, axis=1, keepdims=True) + rng.normal(size=dim)
    # near-duplicates with cosines from ~0.86 to ~0.98 to their original, either side of 0.9
    noise = rng.uniform(0.2, 0.6, size=(300, 1)) * np.linalg.norm(base[:300], axis=1, keepdims=True) / np.sqrt(dim)
    near = base[:300] + noise * rng.normal(size=(300, dim))
    vectors = np.concatenate([base, near])[rng.permutation(1200)]
    unit = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    width = head_width(unit, 0.9, 0.1)
    assert {"spread": 24 <= width <= 64, "leading": width <= 16, "tight": width == dim}[shape], width
    dropped, targets = greedy_near_duplicates(unit, 0.9, low_precision=low_precision)
    expected = _plain_greedy(unit, 0.9)
    assert len(expected[0]) > 100
    assert (dropped.tolist(), targets.tolist()) == expected


def test_bfloat16_bits_round_as_torch_does():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=10_000), [0.0, -0.0, 1.0, 0.85 - 0.0125, 1e-30, -3.5]]).astype(np.float32)
    # halfway cases: ties go to the even neighbour
    x = np.concatenate([x, (np.arange(0x3F800000, 0x3F800000 + 64 * 0x8000, 0x8000, dtype=np.uint32)).view(np.float32)])
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(bfloat16_bits(x), expected)


def test_a_group_in_half_precision_is_compared_as_its_unit_rows_in_order():
    # compare_members takes a group as the members files hold it (half precision, in no order)
    # and scales each row as its block comes up: the same drops and pointers as the plain greedy
    # over the whole group scaled first, in order (distance, then order), mapped back to rows.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(700, 64))
    near = base[:200] + 0.15 * rng.normal(size=(200, 64))
    vectors = np.concatenate([base, near]).astype(np.float16)
    distance = rng.choice([0.1, 0.2, 0.3], size=len(vectors))  # ties: order decides
    orders = rng.permutation(len(vectors)) + 1000
    ids = [f"d{o}" for o in orders]
    sequence = np.lexsort((orders, distance))
    unit = vectors[sequence].astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1)[:, None]
    dropped, targets = _plain_greedy(unit, 0.9)
    expected = [
        (int(sequence[d]), ids[sequence[t]], (float(distance[sequence[t]]), int(orders[sequence[t]])))
        for d, t in zip(dropped, targets)
    ]
    assert len(expected) > 100
    assert compare_members(distance, orders, ids, vectors, 0.1, block=64) == expected


def test_ids_become_strings_as_str_writes_them():
    assert id_strings(pa.array(["a", "b"])).to_pylist() == ["a", "b"]
    assert id_strings(pa.chunked_array([[1, -20], [3]])).to_pylist() == ["1", "-20", "3"]
    assert id_strings(pa.array([1.5, 2.0])).to_pylist() == ["1.5", "2.0"]
    assert id_strings(pa.array([True])).to_pylist() == ["True"]


@pytest.mark.parametrize("documents", [None, 3 * (1 << 16)])
def test_a_pointer_at_a_document_dropped_elsewhere_is_followed(documents):
    # c was kept in its own cluster and dropped b there; in the next cluster c was dropped for a.
    # b must point at a (kept), never at c (dropped). d was dropped in two clusters: the pointer
    # to the earlier document (a, distance 0.1) wins over the one to e (0.5). A chain of three
    # links (g -> h -> i -> a) ends at a too. Records: (order, shard, kept id, reason, target).
    near, exact = "near duplicate", "exact duplicate"
    records = [
        (2, "s0", "c", near, (0.3, 3)),  # b (order 2) for c (order 3)
        (3, "s1", "a", near, (0.1, 1)),
        (4, "s0", "a", near, (0.1, 1)),
        (4, "s0", "e", near, (0.5, 5)),
        (9, "s1", "x", exact, (0.0, 8)),
        (10, "s1", "c", exact, (0.0, 3)),  # f (order 10) repeats c exactly; c is a near duplicate of a
        (20, "s2", "h", near, (0.4, 21)),
        (21, "s2", "i", near, (0.3, 22)),
        (22, "s2", "a", near, (0.1, 1)),
    ]
    expected = [
        (2, "s0", "a", near, (0.1, 1)),
        (3, "s1", "a", near, (0.1, 1)),
        (4, "s0", "a", near, (0.1, 1)),
        (9, "s1", "x", exact, (0.0, 8)),
        (10, "s1", "a", exact, (0.1, 1)),
        (20, "s2", "a", near, (0.1, 1)),
        (21, "s2", "a", near, (0.1, 1)),
        (22, "s2", "a", near, (0.1, 1)),
    ]
    with TestPipeline(runner=TEST_RUNNER) as p:
        # None: one partition; 3 x 65,536 documents: 3 hash partitions of the orders, so that
        # links cross partitions (3 -> 1, 10 -> 3, 20 -> 21 -> 22 -> 1)
        count = None if documents is None else beam.pvalue.AsSingleton(p | "Count" >> beam.Create([documents]))
        # The drops come as batches (one a group or shard): here two, cut across the links
        batches = p | beam.Create([drop_batch(records[:5]), drop_batch(records[5:])])
        resolved = batches | ResolvePointers(count) | beam.FlatMap(drop_records)
        assert_that(resolved, equal_to(expected))


def test_pointers_resolved_as_a_plain_walk_resolves_them_on_random_chains():
    # 3,000 documents; 1,200 drop records, each pointing at an earlier document, some documents
    # dropped twice (the first pointer by distance wins), chains of many links across 4 hash
    # partitions. Expected: each dropped document's first pointer, walked until a kept one.
    rng = np.random.default_rng(7)
    records = []
    for order in rng.choice(np.arange(1, 3000), 1100, replace=False).tolist():
        for _ in range(1 + (rng.random() < 0.1)):
            kept = int(rng.integers(max(0, order - 40), order))
            records.append((order, f"s{order % 5}", f"id{kept}", "near duplicate", (float(rng.random()), kept)))
    first = {}
    for r in sorted(records, key=lambda r: (r[0], r[4][0], r[4][1])):
        first.setdefault(r[0], r)
    expected, longest = [], 0
    for order, (_, shard, kept_id, reason, (distance, kept)) in first.items():
        links = 1
        while kept in first:  # the target was dropped too: point on at what it points at
            _, _, kept_id, _, (distance, kept) = first[kept]
            links += 1
        longest = max(longest, links)
        expected.append((order, shard, kept_id, reason, (distance, kept)))
    assert longest >= 5, "the case holds no long chains"
    with TestPipeline(runner=TEST_RUNNER) as p:
        count = beam.pvalue.AsSingleton(p | "Count" >> beam.Create([4 * (1 << 16)]))
        batches = p | beam.Create([drop_batch(records[j::3]) for j in range(3)])
        resolved = batches | ResolvePointers(count) | beam.FlatMap(drop_records)
        assert_that(resolved, equal_to(expected))


def test_a_large_cluster_is_split_into_parts_near_pairs_still_meet():
    # 2,000 documents in one cluster, bound 500: 2**3 parts (aimed at half the bound), and every
    # document also goes to the part across its nearest cut.
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16))
    shapes = {0: (2000, vectors.sum(0), 2000), 1: (400, vectors[:400].sum(0), 400)}
    samples = {0: (None, None, vectors[::2]), 1: (None, None, vectors[:200])}
    splits = plan_splits(shapes, max_group=500, samples=samples)
    assert list(splits) == [0] and splits[0][0] == 3  # cluster 1 is under the bound: whole
    part, across = parts_of(vectors, 0, splits, probes=2)
    sizes = np.bincount(part, minlength=8) + np.bincount(across, minlength=8)
    assert sizes.max() <= 1000 and sizes.sum() == 4000
    assert (np.bitwise_count(part ^ across) == 1).all()
    # A pair split by a cut near one of them meets in that one's "across" part.
    near_pair = np.stack([vectors[0], vectors[0] + 1e-3 * rng.normal(size=16)])
    p, q = parts_of(near_pair, 0, splits, probes=2)
    assert p[0] == p[1] or q[0] == p[1] or q[1] == p[0]
    whole, none = parts_of(vectors[:5], 1, splits, probes=2)
    assert whole.tolist() == [0] * 5 and none.tolist() == [-1] * 5


def test_a_split_cuts_across_the_directions_of_most_spread_at_their_medians():
    # By hand: a cloud spread 5 along the third axis and 3 along the first, 1 elsewhere, centred
    # at (1, 1, 1, 1); two cuts: the third axis, then the first, each at the sample's median.
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(4000, 4)) * [3.0, 1.0, 5.0, 1.0] + 1.0
    mean = np.ones(4)
    shapes = {7: (3000, mean * 3000, 3000)}
    bits, centre, directions, offsets = plan_splits(shapes, max_group=1500, samples={7: (None, None, sample)})[7]
    assert bits == 2 and np.allclose(centre, 1.0)
    np.testing.assert_allclose(np.abs(directions), [[0, 0, 1, 0], [1, 0, 0, 0]], atol=0.05)
    assert (directions.max(axis=1) > 0.95).all()  # signed: the largest coordinate is positive
    np.testing.assert_allclose(offsets, np.median((sample - mean) @ directions.T, axis=0))
    # Each part holds a quarter of the cloud; a document's part is its side of each median.
    part, _ = parts_of(sample, 7, {7: (bits, centre, directions, offsets)}, probes=1)
    np.testing.assert_allclose(np.bincount(part, minlength=4) / len(sample), 0.25, atol=0.03)
    third, first = sample[:, 2] - 1 > offsets[0], sample[:, 0] - 1 > offsets[1]
    assert (part == third * 1 + first * 2).mean() > 0.97  # the directions are the axes, nearly


def test_a_cluster_with_too_small_a_sample_is_still_split():
    # A cluster compared mostly as the probe of its neighbours: its own documents few, none of
    # them sampled. Its cuts are seeded ones through its mean, and it is split all the same.
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(2000, 16))
    shapes = {0: (2000, vectors[:20].sum(0), 20)}
    for samples in ({}, {0: (None, None, vectors[:2])}):
        splits = plan_splits(shapes, max_group=500, samples=samples)
        bits, mean, directions, offsets = splits[0]
        assert bits == 3 and directions.shape == (3, 16) and not offsets.any()
        part, across = parts_of(vectors, 0, splits, probes=2)
        assert len(np.unique(part)) == 8 and (np.bitwise_count(part ^ across) == 1).all()
    again = plan_splits(shapes, max_group=500, samples={})
    np.testing.assert_array_equal(again[0][2], directions)  # the same cuts every time


def test_the_split_sample_is_the_same_however_shards_are_grouped():
    rng = np.random.default_rng(2)
    parts = []
    for _ in range(6):  # six shards' samples, each sorted as _ClusterShapes gives them
        h = rng.integers(0, 2**63, size=40, dtype=np.uint64)
        o = rng.integers(0, 10**6, size=40)
        at = np.lexsort((o, h))[:10]
        parts.append((h[at], o[at], rng.normal(size=(40, 3))[at]))
    fn = LowestHashes(size=12)
    one = fn.extract_output(fn.merge_accumulators([fn.add_input(fn.create_accumulator(), p) for p in parts]))
    acc = fn.create_accumulator()
    for p in parts[::-1]:
        acc = fn.add_input(acc, p)
    other = fn.extract_output(acc)
    everything = [np.concatenate(c) for c in zip(*parts)]
    lowest = np.lexsort((everything[1], everything[0]))[:12]
    for got in (one, other):
        for column, whole in zip(got, everything):
            np.testing.assert_array_equal(column, whole[lowest])


def test_exact_normalisation_keeps_every_script():
    texts = pa.array(
        ["Привет, мир!", "こんにちは世界", "Hello,\u00a0World", "hello world", "HELLO   world?!", "Пока мир"]
    )
    h = normalised_text_hash(texts)
    assert normalise_text(texts).to_pylist()[:3] == ["привет мир", "こんにちは世界", "hello world"]
    assert h[2] == h[3] == h[4]  # case, a no-break space, punctuation
    assert len({h[0], h[1], h[3], h[5]}) == 4  # other scripts are not erased into one
    # é composed or decomposed, full-width letters: the same text.
    nfkc = normalised_text_hash(pa.array(["e\u0301t\u00e9 ＡＢＣ", "\u00e9t\u00e9 abc"]))
    assert nfkc[0] == nfkc[1]


@pytest.mark.parametrize("alphabet", ["ascii", "every kind", "normalisation"])
def test_compiled_normalised_hashes_are_arrows(alphabet):
    # The compiled loop against Arrow's own normalisation and hash_strings of its result, on
    # characters of 1 to 4 bytes, NFKC's cases (decomposed é, full-width forms, ligatures),
    # Unicode white space and separators, controls, symbols, and texts left empty. The loop
    # normalises only the texts that hold a character normalisation may change: "normalisation"
    # mixes what composes, decomposes or reorders (marks out of order, jamo, Indic vowel signs,
    # kana and voicing marks, singletons) with 400 code points drawn from every plane.
    kinds = list("aZ_09 .,;-!?\t\n\r\x0b\x0c$^`~")
    if alphabet == "every kind":
        kinds += [*"éÉ\u0301\u093f\u0915\u0e34½²Ⅰªʰ\u3000\xa0\u2003\u2028\u0085日。😀𐐀İΣẞ\x00\x1c\u200bＡ！ﬁ€٠"]
    if alphabet == "normalisation":
        kinds += [*"eAa\u0301\u0316\u0327\u0344\u1100\u1161\u11a8\uac00\uac01\u0cc6\u0cc2\u0bc6\u0bbe\u0b47\u0b3e"]
        kinds += [*"\u304b\u3099\u304c\u00c5\u212b\u2126\u1e0b\u0323\u00b4\u0f71\u0f72\u1e9b\u03d2\u0385\u2019\u201c"]
        draw = random.Random(11)
        drawn = (draw.randrange(0x80, draw.choice([0x3000, 0x30000])) for _ in range(400))
        kinds += [chr(c) for c in drawn if not 0xD800 <= c < 0xE000]
    rng = random.Random(5)
    texts = ["".join(rng.choice(kinds) for _ in range(rng.randint(0, 25))) for _ in range(3000)]
    if alphabet == "normalisation":  # each case once on its own: reordered marks, composing pairs
        texts += ["a\u0301\u0316 x", "\u1100\u1161", "\uac00\u11a8", "\u304b\u3099", "\u0cc6\u0cc2", "\u00c5 \u212b"]
    texts += ["", "  ", "...", "Hello,  World!", "e\u0301t\u00e9 ＡＢＣ", "\u00e9t\u00e9 abc"]
    texts = pa.array(texts)
    hashes, lengths = normalised_hashes(texts)
    np.testing.assert_array_equal(hashes, normalised_text_hash(texts))
    np.testing.assert_array_equal(lengths, pc.binary_length(normalise_text(texts)).to_numpy())
    assert (lengths == 0).any() and (lengths > 0).any()


def _near_copy(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 40)):  # drop a few words
        del words[rng.randrange(len(words))]
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]  # swap two
    return " ".join(words)


@pytest.mark.parametrize(
    "embed, max_group",
    [
        ({"method": "projection", "dim": 512}, 20_000),  # compared on the embedding itself
        ({"method": "svd", "dim": 64}, 20_000),  # topics for the clusters; compared on projected TF-IDF
        ({"method": "projection", "dim": 512}, 60),  # every cluster compared in parts of ~30
    ],
)
def test_planted_duplicates(tmp_path, embed, max_group):
    rng = random.Random(0)
    originals = [r for r in demo_records(2000) if r["source"] in ("kjv", "jargon", "devil")][:300]
    records = [{"id": r["id"], "text": r["text"]} for r in originals]
    near = {f"near-{i}": r["id"] for i, r in enumerate(originals[:20])}
    exact = {f"exact-{i}": r["id"] for i, r in enumerate(originals[20:25])}
    for new_id, old in near.items():
        records.append({"id": new_id, "text": _near_copy(next(r["text"] for r in originals if r["id"] == old), rng)})
    for new_id, old in exact.items():
        text = next(r["text"] for r in originals if r["id"] == old)
        records.append({"id": new_id, "text": "  " + text.upper().replace(",", "") + " !"})
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "dedup", "select"],
        embed=embed,
        cluster={"k": 4},
        dedup={"max_group": max_group},
        select={"method": "all", "k": None},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    rows = (
        duckdb.connect()
        .execute(f"SELECT id, duplicate_of, reason, selected FROM '{tmp_path}/out/scores/*.parquet' WHERE NOT selected")
        .fetchall()
    )
    dropped = {i: (of, reason) for i, of, reason, _ in rows}
    # Exact duplicates come later in input order: the copy is dropped and points at the first.
    for new_id, old in exact.items():
        assert dropped.pop(new_id) == (old, "exact duplicate")
    # Each near pair loses exactly one document, which points at the other.
    for new_id, old in near.items():
        assert (new_id in dropped) != (old in dropped), (new_id, old)
        loser, winner = (new_id, old) if new_id in dropped else (old, new_id)
        assert dropped.pop(loser) == (winner, "near duplicate")
    assert dropped == {}  # nothing else
    assert manifest["counts"]["selected"] == 300
    kept = duckdb.connect().execute(
        f"SELECT count(*) FROM '{tmp_path}/out/scores/*.parquet' WHERE duplicate_of IS NULL"
    )
    assert kept.fetchone()[0] == 300


def test_row_runs_read_back_one_at_a_time(tmp_path):
    from beamsift.transforms.chain.staging import read_row_run, write_row_runs

    runs = [np.array([3, 1, 4], np.int64), np.zeros(0, np.int64), np.arange(100_000, 100_005), np.array([2**31 - 1])]
    path = str(tmp_path / "dedup.members.rows" / "part-0.i32")
    starts = write_row_runs(runs, path)
    assert starts.tolist() == [0, 3, 3, 8, 9]
    for run, start in zip(runs, starts[:-1].tolist()):
        assert read_row_run(path, start, len(run)).tolist() == run.tolist()
    with pytest.raises(OSError, match="ends before rows 8..10"):
        read_row_run(path, 8, 2)


def test_removed_staging_tables_take_nothing_else_with_them(tmp_path):
    from beamsift.transforms.chain.staging import remove_tables

    for name in ("dedup.members/a.arrow", "dedup.members.rows/a.i32", "dedup.membersX/a.arrow", "dedup/a.arrow"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    remove_tables(str(tmp_path), ["dedup.members", "dedup.members.rows", "never.written"], 7)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "dedup.membersX/a.arrow",
        "dedup/a.arrow",
    ]
