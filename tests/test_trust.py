"""Results a user can trust: what beamsift wrote is known file by file, settings that would be
ignored are refused, a budget never silently selects none, the manifest says what was read and
what to worry about, and nothing is left in the temp dir. Through the command line, on real files."""

from __future__ import annotations

import json
import re

import pytest
from conftest import demo_records, make_config, run_cli, tree_of, write_jsonl


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("beamsift: error: "), line
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_a_user_file_at_any_depth_of_an_old_output_is_refused_and_kept(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    out = tmp_path / "out"
    run_cli("run", str(cfg))
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert sorted(manifest["files"] + ["manifest.json"]) == on_disk  # every file it wrote, and only those
    for mine in ("scores/my_analysis.csv", "rejected/reviewed/notes.md", "artifacts/mine/keep.txt"):
        (out / mine).parent.mkdir(parents=True, exist_ok=True)
        (out / mine).write_text("the user's own")
        before = tree_of(out)
        for flags in ([], ["--overwrite"]):
            proc = run_cli("run", str(cfg), *flags, "--set", "select.k=7", check=False)
            _one_line_error(proc, f"output.dir {out} holds {mine}, which beamsift did not write")
            assert tree_of(out) == before
            assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "out"]
        (out / mine).unlink()
        if (out / mine).parent.name in ("reviewed", "mine"):
            (out / mine).parent.rmdir()
    # An empty folder of the user's counts too: it is not beamsift's to remove.
    (out / "artifacts" / "empty").mkdir()
    _one_line_error(run_cli("run", str(cfg), "--force", check=False), "holds artifacts/empty/")
    (out / "artifacts" / "empty").rmdir()
    run_cli("run", str(cfg), "--overwrite", "--set", "select.k=7")
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 7


@pytest.mark.parametrize(
    "section,values",
    [
        ("filter", {"column": "n_tokens", "min": 200}),
        ("proxy", {"seeds": 1}),
        ("excess_loss", {"model": None}),
        ("embed", {"dim": 32}),
        ("cluster", {"k": 4}),
        ("dedup", {"epsilon": 0.1}),
        ("reweight", {"strategy": "mid"}),
        ("filter_long", {"column": "n_tokens", "min": 200}),
    ],
)
def test_a_section_for_a_stage_that_stages_does_not_list_is_refused(tmp_path, small_corpus, section, values):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], **{section: values})
    proc = run_cli("run", str(cfg), check=False)
    _one_line_error(proc, f"the section {section!r} configures the", "which 'stages' does not list")
    assert not (tmp_path / "out").exists()


def test_sections_of_stages_left_out_with_set_stages_are_dropped(tmp_path, small_corpus):
    cfg = make_config(
        tmp_path,
        small_corpus["pool"],
        small_corpus["target"],
        stages=["dsir", "filter", "select"],
        filter={"column": "n_tokens", "min": 10**6},  # would leave nothing to select
    )
    run_cli("run", str(cfg), "--set", "stages=[dsir, select]")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["selected"] == 50 and manifest["config"]["filter"]["min"] is None


def test_a_budget_that_rounds_to_none_is_an_error_for_every_selector(tmp_path, small_corpus):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(300))
    balanced = make_config(
        tmp_path / "balanced",
        pool,
        small_corpus["target"],
        stages=["embed", "cluster", "select"],
        embed={"method": "projection", "dim": 32},
        cluster={"k": 3},
        select={"method": "balanced", "column": "cluster_distance", "k": None, "fraction": 0.001},
    )
    _one_line_error(
        run_cli("run", str(balanced), check=False),
        "select.fraction=0.001 of 300 eligible documents rounds to none",
        "raise select.fraction to at least 0.0033",
    )
    select = {"k": None, "fraction": 1e-4}
    importance = make_config(tmp_path / "importance", pool, small_corpus["target"], select=select)
    line = _one_line_error(run_cli("run", str(importance), check=False), "rounds to none", "raise select.fraction")
    assert "lower select.k" not in line


def test_the_manifest_says_which_files_were_read_and_warns_of_a_shadowed_relative_path(tmp_path, small_corpus):
    here, beside = tmp_path / "here", tmp_path / "configs"
    for folder, n in ((here, 200), (beside, 100)):
        (folder / "data").mkdir(parents=True)
        write_jsonl(folder / "data" / "pool.jsonl", demo_records(n))
    cfg = make_config(beside, "data/pool.jsonl", small_corpus["target"], out=tmp_path / "out")
    proc = run_cli("run", str(cfg), "--set", "select.k=10", cwd=here)
    read = here / "data" / "pool.jsonl"
    assert re.search(
        rf"WARNING: input.path data/pool.jsonl was read from the current folder \({read}\), but the config's folder "
        rf"holds a different file by that path \({beside / 'data' / 'pool.jsonl'}\)",
        proc.stdout,
    ), proc.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    [entry] = manifest["inputs"]["input.path"]
    assert entry["path"] == str(read) and entry["bytes"] == read.stat().st_size and entry["modified"]
    assert manifest["inputs"]["target.path"][0]["path"] == str(small_corpus["target"])
    assert any("config's folder holds a different file" in w for w in manifest["warnings"])


def test_a_selection_worse_than_random_is_flagged(tmp_path, small_corpus):
    cfg = make_config(
        tmp_path,
        small_corpus["pool"],
        small_corpus["target"],
        select={"method": "bottom", "column": "dsir_log_weight_per_ngram", "k": 50},
    )
    proc = run_cli("run", str(cfg))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dsir"]["kl"]["reduction"] < 0
    assert "WARNING: the KL reduction is negative" in proc.stdout
    assert any(w.startswith("the KL reduction is negative") for w in manifest["warnings"])


def test_a_limit_on_the_share_of_rejected_records(tmp_path, small_corpus):
    records = demo_records(100)
    bad = [{"id": f"x{i}", "body": "no text field"} for i in range(150)]
    pool = write_jsonl(tmp_path / "pool.jsonl", records + bad)
    cfg = make_config(tmp_path, pool, small_corpus["target"], select={"k": 5}, dsir={"min_tokens": 0})
    proc = run_cli("run", str(cfg))
    assert "WARNING: 60% of the input records were rejected, most as 'missing text field'" in proc.stdout
    proc = run_cli("run", str(cfg), "--overwrite", "--set", "input.max_reject_share=0.5", check=False)
    _one_line_error(
        proc,
        "input.max_reject_share=0.5: 150 of the 250 input records (60%) were rejected, most as 'missing text field'",
        "nothing was published",
    )
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["selected"] == 5  # kept as it was


def test_train_writes_the_models_and_a_manifest_and_nothing_is_left_in_the_temp_dir(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", [{**r, "label": r["source"]} for r in demo_records(150)])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    sections = {
        "input": {"label_field": "label"},
        "stages": ["proxy", "select"],
        "proxy": {"seeds": 1, "epochs": 1, "sample": 100},
        "select": {"method": "top", "column": "el2n", "k": 10},
    }
    cfg = make_config(tmp_path / "train", pool, pool, **sections)
    run_cli("train", str(cfg), "--quiet", env={"TMPDIR": str(tmp)})
    out = tmp_path / "train" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["_beamsift_output", "artifacts", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "train" and "counts" not in manifest
    assert manifest["trained"]["stage"] == "proxy" and "proxy-0/config.json" in manifest["trained"]["files"]
    # Applied by a run: the models are unpacked on the workers, and nothing stays behind.
    applied = make_config(tmp_path / "apply", pool, pool, **{**sections, "proxy": {"model": str(out)}})
    run_cli("run", str(applied), "--quiet", env={"TMPDIR": str(tmp)})
    # A run that fails on the workers leaves nothing either.
    failed = run_cli("run", str(applied), "--quiet", "--overwrite", "--set", "select.k=1000", env={"TMPDIR": str(tmp)},
                     check=False)  # fmt: skip
    assert failed.returncode == 2
    assert list(tmp.iterdir()) == []
