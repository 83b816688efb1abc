"""Column names and types that every stage agrees on, and one schema for all output shards.

Input records may disagree on a field's type from one batch to the next (an int here, a
string there). Each batch keeps what it saw; a combine unifies the types over the whole input,
and the writers cast every shard to that one schema, so that
``duckdb.read_parquet('out/selected/*.parquet')`` reads all shards without ``union_by_name``.
"""

from __future__ import annotations

import functools
import json

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc

ORDER = "_order"  # global input order: file index << 40 | position in the file
ID_HASH = "_id_hash"
TEXT = "_text"  # the document's text; written out under the input's own name for it
N_TOKENS = "n_tokens"
BUCKETS = "_ngram_buckets"
SOURCE_FILE = "source_file"  # the file a document-per-file text record came from
INTERNAL = (ORDER, ID_HASH, BUCKETS, TEXT)

# Columns that beamsift writes into scores/ and selected/ besides the stages' (which each stage
# declares: transforms/stages/). Scripts rely on these names, so an input field that has one of
# them is the one renamed: it is written as ``input_<name>``.
CORE_COLUMNS = frozenset({"id", "selected", "reason", N_TOKENS, SOURCE_FILE})


def one_array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one Arrow array: a lone chunk as it is (``combine_chunks`` copies even one,
    1.6 ms for a batch's 10 MB of text)."""
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


@functools.cache
def reserved() -> frozenset[str]:
    """Every name an input field may not keep: the core columns, every column any stage can write
    (from the registry, read on first use: the stages import this module) and the internal ones."""
    from beamsift.transforms.stages import stage_columns

    return CORE_COLUMNS | stage_columns() | frozenset(INTERNAL)


# Score columns that hold the id of another document: written with the id's type.
ID_VALUED = frozenset({"duplicate_of"})


def output_column(field: str) -> str:
    """The column an input field becomes: its own name, unless beamsift writes a column by that
    name (``id`` when it is not the id field, ``selected``, ``reason``, a score): ``input_<name>``."""
    return f"input_{field}" if field in reserved() else field


def input_field(column: str) -> str:
    """The input field a column came from (the inverse of ``output_column``)."""
    if column.startswith("input_") and column[len("input_") :] in reserved():
        return column[len("input_") :]
    return column


# The reasons a record is rejected: a small fixed vocabulary (``GROUP BY reason`` gives a
# handful of rows); what exactly was wrong is in the ``detail`` column.
REJECT_REASONS = (
    "malformed JSON",
    "not a JSON object",
    "invalid UTF-8",
    "missing text field",
    "text is not a string",
    "empty text",
    "missing id",
    "invalid id",
    "duplicate id",
)

REJECTED_SCHEMA = pa.schema(
    [
        ("input", pa.string()),  # pool or target
        ("source_file", pa.string()),
        # Where the record starts: the byte offset of its line in the (decompressed) file for
        # JSONL and text lines (0-based; `tail -c +$((position + 1)) FILE | head -1` shows it),
        # the row index for Parquet and HuggingFace files, 0 for a document-per-file text.
        ("position", pa.int64()),
        ("reason", pa.string()),  # one of REJECT_REASONS
        ("detail", pa.string()),  # what exactly was wrong, in words
        ("record", pa.string()),  # the raw record; invalid UTF-8 bytes as \xNN escapes
        ("id", pa.string()),  # set where the record had a valid id (duplicates)
    ]
)


def arrow_column(values: list) -> pa.Array:
    """An Arrow column from a field's values across records.

    Scalars keep their type (int and float together become float); lists and objects, and
    columns whose values disagree in type, become JSON text, so one odd record never fails a batch.
    """
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {str}:
        return pa.array(values, pa.string())
    if kinds <= {bool}:
        return pa.array(values, pa.bool_())
    if kinds <= {int}:
        try:
            return pa.array(values, pa.int64())
        except OverflowError:
            pass
    elif kinds <= {int, float}:
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    return pa.array(
        [None if v is None else v if isinstance(v, str) else json.dumps(v, default=str) for v in values],
        pa.string(),
    )


def unify_types(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    if pa.types.is_integer(a) and pa.types.is_integer(b):
        return pa.int64()
    if _numeric(a) and _numeric(b):
        return pa.float64()
    return pa.string()


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


class UnifyFieldTypes(beam.CombineFn):
    """Combine {field: arrow type} dicts (field order kept) into the one output schema."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, fields):
        for name, type_str in fields:
            t = _type_from_str(type_str)
            acc[name] = str(unify_types(_type_from_str(acc[name]), t)) if name in acc else type_str
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc.items())
        return out

    def extract_output(self, acc):
        return list(acc.items())


_SIMPLE_TYPES = {
    str(t): t
    for t in (
        pa.null(),
        pa.bool_(),
        pa.int8(),
        pa.int16(),
        pa.int32(),
        pa.int64(),
        pa.uint8(),
        pa.uint16(),
        pa.uint32(),
        pa.uint64(),
        pa.float16(),
        pa.float32(),
        pa.float64(),
        pa.string(),
        pa.large_string(),
        pa.binary(),
        pa.large_binary(),
        pa.date32(),
    )
}


def id_type(fields: list[tuple[str, str]]) -> pa.DataType:
    """The id's type unified over the input (int64 where every id is an integer), from the
    unified ``fields``; text where they do not say."""
    return _type_from_str(dict(fields).get("id", "string"))


def _type_from_str(s: str) -> pa.DataType:
    # Types travel between workers as strings: simple to encode and compare. Anything that is
    # not a plain scalar type (timestamps, lists, structs from Parquet input) is written as text.
    return _SIMPLE_TYPES.get(s, pa.string())


def field_types(table: pa.Table, skip=()) -> list[tuple[str, str]]:
    """The (name, type) of a table's input fields, as UnifyFieldTypes consumes them."""
    out = []
    for field in table.schema:
        if field.name in skip:
            continue
        t = field.type if str(field.type) in _SIMPLE_TYPES else pa.string()
        out.append((field.name, str(t)))
    return out


def conform(table: pa.Table, fields: list[tuple[str, str]], front: list[pa.Field]) -> pa.Table:
    """``table`` with the columns ``front`` then the unified input ``fields``, cast to their types.

    A front column that is also a unified field (the id, whose type is unified over the input
    like a field's) takes the unified type; a column of other documents' ids (``duplicate_of``)
    takes the id's, so that it joins with ``id`` as it is.
    """
    unified = dict(fields)
    arrays, schema = [], []
    for f in front:
        name = "id" if f.name in ID_VALUED and "id" in unified else f.name
        t = _type_from_str(unified[name]) if name in unified else f.type
        arrays.append(_cast(table.column(f.name), t))
        schema.append(pa.field(f.name, t))
    names = {f.name for f in front}
    for name, type_str in fields:
        if name in names:
            continue
        t = _type_from_str(type_str)
        if name in table.column_names:
            arrays.append(_cast(table.column(name), t))
        else:
            arrays.append(pa.nulls(table.num_rows, t))
        schema.append(pa.field(name, t))
    return pa.Table.from_arrays(arrays, schema=pa.schema(schema))


def _cast(column: pa.ChunkedArray, t: pa.DataType) -> pa.ChunkedArray:
    if column.type == t:
        return column
    try:
        return pc.cast(column, t)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Nested or exotic types to text: JSON, the way the JSON reader writes them.
        values = column.to_pylist()
        return pa.chunked_array([pa.array([None if v is None else json.dumps(v, default=str) for v in values], t)])
