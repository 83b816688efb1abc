"""``beamsift run CONFIG --check``: everything that can go wrong before a long run, found in
seconds, and what the run will cost.

1. The checks a run makes before it starts, and nothing else: the config, the inputs (their
   files, their first records' fields), the output folder, the saved models.
2. A sample run: the config on the pool's first ``--check-sample`` records (the same stages,
   models trained on what the sample holds), into a temporary folder that is removed. Its
   stages' documents per second on this machine, scaled to the whole pool by its size in bytes,
   make the estimate. Training and fitting steps work on capped samples (``proxy.sample``...), so
   a stage that trains is estimated as if its training grew with the pool: an upper bound there.

Nothing is written to ``output.dir``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile

from apache_beam.io.filesystems import FileSystems
from beamsift.pipeline.config import load_config


def sample_pool(files: list[tuple[str, str, int]], n: int, folder: str) -> tuple[str, str, int] | None:
    """The pool's first ``n`` records in a file of ``folder``: (path, format, bytes they take in the
    input); None for a kind of input that is not sampled (a document per file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, fmt, _ = files[0]
    if fmt in ("parquet", "hf"):
        tables, taken = [], 0
        for p, _, _ in files:
            with FileSystems.open(p) as f:
                if fmt == "parquet":
                    batches = pq.ParquetFile(f).iter_batches(batch_size=min(n, 4096))
                else:
                    batches = pa.ipc.open_stream(f)
                for batch in batches:
                    tables.append(pa.Table.from_batches([batch]).slice(0, n - taken))
                    taken += tables[-1].num_rows
                    if taken >= n:
                        break
            if taken >= n:
                break
        table = pa.concat_tables(tables) if tables else None
        if table is None:
            return None
        out = os.path.join(folder, "sample.parquet")
        pq.write_table(table, out)
        return out, "parquet", table.nbytes
    if not fmt.startswith(("jsonl", "txt")):
        return None
    lines, used = [], 0
    for p, _, _ in files:
        with FileSystems.open(p) as f:  # decompressed by its suffix
            while True:
                raw = f.readline()
                if not raw:
                    break
                used += len(raw)
                line = raw.decode("utf-8", errors="replace")
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
                if len(lines) >= n:
                    break
        if len(lines) >= n:
            break
    kind = "jsonl" if fmt.startswith("jsonl") else "txt"
    out = os.path.join(folder, f"sample.{kind}")
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines)
    if path.endswith((".gz", ".zst", ".bz2")):  # the pool's bytes are compressed: compare like with like
        import gzip

        used = len(gzip.compress("".join(lines).encode("utf-8")))
    return out, kind, used


def sample_overrides(cfg, records: int) -> list[str]:
    """--set arguments that let the sample run with what it holds: a budget, clusters and samples
    no larger than the sample."""
    sets = []
    if cfg["select.k"] is not None:
        sets.append(f"select.k={max(1, min(cfg['select.k'], records // 5))}")
    stages = cfg["stages"] or ["dsir", "select"]
    if "cluster" in stages and cfg["cluster.k"] > max(2, records // 20):
        sets.append(f"cluster.k={max(2, records // 20)}")
    if "filter" in stages and cfg["filter.keep_top"] is not None and cfg["filter.keep_top"] >= 1:
        sets.append(f"filter.keep_top={max(1, min(int(cfg['filter.keep_top']), records // 2))}")
    return sets


def run_check(cfg, args, overrides: list[str], beam_args: list[str]) -> int:
    """``cfg``: the config as ``run`` loaded it from ``args.config`` and ``overrides``."""
    from beamsift.pipeline.run import run_selection

    checked = run_selection(cfg, overwrite=args.overwrite, beam_args=beam_args, check_only=True)
    state = {"new": "new or empty", "earlier": "holds an earlier result"}.get(checked["output_state"], "")
    print(
        "beamsift: check passed: the config, the inputs' files and first records, output.dir "
        f"({checked['output']}: {state}) and the saved models"
    )
    total = checked["pool_bytes"]
    print(f"  input           {checked['pool_files']:>10,}  files, {total / 1e6:,.1f} MB")
    folder = tempfile.mkdtemp(prefix="beamsift-check-")
    try:
        sample = sample_pool(checked["files"], args.check_sample, folder)
        if sample is None:
            print("  (no estimate: this kind of input is not sampled)")
            return 0
        path, fmt, used = sample
        records = _records(path, fmt)
        sets = [f"input.path={path}", f"input.format={fmt}", f"output.dir={os.path.join(folder, 'out')}",
                "output.report=false", *sample_overrides(cfg, records)]  # fmt: skip
        sample_cfg = load_config(args.config, overrides + sets)
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                manifest = run_selection(sample_cfg, overwrite=True)
        except Exception as e:  # noqa: BLE001 - the checks passed; only the estimate is missing
            print(f"  (no estimate: the sample of {records} records did not run: {str(e).splitlines()[0][:200]})")
            return 0
        scale = total / max(used, 1)
        took = manifest["timings"]["total_s"]
        print(f"  sample          {records:>10,}  records in {took:.1f} s; the pool is ~{scale:,.0f}x that: "
              f"~{records * scale:,.0f} records")  # fmt: skip
        estimate = 0.0
        for name, t in manifest["timings"].get("stages", {}).items():
            if not isinstance(t, dict) or not t.get("docs") or not t.get("wall_s"):
                continue
            rate = t["docs"] / t["wall_s"]
            whole = t["wall_s"] * scale
            estimate += whole
            print(f"  {name:<15} {rate:>10,.0f}  documents/s  ~{_duration(whole)} for the whole pool")
        print(
            f"  estimate        ~{_duration(estimate)} of stage time in one process (linear in the pool; a stage "
            "that trains on a capped sample takes less)"
        )
        print("  nothing was written to output.dir")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _records(path: str, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
