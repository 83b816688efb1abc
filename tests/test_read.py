"""Every input format gives the same documents, and ranges split a file without loss."""

from __future__ import annotations

import gzip
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.io.read import ReadTask, _read_line_blocks, expand_input
from conftest import demo_records, make_config, write_jsonl


def _ids(out):
    return sorted(r[0] for r in duckdb.connect().execute(f"SELECT id FROM '{out}/scores/*.parquet'").fetchall())


@pytest.fixture(scope="module")
def records():
    return demo_records(150)


def _write_format(d, fmt, records):
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    if fmt == "jsonl.gz":
        (d / "p.jsonl.gz").write_bytes(gzip.compress(lines))
    elif fmt == "jsonl.zst":
        (d / "p.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "parquet":
        half = len(records) // 2
        pq.write_table(pa.Table.from_pylist(records[:half]), d / "p-0.parquet")
        pq.write_table(pa.Table.from_pylist(records[half:]), d / "p-1.parquet")
    elif fmt == "hf":
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(d / "hfds"))
        return d / "hfds"
    return d / {"jsonl.gz": "p.jsonl.gz", "jsonl.zst": "p.jsonl.zst", "parquet": "p-*.parquet"}[fmt]


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet", "hf"])
def test_formats_read_the_same_documents(tmp_path, small_corpus, records, fmt):
    path = _write_format(tmp_path, fmt, records)
    cfg = make_config(tmp_path, path, small_corpus["target"], select={"k": 10})
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    assert manifest["counts"]["input_records"] == len(records)
    assert _ids(tmp_path / "out") == sorted(r["id"] for r in records)
    sources = duckdb.connect().execute(f"SELECT DISTINCT source FROM '{tmp_path}/out/selected/*.parquet'").fetchall()
    assert sources  # input fields travel to selected/


def test_txt_per_line_and_per_file(tmp_path, small_corpus):
    lines = ["first document line", "", "second document line", "third"]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text("a whole file\nas one document\n")
    for mode, expected in (("line", 3 + 2), ("file", 2)):
        cfg = make_config(
            tmp_path,
            tmp_path / "*.txt",
            small_corpus["target"],
            select={"k": 1},
            input={"txt_mode": mode, "id_field": None},
            dsir={"min_tokens": 0},
        )
        manifest = run_selection(load_config(str(cfg)), overwrite=True)
        assert manifest["counts"]["input_records"] == expected, mode


def _lines_of_ranges(path, size, split, max_lines, chunk, equal=False, sizes=None):
    got = []
    for start in range(0, size, split):
        task = ReadTask(0, str(path), "jsonl", start, min(start + split, size))
        blocks = list(_read_line_blocks(task, max_lines, chunk=chunk, equal=equal))
        for block, starts, ends, positions in blocks:
            got += [(int(p), block[s:e].rstrip(b"\r")) for s, e, p in zip(starts, ends, positions)]
        if sizes is not None:
            sizes.append([len(starts) for _, starts, _, _ in blocks])
    return got


def test_byte_ranges_cover_every_line_once(tmp_path, records):
    path = write_jsonl(tmp_path / "p.jsonl", records, [b"", b"  ", b'{"id": "crlf"}\r', b"tail without newline"])
    data = path.read_bytes()[:-1]  # the last line really ends without a newline
    path.write_bytes(data)
    # The oracle: every line of the file with the byte offset it starts at.
    whole, offset = [], 0
    for line in data.split(b"\n"):
        whole.append((offset, line.rstrip(b"\r")))
        offset += len(line) + 1
    for split, max_lines, chunk in ((len(data), 7, 1000), (997, 3, 1000), (4096, 1000, 1 << 20), (50_000, 64, 1000)):
        assert _lines_of_ranges(path, len(data), split, max_lines, chunk) == whole, (split, max_lines)
        # Read whole and cut into equal batches: the same lines, in the fewest batches of at
        # most max_lines, no two batches of a range more than a line apart
        sizes = []
        assert _lines_of_ranges(path, len(data), split, max_lines, chunk, True, sizes) == whole, (split, max_lines)
        for batches in sizes:
            assert not batches or (max(batches) <= max_lines and max(batches) - min(batches) <= 1), batches
            assert len(batches) == -(-sum(batches) // max_lines)
    assert whole[-1][1] == b"tail without newline"
    # 154 lines in batches of at most 64: 51 + 51 + 52, not 64 + 64 + 26
    sizes = []
    _lines_of_ranges(path, len(data), len(data), 64, 1000, True, sizes)
    assert sizes == [[51, 51, 52]]


def test_no_matching_files(tmp_path):
    from beamsift.transforms.io.read import InputError

    with pytest.raises(InputError, match="input.path .*: no files match"):
        expand_input(str(tmp_path / "*.jsonl"), "auto")


def test_fast_and_record_paths_give_the_same_table(tmp_path, records):
    from beamsift.transforms.io.read import InputSpec, ReadDocumentBatches

    spec = InputSpec("text", "id", "line", 4096, 1 << 20)
    fn = ReadDocumentBatches(spec, "pool")
    task = ReadTask(0, "p.jsonl", "jsonl")
    batches = [
        records[:50]
        + [
            {"id": "a", "text": "mixed number types", "n": 1, "x": None, "text_note": "t"},
            {"id": "s", "text": "and a reserved name", "n": 2.5, "selected": True, "x": None},
        ],
        [{"id": 7, "text": "an integer id"}, {"id": 8, "text": "another one"}],
    ]
    for rows in batches:
        lines = [json.dumps(r).encode() for r in rows]
        positions = list(range(len(lines)))
        fast = fn._parse_clean_jsonl(task, b"\n".join(lines), positions)
        assert fast is not None  # the batch is clean: Arrow's parser takes it
        # A malformed line sends the whole batch down the record-by-record path.
        slow, rejects = fn._parse_lines(task, lines + [b"{oops"], positions + [10**6])
        assert [r["reason"].split(":")[0] for r in rejects] == ["malformed JSON"]
        assert fast.schema == slow.schema
        assert fast.to_pylist() == slow.to_pylist()
    first = fn._parse_clean_jsonl(task, b"\n".join(json.dumps(r).encode() for r in batches[0]), list(range(52)))
    assert "input_selected" in first.column_names and first.column("n").type == pa.float64()
    assert fast.column("id").to_pylist() == [7, 8]  # integer ids stay integers


def test_an_input_field_named_text_does_not_replace_the_document(tmp_path, small_corpus):
    path = write_jsonl(tmp_path / "p.jsonl", [{"body": "the real document " * 30, "text": "a field"}])
    cfg = make_config(
        tmp_path, path, small_corpus["target"], select={"k": 1}, input={"text_field": "body", "id_field": None}
    )
    run_selection(load_config(str(cfg)), overwrite=True)
    # The text keeps its input name; the other field keeps its own: nothing collides.
    row = duckdb.connect().execute(f"SELECT body, text FROM '{tmp_path}/out/selected/*.parquet'").fetchone()
    assert row == ("the real document " * 30, "a field")


def _cached_pages(path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file): mincore(2) over a mapping of it."""
    import ctypes
    import mmap
    import os

    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pages = -(-len(m) // mmap.PAGESIZE)
        flags = (ctypes.c_ubyte * pages)()
        view = np.frombuffer(m, np.uint8)
        assert ctypes.CDLL(None).mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(len(m)), flags) == 0
        del view
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_NORMAL)
    return sum(b & 1 for b in flags), pages


def test_a_read_input_gives_its_page_cache_back(tmp_path, records):
    """The bytes a range was read from are not kept cached (the later stages' memory), and the lines
    read are the same as ever (test_byte_ranges_cover_every_line_once reads through the same code)."""
    import os

    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": f"document {i} " * 40}).encode() for i in range(12_000)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # clean pages: only dirty ones stay cached after DONTNEED
        while f.read(1 << 20):  # all of it in the page cache
            pass
    cached, pages = _cached_pages(path)
    probe = tmp_path / "probe"
    probe.write_bytes(b"x" * (1 << 20))
    with open(probe, "rb") as f:
        os.fsync(f.fileno())
        f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if cached < pages // 2 or _cached_pages(probe)[0]:
        pytest.skip("this file system does not keep files cached, or keeps them whatever it is told (tmpfs)")
    size = path.stat().st_size

    def read(once: bool) -> list:
        got = []
        for start in range(0, size, size // 3 + 1):  # three ranges, as three workers read them
            task = ReadTask(0, str(path), "jsonl", start, min(start + size // 3 + 1, size), read_once=once)
            for block, starts, ends, _ in _read_line_blocks(task, 1000, equal=True):
                got += [block[s:e] for s, e in zip(starts, ends)]
        return got

    assert read(False) == lines
    assert _cached_pages(path)[0] >= cached  # a small input stays cached for the next run
    assert read(True) == lines
    left, _ = _cached_pages(path)
    assert left <= 3, f"{left} of {pages} pages still cached after the read"


def test_only_an_input_large_for_the_machine_is_read_once(tmp_path, monkeypatch):
    from beamsift.transforms.io import read

    files = [(str(tmp_path / "a.jsonl"), "jsonl", 700), (str(tmp_path / "b.jsonl.gz"), "jsonl.gz", 400)]
    monkeypatch.setattr(read, "_memory_bytes", lambda: 16 * 1100)
    assert {t.read_once for t in read.plan_read_tasks(files, split_bytes=300)} == {True}
    monkeypatch.setattr(read, "_memory_bytes", lambda: 16 * 1101)
    assert {t.read_once for t in read.plan_read_tasks(files, split_bytes=300)} == {False}
    monkeypatch.setattr(read, "_memory_bytes", lambda: 0)  # not known: kept cached
    assert {t.read_once for t in read.plan_read_tasks(files, split_bytes=300)} == {False}
