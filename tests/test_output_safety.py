"""The user's data is sacred: beamsift deletes only what it wrote, and a run that does not finish
leaves the previous result as it was. Driven through the command line, on real files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from beamsift.pipeline import output
from conftest import make_config, run_cli, start_held, tree_of, write_jsonl


def _refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("beamsift: error: output.dir"), line
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_with_the_users_files_is_refused_and_left_intact(tmp_path, small_corpus, overwrite):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes")
    (out / "scores").mkdir()  # even a name beamsift uses does not make the folder beamsift's
    before = tree_of(out)
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], out=out)
    proc = run_cli("run", str(cfg), *(["--overwrite"] if overwrite else []), check=False)
    _refused(proc, "holds notes.txt, which beamsift did not write", "choose a new or empty folder")
    assert tree_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "mine"]  # nothing beside it


def test_a_folder_that_holds_the_input_is_refused_and_the_input_kept(tmp_path, small_corpus):
    data = tmp_path / "data"
    data.mkdir()
    pool = write_jsonl(data / "pool.jsonl", [json.loads(line) for line in open(small_corpus["pool"])][:200])
    before = tree_of(data)
    cfg = make_config(tmp_path, pool, small_corpus["target"], out=data)
    proc = run_cli("run", str(cfg), "--overwrite", check=False)
    _refused(proc, f"holds {pool}, which input.path reads")
    assert tree_of(data) == before
    # The target is an input too.
    tdir = tmp_path / "t"
    tdir.mkdir()
    target = tdir / "target.jsonl"
    target.write_bytes(small_corpus["target"].read_bytes())
    cfg = make_config(tmp_path, small_corpus["pool"], target, out=tdir)
    _refused(run_cli("run", str(cfg), "--overwrite", check=False), f"holds {target}, which target.path reads")
    assert target.read_bytes() == small_corpus["target"].read_bytes()


def test_an_output_dir_inside_a_dataset_folder_is_refused(tmp_path, small_corpus):
    import datasets

    records = [json.loads(line) for line in open(small_corpus["pool"])][:100]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    before = tree_of(tmp_path / "hf")
    cfg = make_config(tmp_path, tmp_path / "hf", small_corpus["target"], out=tmp_path / "hf" / "selection")
    _refused(run_cli("run", str(cfg), check=False), f"is inside {tmp_path / 'hf'}, which input.path reads")
    assert tree_of(tmp_path / "hf") == before


def test_an_interrupted_run_leaves_the_previous_result_queryable(tmp_path, tmp_path_factory, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], input={"batch_size": 16})
    out = tmp_path / "out"
    run_cli("run", str(cfg))
    before = tree_of(out)
    tmp = str(tmp_path_factory.mktemp("tmpdir"))  # the run's temp dir: left as it was found
    for sig, status, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        # Held with every file of the new result written, just before it would be published.
        held = tmp_path.parent / f"{tmp_path.name}.held"
        proc = start_held(["run", str(cfg), "--force", "--quiet"], "publish", held, env={"TMPDIR": tmp})
        held.unlink()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == status
        # Its stages had finished (it was about to publish): they are kept for the same
        # command to resume after, in its own folder beside the output, until `beamsift clean`.
        kept = list(tmp_path.glob(".out.beamsift-tmp-*"))
        assert err.strip() == (
            f"beamsift: {word}; nothing was published, and output.dir is as it was; kept 2 of 2 stages "
            f"(dsir, select) in {kept[0]}: the same command resumes after select; "
            f"`beamsift clean {out}` removes what was kept"
        )
        assert tree_of(out) == before  # the previous result, byte for byte
        cleaned = run_cli("clean", str(out))
        assert cleaned.stdout.startswith(f"beamsift: removed {kept[0]} (kept after select; ")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]  # no leftovers
        assert os.listdir(tmp) == []
        q = run_cli("query", str(out), "SELECT count(*) AS n FROM selected")
        assert q.stdout.splitlines()[2].strip() == "50"


def test_a_failed_run_leaves_the_previous_result_and_nothing_else(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    out = tmp_path / "out"
    run_cli("run", str(cfg))
    before = tree_of(out)
    # The pool has fewer than 500 documents of 200 tokens: known only once it has been read.
    proc = run_cli("run", str(cfg), "--overwrite", "--set", "select.k=500", "--set", "dsir.min_tokens=200", check=False)
    assert proc.returncode == 2 and "is larger than the" in proc.stderr
    assert tree_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]
    # ...and the next run replaces it without ceremony.
    run_cli("run", str(cfg), "--overwrite", "--set", "select.k=7")
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 7


def test_a_killed_runs_leftovers_are_removed_by_the_next_run(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".out{output.TMP_TAG}{dead.stdout.strip()}-0000"
    (leftover / "_staging").mkdir(parents=True)
    marker = {"written_by": "beamsift", "pid": int(dead.stdout), "host": socket.gethostname()}
    (leftover / output.MARKER).write_text(json.dumps(marker))
    # A folder of the same shape that beamsift did not mark is not touched.
    foreign = tmp_path / f".out{output.TMP_TAG}not-ours"
    foreign.mkdir()
    run_cli("run", str(cfg))
    assert sorted(p.name for p in tmp_path.iterdir()) == [foreign.name, "config.yaml", "out"]


def test_an_output_of_an_earlier_version_is_recognised_by_its_manifest(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    out = tmp_path / "out"
    run_cli("run", str(cfg))
    (out / output.MARKER).unlink()  # versions before the marker wrote only the manifest
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["fingerprint"]  # ... and no fingerprint
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("run", str(cfg), check=False)
    _refused(proc, "holds the result of an earlier run; pass --overwrite")
    run_cli("run", str(cfg), "--overwrite", "--set", "select.k=9")
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 9


def test_the_swap_without_an_atomic_exchange(tmp_path, monkeypatch):
    old, new = tmp_path / "out", tmp_path / ".out.beamsift-tmp-1"
    for folder, text in ((old, "old"), (new, "new")):
        (folder / "scores").mkdir(parents=True)
        (folder / "scores" / "a.parquet").write_text(text)
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)  # as on a system without renameat2
    output._swap_local(str(new), str(old))
    assert (old / "scores" / "a.parquet").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_object_store_publish_copies_the_manifest_last_and_drops_old_shards(tmp_path):
    old, new = tmp_path / "out", tmp_path / ".out.beamsift-tmp-1"
    for folder, shards in ((old, ["part-1", "part-2"]), (new, ["part-2", "part-3"])):
        (folder / "scores").mkdir(parents=True)
        for shard in shards:
            (folder / "scores" / f"{shard}.parquet").write_text(f"{folder.name} {shard}")
        files = [f"scores/{shard}.parquet" for shard in shards] + [output.MARKER]
        (folder / output.MANIFEST).write_text(json.dumps({"beamsift_version": folder.name, "files": files}))
        (folder / output.MARKER).write_text("{}")
    (old / "scores" / "notes.md").write_text("not listed: not beamsift's, never removed")
    output._copy_over(str(new), str(old))
    assert sorted(p.name for p in (old / "scores").iterdir()) == ["notes.md", "part-2.parquet", "part-3.parquet"]
    assert (old / "scores" / "part-2.parquet").read_text() == f"{new.name} part-2"
    assert json.loads((old / output.MANIFEST).read_text())["beamsift_version"] == new.name
    assert not new.exists()
