import random
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from beamsift.transforms.featurize import (
    CHUNK_DOCS,
    compiled_kernels,
    compiled_token_hashes,
    hash_strings,
    hashed_ngram_features,
    token_hashes,
)
from conftest import demo_records

WORDPUNCT = re.compile(r"\w+|[^\w\s]+")
# The two tokenisers: numpy's passes, and the compiled loop (with numpy for "İ" and "Σ").
TOKENISERS = pytest.mark.parametrize("token_hashes", [token_hashes, compiled_token_hashes], ids=["numpy", "compiled"])


@TOKENISERS
def test_tokens_match_nltk_wordpunct_on_real_text(token_hashes):
    texts = [r["text"] for r in demo_records(400)] + [
        "Ünïcode—dash “quotes” f(x)=1; a_b",
        "日本語 テキスト。",
    ]
    hashes, offsets = token_hashes(pa.array(texts))
    for i, text in enumerate(texts):
        expected = WORDPUNCT.findall(text.lower())
        got = hashes[offsets[i] : offsets[i + 1]]
        assert len(got) == len(expected), text[:80]
        # Same token -> same hash, different token -> different hash, within the document.
        want = hash_strings(pa.array(expected, pa.string())) if expected else np.zeros(0, np.uint64)
        np.testing.assert_array_equal(got, want)


@TOKENISERS
def test_tokens_match_wordpunct_on_every_kind_of_character(token_hashes):
    # Python's \w (letters, numbers of every script, "_"; not combining marks), its Unicode
    # white space, lower-casing that Arrow does otherwise (İ -> i + combining dot, final Σ -> ς),
    # characters of 1 to 4 UTF-8 bytes, and white space at the ends and in runs.
    kinds = list("aZ_09 .,;-\t\n") + [
        *"éÉ\u0301\u093f\u0915\u0e34\u0e01½²Ⅰªʰ\u3000\xa0\u2003日。😀𐐀İΣΟẞ\x00\x1c\u200b٠"
    ]
    rng = random.Random(7)
    texts = ["".join(rng.choice(kinds) for _ in range(rng.randint(1, 30))) for _ in range(2000)]
    texts += ["ΟΔΟΣ. ΣΑΣ", "ΣΑΣ.ΚΑ", "İstanbul İ", " edge ", "a\u3000\u3000b  ", "a\x1cb c\x1f", "x\xa0y"]
    hashes, offsets = token_hashes(pa.array(texts))
    for i, text in enumerate(texts):
        expected = WORDPUNCT.findall(text.lower())
        want = hash_strings(pa.array(expected, pa.string())) if expected else np.zeros(0, np.uint64)
        np.testing.assert_array_equal(hashes[offsets[i] : offsets[i + 1]], want, err_msg=repr(text))


def test_hand_checkable_ngram_counts():
    f = hashed_ngram_features(pa.array(["The cat, the CAT.", "dog"]), num_buckets=1_000_003)
    # doc 0 tokens: the cat , the cat .  -> 6 unigrams + 5 bigrams; doc 1: 1 unigram
    assert f.n_tokens.tolist() == [6, 1]
    assert f.n_ngrams.tolist() == [11, 1]
    doc0 = Counter(f.buckets[: f.offsets[1]].tolist())
    # "the" and "cat" twice each, the bigram "the cat" twice, everything else once
    assert sorted(doc0.values()) == [1, 1, 1, 1, 1, 2, 2, 2]


def test_bigrams_do_not_cross_documents():
    joined = hashed_ngram_features(pa.array(["a b", "c d"]), 1 << 20)
    alone = [hashed_ngram_features(pa.array([t]), 1 << 20) for t in ("a b", "c d")]
    np.testing.assert_array_equal(joined.buckets, np.concatenate([a.buckets for a in alone]))


def test_hash_is_stable_across_processes():
    code = (
        "import pyarrow as pa; from beamsift.transforms.featurize import hash_strings;"
        "print(hash_strings(pa.array(['data', 'selection', 'é'])).tolist())"
    )
    runs = {subprocess.check_output([sys.executable, "-c", code], text=True) for _ in range(2)}
    assert len(runs) == 1
    assert runs.pop().strip() == str(hash_strings(pa.array(["data", "selection", "é"])).tolist())


def test_threaded_featurization_gives_the_same_features():
    from concurrent.futures import ThreadPoolExecutor

    texts = pa.array([f"doc {i}: the quick, brown fox #{i % 7} jumps. Ünïcode wörds {i}" for i in range(5000)])
    alone = hashed_ngram_features(texts, 10000)
    with ThreadPoolExecutor(3) as pool:
        threaded = hashed_ngram_features(texts, 10000, executor=pool)
    np.testing.assert_array_equal(threaded.buckets, alone.buckets)
    np.testing.assert_array_equal(threaded.offsets, alone.offsets)
    np.testing.assert_array_equal(threaded.n_tokens, alone.n_tokens)
    assert len(alone.offsets) == 5001 and alone.n_tokens.min() > 0


def test_code_point_kinds_are_pythons_own_regex_classes():
    from beamsift.transforms.featurize import _code_point_kinds

    every = "".join(map(chr, range(0x110000)))
    for pattern, kind in ((r"\w", 1), (r"\s", 2)):
        expected = np.zeros(0x110000, dtype=bool)
        for run in re.finditer(pattern + "+", every):
            expected[run.start() : run.end()] = True
        np.testing.assert_array_equal(_code_point_kinds() == kind, expected, err_msg=pattern)


def test_the_compiled_kernels_load():
    # Where numba cannot load them the numpy path serves alone: right, but 4-5x slower.
    assert compiled_kernels() is not None


def test_lower_case_table_is_pythons_str_lower():
    from beamsift.transforms.featurize import _SPECIAL, _code_point_kinds, _lower_tables

    lowered, kind = _lower_tables()
    for c in range(0x110000):
        if 0xD800 <= c < 0xE000:
            continue
        low = chr(c).lower()
        if c in _SPECIAL or len(low) != 1:
            assert lowered[c] == -1, hex(c)
        else:
            assert lowered[c] == ord(low), hex(c)
            assert kind[c] == _code_point_kinds()[ord(low)], hex(c)
    assert sorted(np.flatnonzero(lowered < 0)) == sorted(_SPECIAL)  # "İ" and "Σ", no others


def test_compiled_and_numpy_features_agree_bit_for_bit():
    from beamsift.transforms.featurize import _compiled_ngram_features, _numpy_ngram_features

    rng = random.Random(11)
    words = [r["text"] for r in demo_records(300)] + ["ΣΑΣ ΟΔΟΣ", "İi", "日本語。", "😀x", "\u3000", ""]
    texts = pa.array([" ".join(rng.choice(words) for _ in range(rng.randint(0, 3))) for _ in range(3 * CHUNK_DOCS)])
    for max_ngram, buckets in ((1, 7), (2, 65536), (3, 1 << 20)):
        want = _numpy_ngram_features(texts, buckets, max_ngram)
        got = _compiled_ngram_features(compiled_kernels(), texts, buckets, max_ngram)
        for field in ("buckets", "offsets", "n_tokens"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        # A batch of more than a chunk takes the compiled path: the same features.
        whole = hashed_ngram_features(texts, buckets, max_ngram)
        np.testing.assert_array_equal(whole.buckets, want.buckets)
        np.testing.assert_array_equal(whole.offsets, want.offsets)


def test_bucket_counts_compiled_are_bincounts():
    from beamsift.transforms.featurize import NgramFeatures, bucket_counts

    compiled_kernels()  # loaded: bucket_counts takes the compiled loop
    rng = np.random.default_rng(2)
    for dtype in (np.uint16, np.uint32, np.int64):
        buckets = rng.integers(0, 1000, 5000).astype(dtype)
        offsets = np.array([0, 1000, 1000, 5000])
        f = NgramFeatures(buckets, offsets, np.array([10, 0, 40]))
        np.testing.assert_array_equal(bucket_counts(f, 1000), np.bincount(buckets, minlength=1000))
        rows = np.array([False, True, True])
        np.testing.assert_array_equal(bucket_counts(f, 1000, rows), np.bincount(buckets[1000:], minlength=1000))
