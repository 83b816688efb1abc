"""Hashed n-gram features, vectorised over a batch of documents.

DSIR (Xie et al. 2023, arXiv:2302.03169) represents a document by the counts of its hashed
unigrams and bigrams of lower-cased word tokens. The reference implementation tokenises with
nltk's WordPunct pattern (``\\w+|[^\\w\\s]+``) and hashes every n-gram with sha256 in Python,
which is 63% of its run time. Here the whole batch is tokenised and hashed in C++ (Arrow's RE2
kernels) and numpy: no Python object is made per token. Any well-mixed hash gives the same
quality; bucket collisions, not the hash function, matter (Xie et al. 2023, section 3: hashed
n-gram features).

A document's features are kept as the flat sequence of its n-gram bucket ids (one per n-gram
occurrence). From it every count we need is one ``np.bincount``: the fitted distributions sum
counts over documents, a log importance weight is a sum of per-bucket log ratios over the
sequence, and a subset's distribution is a bincount over the subset's sequences.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.transforms.window import GlobalWindows
from beamsift.transforms.chain.meter import MeteredDoFn, StageMeter
from beamsift.transforms.io.schema import BUCKETS, ID_HASH, N_TOKENS, TEXT, one_array

# nltk's WordPunctTokenizer is \w+|[^\w\s]+: runs of word characters, or runs of other
# non-space characters.

_POLY = np.uint64(0x100000001B3)  # FNV prime: odd, so multiplication is invertible mod 2^64
_BIGRAM_MULT = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective, well-mixing map of uint64 to uint64."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def hash_strings(strings: pa.Array) -> np.ndarray:
    """A stable 64-bit hash of each string of an Arrow string array, computed in numpy.

    h = splitmix64(len ^ Σ_i (b_i + 1)·P^i mod 2^64) over the UTF-8 bytes b_i. Stable across
    processes, machines and runs (Python's ``hash`` is salted per process, so it cannot be used).
    """
    data, offsets = string_bytes(strings)
    return _hash_segments(data, offsets)


def string_bytes(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of an Arrow string array and its offsets into them (from 0), zero-copy."""
    strings = pc.cast(strings, pa.large_string()) if strings.type != pa.large_string() else strings
    strings = one_array(strings)
    n = len(strings)
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[strings.offset : strings.offset + n + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return data[offsets[0] : offsets[-1]], offsets - offsets[0]


def _hash_segments(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``hash_strings`` of the byte strings ``data[offsets[i]:offsets[i+1]]``."""
    lengths = np.diff(offsets)
    out = lengths.astype(np.uint64)
    if len(data):
        nonempty = lengths > 0
        starts = offsets[:-1]
        # Position of each byte inside its string, for the polynomial's power.
        position = np.arange(len(data)) - np.repeat(starts, lengths)
        powers = _powers(int(lengths.max()))
        with np.errstate(over="ignore"):
            terms = (data.astype(np.uint64) + np.uint64(1)) * powers[position]
            sums = np.add.reduceat(terms, starts[nonempty])
        out[nonempty] ^= sums
    return splitmix64(out)


def _powers(n: int) -> np.ndarray:
    powers = np.empty(max(n, 1), dtype=np.uint64)
    powers[0] = 1
    with np.errstate(over="ignore"):
        # Doubling fill: log2(n) vectorised steps instead of n scalar ones.
        filled = 1
        while filled < n:
            step = min(filled, n - filled)
            powers[filled : filled + step] = powers[:step] * (powers[filled - 1] * _POLY)
            filled += step
    return powers


def token_hashes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the lower-cased WordPunct tokens of each text, and each text's token offsets.

    The texts are split at ASCII white space (one Arrow kernel) and the batch's distinct words
    are tokenised once each: WordPunct's tokens are the runs of word characters (\\w) and the
    runs of other characters but white space, so their bounds come from one vectorised pass
    over the words' bytes, classified by code point, and each token is hashed where it lies.
    The rest of Python's white space (NBSP, em space, \\x1c-\\x1f...) is classified there too:
    UTF-8 never puts an ASCII byte inside a longer character, so the ASCII split is safe for
    any text, and ~2x as fast as Arrow's Unicode one. Tokens are never Python objects.
    """
    texts = one_array(texts)
    words = pc.ascii_split_whitespace(texts)
    word_offsets = np.asarray(words.offsets, dtype=np.int64)
    word_offsets = word_offsets - word_offsets[0]
    encoded = pc.dictionary_encode(words.flatten())
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    # Lower-case the distinct words, not the text: the same tokens, a fraction of the work.
    # ("The" and "the" stay two entries, with the same hashes.)
    data, vocab_offsets = string_bytes(_lower(encoded.dictionary))
    # A run starts at each word's first byte and wherever the class (word, space, other)
    # changes; a character's continuation bytes share its class, so no cut falls inside one.
    kind = _byte_kinds(data)
    cut = np.empty(len(data), dtype=bool)
    if len(data):
        cut[0] = True
        np.not_equal(kind[1:], kind[:-1], out=cut[1:])
        cut[vocab_offsets[:-1][np.diff(vocab_offsets) > 0]] = True  # (Arrow's split can give "")
    run_offsets = np.append(np.flatnonzero(cut), len(data))
    is_token = kind[run_offsets[:-1]] != _SPACE
    piece_hash = _hash_segments(data, run_offsets)[is_token]
    # Tokens of each vocabulary word, laid out word after word.
    tokens_before = np.zeros(len(is_token) + 1, dtype=np.int64)
    np.cumsum(is_token, out=tokens_before[1:])
    first_piece = tokens_before[np.searchsorted(run_offsets, vocab_offsets)]
    pieces_per_word = np.diff(first_piece)
    # Expand every word occurrence to its tokens.
    word_vocab_idx = np.asarray(encoded.indices, dtype=np.int64)
    counts = pieces_per_word[word_vocab_idx]
    hashes = piece_hash[_ranges(first_piece[word_vocab_idx], counts)]
    token_end = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=token_end[1:])
    return hashes, token_end[word_offsets]


def _lower(words: pa.Array) -> pa.Array:
    """``str.lower()`` of each word, as the reference lower-cases. ASCII words in Arrow; the
    others in Python, because Arrow's Unicode lower-casing is not Python's: "İ" becomes "i"
    (Python: "i̇", two characters), a word-final "Σ" becomes "σ" (Python: "ς"), and Arrow's
    Unicode tables are newer than some Pythons'. Only the batch's distinct words go through it."""
    other = pc.invert(pc.string_is_ascii(words))
    lowered = pc.ascii_lower(words)
    if not pc.any(other).as_py():
        return lowered
    fixed = [w.lower() for w in words.filter(other).to_pylist()]
    return pc.replace_with_mask(lowered, other, pa.array(fixed, lowered.type))


_OTHER, _WORDCHAR, _SPACE = 0, 1, 2


@functools.cache
def _code_point_kinds() -> np.ndarray:
    """``table[c]``: whether code point c is a word character (\\w), white space (\\s) or
    other to Python's ``re``, as WordPunct's pattern sees them. Python's \\w is ``isalnum()``
    (letters and numbers of every script) and "_", its \\s is ``isspace()``; numpy's string
    functions ask the running Python's Unicode tables the same questions for every code point
    at once (0.02 s)."""
    chars = np.arange(0x110000, dtype=np.uint32).view("<U1")
    table = np.where(np.char.isalnum(chars), _WORDCHAR, np.where(np.char.isspace(chars), _SPACE, _OTHER))
    table[ord("_")] = _WORDCHAR
    return table.astype(np.int8)


_SPECIAL = (0x130, 0x3A3)  # "İ" and "Σ": str.lower() gives two characters, or one by context


@functools.cache
def _lower_tables() -> tuple[np.ndarray, np.ndarray]:
    """(lowered, kind) for every code point c: ``ord(chr(c).lower())`` (-1 for the two code
    points whose lower case is not one fixed code point) and the kind of that lower-cased
    character, as the compiled tokeniser reads them. Only upper- and title-case characters
    change under ``str.lower`` (~2,000 code points; a test checks every one): Python lower-cases
    those (0.02 s, once a process)."""
    chars = np.arange(0x110000, dtype=np.uint32).view("<U1")
    lowered = np.arange(0x110000, dtype=np.int32)
    for c in np.flatnonzero(np.char.isupper(chars) | np.char.istitle(chars)):
        low = chr(c).lower()
        lowered[c] = ord(low) if len(low) == 1 else -1
    lowered[list(_SPECIAL)] = -1
    kind = _code_point_kinds()[np.maximum(lowered, 0)]
    return lowered, kind


@functools.cache
def _single_byte_kinds() -> np.ndarray:
    """The kind of each byte value as a character of its own: ASCII's from the table, and
    "other" for the bytes of longer characters (``_byte_kinds`` sets those)."""
    return np.concatenate([_code_point_kinds()[:128], np.full(128, _OTHER, dtype=np.int8)])


def code_points_at(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The code point of the character of valid UTF-8 ``data`` that starts at each of ``at``."""

    def byte(k):  # clipped at the end: only a shorter character reads past it, and ignores it
        return np.take(data, at + k, mode="clip").astype(np.int32)

    b0 = byte(0)
    b1, b2, b3 = byte(1) & 0x3F, byte(2) & 0x3F, byte(3) & 0x3F
    return np.select(
        [b0 < 0x80, b0 < 0xE0, b0 < 0xF0],
        [b0, ((b0 & 0x1F) << 6) | b1, ((b0 & 0x0F) << 12) | (b1 << 6) | b2],
        ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3,
    )


def _byte_kinds(data: np.ndarray) -> np.ndarray:
    """The kind (word character, white space, other) of the character each byte of valid UTF-8
    ``data`` belongs to."""
    kind = _single_byte_kinds()[data]  # "other" for every byte of a longer character, set below
    high = np.flatnonzero(data >= 0x80)
    if len(high) == 0:
        return kind
    # Decode the code point at each character's lead byte (0b11xxxxxx) from the bytes after it.
    is_lead = data[high] >= 0xC0
    code = code_points_at(data, high[is_lead])
    # A continuation byte follows its lead byte among the high bytes: it takes the lead's kind.
    kind[high] = _code_point_kinds()[code][np.cumsum(is_lead) - 1]
    return kind


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    total = int(lengths.sum())
    if total == len(lengths):  # all ones: the common case, skip the arithmetic
        return starts.astype(np.int64, copy=False)
    out_start = np.cumsum(lengths) - lengths
    return np.repeat(starts - out_start, lengths) + np.arange(total)


@dataclass(frozen=True)
class NgramFeatures:
    """Hashed n-grams of a batch of documents.

    ``buckets[offsets[i]:offsets[i+1]]`` are document i's n-gram bucket ids; ``n_tokens[i]``
    counts its word tokens.
    """

    buckets: np.ndarray  # int64, one per n-gram occurrence
    offsets: np.ndarray  # int64, len = n_docs + 1
    n_tokens: np.ndarray  # int64, len = n_docs

    @property
    def n_ngrams(self) -> np.ndarray:
        return np.diff(self.offsets)


# Documents featurized at a time. Measured on 2 cores: 1,024 keeps the working arrays in cache
# and gives ~1.5x the throughput of 4,096 when two workers featurize at once.
CHUNK_DOCS = 1024


def hashed_ngram_features(
    texts: pa.Array, num_buckets: int, max_ngram: int = 2, executor: Executor | None = None
) -> NgramFeatures:
    """Each document's n-grams of order 1..max_ngram (within the document), hashed into buckets.

    ``executor``: a thread pool to featurize the chunks of a batch on. The work is compiled
    loops, Arrow kernels and numpy, which let go of the GIL: the chunks featurize on every core.

    A batch of more than a chunk is featurized by the compiled kernels (``ngram_kernels``),
    4-5x as fast as numpy; a smaller one (a target, a test) by the numpy path, which gives the
    same features bit for bit and saves a small run the kernels' load (~0.4 s, once a process).
    """
    featurize = _numpy_ngram_features
    if len(texts) > CHUNK_DOCS and (kernels := compiled_kernels()) is not None:
        featurize = functools.partial(_compiled_ngram_features, kernels)
    if len(texts) <= CHUNK_DOCS:
        return featurize(texts, num_buckets, max_ngram)
    chunks = [texts.slice(start, CHUNK_DOCS) for start in range(0, len(texts), CHUNK_DOCS)]

    def one(chunk):
        return featurize(chunk, num_buckets, max_ngram)

    parts = list(executor.map(one, chunks) if executor is not None else map(one, chunks))
    n_ngrams = np.concatenate([p.n_ngrams for p in parts])
    offsets = np.zeros(len(n_ngrams) + 1, dtype=np.int64)
    np.cumsum(n_ngrams, out=offsets[1:])
    return NgramFeatures(
        buckets=np.concatenate([p.buckets for p in parts]),
        offsets=offsets,
        n_tokens=np.concatenate([p.n_tokens for p in parts]),
    )


_KERNELS_LOADING = threading.Lock()  # one load a process, whichever thread asks first


def compiled_kernels():
    """``ngram_kernels``, loaded and warm in this process (once); None where numba cannot load
    them (said once in the log: the numpy path featurizes alone)."""
    with _KERNELS_LOADING:
        return _load_kernels()


@functools.cache
def _load_kernels():
    try:
        import numba.np.linalg
        from beamsift.transforms import ngram_kernels

        # The first call loads the machine code that numba cached on disk (or compiles it,
        # ~2 s, once a machine): made here, with the argument types of every later call. On it
        # numba loads its numpy support, which looks for a BLAS by importing scipy.linalg
        # (0.15 s) where scipy is installed; the kernels use none, so it is told there is none.
        ensure_blas = getattr(numba.np.linalg, "ensure_blas", None)
        numba.np.linalg.ensure_blas = _no_blas
        try:
            data = np.frombuffer(b"Warm up, once.", dtype=np.uint8)
            hashes, offsets, _ = _compiled_token_hashes(ngram_kernels, data, np.array([0, len(data)], np.int64))
            ngram_kernels.ngram_buckets_compiled(hashes, offsets, 2, 16)
        finally:
            if ensure_blas is not None:
                numba.np.linalg.ensure_blas = ensure_blas
        return ngram_kernels
    except Exception as e:
        logging.getLogger(__name__).warning("the compiled n-gram kernels cannot load (%s); featurizing with numpy", e)
        return None


def loaded_kernels():
    """The compiled kernels where this process has loaded them already, else None: for work
    that gains from them only where featurizing has paid their load."""
    return compiled_kernels() if _load_kernels.cache_info().currsize else None


def load_kernels_meanwhile() -> None:
    """Start loading the compiled kernels on a thread of their own (~0.5 s: numba's import and
    the cached machine code) while this process does other work, for a process that featurizes
    later (a local runner in this process)."""
    threading.Thread(target=compiled_kernels, name="load-kernels", daemon=True).start()


def _no_blas():
    raise ImportError("no BLAS: beamsift's compiled kernels need none")


def kernel_text(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch's UTF-8 bytes (read-only) and int64 offsets, as every compiled text loop takes
    them: the same argument types on every call, or numba compiles the loop again for new ones."""
    data = data.view()
    data.flags.writeable = False
    return data, np.array(offsets, dtype=np.int64)


def cores_of_this_process() -> int:
    """The cores this process may keep busy: its share where a local runner sized its workers'
    math pools (``OMP_NUM_THREADS``, set for each worker process to cores / workers unless the
    user set it), else every core of the machine."""
    try:
        share = int(os.environ.get("OMP_NUM_THREADS", "0"))
    except ValueError:
        share = 0
    return max(1, min(share, os.cpu_count() or 1) if share > 0 else os.cpu_count() or 1)


def over_parts(work, n: int) -> list:
    """``work(lo, hi)`` for parts of ``range(n)`` that together cover it, in order, each on a
    thread of this process's cores (up to 4, parts of 512 documents or more): for work that lets
    go of the GIL (compiled loops, scipy's products) and whose rows are each their own."""
    threads = min(cores_of_this_process(), 4, max(1, n // 512))
    if threads == 1:
        return [work(0, n)]
    bounds = np.linspace(0, n, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, bounds[:-1], bounds[1:]))


def over_cores(kernel, data: np.ndarray, offsets: np.ndarray, *args):
    """``kernel(data, offsets, *args)``, a compiled loop over documents, ``over_parts``: each
    document's results are its own, so the parts' results end to end are the one call's."""
    parts = over_parts(lambda lo, hi: kernel(data, offsets[lo : hi + 1], *args), len(offsets) - 1)
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(columns) for columns in zip(*parts))
    return np.concatenate(parts)


def _compiled_token_hashes(kernels, data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lowered, kind = _lower_tables()
    return kernels.token_hashes_compiled(*kernel_text(data, offsets), lowered, kind)


def compiled_token_hashes(texts: pa.Array, kernels=None) -> tuple[np.ndarray, np.ndarray]:
    """``token_hashes`` in one compiled pass (``ngram_kernels``); a document holding "İ" or "Σ"
    is tokenised the numpy way, whose lower-casing is Python's own."""
    kernels = kernels or compiled_kernels()
    texts = one_array(texts)
    data, offsets = string_bytes(texts)
    hashes, token_offsets, special = _compiled_token_hashes(kernels, data, offsets)
    if not special.any():
        return hashes, token_offsets
    docs = np.flatnonzero(special)
    fixed, fixed_offsets = token_hashes(texts.take(pa.array(docs)))
    counts = np.diff(token_offsets)
    counts[docs] = np.diff(fixed_offsets)
    out_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out_offsets[1:])
    out = np.empty(out_offsets[-1], dtype=np.uint64)
    keep = np.flatnonzero(~special)
    out[_ranges(out_offsets[keep], counts[keep])] = hashes[_ranges(token_offsets[keep], counts[keep])]
    out[_ranges(out_offsets[docs], counts[docs])] = fixed
    return out, out_offsets


def _compiled_ngram_features(kernels, texts: pa.Array, num_buckets: int, max_ngram: int) -> NgramFeatures:
    token_hash, token_offsets = compiled_token_hashes(texts, kernels)
    buckets, offsets = kernels.ngram_buckets_compiled(token_hash, token_offsets, max_ngram, num_buckets)
    return NgramFeatures(buckets=buckets, offsets=offsets, n_tokens=np.diff(token_offsets))


def _numpy_ngram_features(texts: pa.Array, num_buckets: int, max_ngram: int) -> NgramFeatures:
    token_hash, token_offsets = token_hashes(texts)
    n_tokens = np.diff(token_offsets)
    total = len(token_hash)
    # Column j of `grams` holds the hash of the (j+1)-gram that starts at each token; an n-gram
    # exists where the document has n-1 more tokens after its start.
    grams = np.empty((total, max_ngram), dtype=np.uint64)
    valid = np.ones((total, max_ngram), dtype=bool)
    grams[:, 0] = token_hash
    ends = token_offsets[1:]
    h = token_hash
    with np.errstate(over="ignore"):
        for order in range(2, max_ngram + 1):
            nxt = np.zeros(total, dtype=np.uint64)
            nxt[: total - order + 1] = token_hash[order - 1 :]
            # Token hashes are splitmix outputs: a multiply-xor chains them into an n-gram hash
            # whose top bits (the ones the bucket is taken from) depend on every token.
            h = (h * _BIGRAM_MULT) ^ nxt
            grams[:, order - 1] = h
            for back in range(1, order):  # the last order-1 tokens of a document start none
                has = n_tokens >= back
                valid[ends[has] - back, order - 1] = False
    # Row-major order keeps each document's n-grams together. The bucket is taken from the top
    # 32 bits by multiply-shift (Lemire), several times faster than a 64-bit modulo.
    kept = grams.ravel()[valid.ravel()]
    buckets = (((kept >> np.uint64(32)) * np.uint64(num_buckets)) >> np.uint64(32)).astype(np.int64)
    per_doc = np.zeros(len(n_tokens), dtype=np.int64)
    for order in range(1, max_ngram + 1):
        per_doc += np.maximum(n_tokens - (order - 1), 0)
    offsets = np.zeros(len(n_tokens) + 1, dtype=np.int64)
    np.cumsum(per_doc, out=offsets[1:])
    return NgramFeatures(buckets=buckets, offsets=offsets, n_tokens=n_tokens)


def bucket_counts(features: NgramFeatures, num_buckets: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Total count of each bucket over the documents (all, or those where ``rows`` is True)."""
    buckets = features.buckets
    if rows is not None and not rows.all():
        chosen = np.flatnonzero(rows)
        # Gather the chosen documents' ranges: cheap when few are chosen (a selection).
        buckets = buckets[_ranges(features.offsets[chosen], features.n_ngrams[chosen])]
    kernels = loaded_kernels()
    if kernels is not None and len(buckets) and buckets.dtype in (np.uint16, np.uint32, np.int64):
        return kernels.bucket_counts_compiled(buckets, num_buckets)  # 2.3x np.bincount on uint16
    return np.bincount(buckets, minlength=num_buckets).astype(np.int64)


def features_to_arrow(features: NgramFeatures, num_buckets: int) -> pa.ListArray:
    """Per-document bucket ids as an Arrow list column (2 bytes an n-gram for <= 65,536 buckets)."""
    values = pa.array(features.buckets.astype(np.uint16 if num_buckets <= 2**16 else np.uint32))
    return pa.LargeListArray.from_arrays(pa.array(features.offsets, pa.int64()), values)


def features_from_arrow(column: pa.ChunkedArray | pa.Array, n_tokens: np.ndarray, dtype=np.int64) -> NgramFeatures:
    """``dtype=None`` keeps the stored bucket ids (uint16 up to 65,536 buckets) without a copy:
    enough to count and to index with, where nothing else is done with them."""
    column = one_array(column)
    offsets = np.asarray(column.offsets, dtype=np.int64)
    buckets = np.asarray(column.values)[offsets[0] : offsets[-1]]
    if dtype is not None:
        buckets = buckets.astype(dtype)
    return NgramFeatures(buckets=buckets, offsets=offsets - offsets[0], n_tokens=np.asarray(n_tokens))


class FeaturizeHashedNgrams(MeteredDoFn):
    """Adds ``n_tokens``, the id hash and the hashed n-gram buckets to each batch of documents.

    ``threads``: how many of the worker's cores featurize a batch (the chunks of a batch run on
    a thread pool). A worker process per core (Dataflow's default, the local multi-process runner)
    wants 1; one process on a machine of n cores, n. With more than one, a batch is featurized in
    the background while the bundle's thread reads and parses the next and stages the one
    before (that work is single-threaded: overlapped, a 60,000-document multilingual DSIR run's
    read took 3.6 s -> 2.1 s on 2 cores); at most ``AHEAD`` batches wait.
    """

    AHEAD = 2

    def __init__(self, num_buckets: int, max_ngram: int, meter: StageMeter | None = None, threads: int = 1):
        self.num_buckets = num_buckets
        self.max_ngram = max_ngram
        self.meter = meter or StageMeter("featurize")
        self.threads = threads

    def setup(self):
        super().setup()
        self.executor = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        # The batches' own thread (it waits on the chunks' pool: one pool for both could deadlock).
        self.background = ThreadPoolExecutor(1) if self.threads > 1 else None

    def start_bundle(self):
        self.pending = collections.deque()

    def process(self, table: pa.Table):
        if self.background is None:
            yield self._recorded(*self._timed(table))
            return
        self.pending.append(self.background.submit(self._timed, table))
        while self.pending and (len(self.pending) > self.AHEAD or self.pending[0].done()):
            yield self._collect(self.pending.popleft())

    def finish_bundle(self):
        while self.pending:
            yield GlobalWindows.windowed_value(self._collect(self.pending.popleft()))
        super().finish_bundle()

    def teardown(self):
        for pool in (self.executor, self.background):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _featurize(self, table: pa.Table) -> pa.Table:
        features = hashed_ngram_features(table.column(TEXT), self.num_buckets, self.max_ngram, self.executor)
        table = table.append_column(ID_HASH, pa.array(hash_ids(table.column("id"))))
        table = table.append_column(N_TOKENS, pa.array(features.n_tokens.astype(np.int32)))
        return table.append_column(BUCKETS, features_to_arrow(features, self.num_buckets))

    def _timed(self, table: pa.Table):
        started = time.time()
        table = self._featurize(table)
        return table, started, time.time()

    def _collect(self, future) -> pa.Table:
        return self._recorded(*future.result())

    def _recorded(self, table: pa.Table, started: float, ended: float) -> pa.Table:
        self.meter.record(started, ended, docs=table.num_rows)
        return table


def hash_ids(ids) -> np.ndarray:
    """A stable 64-bit hash of each id: the key for de-duplication and the seeded noise.

    Integer ids are hashed as their decimal text, so 7 and "7" are the same id on every batch."""
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        ids = pc.cast(ids, pa.string())
    return hash_strings(ids)
