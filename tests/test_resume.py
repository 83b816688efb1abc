"""A run interrupted after some stages finished keeps them beside the output; the same command
resumes after the last of them and gives the result an uninterrupted run gives. Another
fingerprint starts afresh; `beamsift clean` removes what was kept."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
from beamsift.pipeline import output
from conftest import (
    POOL_DOCS,
    ROOT,
    TARGET_DOCS,
    TEXT_COLUMNS,
    WORKERS,
    assert_same_result,
    demo_records,
    make_config,
    run_cli,
    small_overrides,
    start_held,
    target_records,
    write_jsonl,
)

GOLDEN = ROOT / "tests" / "golden"


def _interrupt_once_done(args: list[str], out, stage: str) -> tuple[int, str]:
    """Run `beamsift ARGS` and interrupt it (SIGINT) just after ``stage`` has finished."""
    held = out.parent.parent / f"{out.parent.name}.held"
    proc = start_held(args, f"done:{stage}", held)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _scores(out):
    table = pq.read_table(out / "scores").sort_by("id")
    return table.select([c for c in table.column_names if c not in TEXT_COLUMNS])


def test_an_interrupted_run_resumes_after_its_last_finished_stage_with_the_uninterrupted_result(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(POOL_DOCS))
    target = write_jsonl(tmp_path / "target.jsonl", target_records(TARGET_DOCS))
    out = tmp_path / "out"
    small = small_overrides("quality_diversity", pool, target, out)
    args = ["run", "configs/quality_diversity.yaml", *small, "--quiet"]
    status, err = _interrupt_once_done(args, out, "proxy")  # its model trained, its scores written

    assert status == 130 and not out.exists()
    kept = list(tmp_path.glob(f".out{output.TMP_TAG}*"))
    assert len(kept) == 1
    assert err.strip() == (
        "beamsift: interrupted; nothing was published, and output.dir is as it was; kept 6 of 8 stages "
        f"(dsir … proxy) in {kept[0]}: the same command resumes after proxy; "
        f"`beamsift clean {out}` removes what was kept"
    )
    model = "artifacts/proxy/proxy-0/model.safetensors"
    trained = (kept[0] / model).stat().st_mtime_ns

    resumed = run_cli(*args)
    first = resumed.stdout.splitlines()[0]
    assert first.endswith("(resumed after proxy: 6 finished stages kept by an interrupted run)")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"]["stages"] == ["dsir", "filter", "embed", "cluster", "dedup", "proxy"]
    assert [s["name"] for s in manifest["stages"] if s.get("resumed")] == manifest["resumed"]["stages"]
    assert (out / model).stat().st_mtime_ns == trained  # the proxy was not trained again
    # Every model a finished stage saved is published with the result, and listed as beamsift's.
    assert sorted(manifest["files"]) == [f for f in output.files_under(str(out)) if f != "manifest.json"]
    assert {model, "artifacts/cluster/centroids.npy", "artifacts/cluster/basis.npy"} <= set(manifest["files"])
    assert manifest["counts"]["accounted_for"] and manifest["counts"]["input_records"] == POOL_DOCS
    # The ids and scores an uninterrupted run gives (recorded by test_golden's run of this config).
    assert_same_result(_scores(out), pq.read_table(GOLDEN / "quality_diversity.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pool.jsonl", "target.jsonl"]
    assert "_staging" not in os.listdir(out)


def test_a_run_resumes_on_another_runner_with_the_same_result(tmp_path):
    """Kept by the in-process runner, resumed by two worker processes (the fingerprint leaves the
    runner out: the result is the same on every runner)."""
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(POOL_DOCS))
    target = write_jsonl(tmp_path / "target.jsonl", target_records(TARGET_DOCS))
    out = tmp_path / "out"
    args = ["run", "configs/demo.yaml", *small_overrides("demo", pool, target, out), "--quiet"]
    status, err = _interrupt_once_done(args, out, "dsir")
    assert status == 130 and "the same command resumes after dsir" in err

    resumed = run_cli(*args, "--", *WORKERS)
    assert "(resumed after dsir: its first stage kept by an interrupted run)" in resumed.stdout
    assert json.loads((out / "manifest.json").read_text())["runner"]["workers"] == 2
    assert_same_result(_scores(out), pq.read_table(GOLDEN / "demo.parquet"))


def _kept_folder(tmp_path, pid: int, fingerprint: str):
    """A folder as an interrupted run into tmp_path/out leaves it: marker, run file, a finished dsir."""
    folder = tmp_path / f".out{output.TMP_TAG}{pid}-0000"
    (folder / "_staging" / "dsir").mkdir(parents=True)
    (folder / "_staging" / "dsir" / "_done.pkl").write_bytes(pickle.dumps({"stage": "dsir"}))
    run = {"fingerprint": fingerprint, "stages": ["dsir", "select"]}
    (folder / "_staging" / "_run.json").write_text(json.dumps(run))
    marker = {"written_by": "beamsift", "pid": pid, "host": socket.gethostname(), "created": time.time()}
    (folder / output.MARKER).write_text(json.dumps(marker))
    return folder


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_run_of_another_fingerprint_starts_afresh_and_removes_what_was_kept(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    stale = _kept_folder(tmp_path, _dead_pid(), "0" * 20)  # kept by a run with other inputs or config
    proc = run_cli("run", str(cfg))
    assert "resumed" not in proc.stdout
    assert "resumed" not in json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]


def test_clean_removes_what_interrupted_runs_kept_and_nothing_else(tmp_path):
    kept = _kept_folder(tmp_path, _dead_pid(), "0" * 20)
    going = _kept_folder(tmp_path, os.getpid(), "1" * 20)  # a run that is still going: not touched
    # A job handed to Dataflow or Flink may write after its launching command is gone: not touched.
    detached = _kept_folder(tmp_path, _dead_pid(), "2" * 20)
    marker = json.loads((detached / output.MARKER).read_text())
    (detached / output.MARKER).write_text(json.dumps({**marker, "detached": True}))
    # Cut short while its first mark was written: nothing of it counts as finished.
    torn = _kept_folder(tmp_path, _dead_pid(), "3" * 20)
    mark = torn / "_staging" / "dsir" / "_done.pkl"
    mark.write_bytes(mark.read_bytes()[:5])
    foreign = tmp_path / f".out{output.TMP_TAG}not-ours"  # the same shape, without beamsift's marker
    foreign.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("the user's")

    proc = run_cli("clean", str(tmp_path / "out"))
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    assert any(line.startswith(f"beamsift: removed {kept} (kept after dsir; ") for line in lines)
    assert any(line.startswith(f"beamsift: removed {torn} (left by a killed run; ") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([going.name, detached.name, foreign.name, "out"])
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's"
    again = run_cli("clean", str(tmp_path / "out"))
    assert again.stdout.strip() == f"beamsift: nothing to clean beside {tmp_path / 'out'}"
