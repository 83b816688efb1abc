"""Compiled loops over a batch's UTF-8 bytes: WordPunct tokens and hashed n-grams in one pass,
and the hash of each text as the exact-duplicate test normalises it.

The numpy path (``featurize.token_hashes``) tokenises with ~20 vectorised passes over the
batch: a split, a dictionary of the distinct words, their bytes' kinds, runs, hashes, and a
gather back to every occurrence. Each pass is at native speed, but together they cost ~25 µs a
document of English, most of a DSIR run. Here one loop, compiled by numba, decodes each code
point, lower-cases it, classes it (word character, white space, other), and folds its bytes into
the open token's hash; a second loop chains the token hashes into n-gram buckets. The loops let
go of the GIL, so a batch's chunks featurize on every core.

The result is the numpy path's, bit for bit (the tests compare both with ``re`` on every kind of
character): the same tokens, the same hashes, the same buckets, so models saved by either agree.
Python's ``str.lower`` maps every code point to one code point except two: "İ" (U+0130) becomes
two ("i" and a combining dot) and "Σ" (U+03A3) becomes "ς" or "σ" depending on its neighbours. A
document holding either is marked, and the caller featurizes it the numpy way.

``normalised_hashes_compiled`` is ``dedup.normalise_text`` (lower case, punctuation and symbols
out, runs of white space as one space, trimmed) and ``hash_strings`` of the result in one loop,
without making the normalised strings; its tables come from Arrow's own kernels, so the two agree.
"""

from __future__ import annotations

import numba
import numpy as np

_POLY = np.uint64(0x100000001B3)  # featurize._POLY
_BIGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)  # featurize._BIGRAM_MULT
_OTHER, _WORDCHAR, _SPACE = 0, 1, 2  # featurize's kinds


@numba.njit(nogil=True, cache=True, inline="always")
def _splitmix64(x):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True, inline="always")
def _decode(data, i):
    """(the code point of the valid UTF-8 character at data[i], the index after it)."""
    b = np.int64(data[i])
    if b < 0x80:
        return b, i + 1
    if b < 0xE0:
        return ((b & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F), i + 2
    if b < 0xF0:
        return ((b & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F), i + 3
    return (
        ((b & 0x07) << 18)
        | ((np.int64(data[i + 1]) & 0x3F) << 12)
        | ((np.int64(data[i + 2]) & 0x3F) << 6)
        | (np.int64(data[i + 3]) & 0x3F)
    ), i + 4


@numba.njit(nogil=True, cache=True, inline="always")
def _fold(cp, total, power, length):
    """(total, power, length) after folding code point cp's UTF-8 bytes into the polynomial hash
    (``featurize.hash_strings``: Σ (byte + 1)·P^position) of the bytes so far."""
    one = np.uint64(1)
    if cp < 0x80:
        width, lead = 1, cp
    elif cp < 0x800:
        width, lead = 2, 0xC0 | (cp >> 6)
    elif cp < 0x10000:
        width, lead = 3, 0xE0 | (cp >> 12)
    else:
        width, lead = 4, 0xF0 | (cp >> 18)
    total += (np.uint64(lead) + one) * power
    power *= _POLY
    for j in range(width - 2, -1, -1):
        total += (np.uint64(0x80 | ((cp >> (6 * j)) & 0x3F)) + one) * power
        power *= _POLY
    return total, power, length + width


@numba.njit(nogil=True, cache=True)
def token_hashes_compiled(data, offsets, lowered, kind):
    """(hashes, token offsets per document, special) of the documents ``data[offsets[i]:
    offsets[i+1]]`` (valid UTF-8): each lower-cased WordPunct token's hash, as
    ``featurize.hash_strings`` would give for the token's lower-cased UTF-8 bytes. ``special``
    marks the documents holding a code point whose ``lowered`` is -1 (their tokens here are not to be used)."""
    n_docs = len(offsets) - 1
    # A token holds at least one byte, so there are at most as many tokens as bytes; pages of
    # the array that are never written are never touched.
    hashes = np.empty(max(offsets[n_docs] - offsets[0], 1), dtype=np.uint64)
    doc_tokens = np.zeros(n_docs + 1, dtype=np.int64)
    special = np.zeros(n_docs, dtype=np.bool_)
    one = np.uint64(1)
    t = 0
    for d in range(n_docs):
        i = offsets[d]
        end = offsets[d + 1]
        open_kind = _SPACE
        total = np.uint64(0)
        power = one
        length = 0
        while i < end:
            cp, i = _decode(data, i)
            low = np.int64(lowered[cp])
            if low < 0:
                special[d] = True
                low = cp
            k = kind[cp]
            if k != open_kind or k == _SPACE:
                if open_kind != _SPACE:  # the open token ends here
                    hashes[t] = _splitmix64(np.uint64(length) ^ total)
                    t += 1
                open_kind = k
                total = np.uint64(0)
                power = one
                length = 0
            if k == _SPACE:
                continue
            # The lowered code point's UTF-8 bytes, folded into the polynomial hash.
            total, power, length = _fold(low, total, power, length)
        if open_kind != _SPACE:
            hashes[t] = _splitmix64(np.uint64(length) ^ total)
            t += 1
        doc_tokens[d + 1] = t
    return hashes[:t].copy(), doc_tokens, special


@numba.njit(nogil=True, cache=True)
def ngram_buckets_compiled(token_hash, doc_tokens, max_ngram, num_buckets):
    """(buckets, offsets): each document's n-grams of order 1..max_ngram, at each token the
    1-gram first, then the longer ones that start there (``featurize``'s layout), hashed into
    ``num_buckets`` by multiply-shift of the top 32 bits."""
    n_docs = len(doc_tokens) - 1
    offsets = np.zeros(n_docs + 1, dtype=np.int64)
    for d in range(n_docs):
        n = doc_tokens[d + 1] - doc_tokens[d]
        grams = 0
        for order in range(1, max_ngram + 1):
            grams += max(n - order + 1, 0)
        offsets[d + 1] = offsets[d] + grams
    buckets = np.empty(offsets[n_docs], dtype=np.int64)
    shift = np.uint64(32)
    width = np.uint64(num_buckets)
    j = 0
    for d in range(n_docs):
        end = doc_tokens[d + 1]
        for t in range(doc_tokens[d], end):
            h = token_hash[t]
            buckets[j] = np.int64(((h >> shift) * width) >> shift)
            j += 1
            for order in range(2, max_ngram + 1):
                if t + order - 1 >= end:
                    break
                h = (h * _BIGRAM_MULT) ^ token_hash[t + order - 1]
                buckets[j] = np.int64(((h >> shift) * width) >> shift)
                j += 1
    return buckets, offsets


_DROP, _KEEP, _BLANK = 0, 1, 2  # dedup's classes: punctuation and symbols, kept, white space


@numba.njit(nogil=True, cache=True)
def normalised_hashes_compiled(data, offsets, lowered, klass):
    """(hashes, lengths): for each text ``data[offsets[i]:offsets[i+1]]`` (valid UTF-8, already
    NFKC), ``hash_strings`` of its normalised form and that form's length in bytes. A code point
    c is lower-cased to ``lowered[c]`` and, by ``klass[c]``, dropped, kept or white space."""
    n_docs = len(offsets) - 1
    hashes = np.empty(n_docs, dtype=np.uint64)
    lengths = np.zeros(n_docs, dtype=np.int64)
    one = np.uint64(1)
    for d in range(n_docs):
        i = offsets[d]
        end = offsets[d + 1]
        total = np.uint64(0)
        power = one
        length = 0
        blank = False  # white space seen since the last kept character (one space, if more follows)
        while i < end:
            cp, i = _decode(data, i)
            k = klass[cp]
            if k == _DROP:
                continue
            if k == _BLANK:
                blank = length > 0  # none before the first kept character: trimmed
                continue
            if blank:
                total, power, length = _fold(0x20, total, power, length)
                blank = False
            low = np.int64(lowered[cp])
            total, power, length = _fold(low, total, power, length)
        hashes[d] = _splitmix64(np.uint64(length) ^ total)
        lengths[d] = length
    return hashes, lengths


@numba.njit(nogil=True, cache=True)
def texts_holding_compiled(data, offsets, table):
    """Whether each text ``data[offsets[i]:offsets[i+1]]`` holds a code point c with ``table[c]``
    (ASCII bytes are passed over undecoded)."""
    n_docs = len(offsets) - 1
    holds = np.zeros(n_docs, dtype=np.bool_)
    for d in range(n_docs):
        i = offsets[d]
        end = offsets[d + 1]
        while i < end:
            if data[i] < 0x80:
                i += 1
                continue
            cp, i = _decode(data, i)
            if table[cp]:
                holds[d] = True
                break
    return holds


@numba.njit(nogil=True, cache=True)
def document_frequencies_compiled(buckets, offsets, running, num_buckets):
    """How many of the documents where ``running`` hold each bucket (at least once): a bucket
    counts for a document the first time it is met there (``last`` remembers where it was)."""
    df = np.zeros(num_buckets, dtype=np.int64)
    last = np.full(num_buckets, -1, dtype=np.int64)
    for d in range(len(offsets) - 1):
        if not running[d]:
            continue
        for j in range(offsets[d], offsets[d + 1]):
            b = buckets[j]
            if last[b] != d:
                last[b] = d
                df[b] += 1
    return df


@numba.njit(nogil=True, cache=True)
def column_counts_compiled(buckets, offsets, num_buckets):
    """The documents' bucket counts as the columns of a sparse matrix (CSC): (indptr, rows,
    counts), each column's rows ascending, what ``scipy.sparse`` makes with ``sum_duplicates``
    and ``tocsc`` but with no sort: a bucket's first occurrence in a document takes a slot
    (``last`` remembers where), later ones add to it; then one counting pass places the slots
    by column, in document order."""
    slots = len(buckets)
    last = np.full(num_buckets, -1, dtype=np.int64)
    slot = np.zeros(num_buckets, dtype=np.int64)
    rows = np.empty(slots, dtype=np.int64)
    cols = np.empty(slots, dtype=np.int64)
    counts = np.empty(slots, dtype=np.float32)
    k = 0
    for d in range(len(offsets) - 1):
        for j in range(offsets[d], offsets[d + 1]):
            b = buckets[j]
            if last[b] != d:
                last[b] = d
                slot[b] = k
                rows[k], cols[k], counts[k] = d, b, 1.0
                k += 1
            else:
                counts[slot[b]] += 1.0
    indptr = np.zeros(num_buckets + 1, dtype=np.int64)
    for q in range(k):
        indptr[cols[q] + 1] += 1
    for c in range(num_buckets):
        indptr[c + 1] += indptr[c]
    fill = indptr[:-1].copy()
    out_rows = np.empty(k, dtype=np.int64)
    out_counts = np.empty(k, dtype=np.float32)
    for q in range(k):
        at = fill[cols[q]]
        fill[cols[q]] += 1
        out_rows[at], out_counts[at] = rows[q], counts[q]
    return indptr, out_rows, out_counts


@numba.njit(nogil=True, cache=True)
def bucket_counts_compiled(buckets, num_buckets):
    """``np.bincount(buckets, minlength=num_buckets)`` without widening the ids to 64 bits first."""
    counts = np.zeros(num_buckets, dtype=np.int64)
    for b in buckets:
        counts[b] += 1
    return counts


@numba.njit(nogil=True, cache=True)
def _pairwise_sum(table, buckets, start, n):
    """numpy's pairwise sum (``DOUBLE_pairwise_sum``) of table[buckets[start:start + n]], in its
    order: under 8 terms one by one, up to 128 in 8 running sums, beyond that two halves."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += table[buckets[start + i]]
        return res
    if n <= 128:
        r0, r1 = table[buckets[start]], table[buckets[start + 1]]
        r2, r3 = table[buckets[start + 2]], table[buckets[start + 3]]
        r4, r5 = table[buckets[start + 4]], table[buckets[start + 5]]
        r6, r7 = table[buckets[start + 6]], table[buckets[start + 7]]
        i = 8
        stop = n - n % 8
        while i < stop:
            r0 += table[buckets[start + i]]
            r1 += table[buckets[start + i + 1]]
            r2 += table[buckets[start + i + 2]]
            r3 += table[buckets[start + i + 3]]
            r4 += table[buckets[start + i + 4]]
            r5 += table[buckets[start + i + 5]]
            r6 += table[buckets[start + i + 6]]
            r7 += table[buckets[start + i + 7]]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += table[buckets[start + i]]
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(table, buckets, start, half) + _pairwise_sum(table, buckets, start + half, n - half)


@numba.njit(nogil=True, cache=True)
def document_sums_compiled(table, buckets, offsets):
    """Σ table[b] over each document's buckets, bit for bit as ``np.add.reduceat(table[buckets],
    starts)`` sums them (the first term, then numpy's pairwise sum of the rest), without making
    the gathered array; 0 for a document without buckets."""
    n_docs = len(offsets) - 1
    out = np.zeros(n_docs, dtype=np.float64)
    for d in range(n_docs):
        start, end = offsets[d], offsets[d + 1]
        if end > start:
            out[d] = table[buckets[start]] + _pairwise_sum(table, buckets, start + 1, end - start - 1)
    return out
