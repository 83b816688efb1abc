"""How a run's models trained, against a baseline; whether a ranked column can rank; and the live
display of a model's training (issue 12, items 5 and 16)."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from beamsift.pipeline.progress import fit, read_totals, render, terminal_width
from beamsift.transforms import models
from beamsift.transforms.chain.meter import StageMeter
from conftest import demo_records, make_config, run_cli, write_jsonl

RECORD_KEYS = {
    "stage",
    "model",
    "kind",
    "seed",
    "loss_unit",
    "trained_on",
    "held_out",
    "epochs_run",
    "max_epochs",
    "stopping_epoch",
    "stopped",
    "train_loss",
    "held_out_loss",
    "final_held_out_loss",
    "baseline",
    "beats_baseline",
}


def _run(tmp_path, records, **sections):
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(tmp_path, pool, pool, **sections)
    proc = run_cli("run", str(cfg), "--quiet")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    return proc.stdout, manifest


def _classifier_sections(seeds=2, column="el2n"):
    return {
        "input": {"label_field": "source"},
        "stages": ["proxy", "select"],
        # A few hundred documents make few steps: a higher rate than the default 1e-3 (made for
        # the thousands of a real pool) lets the classifier learn in 4 epochs.
        "proxy": {"seeds": seeds, "sample": 600, "epochs": 4, "hidden": 16, "learning_rate": 0.01},
        "select": {"method": "top", "column": column, "k": 50},
    }


def test_a_classifier_proxy_reports_each_model_against_the_label_prior(tmp_path):
    stdout, manifest = _run(tmp_path, demo_records(500), **_classifier_sections())
    records = manifest["training"]
    assert [r["model"] for r in records] == ["proxy-0", "proxy-1"]
    assert [r["seed"] for r in records] == [1000, 1001]  # seed 1 of the config, k = 0, 1
    for r in records:
        assert RECORD_KEYS <= set(r), set(r) ^ RECORD_KEYS
        assert r["stage"] == "proxy" and r["kind"] == "classifier" and r["loss_unit"] == "nats per document"
        assert r["trained_on"] + r["held_out"] == 500 and r["held_out"] == 50
        assert 1 <= r["epochs_run"] <= 4 == r["max_epochs"]
        assert len(r["train_loss"]) == len(r["held_out_loss"]) == r["epochs_run"]
        # The model kept is the epoch with the lowest held-out loss.
        assert r["held_out_loss"][r["stopping_epoch"] - 1] == min(r["held_out_loss"]) == r["final_held_out_loss"]
        assert r["baseline"]["name"] == "label prior"
        assert 0 < r["baseline"]["accuracy"] < 1 and r["baseline"]["held_out_loss"] > 1  # 7 sources
        # Telling the 7 sources apart by their n-grams is easy: far below the prior, and more
        # often right than always answering the commonest source.
        assert r["beats_baseline"] is True and r["improvement"] > 0.5
        assert r["held_out_accuracy"] > r["baseline"]["accuracy"]
    lines = [line for line in stdout.splitlines() if line.strip().startswith("training")]
    assert len(lines) == 2 and "proxy/proxy-0" in lines[0] and "for label prior" in lines[0], stdout
    assert "WARNING" not in stdout, stdout
    ranked = manifest["stages"][-1]["ranked_by"]
    assert ranked["column"] == "el2n" and ranked["documents"] == 500 and ranked["enough_spread"] is True


def test_a_classifier_on_random_labels_is_flagged_as_no_better_than_its_baseline(tmp_path):
    rng = random.Random(3)
    records = [{**r, "source": rng.choice(["a", "b"])} for r in demo_records(400)]
    stdout, manifest = _run(tmp_path, records, **_classifier_sections(seeds=1))
    (r,) = manifest["training"]
    assert r["beats_baseline"] is False, r
    assert r["final_held_out_loss"] > 0.9 * r["baseline"]["held_out_loss"]
    warnings = [line for line in stdout.splitlines() if "WARNING" in line]
    assert any("proxy-0 is not clearly better than the label prior" in w for w in warnings), stdout
    assert manifest["warnings"] and "not clearly better" in manifest["warnings"][0]


def test_a_causal_lm_trained_one_epoch_on_a_tiny_sample_is_flagged_against_the_unigram(tmp_path):
    proxy = {"seeds": 1, "sample": 40, "epochs": 1, "dim": 32, "layers": 1, "heads": 2, "vocab_size": 300}
    stdout, manifest = _run(
        tmp_path,
        demo_records(120),
        stages=["proxy", "select"],
        proxy={**proxy, "context": 64},
        select={"method": "top", "column": "el2n", "k": 20},
    )
    (r,) = manifest["training"]
    assert r["kind"] == "causal_lm" and r["loss_unit"] == "nats per token" and r["trained_on_texts"] == "pool sample"
    assert r["trained_on"] == 36 and r["held_out"] == 4 and r["epochs_run"] == 1 == r["stopping_epoch"]
    assert r["baseline"]["name"] == "unigram" and r["baseline"]["held_out_loss"] > 0
    assert r["beats_baseline"] is False
    assert any("proxy-0 is not clearly better than the unigram token frequencies" in x for x in manifest["warnings"])
    assert "WARNING: the proxy stage's model proxy-0 is not clearly better" in stdout
    # An untrained LM's EL2N is near 1 for every document: the selector's column cannot rank.
    ranked = manifest["stages"][-1]["ranked_by"]
    assert ranked["enough_spread"] is False and ranked["cv"] < 0.01
    assert "WARNING: the select stage ranks 120 documents by el2n, whose values barely differ" in stdout


def test_a_ranking_column_with_few_distinct_values_is_flagged(tmp_path):
    stdout, manifest = _run(
        tmp_path,
        demo_records(300),
        stages=["embed", "cluster", "select"],
        embed={"method": "svd", "dim": 16},
        cluster={"k": 3},
        select={"method": "top", "column": "cluster", "k": 30},
    )
    ranked = manifest["stages"][-1]["ranked_by"]
    assert ranked["column"] == "cluster" and ranked["distinct_values"] == 3 and ranked["enough_spread"] is False
    assert "WARNING: the select stage ranks 300 documents by cluster, which has only 3 distinct value(s)" in stdout
    assert "training" not in manifest  # no model was trained


def test_the_baselines_by_hand():
    # Training documents use tokens 0, 0, 1; held out: [2, 0, 1] predicts 0 then 1.
    ids = [[0, 0, 1], [2, 0, 1]]
    p = np.array([2 + 1, 1 + 1, 0 + 1, 0 + 1]) / (3 + 4)  # add-one over a vocabulary of 4
    expected = -(np.log(p[0]) + np.log(p[1])) / 2
    assert models.unigram_loss(ids, [0], [1], 4) == pytest.approx(expected)
    y = np.array([0, 0, 0, 1, 1, 2])
    loss, majority = models.prior_baseline(y, np.arange(4), np.array([4, 5]), 3)
    prior = np.array([3 + 1, 1 + 1, 0 + 1]) / 7
    assert loss == pytest.approx(-(np.log(prior[1]) + np.log(prior[2])) / 2)
    assert majority == 0.0  # the commonest label (0) is neither held-out label
    record = {"final_held_out_loss": 0.95, "baseline": {"name": "unigram"}}
    assert models.judge(dict(record, baseline={"name": "x"}), 1.0)["beats_baseline"] is False  # only 5% lower
    assert models.judge(dict(record, final_held_out_loss=0.89, baseline={"name": "x"}), 1.0)["beats_baseline"] is True


# ---- the live display --------------------------------------------------------------------------


def test_the_progress_line_shows_what_a_stage_is_training(tmp_path):
    meter = StageMeter("proxy", str(tmp_path))
    meter.setup()
    meter.status(model="proxy-0", seed=1000, epoch=2, epochs=10, step=14, steps=29, loss=5.3114)
    reader = StageMeter("read", str(tmp_path))
    reader.setup()
    reader.done(reader.start(), docs=7072)
    reader.flush()
    line = render(read_totals(str(tmp_path)), 0, 75, {}, 200, ["proxy", "select"])
    assert "proxy training proxy-0 (seed 1000) epoch 2/10 step 14/29 loss 5.311" in line, line
    assert line.startswith("read 7,072") and line.endswith("| 1:15"), line
    meter.status()  # training done: the stage counts documents again
    assert "proxy 0" in render(read_totals(str(tmp_path)), 0, 75, {}, 200, ["proxy", "select"])


def test_a_cut_progress_line_keeps_the_elapsed_time(tmp_path):
    meter = StageMeter("proxy", str(tmp_path))
    meter.setup()
    meter.status(model="reference-0", seed=0, epoch=1, epochs=4, step=3, steps=40, loss=7.0)
    totals = read_totals(str(tmp_path))
    stages = ["dsir", "filter", "proxy", "select"]
    wide = render(totals, 0, 3725, {}, 300, stages)
    assert "dsir 0" in wide and wide.endswith("| 62:05")
    for width in (90, 60, 40, 20, 9):
        line = render(totals, 0, 3725, {}, width, stages)
        assert len(line) < width and line.endswith("62:05"), (width, line)
    # Stages that have not begun go first; what is being trained stays while it fits.
    assert render(totals, 0, 3725, {}, 90, stages) == (
        "proxy training reference-0 (seed 0) epoch 1/4 step 3/40 loss 7.000 | 62:05"
    )
    assert fit(["a" * 50], [], "0:01", 20) == "a" * 11 + "… | 0:01"  # 19 characters: one less than the width


def test_the_width_is_the_terminal_s_own(monkeypatch):
    import fcntl
    import struct
    import termios

    leader, follower = os.openpty()
    try:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 57, 0, 0))
        monkeypatch.setenv("COLUMNS", "150")  # the terminal's own size comes first
        with os.fdopen(os.dup(follower), "w") as tty:
            assert terminal_width(tty) == 57
    finally:
        os.close(leader)
        os.close(follower)
    read, write = os.pipe()
    try:
        with os.fdopen(write, "w") as pipe:
            assert terminal_width(pipe) == 150  # not a terminal: $COLUMNS
            monkeypatch.delenv("COLUMNS")
            assert terminal_width(pipe) == 100
    finally:
        os.close(read)
