"""Loss-based reweighting (Sow et al. 2025): the four strategies against their formulas, and the
stage's weights against the same formulas over the corpus."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.stages.reweight import preference, softmax_weights
from conftest import demo_records, make_config, write_jsonl


def test_the_four_strategies_by_hand():
    # Bounds 1 and 3: losses 0.5, 1, 1.5, 2, 3, 4 -> h = -1 (clipped), -1, -0.5, 0, 1, 1 (clipped).
    losses = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    h = np.array([-1, -1, -0.5, 0, 1, 1])
    np.testing.assert_allclose(preference(losses, 1, 3, "linupper"), [0, 0, 0.5, 1, 1, 1])
    np.testing.assert_allclose(preference(losses, 1, 3, "upper"), h / 2 + 0.5)
    np.testing.assert_allclose(preference(losses, 1, 3, "mid"), 1 - h**2)
    np.testing.assert_allclose(preference(losses, 1, 3, "extremes"), np.abs(h))
    # softmax(f / r), times n: weights that average 1; r sharpens or flattens them.
    f = np.array([0.0, 0.5, 1.0])
    w = softmax_weights(f, 1.0)
    np.testing.assert_allclose(w, 3 * np.exp(f) / np.exp(f).sum())
    assert w.mean() == pytest.approx(1) and softmax_weights(f, 0.1).max() > w.max()


def test_the_stage_writes_the_formula_over_the_corpus(tmp_path):
    records = [{"id": r["id"], "text": r["text"], "label": r["source"]} for r in demo_records(200)]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        input={"label_field": "label"},
        stages=["proxy", "reweight", "select"],
        proxy={"seeds": 1, "epochs": 2},
        reweight={"strategy": "mid", "temperature": 0.5, "bounds": [0.1, 0.9]},
        select={"method": "weighted", "column": "weight", "k": 20},
    )
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    rows = duckdb.connect().execute(f"SELECT loss, weight, selected FROM '{tmp_path}/out/scores/*.parquet'").fetchall()
    loss, weight = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    lo, hi = np.quantile(loss, [0.1, 0.9])  # 200 documents: the bounds' sample is all of them
    np.testing.assert_allclose(weight, softmax_weights(preference(loss, lo, hi, "mid"), 0.5), rtol=1e-9)
    assert weight.mean() == pytest.approx(1.0) and manifest["counts"]["selected"] == 20
