"""Per-cluster statistics: what each k-means cluster holds and what the run kept of it.

One row per cluster, written to ``clusters/part-00000.parquet`` under the output (the ``clusters``
view of ``beamsift query``) and to the manifest: ``size`` (documents assigned to it), ``selected``,
``duplicates`` (taken out by the dedup stage), ``mean_<column>`` for each numeric score column of
the stages before the selector (and ``n_tokens``), and ``examples``: the ids of the documents
nearest the centroid (the cluster's most typical members), to read what a cluster is about.

Each shard yields partial sums per cluster and its own nearest few; one combine adds them up, so
nothing larger than (clusters × columns) travels.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain import shard_of
from beamsift.transforms.chain.staging import read_id_hashes, read_staging, write_parquet
from beamsift.transforms.chain.sums import fixed_point_sum
from beamsift.transforms.io.schema import id_type

EXAMPLES = 3
FIXED_POINT = float(1 << 20)
DUPLICATE_REASONS = ("exact duplicate", "near duplicate")
FILE = "clusters/part-00000.parquet"


def mean_columns(chain, select_stage: str, skip=()) -> list[str]:
    """The numeric score columns a cluster's mean is reported for (``skip``: those whose mean
    means nothing, as the stages declare them)."""
    out = ["n_tokens"]
    for stage in chain.stages[: chain.stages.index(select_stage)]:
        for name, type_str in chain.columns.get(stage, ()):
            if type_str in ("double", "int64") and not name.startswith("_") and name not in skip and name not in out:
                out.append(name)
    return out


class _ClusterPartials(beam.DoFn):
    def __init__(self, chain, select_stage: str, columns: list[str]):
        self.chain, self.select_stage, self.columns = chain, select_stage, columns

    def process(self, item):
        shard = shard_of(item)
        clusters = self.chain.column("cluster", shard.name)
        assigned = ~np.isnan(clusters)
        if not assigned.any():
            return
        final = self.chain.read(self.select_stage, shard.name, ["selected", "_reason"])
        selected = np.asarray(final.column("selected").to_pylist(), dtype=bool)
        duplicate = np.isin(np.asarray(final.column("_reason").to_pylist(), dtype=object), DUPLICATE_REASONS)
        distance = self.chain.column("cluster_distance", shard.name)
        ids = read_staging(shard.path, ["id"]).column("id").to_pylist()
        id_hash = read_id_hashes(shard.path)
        values = {c: self.chain.column(c, shard.name) for c in self.columns}
        out = {}
        for c in np.unique(clusters[assigned]).astype(np.int64).tolist():
            rows = np.flatnonzero(clusters == c)
            sums = {}
            for name, v in values.items():
                x = v[rows]
                x = x[~np.isnan(x)]
                sums[name] = (fixed_point_sum(x, FIXED_POINT), len(x))  # the same for any split
            # Ids as read (an integer id stays one); ordered by (distance, id hash) alone.
            nearest = sorted(zip(distance[rows].tolist(), id_hash[rows].tolist(), (ids[r] for r in rows)), key=_near)
            out[c] = {
                "size": len(rows),
                "selected": int(selected[rows].sum()),
                "duplicates": int(duplicate[rows].sum()),
                "sums": sums,
                "examples": nearest[:EXAMPLES],
            }
        yield out


def _near(example: tuple) -> tuple:
    # Ids of two batches may differ in type (int, str): they are never compared.
    return example[0], example[1]


class _SumClusters(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, part):
        for c, p in part.items():
            if c not in acc:
                acc[c] = {**p, "sums": dict(p["sums"]), "examples": list(p["examples"])}
                continue
            a = acc[c]
            for key in ("size", "selected", "duplicates"):
                a[key] += p[key]
            for name, (s, n) in p["sums"].items():
                s0, n0 = a["sums"].get(name, (0, 0))
                a["sums"][name] = (s0 + s, n0 + n)
            a["examples"] = sorted(a["examples"] + p["examples"], key=_near)[:EXAMPLES]
        return acc

    def merge_accumulators(self, accs):
        out = {}
        for acc in accs:
            self.add_input(out, acc)
        return out

    def extract_output(self, acc):
        rows = []
        for c in sorted(acc):
            a = acc[c]
            row = {"cluster": c, "size": a["size"], "selected": a["selected"], "duplicates": a["duplicates"]}
            for name, (s, n) in a["sums"].items():
                row[f"mean_{name}"] = s / FIXED_POINT / n if n else None
            row["examples"] = [e[2] for e in a["examples"]]
            rows.append(row)
        return rows


# Columns a selector adds to clusters/ (the quad selector's bandit), with their types.
EXTRA_TYPES = {
    "quad_score": pa.float64(),
    "quad_reward": pa.float64(),
    "quad_probed": pa.int64(),
    "quad_chosen": pa.int64(),
}


def cluster_table(rows: list[dict], columns: list[str], ids: pa.DataType | None = None) -> pa.Table:
    """The rows as a table; ``examples`` is a list of ``ids``, the type of the run's ``id`` (text if not given)."""
    extra = [name for name in EXTRA_TYPES if any(name in r for r in rows)]
    fields = [
        pa.field("cluster", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("selected", pa.int64()),
        pa.field("duplicates", pa.int64()),
        *(pa.field(f"mean_{c}", pa.float64()) for c in columns),
        *(pa.field(name, EXTRA_TYPES[name]) for name in extra),
        pa.field("examples", pa.list_(ids or pa.string())),
    ]
    schema = pa.schema(fields)
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in fields} for r in rows], schema=schema)


def _write(rows: list[dict], out: str, columns: list[str], fields=(), extra=None) -> dict:
    if extra:  # a selector's columns, by cluster
        rows = [{**r, **extra.get(r["cluster"], {})} for r in rows]
    ids = id_type(fields)
    if not pa.types.is_integer(ids):  # text ids, or ids of mixed types that the run writes as text
        rows = [{**r, "examples": [str(e) for e in r["examples"]]} for r in rows]
    write_parquet(cluster_table(rows, columns, ids), FileSystems.join(out, FILE))
    return {"clusters": rows}


class ClusterStatistics(beam.PTransform):
    """The final shards -> the per-cluster rows, written under ``out``; yields {"clusters": rows}
    for the manifest. ``fields``: the unified field types (a side input), for the id's type."""

    def __init__(self, chain, select_stage: str, out: str, fields=(), skip=(), extra=None):
        super().__init__()
        self.chain, self.select_stage, self.out, self.fields = chain, select_stage, out, fields
        self.extra = extra  # a side input: a selector's columns by cluster (or None)
        self.columns = mean_columns(chain, select_stage, skip)

    def expand(self, shards):
        return (
            shards
            | "ClusterPartials" >> beam.ParDo(_ClusterPartials(self.chain, self.select_stage, self.columns))
            | "SumClusters" >> beam.CombineGlobally(_SumClusters())
            | "WriteClusters" >> beam.Map(_write, self.out, self.columns, self.fields, self.extra)
        )
