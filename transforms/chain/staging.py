"""Staging shards: each batch of featurized documents written once, read by the later passes.

DSIR needs the pool three times after reading it (fit the raw distribution, score and rank,
write the outputs), and each pass needs a global result of the one before. Beam's local
runners keep a PCollection that crosses such a barrier in memory, so instead of carrying the
documents across, each batch goes to an Arrow IPC shard under the run's ``_staging`` folder
(uncompressed on a local disk, LZ4 on an object store) and only the shard's path and a small
summary travel on. Later passes read just the columns they need.
Memory stays flat in the corpus size; the shards are deleted when the run succeeds.

Shard names come from the batch's first input position, so a retried bundle rewrites the same
file instead of adding a second copy.
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain.meter import NAMESPACE, STAGING_READ, MeteredDoFn, StageMeter
from beamsift.transforms.io.schema import ID_HASH, INTERNAL, N_TOKENS, ORDER, field_types


@dataclass(frozen=True)
class ShardRef:
    """A staging shard as the later passes see it: where it is and which input it holds."""

    path: str
    name: str
    num_rows: int
    min_order: int
    max_order: int


@dataclass(frozen=True)
class StagedShard:
    """What travels on from a staging shard: its path and what the global steps need of it."""

    ref: ShardRef
    fields: list  # [(name, arrow type as str)] of the input fields
    totals: object  # what the featurized documents add to the raw model (NgramTotals)


def shard_name(table: pa.Table) -> str:
    return f"part-{int(table.column(ORDER)[0].as_py()):016x}"


# Files are written in pieces of this size, never in one large write(): Linux (6.x) fills the page
# cache of a large write with large folios, and where the machine's free memory is handed back to
# its host (a VM with free page reporting: virtio-balloon, as on this project's 2-core VM) each
# fresh large folio waits on the host: 8 MB writes went at 110-160 MB/s once ~1 GB had been
# written, in pieces of 64-512 KB at 3.5-5 GB/s (1 MB pieces: 300 MB/s). A shard's 8 MB of
# embeddings then costs ~2 ms to write instead of ~55; elsewhere pieces cost a few syscalls.
WRITE_PIECE = 256 << 10


def write_in_pieces(f, data) -> None:
    """``data`` (bytes, a memoryview or an Arrow buffer) written to the open file ``f`` in
    ``WRITE_PIECE`` pieces (a raw file may write less than it is given: the rest follows)."""
    view = memoryview(data).cast("B")
    for start in range(0, len(view), WRITE_PIECE):
        piece = view[start : start + WRITE_PIECE]
        while len(piece):
            written = f.write(piece)
            piece = piece[len(piece) if written is None else written :]


class PieceWriter(io.RawIOBase):
    """A local file that Arrow's writers write to in ``WRITE_PIECE`` pieces (``pa.PythonFile``)."""

    def __init__(self, path: str):
        super().__init__()
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        write_in_pieces(self._file, data)
        return memoryview(data).nbytes

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def write_parquet(table: pa.Table, path: str) -> None:
    """Write a table through Beam's FileSystems (local, gs://, s3:// alike)."""
    buffer = io.BytesIO()
    if table.num_rows:
        pq.write_table(table, buffer, compression="zstd")
    else:  # no row group at all: readers that size their batches by the first one (datasets) choke on 0 rows
        pq.ParquetWriter(buffer, table.schema, compression="zstd").close()
    with FileSystems.create(path) as f:
        write_in_pieces(f, buffer.getbuffer())


def on_local_disk(path: str) -> bool:
    """Whether ``path`` is on Beam's local file system (not an object store)."""
    return FileSystems.get_filesystem(path).scheme() is None


def _beside(path: str) -> str:
    """Where a local file is written before it is renamed into place: a retried bundle's rewrite
    never changes the bytes under a reader that has the file open or memory-mapped (``_open``)."""
    return f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"


def matrix_column(matrix: np.ndarray) -> pa.FixedSizeBinaryArray:
    """A 2-D array as a column of one fixed-size binary value a row (the row's bytes), to stage
    beside other columns; ``column_matrix`` reads it back."""
    matrix = np.ascontiguousarray(matrix)
    width = matrix.shape[1] * matrix.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(matrix), [None, pa.py_buffer(matrix.tobytes())])


def column_matrix(column, dtype) -> np.ndarray:
    """A ``matrix_column`` column (an array, or a chunked one from a table) -> its (rows, width)
    array of ``dtype``: a view of the column's buffer, not a copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dtype = np.dtype(dtype)
    n, width = len(column), column.type.byte_width // dtype.itemsize
    values = np.frombuffer(column.buffers()[1], dtype, count=n * width, offset=column.offset * column.type.byte_width)
    return values.reshape(n, width)


def write_staging(table: pa.Table, path: str) -> None:
    """Staging shards are Arrow IPC files: written once and read three times soon after, they
    need no Parquet encoding (measured per 4,096 documents: 1.4 ms to write and ~0 to read
    uncompressed, 14 ms and 2 ms with lz4, against 45 ms and 12-23 ms a read for Parquet)."""
    # On local disk the shard stays in the page cache: compressing costs more than it saves.
    local = on_local_disk(path)
    options = pa.ipc.IpcWriteOptions(compression=None if local else "lz4")
    if local and os.path.isdir(os.path.dirname(path) or "."):  # a plain local path: straight to a file
        tmp = _beside(path)
        with (
            pa.PythonFile(PieceWriter(tmp), mode="w") as sink,
            pa.ipc.new_file(sink, table.schema, options=options) as writer,
        ):
            writer.write_table(table)
        os.replace(tmp, path)
        return
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    with FileSystems.create(path) as f:
        write_in_pieces(f, sink.getvalue())


def read_staging_batch(path: str, index: int) -> pa.RecordBatch:
    """One record batch of a staging file written with several (``write_staging`` of a table
    made of batches): only that batch's bytes are read."""
    with _open(path) as source:
        batch = pa.ipc.open_file(source).get_batch(index)
    _counted(path, pa.Table.from_batches([batch]))
    return batch


def read_staging_rows(path: str, rows: np.ndarray) -> pa.RecordBatch:
    """Some rows of a staging file of one record batch: on a local disk (memory-mapped) only
    their pages are touched, and only their bytes are counted as read."""
    with _open(path) as source:
        reader = pa.ipc.open_file(source)
        if reader.num_record_batches == 1:
            batch = reader.get_batch(0).take(pa.array(rows))
        else:
            batch = reader.read_all().combine_chunks().take(pa.array(rows)).to_batches()[0]
    _counted(path, pa.Table.from_batches([batch]))
    return batch


def write_row_runs(runs: list, path: str) -> np.ndarray:
    """Lists of row numbers, one after the other, as raw int32 in a local file -> where each
    starts (in rows): ``read_row_run`` reads one back with a single read. (An Arrow file of lists
    took ~0.2 ms to open and read for each list, SemDeDup's groups read ~15,000 at 1M documents.)"""
    values = np.concatenate(runs).astype("<i4") if runs else np.zeros(0, "<i4")
    tmp = _beside(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(tmp, "wb") as f:
        write_in_pieces(f, values.data)
    os.replace(tmp, path)
    return np.r_[0, np.cumsum([len(r) for r in runs])].astype(np.int64)


def read_row_run(path: str, start: int, count: int) -> np.ndarray:
    """The ``count`` row numbers from ``start`` of a file that ``write_row_runs`` wrote."""
    rows = np.fromfile(path, dtype="<i4", count=count, offset=4 * start).astype(np.int64)
    if len(rows) != count:
        raise OSError(f"{path} ends before rows {start}..{start + count} (a staging file cut short)")
    _counted_bytes(path, 4 * count)
    return rows


def remove_tables(staging_dir: str, tables: list[str], *_after) -> None:
    """Remove staging tables that no later step reads (``_staging/<table>/``), before the run's
    end removes the rest: the page cache and disk they held are free for the steps after.
    ``_after``: side inputs that order this after the last step that read them."""
    for table in tables:
        folder = FileSystems.join(staging_dir, table)
        if on_local_disk(folder):
            shutil.rmtree(folder, ignore_errors=True)
            continue
        # An object store has no folders: the objects under the prefix, one by one
        found = FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list
        if found:
            FileSystems.delete([m.path for m in found])


def read_id_hashes(path: str) -> np.ndarray:
    """A staged shard's id hashes (the key of every seeded draw)."""
    return np.asarray(read_staging(path, [ID_HASH]).column(0).combine_chunks(), np.uint64)


def read_orders(path: str) -> np.ndarray:
    """A staged shard's ``_order`` column: each document's place in the input."""
    return np.asarray(read_staging(path, [ORDER]).column(0).combine_chunks(), np.int64)


def rows_of(orders: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The row of each of ``wanted`` in a shard whose rows have ``orders`` (every one is there):
    what joins a table staged beside a shard, keyed by order, back to the shard's rows."""
    orders, wanted = np.asarray(orders, np.int64), np.asarray(wanted, np.int64)
    if np.all(orders[:-1] <= orders[1:]):  # staged in input order: no sort needed
        return np.searchsorted(orders, wanted)
    by_order = np.argsort(orders)
    return by_order[np.searchsorted(orders[by_order], wanted)]


def read_staging(path: str, columns: list[str] | None = None) -> pa.Table:
    """A staged shard, or only ``columns`` of it: the IPC file's footer says where each column's
    buffers are, and only those byte ranges are read (on an object store, only those are fetched),
    so a stage that scores n-grams never reads the texts."""
    with _open(path) as source:
        reader = pa.ipc.open_file(source)
        if columns is None:
            return _counted(path, reader.read_all())
        schema = reader.schema
        missing = [c for c in columns if schema.get_field_index(c) < 0]
        if missing:
            raise KeyError(f"{path} has no column {missing[0]!r}")
        if isinstance(source, pa.MemoryMappedFile):  # the columns not asked for are never touched
            table = reader.read_all()
        else:
            wanted = sorted({schema.get_field_index(c) for c in columns})
            options = pa.ipc.IpcReadOptions(included_fields=wanted)
            table = pa.ipc.open_file(source, options=options).read_all()
    return _counted(path, table.select(columns))


def _open(path: str):
    """A staging shard to read: memory-mapped where it is a local file, so that reading a column
    copies nothing and a row filter copies only the rows it keeps (the page cache holds the
    shard); through Beam's FileSystems elsewhere."""
    if on_local_disk(path):
        return pa.memory_map(path)
    return pa.PythonFile(FileSystems.open(path), mode="r")


def _counted(path: str, table: pa.Table) -> pa.Table:
    """Count the bytes of the columns read, by the staging table they come from (``docs``, a
    stage's name): the manifest's ``timings.staging_read_bytes``, what the scale benchmark shows."""
    _counted_bytes(path, table.nbytes)
    return table


def _counted_bytes(path: str, nbytes: int) -> None:
    table_name = path.replace("\\", "/").rstrip("/").split("/")[-2]
    beam.metrics.Metrics.counter(NAMESPACE, f"{STAGING_READ}{table_name}").inc(nbytes)


class WriteStagingShards(MeteredDoFn):
    """pa.Table of featurized documents -> StagedShard (the table is written to ``staging_dir``).

    ``count_ngrams(table)`` gives what the shard adds to the raw model, counted here while the
    features are in memory, so that fitting needs no pass of its own over the shards.
    """

    def __init__(self, staging_dir: str, count_ngrams, progress_dir: str | None = None):
        self.staging_dir = staging_dir
        self.count_ngrams = count_ngrams
        self.meter = StageMeter("stage", progress_dir)

    def process(self, table: pa.Table):
        started = self.meter.start()
        name = shard_name(table)
        path = FileSystems.join(self.staging_dir, name + ".arrow")
        write_staging(table, path)
        skip = set(INTERNAL) | {N_TOKENS}  # the id is kept: its type is unified like a field's
        orders = np.asarray(table.column(ORDER).combine_chunks(), dtype=np.int64)
        totals = self.count_ngrams(table)
        self.meter.done(started, docs=table.num_rows)
        yield StagedShard(
            ref=ShardRef(path, name, table.num_rows, int(orders.min()), int(orders.max())),
            fields=field_types(table, skip=skip),
            totals=totals,
        )
