"""``beamsift export DIR``: a run's selection in the formats trainers load.

    beamsift export out/demo --to-hf data/demo-hf             # datasets' save_to_disk folder
    beamsift export out/demo --to-jsonl data/demo-jsonl --columns id,text,weight --shard-docs 50000

``selected/`` itself already loads with ``datasets.load_dataset("parquet", data_files=...)``; an
export is for trainers that want a ``load_from_disk`` folder or JSON Lines shards. The rows come in
the order of ``selected/`` (shard by shard), the columns are the selection's (or ``--columns``),
and ``weight`` travels with them where the run wrote one.

The destination is written as a run's output is: into a sibling folder that takes its place only
when complete, so an interrupted export leaves nothing half-written under the name; an existing
destination is replaced only with ``--overwrite`` and only when it is an earlier export (its
marker file says so), never a folder of the user's.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import shutil
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from beamsift.pipeline.output import MANIFEST
from beamsift.pipeline.query import arrow_filesystem, whole_number
from beamsift.transforms.chain.staging import PieceWriter

EXPORT_MARKER = "beamsift_export.json"  # what the export holds and where it came from
SELECTED = "selected"

HELP = "write a run's selection as a HuggingFace datasets folder or JSON Lines shards"
HELP_DESCRIPTION = """\
Write the selected documents of a finished `beamsift run` (OUTPUT_DIR, local or on an object
store) in a format a trainer loads: a `datasets` folder (`datasets.load_from_disk(PATH)`) or JSON
Lines shards. `selected/` itself loads with `datasets.load_dataset("parquet", data_files=...)`."""


class ExportError(RuntimeError):
    """An error the user must fix; the message says what."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output.dir of a finished `beamsift run`")
    to = parser.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-hf", metavar="PATH", help="a datasets folder (save_to_disk), on the local disk")
    to.add_argument("--to-jsonl", metavar="PATH", help="a folder of JSON Lines shards (local or an object store)")
    parser.add_argument(
        "--columns",
        metavar="A,B,...",
        help="the columns to keep, in this order (e.g. id,text,weight; default: every column of selected/)",
    )
    parser.add_argument(
        "--shard-docs",
        type=whole_number(1),
        default=100_000,
        metavar="N",
        help="JSONL: documents a shard (default: %(default)s)",
    )
    parser.add_argument("--gzip", action="store_true", help="JSONL: gzip each shard (.jsonl.gz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at PATH")


# ---- the source: selected/ of a finished run --------------------------------------------------


def selected_files(out_dir: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of ``out_dir`` and its ``selected/`` shards, in order."""
    try:
        fs, root = arrow_filesystem(out_dir)
        manifest = fs.get_file_info(f"{root}/{MANIFEST}")
        shards = fs.get_file_info(pafs.FileSelector(f"{root}/{SELECTED}", allow_not_found=True))
    except Exception as e:  # noqa: BLE001 - no such bucket, no credentials, no connection
        raise ExportError(f"{out_dir}: cannot list it: {str(e).strip().splitlines()[0]}") from None
    if manifest.type != pafs.FileType.File:
        raise ExportError(f"{out_dir} has no {MANIFEST}: not the output of a finished beamsift run")
    files = sorted(s.path for s in shards if s.type == pafs.FileType.File and s.path.endswith(".parquet"))
    if not files:
        raise ExportError(f"{out_dir} has no {SELECTED}/ shards (a `beamsift train` output selects nothing)")
    return fs, files


def _schema(fs, files: list[str], columns: list[str] | None) -> pa.Schema:
    """The shards' one schema (a column null in one shard takes the others' type), cut to ``columns``."""
    schemas = [pq.read_schema(fs.open_input_file(f)) for f in files]
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    if columns is None:
        return schema
    missing = [c for c in columns if schema.get_field_index(c) < 0]
    if missing:
        raise ExportError(f"selected/ has no column {', '.join(map(repr, missing))}; it has {schema.names}")
    return pa.schema([schema.field(c) for c in columns])


def record_batches(out_dir: str, columns: list[str] | None = None):
    """(schema, an iterator of record batches of ``selected/``, in order, cast to the schema)."""
    fs, files = selected_files(out_dir)
    schema = _schema(fs, files, columns)

    def batches():
        for path in files:
            with fs.open_input_file(path) as f:
                parquet = pq.ParquetFile(f)
                names = [n for n in schema.names if n in parquet.schema_arrow.names]
                for batch in parquet.iter_batches(batch_size=8192, columns=names):
                    yield _conform(batch, schema)

    return schema, batches()


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for field in schema:
        i = batch.schema.get_field_index(field.name)
        arrays.append(batch.column(i).cast(field.type) if i >= 0 else pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ---- the destination: a sibling folder put in place when complete ------------------------------


def _check_destination(fs, path: str, overwrite: bool) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise ExportError(f"{path} exists and is not a folder")
    entries = fs.get_file_info(pafs.FileSelector(path))
    if not entries:
        return
    if fs.get_file_info(f"{path}/{EXPORT_MARKER}").type != pafs.FileType.File:
        raise ExportError(f"{path} holds files that are not a beamsift export; choose another path")
    if not overwrite:
        raise ExportError(f"{path} holds an earlier export; pass --overwrite to replace it")
    # Replacing it removes it: only when it holds nothing but what that export wrote.
    with fs.open_input_stream(f"{path}/{EXPORT_MARKER}") as f:
        listed = set(json.loads(f.read()).get("files", [])) | {EXPORT_MARKER}
    foreign = sorted(set(_files(fs, path)) - listed)
    if foreign:
        raise ExportError(f"{path} holds {', '.join(foreign[:3])}, which the earlier export did not write; choose "
                          "another path or move them")  # fmt: skip


def _files(fs, folder: str) -> list[str]:
    """Every file under ``folder``, relative to it."""
    entries = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    return sorted(e.path[len(folder) + 1 :] for e in entries if e.type == pafs.FileType.File)


def _publish(fs, tmp: str, path: str) -> None:
    """The complete export at ``tmp`` takes the place of ``path`` (an earlier export, or nothing)."""
    if isinstance(fs, pafs.LocalFileSystem):
        old = None
        if os.path.exists(path):
            old = f"{path}.beamsift-old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old)
        return
    # Object stores have no rename of a folder: the new files are copied over the old, the marker
    # last, then the old export's files that the new one does not have are removed.
    old = set(_files(fs, path))
    new = sorted(_files(fs, tmp), key=lambda rel: rel == EXPORT_MARKER)
    for rel in new:
        fs.copy_file(f"{tmp}/{rel}", f"{path}/{rel}")
    for rel in sorted(old - set(new)):
        fs.delete_file(f"{path}/{rel}")
    fs.delete_dir(tmp)


def _sibling(path: str) -> str:
    parent, name = os.path.split(path.rstrip("/"))
    return f"{parent}/.{name}.beamsift-export-{uuid.uuid4().hex[:8]}"


# ---- the formats ------------------------------------------------------------------------------


def to_jsonl(out_dir: str, dest: str, columns=None, shard_docs: int = 100_000, compress: bool = False,
             overwrite: bool = False) -> dict:  # fmt: skip
    """JSON Lines shards ``part-00000.jsonl[.gz]`` of at most ``shard_docs`` documents each."""
    fs, path = arrow_filesystem(dest)
    _check_destination(fs, path, overwrite)
    schema, batches = record_batches(out_dir, columns)
    tmp = _sibling(path)
    fs.create_dir(tmp)
    suffix = ".jsonl.gz" if compress else ".jsonl"
    shards, rows, in_shard, stream = [], 0, 0, None
    try:
        for batch in batches:
            for row in batch.to_pylist():
                if stream is None or in_shard == shard_docs:
                    if stream is not None:
                        stream.close()
                    name = f"part-{len(shards):05d}{suffix}"
                    shards.append(name)
                    stream = _text_stream(fs, f"{tmp}/{name}", compress)
                    in_shard = 0
                stream.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                in_shard += 1
                rows += 1
        if stream is not None:
            stream.close()
            stream = None
        info = {"format": "jsonl", "source": out_dir, "documents": rows, "columns": schema.names, "files": shards}
        with fs.open_output_stream(f"{tmp}/{EXPORT_MARKER}") as f:
            f.write(json.dumps(info, indent=1).encode())
        _publish(fs, tmp, path)
    except BaseException:
        if stream is not None:
            stream.close()
        with contextlib.suppress(Exception):
            fs.delete_dir(tmp)
        raise
    return info


def _text_stream(fs, path: str, compress: bool):
    raw = fs.open_output_stream(path, compression=None)  # not by the name: the gzip is ours
    if compress:
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode="wb", mtime=0), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def to_hf(out_dir: str, dest: str, columns=None, overwrite: bool = False) -> dict:
    """A ``datasets`` folder (``save_to_disk``): ``datasets.load_from_disk(dest)`` loads it."""
    import tempfile

    import datasets

    if "://" in dest and not dest.startswith("file://"):
        raise ExportError(f"--to-hf writes a local folder ({dest} is not one): export locally, then copy it")
    fs, path = arrow_filesystem(dest)
    _check_destination(fs, path, overwrite)
    schema, batches = record_batches(out_dir, columns)
    tmp = _sibling(path)
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="beamsift-export-") as cache:
            # Written batch by batch into an Arrow file of the temporary cache, never held whole.
            arrow_path = os.path.join(cache, "selected.arrow")
            rows = 0
            with pa.PythonFile(PieceWriter(arrow_path), mode="w") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            dataset = datasets.Dataset.from_file(arrow_path, in_memory=False)
            dataset.save_to_disk(tmp)
            del dataset
        info = {"format": "hf", "source": out_dir, "documents": rows, "columns": schema.names,
                "files": _files(fs, tmp)}  # fmt: skip
        with open(os.path.join(tmp, EXPORT_MARKER), "w") as f:
            json.dump(info, f, indent=1)
        _publish(fs, tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def main(args: argparse.Namespace) -> int:
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if args.to_hf:
        info = to_hf(args.output_dir, args.to_hf, columns, args.overwrite)
        where, how = args.to_hf, f'datasets.load_from_disk("{args.to_hf}")'
    else:
        info = to_jsonl(args.output_dir, args.to_jsonl, columns, args.shard_docs, args.gzip, args.overwrite)
        where, how = args.to_jsonl, f"{len(info['files'])} shard(s) of at most {args.shard_docs:,} documents"
    print(f"beamsift: exported {info['documents']:,} documents ({', '.join(info['columns'])}) to {where}: {how}")
    return 0
