"""MinHash LSH: shingles, signatures and bands checked by hand, and the stage through the CLI."""

from __future__ import annotations

import json

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from beamsift.transforms.stages.minhash import (
    band_keys,
    candidate_probability,
    permutations,
    shingle_hashes,
    signatures,
)
from conftest import WORKERS, demo_records, run_cli, write_jsonl


def _shingle_sets(texts, ngram, unit="word"):
    hashes, offsets = shingle_hashes(pa.array(texts), ngram, unit)
    return [set(hashes[offsets[i] : offsets[i + 1]].tolist()) for i in range(len(texts))]


def test_shingles_are_the_word_ngrams_of_the_normalised_text():
    a, b, c, d, e = _shingle_sets(
        ["The cat sat on the mat.", "the CAT, sat on -- the mat", "cat sat", "", "!!!"], ngram=3
    )
    assert len(a) == 4  # the cat sat / cat sat on / sat on the / on the mat
    assert a == b  # case, punctuation and spacing do not count
    assert len(c) == 1  # shorter than a shingle: one shingle of all its words
    assert d == set() and e == set()  # nothing left after normalising: no shingles


def test_unspaced_scripts_are_cut_into_characters_and_char_shingles_count_characters():
    (zh,) = _shingle_sets(["数据选择很重要"], ngram=2)
    assert len(zh) == 6  # 7 characters, 6 bigrams
    (chars,) = _shingle_sets(["abcdef"], ngram=3, unit="char")
    assert len(chars) == 4  # abc bcd cde def
    (same,) = _shingle_sets(["AbCdEf"], ngram=3, unit="char")  # normalised to "abcdef"
    assert same == chars
    (hyphen,) = _shingle_sets(["foo-bar baz"], ngram=3)  # punctuation is a space: three words
    assert hyphen == _shingle_sets(["foo bar baz"], ngram=3)[0]


def test_a_texts_shingles_do_not_depend_on_its_batch():
    # An ASCII batch takes ASCII kernels: the same shingles as beside a non-ASCII text.
    text = "Plain ASCII text -- with PUNCTUATION, tabs\tand   runs of spaces; 42 numbers."
    alone = _shingle_sets([text], ngram=3)[0]
    mixed = _shingle_sets([text, "Ünïcödé wörds ＦＵＬＬ width 数据选择"], ngram=3)[0]
    assert alone == mixed and len(alone) == 10  # 12 words


def test_signatures_estimate_the_jaccard_similarity():
    # Pairs of shingle sets with known overlap: the share of equal min-hashes tracks |A∩B|/|A∪B|.
    rng = np.random.default_rng(0)
    a, b = permutations(256, seed=0)
    errors = []
    for jaccard in (0.1, 0.3, 0.5, 0.7, 0.9):
        for _ in range(4):
            union = rng.integers(0, 2**63, 400, dtype=np.uint64)
            shared = int(round(jaccard * 400))
            only = (400 - shared) // 2
            x = np.concatenate([union[:shared], union[shared : shared + only]])
            y = np.concatenate([union[:shared], union[shared + only : shared + 2 * only]])
            true = shared / (shared + 2 * only)
            sig = signatures(np.concatenate([x, y]), np.array([0, len(x), len(x) + len(y)]), a, b)
            errors.append((sig[0] == sig[1]).mean() - true)
    errors = np.abs(errors)
    assert errors.mean() < 0.03 and errors.max() < 0.1, errors


def test_a_document_without_shingles_matches_nothing_and_bands_differ_by_band():
    a, b = permutations(4, seed=1)
    sig = signatures(np.array([5, 6], np.uint64), np.array([0, 0, 2]), a, b)
    assert (sig[0] == np.iinfo(np.uint32).max).all() and (sig[1] < np.iinfo(np.uint32).max).all()
    same = np.zeros((1, 4), np.uint32)
    keys = band_keys(same, bands=2, rows=2)
    assert keys[0, 0] != keys[0, 1]  # equal rows in two bands are two buckets


def test_the_banding_curve_is_the_one_of_the_paper():
    assert abs(candidate_probability(0.8, 14, 8) - 0.924) < 0.001  # datatrove's defaults
    assert candidate_probability(0.5, 14, 8) < 0.06
    assert abs((1 / 14) ** (1 / 8) - 0.719) < 0.001  # the threshold ~0.72


def _near_copy(text: str, rng) -> str:
    words = text.split()
    for _ in range(max(1, len(words) // 50)):  # ~2% of the words changed
        words[rng.integers(len(words))] = "xyzzy"
    return " ".join(words)


@pytest.mark.parametrize(
    "how",
    [
        [],
        # Verified pairs; two worker processes over shards of 32 documents: the same groups.
        ["--set", "minhash.verify=true", "--set", "input.batch_size=32", "--", *WORKERS],
    ],
    ids=["default", "verified-multiprocess"],
)
def test_minhash_config_finds_planted_near_duplicates_and_keeps_the_first(tmp_path, how):
    rng = np.random.default_rng(0)
    base = [r for r in demo_records(400) if len(r["text"].split()) >= 120][:150]
    records = [{"id": f"d{i}", "text": r["text"]} for i, r in enumerate(base)]
    planted = {}
    for i in range(0, 60, 3):  # 20 documents get a near copy; d0 gets two (a group of three)
        records.append({"id": f"copy{i}", "text": _near_copy(base[i]["text"], rng)})
        planted[f"copy{i}"] = f"d{i}"
    records.append({"id": "copy0b", "text": _near_copy(base[0]["text"], rng)})
    planted["copy0b"] = "d0"
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    out = tmp_path / "out"
    run_cli("run", "configs/minhash.yaml", "--set", f"input.path={pool}", "--set", f"output.dir={out}", "--quiet", *how)
    db = duckdb.connect()
    found = dict(
        db.execute(f"SELECT id, duplicate_of FROM '{out}/scores/*.parquet' WHERE reason = 'near duplicate'").fetchall()
    )
    assert found == planted  # every copy found, pointing at its original; no original dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["accounted_for"] is True
    assert manifest["counts"]["selected"] == len(records) - len(planted)


def test_dedup_after_minhash_keeps_minhash_pointers(tmp_path):
    base = [r for r in demo_records(400) if len(r["text"].split()) >= 120][:120]
    records = [{"id": f"d{i}", "text": r["text"]} for i, r in enumerate(base)]
    words = base[3]["text"].split()
    words[10], words[40] = "xyzzy", "plugh"
    records.append({"id": "near3", "text": " ".join(words)})
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    out = tmp_path / "out"
    run_cli("run", "configs/semdedup.yaml", "--set", f"input.path={pool}", "--set", f"output.dir={out}",
            "--set", "stages=[minhash, embed, cluster, dedup, select]", "--set", "cluster.k=4", "--quiet")  # fmt: skip
    rows = duckdb.connect().execute(
        f"SELECT id, reason, duplicate_of FROM '{out}/scores/*.parquet' WHERE duplicate_of IS NOT NULL"
    )
    # The last stage to write duplicate_of (dedup) carried minhash's pointer on.
    assert rows.fetchall() == [("near3", "near duplicate", "d3")]
