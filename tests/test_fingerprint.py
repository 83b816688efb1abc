"""A run's fingerprint (its inputs' content, its resolved config, beamsift's version): the same
command again does no work; a changed input, a changed key or --force runs again."""

from __future__ import annotations

import json
import os

from conftest import WORKERS, demo_records, make_config, run_cli, write_jsonl


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def test_an_unchanged_run_is_skipped_and_any_change_runs_again(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(200))
    cfg = make_config(tmp_path, pool, pool, select={"k": 20})
    out = tmp_path / "out"
    run_cli("run", str(cfg), "--quiet")
    first = _manifest(out)
    assert len(first["fingerprint"]) == 20

    # The same command (on another runner, too: the result is the same on every runner): no work.
    for extra in ([], ["--", *WORKERS]):
        again = run_cli("run", str(cfg), "--quiet", *extra)
        assert "already holds this run's result" in again.stdout and first["fingerprint"] in again.stdout
        assert _manifest(out)["run_id"] == first["run_id"]

    # --force runs it again, and gives the same fingerprint and ids.
    run_cli("run", str(cfg), "--quiet", "--force")
    forced = _manifest(out)
    assert forced["run_id"] != first["run_id"] and forced["fingerprint"] == first["fingerprint"]

    # A changed key, or an input with a new modification time: a new fingerprint, so the old
    # result is an earlier run's (replaced only with --overwrite).
    changed = run_cli("run", str(cfg), "--quiet", "--set", "seed=5", check=False)
    assert changed.returncode == 2 and "--overwrite" in changed.stderr
    os.utime(pool, (1_700_000_000, 1_700_000_000))
    touched = run_cli("run", str(cfg), "--quiet", "--overwrite")
    assert "already holds" not in touched.stdout
    assert _manifest(out)["fingerprint"] != first["fingerprint"]


def test_check_validates_estimates_from_a_sample_and_writes_nothing(tmp_path, tmp_path_factory):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(400))
    cfg = make_config(tmp_path, pool, pool, stages=["dsir", "embed", "cluster", "select"],
                      cluster={"k": 8, "sample": 300}, select={"method": "balanced", "k": 100})  # fmt: skip
    tmp = str(tmp_path_factory.mktemp("tmpdir"))  # the run's temp dir: left empty
    proc = run_cli("run", str(cfg), "--check", "--check-sample", "120", env={"TMPDIR": tmp})
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("beamsift: check passed") and "new or empty" in lines[0]
    assert any(line.split()[:2] == ["sample", "120"] for line in lines)
    rates = {line.split()[0]: line for line in lines if "documents/s" in line}
    assert {"featurize", "dsir", "embed", "cluster", "select"} <= set(rates)
    assert "estimate" in lines[-2] and lines[-1].strip() == "nothing was written to output.dir"
    assert not (tmp_path / "out").exists() and os.listdir(tmp) == []
    # What a run would refuse, --check refuses, in one line.
    bad = run_cli("run", str(cfg), "--check", "--set", "input.text_field=body", check=False)
    assert bad.returncode == 2 and "input.text_field 'body'" in bad.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("the user's")
    refused = run_cli("run", str(cfg), "--check", check=False)
    assert refused.returncode == 2 and "mine.txt" in refused.stderr
