"""Resuming an interrupted run: how much of the run's time a resume saves, and that it gives the
same result.

    python benchmarks/resume.py [--config configs/quality_diversity.yaml] [--after proxy]

1. The config as it is, uninterrupted, into one folder: the baseline's wall time (process start to
   exit), measured in this run.
2. The same config into a second folder, interrupted (SIGINT) as soon as the stage ``--after`` has
   left its done mark; its wall time until the interrupt.
3. The same command again: it resumes after that stage. Its wall time against the baseline's, and
   whether its selected ids and every score equal the baseline's.

Run on a quiet machine; nothing else should be timed at once.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def beamsift(*args: str) -> list[str]:
    return [sys.executable, "-m", "beamsift.pipeline.cli", *args]


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started, proc


def interrupted(cmd: list[str], out: str, stage: str) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent, name = os.path.split(out)
    pattern = os.path.join(parent, f".{name}.beamsift-tmp-*", "_staging", stage, "_done.pkl")
    while not glob.glob(pattern):
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before {stage} finished:\n{proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    print(f"  {err.strip()}")
    return time.perf_counter() - started


def result(out: str):
    import duckdb

    con = duckdb.connect()
    return con.sql(f"SELECT * FROM read_parquet('{out}/scores/*.parquet') ORDER BY id").fetchall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quality_diversity.yaml")
    parser.add_argument("--after", default="proxy", help="the stage after which the run is interrupted")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="beamsift-resume-bench-")
    base, resumed = os.path.join(work, "uninterrupted"), os.path.join(work, "resumed")
    load = os.getloadavg()[0]

    try:
        baseline, _ = timed(beamsift("run", args.config, "--set", f"output.dir={base}", "--quiet"))
        print(f"uninterrupted: {baseline:.1f} s")
        cmd = beamsift("run", args.config, "--set", f"output.dir={resumed}", "--quiet")
        until = interrupted(cmd, resumed, args.after)
        print(f"interrupted after {args.after}: {until:.1f} s")
        resume, proc = timed(cmd)
        print(f"resumed: {resume:.1f} s  ({proc.stdout.splitlines()[0]})")
        same = result(base) == result(resumed)
        print(
            f"resume / uninterrupted: {resume / baseline:.2f}  (target < 0.60); same ids and scores: {same}; "
            f"load average at the start {load:.2f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the benchmark's own temporary folder


if __name__ == "__main__":
    main()
