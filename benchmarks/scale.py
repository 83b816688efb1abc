"""How time and memory grow with the corpus: every shipped config without a model stage at 100k,
300k and 1M documents, in one process and with two worker processes.

    python benchmarks/scale.py                                  # 100k, 300k, 1M; both modes
    python benchmarks/scale.py --docs 100000,300000 --modes two --configs dsir,semdedup
    python benchmarks/scale.py --side-inputs --docs 100000      # also the size of every side input
    python benchmarks/scale.py --docs 100000,1000000 --repeat 3 # medians of 3 rounds (this VM's spread)

The corpus is the bundled pool's real text cut into new documents (60-300 words of spans from
random pool documents, seeded: no document is a copy of another) with 5% planted again as
near-duplicates under fresh ids (``diversity_memory.build_corpus``). Each run is ``beamsift run``
through the CLI, its process tree sampled every 0.1 s for RSS. Printed per config and size:

- wall time, end to end, and per step (the manifest's ``timings.stages``: read, featurize,
  stage, each stage of the config, write; steps overlap where the runner fuses them);
- peak RSS of the whole process tree and of its largest process;
- bytes read back from staging per 4,096-document shard, by the table read (the manifest's
  ``timings.staging_read_bytes``: ``docs`` is the staged documents, the others a stage's columns);
- then the ratios the issue asks for: RSS at the largest size over the smallest (flat: within
  ±10%), and each config's wall time over DSIR's at the same size.

``--repeat N`` runs the configs N times in rounds (each config's runs alternate with DSIR's, the
disk synced before every run) and reports medians: on a shared VM one run's wall time moves by
±15% and its peak RSS by ~100 MB (mapped pages), about the whole of a ±10% band; each round's
ratio to DSIR is printed too.

``--side-inputs`` runs each config once more in this process (one worker) with every side input
measured as it is materialised: its pickled size, summed over its elements.

The configs: ``demo`` and ``dsir`` (DSIR), ``semdedup``, ``minhash``, and ``quality_diversity``
without its proxy stages (DSIR -> top 40% -> SVD embedding -> k-means -> exact + SemDeDup ->
cluster-balanced), as in ``diversity_memory.py``. The configs with a model stage (el2n, influence,
loss_reweight, excess_loss, dsir_el2n, presence, quad, perplexity_correlations) are left out:
their time is the model's (see ``scoring_throughput.py``) and their memory the model's and its
training sample's, whatever the corpus.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from diversity_memory import build_corpus  # noqa: E402
from dsir_vs_reference import timed  # noqa: E402

SHARD = 4096  # the figures per shard are per 4,096 documents (input.batch_size, the most a shard holds)
MODES = {
    "one": ["--direct_running_mode=in_memory"],
    "two": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
}


def page_cache_gb() -> float:
    """The machine's page cache (``Cached`` in /proc/meminfo; NaN elsewhere): on a VM whose host
    takes freed memory back, what the machine already holds decides how dear a run's fresh memory
    is (docs/scale-history.md), so it is printed beside each run."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Cached:")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def config_file(name: str, tmp: Path) -> tuple[Path, list[str]]:
    """A shipped config (proxy stages taken out for quality_diversity) and its --set overrides."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    sets: list[str] = []
    if name == "quality_diversity":
        cfg["stages"] = [s for s in cfg["stages"] if s not in ("proxy", "filter_hardest")]
        for section in ("proxy", "filter_hardest"):
            cfg.pop(section, None)
        sets = ["select.column=dsir_key", "select.fraction=null", "select.k=10000"]
    elif name in ("demo", "dsir"):
        sets = ["select.k=10000"]
    for key in ("input", "target"):
        if key in cfg and not Path(cfg[key]["path"]).is_absolute():
            cfg[key]["path"] = str(ROOT / cfg[key]["path"])
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, sets


def run_one(name: str, corpus: Path, n: int, mode: str, tmp: Path) -> dict:
    path, sets = config_file(name, tmp)
    out = tmp / f"out-{name}-{mode}"
    cmd = [sys.executable, "-m", "beamsift.pipeline.cli", "run", "--quiet", "--no-progress", "--force", str(path)]
    for s in [f"input.path={corpus}", f"output.dir={out}", *sets]:
        cmd += ["--set", s]
    wall, rss, rss_one = timed([*cmd, "--", *MODES[mode]], tmp / f"{name}-{mode}.log")
    manifest = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out)
    read = manifest["timings"].get("staging_read_bytes", {})
    return {
        "config": name,
        "docs": n,
        "mode": mode,
        "wall_s": round(wall, 1),
        "rss_all_mb": round(rss / 2**20),
        "rss_largest_mb": round(rss_one / 2**20),
        # every step's wall time: reading, featurizing, staging, each stage, writing
        "stages_s": {k: v.get("wall_s") for k, v in manifest["timings"].get("stages", {}).items()},
        "staging_read_per_shard_kb": {t: round(b * SHARD / n / 1024) for t, b in read.items()},
        "selected": manifest["counts"]["selected"],
    }


def side_input_sizes(name: str, corpus: Path, tmp: Path) -> dict:
    """{side input (its producer's label): pickled bytes} for one run of ``name`` in this process."""
    import apache_beam as beam
    from beamsift.pipeline.config import load_config
    from beamsift.pipeline.run import run_selection

    log = tmp / f"side-{name}.tsv"
    log.write_text("")
    original = beam.pvalue.AsSideInput.__init__
    count = [0]

    def measured(self, pcoll, *args, **kwargs):
        count[0] += 1
        label = pcoll.producer.full_label if pcoll.producer else str(pcoll)
        pcoll = pcoll | f"MeasureSideInput{count[0]}" >> beam.Map(_record, str(log), label)
        original(self, pcoll, *args, **kwargs)

    path, sets = config_file(name, tmp)
    cfg = load_config(str(path), [f"input.path={corpus}", f"output.dir={tmp / 'side-out'}", *sets])
    beam.pvalue.AsSideInput.__init__ = measured
    try:
        run_selection(cfg, force=True, beam_args=["--direct_running_mode=in_memory"])
    finally:
        beam.pvalue.AsSideInput.__init__ = original
    sizes: dict[str, int] = {}
    for line in log.read_text().splitlines():
        label, n = line.rsplit("\t", 1)
        sizes[label] = sizes.get(label, 0) + int(n)
    return sizes


def _record(value, log: str, label: str):
    with open(log, "a") as f:
        f.write(f"{label}\t{len(pickle.dumps(value))}\n")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default="100000,300000,1000000")
    parser.add_argument("--configs", default="demo,dsir,semdedup,minhash,quality_diversity")
    parser.add_argument("--modes", default="one,two")
    parser.add_argument("--side-inputs", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every config; medians reported")
    parser.add_argument("--json", help="also write every row to this file")
    args = parser.parse_args()
    import os

    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="beamsift-scale-"))
    try:
        for n_docs in [int(x) for x in args.docs.split(",")]:
            corpus = tmp / "pool.jsonl"
            build_corpus(corpus, n_docs)
            # The corpus on disk before the first run: its write-back (3.4 GB at 1M) otherwise
            # lands in that run's time (DSIR one process at 1M: 55.0 s, against 33 s alone)
            os.sync()
            n = sum(1 for _ in open(corpus, "rb"))
            print(f"\n{n:,} documents, {corpus.stat().st_size / 2**20:,.0f} MB", flush=True)
            for mode in args.modes.split(","):
                for round_, name in [(r, c) for r in range(args.repeat) for c in args.configs.split(",")]:
                    os.sync()  # the previous run's outputs written back before this one, not during it
                    cached = page_cache_gb()
                    row = {**run_one(name, corpus, n, mode, tmp), "round": round_, "cached_before_gb": cached}
                    rows.append(row)
                    stages = "  ".join(f"{k} {v:.1f}" for k, v in row["stages_s"].items() if v is not None)
                    read = "  ".join(f"{k} {v:,}" for k, v in row["staging_read_per_shard_kb"].items())
                    print(
                        f"  {name:<18}{mode:<4}{row['wall_s']:>8.1f} s  RSS {row['rss_all_mb']:>6,} MB all"
                        f" / {row['rss_largest_mb']:>5,} MB largest   load {os.getloadavg()[0]:.2f}"
                        f"   page cache before {cached:.1f} GB\n"
                        f"      stages (s): {stages}\n      staging read per shard (KB): {read}",
                        flush=True,
                    )
                    if args.side_inputs and mode == args.modes.split(",")[0] and round_ == 0:
                        sizes = side_input_sizes(name, corpus, tmp)
                        print("      side inputs (bytes): " + "  ".join(f"{k} {v:,}" for k, v in sizes.items()))
                        row["side_inputs"] = sizes
            corpus.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summarize(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def summarize(rows: list[dict]) -> None:
    """The ratios, from each (config, mode, size)'s medians over its rounds."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["config"], r["mode"], r["docs"]), []).append(r)
    measures = ("wall_s", "rss_all_mb", "rss_largest_mb")
    med = {key: {k: statistics.median(r[k] for r in rs) for k in measures} for key, rs in runs.items()}
    rounds = max(len(rs) for rs in runs.values())
    if rounds > 1:
        print(f"\nmedians of {rounds} rounds")
        for (name, mode, n), m in med.items():
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in runs[(name, mode, n)])
            print(
                f"  {name:<18}{mode:<4}{n:>10,}  {m['wall_s']:>7.1f} s ({walls})  RSS {m['rss_all_mb']:>6,.0f} MB all"
                f" / {m['rss_largest_mb']:>5,.0f} MB largest"
            )
    sizes = sorted({n for _, _, n in med})
    if len(sizes) > 1:
        print(f"\npeak RSS at {sizes[-1]:,} over {sizes[0]:,} documents (flat: 0.9-1.1)")
        for name, mode in sorted({(c, m) for c, m, _ in med}):
            first, last = med.get((name, mode, sizes[0])), med.get((name, mode, sizes[-1]))
            if first and last:
                print(
                    f"  {name:<18}{mode:<4} all {last['rss_all_mb'] / first['rss_all_mb']:.2f}"
                    f"  largest {last['rss_largest_mb'] / first['rss_largest_mb']:.2f}"
                )
    print("\nwall time over DSIR's (configs/dsir.yaml) at the same size and mode (rounds: each round's own pair)")
    for (name, mode, n), m in med.items():
        dsir = med.get(("dsir", mode, n))
        if dsir and name != "dsir":
            pairs = [
                r["wall_s"] / d["wall_s"]
                for r in runs[(name, mode, n)]
                for d in runs[("dsir", mode, n)]
                if d.get("round") == r.get("round")
            ]
            each = f"  (rounds: {', '.join(f'{x:.2f}x' for x in pairs)})" if len(pairs) > 1 else ""
            print(f"  {name:<18}{mode:<4}{n:>10,}  {m['wall_s'] / dsir['wall_s']:.2f}x{each}")


if __name__ == "__main__":
    main()
