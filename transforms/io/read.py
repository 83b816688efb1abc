"""Reading documents: files -> Arrow batches of valid documents, plus reject records.

The input glob is expanded once, at pipeline construction, through Beam's FileSystems (so gs://
and s3:// work as well as local paths) and sorted: a file's index in that list and a record's
position in its file give every record a global input order (``_order``), which decides which
of two records with the same id is "the first" no matter how the work is split.

Uncompressed line files are split into byte ranges, so one large file is read by many workers;
compressed files, Parquet files and HuggingFace Arrow files are read whole by one worker each.
A range reader owns the lines that *start* inside its range, as Beam's own text source does.

Every record ends up in exactly one of two places: a valid document in a batch, or a reject
record with the reason. Blank lines are not records.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain.meter import MeteredDoFn, StageMeter
from beamsift.transforms.io.schema import ORDER, SOURCE_FILE, TEXT, arrow_column, output_column

POSITION_BITS = 40  # a record's position in its file (byte offset or row) < 2**40
REJECTED = "rejected"

FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".json.zst": "jsonl.zst",
    ".jsonl.zstd": "jsonl.zst",
    ".parquet": "parquet",
    ".txt": "txt",
    ".txt.gz": "txt",
    ".txt.zst": "txt",
    ".arrow": "hf",
}


# Arrow types that the record-by-record path (schema.arrow_column) also produces.
_PLAIN_TYPES = {"string", "int64", "double", "bool", "null"}


class InputError(ValueError):
    """The input cannot be read at all (no files, unknown format): a clear error before running."""


@dataclass(frozen=True)
class ReadTask:
    """One unit of reading work: a whole file, or a byte range of an uncompressed line file."""

    file_index: int
    path: str
    format: str  # jsonl | parquet | txt | hf  (compression is found from the suffix)
    start: int = 0
    stop: int | None = None  # None: to the end of the file
    nbytes: int = 0  # the bytes of the file this task covers (for progress)
    read_once: bool = False  # give the page cache back as it is read (a large input: see _ReadOnce)


@dataclass(frozen=True)
class InputSpec:
    """What a reader needs from the config's `input` (or `target`) section."""

    text_field: str
    id_field: str | None
    txt_mode: str
    batch_size: int
    split_bytes: int


def detect_format(path: str, key: str = "input.path") -> str:
    lower = path.lower()
    for suffix in sorted(FORMAT_BY_SUFFIX, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMAT_BY_SUFFIX[suffix]
    section = key.split(".")[0]
    raise InputError(
        f"{key}: cannot tell the format of {path} from its name; set {section}.format "
        f"(one of jsonl, jsonl.gz, jsonl.zst, parquet, txt, hf)"
    )


def expand_input(pattern: str, fmt: str, key: str = "input.path") -> list[tuple[str, str, int]]:
    """The files of an input glob as (path, format, size), in a fixed order.

    A folder written by ``datasets.Dataset.save_to_disk`` (it holds ``state.json``) stands for
    its Arrow files, in the order that ``state.json`` lists them. ``key`` names the config key
    in errors.
    """
    if pattern.startswith(HUB_PREFIX):
        return hub_dataset_files(pattern, key)
    folder = pattern.rstrip("/")
    state = posixpath.join(folder, "state.json")
    if fmt in ("auto", "hf") and FileSystems.exists(state):
        with FileSystems.open(state) as f:
            data_files = json.load(f).get("_data_files", [])
        paths = [posixpath.join(folder, d["filename"]) for d in data_files]
        sizes = [FileSystems.match([p])[0].metadata_list[0].size_in_bytes for p in paths]
        return [(p, "hf", s) for p, s in zip(paths, sizes)]
    if FileSystems.get_filesystem(folder).scheme() in (None, "file") and os.path.isdir(folder):
        if fmt == "hf":
            raise InputError(f"{key} {pattern} is not a HuggingFace save_to_disk folder: it has no state.json")
        raise InputError(
            f"{key} {pattern} is a folder; give a glob of its files, e.g. {folder}/*.jsonl or {folder}/*.txt"
        )
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # noqa: BLE001 - FileSystems raises BeamIOError for bad globs
        raise InputError(f"{key} {pattern}: cannot list the files: {e}") from None
    files = sorted((m.path, m.size_in_bytes) for m in metadata)
    if not files:
        raise InputError(f"{key} {pattern}: no files match")
    out = []
    for path, size in files:
        f = detect_format(path, key) if fmt == "auto" else fmt
        out.append((path, f, size))
    return out


HUB_PREFIX = "hf://"
_HUB_HINT = (
    "load it where the hub can be reached (datasets.load_dataset(...).save_to_disk(PATH)) and set input.path to PATH"
)


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here, found at once (offline mode, no name resolution),
    rather than after the hub client's retries; None where it may be."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on"):
        return "the HuggingFace hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"this machine cannot reach the HuggingFace hub ({host}: {e.strerror or e})"
    return None


def hub_dataset_files(pattern: str, key: str = "input.path") -> list[tuple[str, str, int]]:
    """A dataset on the HuggingFace hub, ``hf://OWNER/NAME[/CONFIG][@SPLIT]`` (split ``train``
    by default): ``datasets`` loads it into its cache (the hub's own loading, with its
    credentials and cache), and the run reads the cache's Arrow files as a save_to_disk folder's.
    Offline, or for a dataset the hub does not have, one line says so."""
    spec = pattern[len(HUB_PREFIX) :].strip("/")
    spec, _, split = spec.partition("@")
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InputError(f"{key} {pattern}: a hub dataset is hf://OWNER/NAME, hf://OWNER/NAME/CONFIG, or either @SPLIT")
    offline = _hub_unreachable()
    if offline:
        raise InputError(f"{key} {pattern}: {offline}; {_HUB_HINT}")
    try:
        import datasets

        datasets.disable_progress_bars()
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries would bury the one line
        ds = datasets.load_dataset("/".join(parts[:2]), parts[2] if len(parts) == 3 else None, split=split or "train")
    except Exception as e:  # noqa: BLE001 - unknown dataset, no access, lost connection: the hub's own words
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"{key} {pattern}: the HuggingFace hub did not give it: {first}") from None
    files = [f["filename"] for f in ds.cache_files]
    return [(f, "hf", os.path.getsize(f)) for f in files]


SAMPLE_RECORDS = 100


def check_fields(
    files: list[tuple[str, str, int]], spec: InputSpec, section: str, label_field: str | None = None
) -> None:
    """Check the text and id fields against the first records, before any worker starts.

    A wrong ``text_field`` would otherwise reject every record one by one and end in an error
    about an empty selection. Only a field absent from (or never text in) every sampled record
    is an error: a few bad records are the reader's to reject with a reason.
    """
    path, fmt, _ = files[0]
    if fmt == "txt":
        return  # the line (or the file) is the text
    if fmt in ("parquet", "hf"):
        schema = _arrow_schema(path, fmt)
        names = schema.names
        for field, what in ((spec.text_field, "text_field"), (spec.id_field, "id_field"), (label_field, "label_field")):
            if field is not None and field not in names:
                raise InputError(
                    f"{section}.{what} {field!r} is not a column of {path}; its columns: {_listing(names)}"
                )
        t = schema.field(spec.text_field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise InputError(
                f"{section}.text_field {spec.text_field!r} is a column of {_arrow_kind(t)}, not text, in {path}; "
                f"its columns: {_listing(names)}"
            )
        if label_field is not None and pa.types.is_nested(schema.field(label_field).type):
            kind = _arrow_kind(schema.field(label_field).type)
            raise InputError(f"{section}.label_field {label_field!r} is a column of {kind} in {path}: {_LABEL_KINDS}")
        return
    lines, records = _first_records(files)
    if not lines:
        return  # empty files: nothing to check, the run reports 0 records
    if not records:
        raise InputError(
            f"{section}.path: none of the first {len(lines)} lines of {path} is a JSON object "
            f"(line 1: {lines[0][:60].decode('utf-8', 'replace')!r}); is {section}.format right?"
        )
    fields: dict[str, int] = {}
    for r in records:
        for name in r:
            fields[name] = fields.get(name, 0) + 1
    names = list(fields)
    where = f"the first {len(records)} records of {path}"
    for field, what in ((spec.text_field, "text_field"), (spec.id_field, "id_field"), (label_field, "label_field")):
        if field is not None and field not in fields:
            raise InputError(f"{section}.{what} {field!r} is in none of {where}; their fields: {_listing(names)}")
    kinds = {_json_type(r[spec.text_field]) for r in records if spec.text_field in r}
    if "a string" not in kinds:
        raise InputError(
            f"{section}.text_field {spec.text_field!r} holds {' or '.join(sorted(kinds))}, never text, in {where}; "
            f"their fields: {_listing(names)}"
        )
    if label_field is not None:
        _check_label_values(label_field, [r.get(label_field) for r in records], section, where)


# A label is one class: an object or a list as a label would make every distinct value a class of its own.
_LABEL_KINDS = "a label must be a string, a number or a boolean (name a field that holds one)"


def _check_label_values(field: str, values: list, section: str, where: str) -> None:
    nested = [v for v in values if isinstance(v, (dict, list))]
    if nested:
        example = json.dumps(nested[0], ensure_ascii=False, default=str)
        example = example if len(example) <= 40 else example[:39] + "…"
        raise InputError(
            f"{section}.label_field {field!r} holds {_json_type(nested[0])} ({example}) in {len(nested)} of "
            f"{where}: {_LABEL_KINDS}"
        )


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _arrow_kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "numbers"
    if pa.types.is_boolean(t):
        return "booleans"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "lists"
    if pa.types.is_struct(t):
        return "objects"
    return f"values of type {t}"


def _arrow_schema(path: str, fmt: str) -> pa.Schema:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if fmt == "parquet":
            return pq.ParquetFile(f).schema_arrow
        data = f.read()
    try:
        return pa.ipc.open_stream(data).schema
    except pa.ArrowInvalid:
        return pa.ipc.open_file(data).schema


def _first_records(files, max_files: int = 5) -> tuple[list[bytes], list[dict]]:
    """The first non-blank lines of the first files, and the JSON objects among them."""
    lines: list[bytes] = []
    for path, _, _ in files[:max_files]:
        task = ReadTask(0, path, "jsonl")
        for block, starts, ends, _ in _read_line_blocks(task, SAMPLE_RECORDS):
            for start, end in zip(starts.tolist(), ends.tolist()):
                line = block[start:end].strip()
                if line:
                    lines.append(line)
            break
        if len(lines) >= SAMPLE_RECORDS:
            break
    lines = lines[:SAMPLE_RECORDS]
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return lines, records


def first_values(files: list[tuple[str, str, int]], field: str) -> tuple[list, str]:
    """The values of ``field`` in the first records of ``files`` (None where a record has none),
    and which records they are, for checks before any worker starts; no values for txt."""
    path, fmt, _ = files[0]
    where = f"the first records of {path}"
    if fmt == "txt":
        return [], where
    if fmt in ("parquet", "hf"):
        if field not in _arrow_schema(path, fmt).names:
            return [None], where
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            if fmt == "parquet":
                batch = next(pq.ParquetFile(f).iter_batches(batch_size=SAMPLE_RECORDS, columns=[field]), None)
            else:
                data = f.read()
                try:
                    batch = next(iter(pa.ipc.open_stream(data)), None)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(data)
                    batch = reader.get_batch(0) if reader.num_record_batches else None
        values = batch.column(field).to_pylist()[:SAMPLE_RECORDS] if batch is not None else []
        return values, f"the first {len(values)} records of {path}"
    _, records = _first_records(files)
    return [r.get(field) for r in records], f"the first {len(records)} records of {path}"


def max_records(
    files: list[tuple[str, str, int]], txt_mode: str, max_bytes: int = 256 << 20, enough: int | None = None
) -> int | None:
    """An upper bound of the records in ``files`` where one is cheap to know, else None; or, once
    the count reaches ``enough``, that count (the bound is at least that: the scan stops there).

    Parquet footers give row counts; uncompressed line files are counted by their newlines (a
    blank line is not a record, so lines bound records) when they are small enough to scan.
    """
    total = 0
    scanned = 0
    for path, fmt, size in files:
        if enough is not None and total >= enough:
            return total
        if fmt == "txt" and txt_mode == "file":
            total += 1
        elif fmt == "parquet":
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        elif fmt in ("jsonl", "txt") and _compression(path) == CompressionTypes.UNCOMPRESSED:
            scanned += size
            if scanned > max_bytes:
                return None
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                lines = 0
                last = b"\n"
                while chunk := f.read(8 << 20):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
                    if enough is not None and total + lines >= enough:
                        return total + lines
                total += lines + (last != b"\n")
        else:
            return None
    return total


# An input of at least 1/16 of the machine's memory gives its page cache back: a run stages one to
# three times its input besides (documents, embeddings, SemDeDup's members), so from there the
# cached input and the staging hold a quarter of the memory or more
GIVE_BACK_FROM = 16


def plan_read_tasks(files: list[tuple[str, str, int]], split_bytes: int) -> list[ReadTask]:
    tasks = []
    memory = _memory_bytes()
    once = memory > 0 and sum(size for _, _, size in files) >= memory // GIVE_BACK_FROM
    for index, (path, fmt, size) in enumerate(files):
        base = "jsonl" if fmt.startswith("jsonl") else fmt
        splittable = base in ("jsonl", "txt") and _compression(path) == CompressionTypes.UNCOMPRESSED
        if splittable and size > split_bytes:
            for start in range(0, size, split_bytes):
                stop = min(start + split_bytes, size)
                tasks.append(ReadTask(index, path, base, start, stop, stop - start, once))
        else:
            tasks.append(ReadTask(index, path, base, nbytes=size, read_once=once))
    return tasks


def _memory_bytes() -> int:
    """This machine's memory (0 where it cannot be told: then no input counts as large)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def _compression(path: str) -> str:
    return CompressionTypes.detect_compression_type(path)


def make_order(file_index: int, positions: np.ndarray) -> np.ndarray:
    return (np.int64(file_index) << np.int64(POSITION_BITS)) | np.asarray(positions, np.int64)


def text_hash_id(text: str) -> str:
    """The id of a document without an id field: a stable hash of its text."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def reject(task: ReadTask, position: int, reason: str, detail: str | None, record: bytes | str, dataset: str) -> dict:
    """A dead-letter record: ``reason`` is one of schema.REJECT_REASONS, ``detail`` says what exactly."""
    if isinstance(record, bytes):
        record = record.decode("utf-8", errors="backslashreplace")
    else:  # unpaired surrogates cannot be written as UTF-8: keep them as \udXXX escapes
        record = record.encode("utf-8", errors="backslashreplace").decode("utf-8")
    return {
        "input": dataset,
        "source_file": task.path,
        "position": int(position),
        "reason": reason,
        "detail": detail,
        "record": record,
        "id": None,
    }


class ReadDocumentBatches(MeteredDoFn):
    """ReadTask -> Arrow tables of valid documents; reject records to the ``rejected`` output.

    Output columns: ``_order`` (global input order), ``id``, ``text``, then the record's other
    fields (nested values as JSON text; see ``schema.arrow_column``).
    """

    def __init__(self, spec: InputSpec, dataset: str, progress_dir: str | None = None):
        self.spec = spec
        self.dataset = dataset
        self.meter = StageMeter("read" if dataset == "pool" else f"read_{dataset}", progress_dir)

    def setup(self):
        super().setup()
        self.records_read = beam.metrics.Metrics.counter("beamsift", f"{self.dataset}_records_read")

    def process(self, task: ReadTask) -> Iterator:
        started = self.meter.start()
        for out in self._read(task):
            if not isinstance(out, beam.pvalue.TaggedOutput):
                self.meter.progress(docs=out.num_rows)
            yield out
        self.meter.done(started, nbytes=task.nbytes, busy=False)

    def _read(self, task: ReadTask) -> Iterator:
        if task.format in ("parquet", "hf"):
            batches = self._arrow_batches(task)
        elif task.format == "txt" and self.spec.txt_mode == "file":
            batches = self._whole_file(task)
        else:
            batches = self._line_batches(task)
        for records in batches:
            table, rejects = records
            self.records_read.inc(len(rejects) + (table.num_rows if table is not None else 0))
            for r in rejects:
                yield beam.pvalue.TaggedOutput(REJECTED, r)
            if table is not None and table.num_rows:
                yield table

    # -- line files (jsonl, txt per line) -------------------------------------------------
    def _line_batches(self, task: ReadTask):
        """Batches of lines straight from the file's bytes. A JSONL batch whose lines all open
        an object goes to Arrow's parser as it is, with no Python object per line; any other
        batch is parsed line by line."""
        for block, starts, ends, positions in _read_line_blocks(task, self.spec.batch_size, equal=True):
            if task.format == "jsonl" and bool(np.all(np.frombuffer(block, np.uint8)[starts] == ord("{"))):
                table = self._parse_clean_jsonl(task, block, positions)
                if table is not None:
                    yield table, []
                    continue
            lines, kept = [], []
            for start, end, position in zip(starts.tolist(), ends.tolist(), positions.tolist()):
                line = block[start:end].rstrip(b"\r")
                if line.strip():  # a blank line is not a record
                    lines.append(line)
                    kept.append(position)
            if lines:
                yield self._parse_lines(task, lines, kept)

    def _parse_lines(self, task, lines, positions):
        if task.format == "txt":
            records, rejects, kept = [], [], []
            for pos, line in zip(positions, lines):
                try:
                    records.append({self.spec.text_field: line.decode("utf-8")})
                    kept.append(pos)
                except UnicodeDecodeError as e:
                    rejects.append(reject(task, pos, "invalid UTF-8", _utf8_detail(e), line, self.dataset))
            table, more = self._records_to_table(task, records, kept)
            return table, rejects + more
        records, kept, rejects = [], [], []
        for pos, line in zip(positions, lines):
            try:
                record = json.loads(line)
            except UnicodeDecodeError as e:
                rejects.append(reject(task, pos, "invalid UTF-8", _utf8_detail(e), line, self.dataset))
                continue
            except ValueError as e:
                rejects.append(reject(task, pos, "malformed JSON", str(e), line, self.dataset))
                continue
            if not isinstance(record, dict):
                detail = f"the line holds {_json_type(record)}"
                rejects.append(reject(task, pos, "not a JSON object", detail, line, self.dataset))
                continue
            records.append(record)
            kept.append(pos)
        table, more = self._records_to_table(task, records, kept)
        return table, rejects + more

    def _parse_clean_jsonl(self, task, block: bytes, positions) -> pa.Table | None:
        """The fast path: Arrow's JSON parser over the whole batch, when the batch is clean.

        Returns None where any record needs a closer look (a parse error, a type Arrow would
        read differently from the record-by-record path, a missing or empty text, invalid
        UTF-8); the record-by-record path then gives each bad record its own reason. On clean
        input both paths give the same table.
        """
        try:
            parsed = pa_json.read_json(
                pa.BufferReader(block),
                read_options=pa_json.ReadOptions(use_threads=False, block_size=len(block) + 1),
            )
            parsed.validate(full=True)  # invalid UTF-8, e.g. from an unpaired surrogate escape
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            return None
        text_field, id_field = self.spec.text_field, self.spec.id_field
        names = parsed.column_names
        if parsed.num_rows != len(positions) or text_field not in names:
            return None
        if any(str(t) not in _PLAIN_TYPES for t in parsed.schema.types):
            return None  # nested values, timestamps: the record path writes them as JSON text
        text = parsed.column(text_field)
        if text.type != pa.string() or text.null_count:
            return None
        # Empty or only white space (Arrow's and Python's white space are the same set): the
        # predicate stops at a text's first other character, where trimming copies every text.
        if pc.any(pc.utf8_is_space(text)).as_py() or pc.min(pc.binary_length(text)).as_py() == 0:
            return None
        if id_field is not None:
            if id_field not in names:
                return None
            ids = parsed.column(id_field)
            if ids.null_count or ids.type not in (pa.string(), pa.int64()):
                return None
        else:
            ids = pa.array([text_hash_id(t) for t in text.to_pylist()], pa.string())
        columns = {
            ORDER: pa.array(make_order(task.file_index, np.asarray(positions, np.int64))),
            "id": ids,
            TEXT: text,
        }
        for name in names:
            if name == text_field or (name == id_field and name == "id"):
                continue
            column = parsed.column(name)
            if pa.types.is_null(column.type):
                column = column.cast(pa.string())  # what the record path makes of all-null
            columns[output_column(name)] = column
        return pa.table(columns)

    # -- whole text files ---------------------------------------------------------------
    def _whole_file(self, task: ReadTask):
        with FileSystems.open(task.path, compression_type=_compression(task.path)) as f:
            data = f.read()
        if not data.strip():
            yield None, [reject(task, 0, "empty text", "the file holds only white space", data, self.dataset)]
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            yield None, [reject(task, 0, "invalid UTF-8", _utf8_detail(e), data, self.dataset)]
            return
        # The file is the record: its path is the only other thing known about it.
        table, rejects = self._records_to_table(task, [{self.spec.text_field: text}], [0])
        if table is not None:
            table = table.append_column(SOURCE_FILE, pa.array([task.path], pa.string()))
        yield table, rejects

    # -- Parquet and HuggingFace Arrow files ----------------------------------------------
    def _arrow_batches(self, task: ReadTask):
        row = 0
        for batch in _iter_arrow_file(task, self.spec.batch_size):
            # Columnar validation of an Arrow batch is done on records: the batch is already
            # bounded in size, and it keeps one code path for the rules of what is valid.
            records = batch.to_pylist()
            positions = list(range(row, row + len(records)))
            row += len(records)
            yield self._records_to_table(task, records, positions)

    # -- shared: validate records and build the table ---------------------------------------
    def _records_to_table(self, task, records, positions):
        text_field, id_field = self.spec.text_field, self.spec.id_field
        keep_records, keep_pos, rejects = [], [], []
        texts, ids = [], []
        for pos, record in zip(positions, records):
            text = record.get(text_field, _MISSING)
            reason = detail = None
            if text is _MISSING:
                reason, detail = "missing text field", _missing_field(text_field, record)
            elif not isinstance(text, str):
                reason, detail = "text is not a string", f"field {text_field!r} holds {_json_type(text)}"
            elif not text.strip():
                reason, detail = "empty text", f"field {text_field!r} holds only white space" if text else None
            elif not _encodable(text):
                reason, detail = "invalid UTF-8", "the text holds unpaired surrogates"
            doc_id = None
            if reason is None and id_field is not None:
                doc_id = record.get(id_field, _MISSING)
                if doc_id is _MISSING or doc_id is None:
                    reason = "missing id"
                    detail = _missing_field(id_field, record) if doc_id is _MISSING else f"field {id_field!r} is null"
                elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
                    reason, detail = (
                        "invalid id",
                        f"field {id_field!r} holds {_json_type(doc_id)}, not a string or integer",
                    )
                elif isinstance(doc_id, str) and not _encodable(doc_id):
                    reason, detail = "invalid UTF-8", "the id holds unpaired surrogates"
            if reason is not None:
                rejects.append(reject(task, pos, reason, detail, _record_text(record), self.dataset))
                continue
            if doc_id is None:
                doc_id = text_hash_id(text)
            keep_records.append(record)
            keep_pos.append(pos)
            texts.append(text)
            ids.append(doc_id)
        if not keep_records:
            return None, rejects
        columns = {
            ORDER: pa.array(make_order(task.file_index, np.asarray(keep_pos, np.int64))),
            "id": _id_column(ids),
            TEXT: pa.array(texts, pa.string()),
        }
        names = {}
        for record in keep_records:
            for name in record:
                names.setdefault(name, None)
        for name in names:
            if name == text_field or (name == id_field and name == "id"):
                continue
            columns[output_column(name)] = arrow_column([r.get(name) for r in keep_records])
        return pa.table(columns), rejects


_MISSING = object()


def _json_type(value) -> str:
    """What a value is, in JSON's words (never a Python type name)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a " + {bytes: "binary value"}.get(type(value), "value of another kind")


def _missing_field(name: str, record: dict) -> str:
    fields = ", ".join(repr(k) for k in list(record)[:20]) or "none"
    return f"no field {name!r}; the record's fields: {fields}"


def _utf8_detail(e: UnicodeDecodeError) -> str:
    return f"{e.reason} at byte {e.start}"


def _id_column(ids: list) -> pa.Array:
    """Integer ids stay integers (where every id of the batch is one that fits int64)."""
    if all(isinstance(i, int) and -(2**63) <= i < 2**63 for i in ids):
        return pa.array(ids, pa.int64())
    return pa.array([str(i) for i in ids], pa.string())


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _record_text(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


# The largest range read whole to cut it into equal batches (16 MB ranges by default)
EQUAL_BATCHES_MAX_BYTES = 64 << 20


class _ReadOnce:
    """A local input file read front to back once: with ``give_back``, the page cache that holds
    what has been read is given back as reading goes (``POSIX_FADV_DONTNEED`` every ``STEP`` bytes
    and at the end). beamsift never reads an input byte twice in a run, and a large corpus held
    in the page cache is memory that the later stages' staging then has to find elsewhere: on a
    VM whose host takes back the guest's free memory (free page reporting), 3.3 GB of input kept
    cached made the embeddings and SemDeDup's members of 1M documents write at ~13 s/GB instead
    of ~1 s/GB. A later run reads the file from disk again, so only an input of at least
    1/``GIVE_BACK_FROM`` of the machine's memory does this (``plan_read_tasks``); a small one
    stays cached for the next run. Files without a descriptor of their own (compressed, on an
    object store) are read as they are."""

    STEP = 64 << 20

    def __init__(self, f, give_back: bool = True):
        self.f = f
        self.fd = None
        if give_back and hasattr(os, "posix_fadvise"):
            try:
                self.fd = f.fileno()
            except (AttributeError, OSError, io.UnsupportedOperation):
                self.fd = None
        self.since = None  # where the bytes not yet given back start

    def read(self, size: int = -1) -> bytes:
        if self.fd is not None and self.since is None:
            self.since = self.f.tell()
        data = self.f.read(size)
        if self.fd is not None and (not data or self.f.tell() - self.since >= self.STEP):
            self.forget()
        return data

    def forget(self) -> None:
        if self.fd is None or self.since is None:
            return
        position = self.f.tell()
        if position > self.since:
            try:
                os.posix_fadvise(self.fd, self.since, position - self.since, os.POSIX_FADV_DONTNEED)
            except OSError:  # a file system or file kind without it: read as it is
                self.fd = None
        self.since = position

    def __getattr__(self, name):  # seek, readline, tell: the file's own
        return getattr(self.f, name)


def _read_line_blocks(task: ReadTask, max_lines: int, chunk: int = 4 << 20, equal: bool = False):
    """(block, starts, ends, positions) for up to ``max_lines`` lines at a time of a task's range.

    ``block[starts[i]:ends[i]]`` is a line (without its newline); ``positions`` are the lines'
    byte offsets in the (decompressed) file. Line ends are found by ``bytes.find`` (memchr: a
    call per line, where a numpy pass over every byte took 4x as long on 2.5 KB lines), and
    reading stops at the range's end. A range owns the lines that start in it, as Beam's own
    text source does: a range that does not start at 0 skips the line in progress, which the
    range before it owns.

    With ``equal``, a range of known size up to ``EQUAL_BATCHES_MAX_BYTES`` is read whole and
    its lines cut into blocks of equal size (within one), the fewest of at most ``max_lines``:
    a 16 MB range of 4,766 lines gives two of 2,383, not 4,096 and a 670-line remainder. Shards
    of one size are what keeps a local runner's workers even: it hands a stage's shards to its
    workers alternately, and with the full shards and the remainders alternating one worker got
    every full one (the embedding of 1M documents: 31 s on one worker, 5.6 s on the other).
    """
    with FileSystems.open(task.path, compression_type=_compression(task.path)) as opened:
        f = _ReadOnce(opened, task.read_once)
        base = task.start  # file position of buffer[0]
        if task.start > 0:
            f.seek(task.start - 1)
            base = task.start - 1 + len(f.readline())
        extent = (task.stop - task.start) if task.stop is not None else task.nbytes
        whole = equal and 0 < extent <= EQUAL_BATCHES_MAX_BYTES
        if not whole or _compression(task.path) != CompressionTypes.UNCOMPRESSED:
            yield from _stream_line_blocks(f, base, task.stop, max_lines, chunk)
        else:
            for block in _stream_line_blocks(f, base, task.stop, sys.maxsize, chunk):  # the range's one block
                yield from _equal_parts(*block, max_lines)
        f.forget()


def _stream_line_blocks(f, base: int, stop: int | None, max_lines: int, chunk: int):
    """``_read_line_blocks``'s blocks from an open file positioned at ``base`` (file position),
    the lines that start before ``stop`` (None: to the end)."""
    buffer, eof = bytearray(), False  # buffer[0] is at file position ``base``
    while True:
        # This range's lines end at the first newline at or after its stop.
        limit = None if stop is None else stop - base
        ends, pos = [], 0
        while len(ends) < max_lines and (limit is None or pos < limit):
            end = buffer.find(b"\n", pos)
            if end >= 0:
                ends.append(end)
                pos = end + 1
            elif eof:
                if pos < len(buffer):  # the last line, without a newline
                    ends.append(len(buffer))
                break
            else:
                data = f.read(chunk)
                eof = not data
                buffer += data
        if not ends:
            return
        # Every line here starts before the range's stop: the search ends at the first that does not.
        newlines = np.asarray(ends, dtype=np.int64)
        starts = np.concatenate([[0], newlines[:-1] + 1])
        with memoryview(buffer) as view:  # one copy of the lines (buffer[:n] would be a second)
            block = bytes(view[: int(newlines[-1])])
        yield block, starts, newlines, base + starts
        if limit is not None and pos >= limit:
            return
        consumed = int(newlines[-1]) + 1
        del buffer[:consumed]
        base += consumed


def _equal_parts(block: bytes, starts: np.ndarray, ends: np.ndarray, positions: np.ndarray, max_lines: int):
    """A block of lines as the fewest blocks of at most ``max_lines``, equal within one line."""
    parts = -(-len(starts) // max_lines)
    if parts == 1:
        yield block, starts, ends, positions
        return
    cuts = (np.arange(parts + 1) * len(starts)) // parts
    for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        first = int(starts[a])
        yield block[first : int(ends[b - 1])], starts[a:b] - first, ends[a:b] - first, positions[a:b]


def _iter_arrow_file(task: ReadTask, batch_size: int):
    with FileSystems.open(task.path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        if task.format == "parquet":
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
                yield batch
            return
        data = f.read()
    # datasets' save_to_disk writes Arrow IPC streams; older versions wrote files.
    try:
        reader = pa.ipc.open_stream(data)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(data)
        for i in range(reader.num_record_batches):
            yield from _rebatch(reader.get_batch(i), batch_size)
        return
    for batch in reader:
        yield from _rebatch(batch, batch_size)


def _rebatch(batch: pa.RecordBatch, size: int):
    for start in range(0, batch.num_rows, size):
        yield batch.slice(start, size)


class CountRejectReasons(beam.CombineFn):
    """Reject records -> {dataset: {reason: [count, the first detail seen]}}: what the errors that
    explain an empty or short selection quote ("all 600 records were rejected: missing text ...")."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, record):
        by_reason = acc.setdefault(record["input"], {})
        entry = by_reason.setdefault(record["reason"], [0, record.get("detail")])
        entry[0] += 1
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            for dataset, by_reason in acc.items():
                mine = out.setdefault(dataset, {})
                for reason, (n, detail) in by_reason.items():
                    entry = mine.setdefault(reason, [0, detail])
                    entry[0] += n
        return out

    def extract_output(self, acc):
        return acc


def describe_rejects(rejects: dict, dataset: str, valid: int) -> str:
    """'600 of 600 pool records were rejected, 600 as "missing text field" (no field ...)'."""
    by_reason = rejects.get(dataset, {})
    rejected = sum(n for n, _ in by_reason.values())
    if not rejected:
        return f"none of the {valid:,} {dataset} records was rejected"
    reason, (n, detail) = max(by_reason.items(), key=lambda item: item[1][0])
    text = f"{rejected:,} of {valid + rejected:,} {dataset} records were rejected, {n:,} as {reason!r}"
    if detail:
        text += f" ({detail})"
    if n < rejected:
        text += f" and {rejected - n:,} for other reasons (see rejected/)"
    return text


class ReadDocuments(beam.PTransform):
    """files -> (documents: PCollection[pa.Table], rejected: PCollection[dict])."""

    def __init__(self, tasks: list[ReadTask], spec: InputSpec, dataset: str, progress_dir: str | None = None):
        super().__init__()
        self.tasks = tasks
        self.spec = spec
        self.dataset = dataset
        self.progress_dir = progress_dir

    def expand(self, pbegin):
        results = (
            pbegin
            | "ListReadTasks" >> beam.Create(self.tasks, reshuffle=False)
            # Spread the read tasks over workers before the heavy reading is fused to them.
            | "SpreadReadTasks" >> beam.Reshuffle()
            | "ReadAndValidate"
            >> beam.ParDo(ReadDocumentBatches(self.spec, self.dataset, self.progress_dir)).with_outputs(
                REJECTED, main="documents"
            )
        )
        return results.documents, results[REJECTED]
