"""The command line as a user drives it: config errors, --set, --overwrite, crash safety, query."""

from __future__ import annotations

import json
import re

import pytest
from beamsift.pipeline.config import ConfigError, config_from_dict, load_config
from conftest import make_config, run_cli


def test_unknown_key_names_the_key_and_the_file(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], select={"fracton": 0.1})
    with pytest.raises(
        ConfigError,
        match=r"config.yaml: unknown config key 'select.fracton' \(did you mean 'select.fraction'\?\)",
    ):
        load_config(str(cfg))


@pytest.mark.parametrize(
    "override, message",
    [
        ("select.kk=3", "unknown config key 'select.kk'"),
        ("select.k=many", "config key 'select.k' must be an integer or null, got text: 'many'"),
        ("input.format=csv", "config key 'input.format' must be one of"),
        ("select.fraction=2", "config key 'select.fraction' must be in (0, 1], got 2"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, small_corpus, override, message):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(str(cfg), [override])


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required config key 'output.dir'"):
        config_from_dict({"input": {"path": "x"}, "target": {"path": "y"}, "select": {"k": 1}}, "c.yaml")


def test_cli_run_overwrite_and_query(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    out = tmp_path / "out"
    first = run_cli("run", str(cfg), "--set", "select.k=30", "--set", f"output.dir={out}")
    assert "selected" in first.stdout and "KL reduction" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["selected"] == 30 and manifest["config"]["select"]["k"] == 30

    again = run_cli("run", str(cfg), "--set", f"output.dir={out}", check=False)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("beamsift: error: output.dir")
    assert "--overwrite" in again.stderr

    run_cli("run", str(cfg), "--set", f"output.dir={out}", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 50

    q = run_cli("query", str(out), "SELECT count(*) AS n FROM selected")
    assert q.stdout.splitlines()[0].strip() == "n" and q.stdout.splitlines()[2].strip() == "50"


def test_impossible_k_is_one_clear_line_and_leaves_nothing(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    out = tmp_path / "out"
    # 600 records, fewer than 500 of them with 200 tokens: found only once the pool is read.
    args = ["--set", "select.k=500", "--set", "dsir.min_tokens=200", "--set", f"output.dir={out}"]
    proc = run_cli("run", str(cfg), *args, check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line  # one line, no worker traceback
    assert re.fullmatch(
        r"beamsift: error: select.k=500 is larger than the \d+ eligible documents: none of the 600 pool records "
        r"was rejected; \d+ valid documents have fewer than dsir.min_tokens=200 tokens \(lower it to keep them\) "
        r"\(lower select.k\)",
        line,
    ), line
    # A failed run leaves nothing behind: no output.dir, no folder beside it.
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    q = run_cli("query", str(out), "SELECT 1", check=False)
    assert q.returncode == 2 and q.stderr.strip() == f"beamsift: error: {out}: no such folder"


def test_a_k_that_the_input_size_rules_out_fails_before_reading(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    proc = run_cli("run", str(cfg), "--set", "select.k=100000", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"beamsift: error: select.k=100000 is more than the input holds: {small_corpus['pool']} has at most "
        "600 records; lower select.k (or use select.fraction)"
    )


def test_config_error_on_the_command_line(tmp_path, small_corpus):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"])
    proc = run_cli("run", str(cfg), "--set", "seed=abc", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == "beamsift: error: --set seed=abc: config key 'seed' must be an integer, got text: 'abc'"
    )


def test_missing_input_is_a_clear_error(tmp_path, small_corpus):
    cfg = make_config(tmp_path, tmp_path / "nothing-*.jsonl", small_corpus["target"])
    proc = run_cli("run", str(cfg), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"beamsift: error: input.path {tmp_path}/nothing-*.jsonl: no files match"
