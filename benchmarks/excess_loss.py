"""Target-directed selection with neural models against DSIR, on the same pool in the same run.

    python benchmarks/excess_loss.py [--pool data/pool.jsonl.gz] [--target data/target.jsonl]
                                     [--target-source pydoc] [--k 800]

Runs `configs/excess_loss.yaml`, `configs/influence.yaml` (the proxy's target_influence; labels
from `source`) and `configs/dsir.yaml` through the command line on the same pool, and prints,
for each score, the AUROC at ranking the target-domain documents (source = --target-source)
above the rest, and the precision of its top-k; with the wall time of each run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import duckdb
import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config: str, out: str, pool: str, target: str, *sets: str) -> float:
    started = time.time()
    args = ["--set", f"input.path={pool}", "--set", f"target.path={target}", "--set", f"output.dir={out}", *sets]
    subprocess.run(
        [sys.executable, "-m", "beamsift.pipeline.cli", "run", config, "--quiet", *args],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=os.path.join(ROOT, "data", "pool.jsonl.gz"))
    ap.add_argument("--target", default=os.path.join(ROOT, "data", "target.jsonl"))
    ap.add_argument("--target-source", default="pydoc")
    ap.add_argument("--k", type=int, default=800)
    ap.add_argument("--only", nargs="*", help="run only these scores")
    args = ap.parse_args()
    runs = {
        "excess_loss": ("configs/excess_loss.yaml", "excess_loss", ["--set", f"select.k={args.k}"]),
        # Without labels: the proxy is the causal LM, as the excess-loss pool model (with the
        # bundled `source` labels the target's gradient would name its domain outright).
        "target_influence": (
            "configs/influence.yaml",
            "target_influence",
            [
                "--set",
                f"select.k={args.k}",
                "--set",
                "input.label_field=null",
                "--set",
                "proxy.seeds=1",
                "--set",
                "proxy.sample=1500",
                "--set",
                "proxy.epochs=2",
                "--set",
                "proxy.self_influence=false",
            ],
        ),
        "dsir_log_weight": (
            "configs/dsir.yaml",
            "dsir_log_weight",
            ["--set", f"select.k={args.k}", "--set", "dsir.min_tokens=0"],
        ),
    }
    with tempfile.TemporaryDirectory() as d:
        results = {}
        for name, (config, column, sets) in runs.items():
            if args.only and name not in args.only:
                continue
            out = os.path.join(d, name)
            seconds = run(config, out, args.pool, args.target, *sets)
            rows = duckdb.connect().execute(f"SELECT source, {column} FROM '{out}/scores/*.parquet'").fetchall()
            truth = np.array([s == args.target_source for s, _ in rows], dtype=int)
            score = np.array([v if v is not None else -np.inf for _, v in rows], dtype=float)
            top = np.argsort(-score, kind="stable")[: args.k]
            results[name] = (roc_auc_score(truth, score), truth[top].mean(), seconds, len(rows))
        n = next(iter(results.values()))[3]
        print(f"{n:,} pool documents, {args.target_source} is the target's domain; top-k precision at k={args.k}")
        print(f"{'score':<18}{'AUROC':>8}{'precision':>11}{'wall s':>9}{'docs/s':>8}")
        for name, (auc, precision, seconds, n) in results.items():
            print(f"{name:<18}{auc:>8.3f}{precision:>11.3f}{seconds:>9.0f}{n / seconds:>8.0f}")


if __name__ == "__main__":
    main()
