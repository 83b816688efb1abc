"""The encoder embedding (all-MiniLM-L6-v2 from the PyPI package): mean pooling by hand, and the
stage's vectors equal to one document at a time through transformers, whatever the batching."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.models.encoder import load_encoder, mean_pool, resolve_encoder
from beamsift.transforms.stages.cluster import assign, load_centroids
from conftest import demo_records, make_config, run_cli, write_jsonl


def test_mean_pool_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    # mean of (1, 0) and (3, 4) = (2, 2); normalised: (1, 1)/√2
    assert mean_pool(hidden, mask)[0].tolist() == pytest.approx([2**-0.5, 2**-0.5])


def _one_at_a_time(texts, max_tokens):
    tokenizer, model = load_encoder(resolve_encoder(None))
    out = []
    with torch.inference_mode():
        for t in texts:
            batch = tokenizer([t], truncation=True, max_length=max_tokens, return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]
            v = hidden.mean(0)
            out.append((v / v.norm()).numpy())
    return np.stack(out)


def test_the_encoder_stage_matches_transformers_one_document_at_a_time(tmp_path):
    records = demo_records(48)
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "select"],
        embed={"method": "model", "max_tokens": 64, "batch_size": 5},
        cluster={"k": 3},
        select={"method": "all", "k": None},
    )
    run_selection(load_config(str(cfg)), overwrite=True)
    got = dict(
        (i, (c, d))
        for i, c, d in duckdb.connect()
        .execute(f"SELECT id, cluster, cluster_distance FROM '{tmp_path}/out/scores/*.parquet'")
        .fetchall()
    )
    vectors = _one_at_a_time([r["text"] for r in records], 64)
    nearest, distance = assign(vectors, load_centroids(str(tmp_path / "out" / "artifacts" / "cluster")))
    assert [got[r["id"]][0] for r in records] == nearest.tolist()
    np.testing.assert_allclose([got[r["id"]][1] for r in records], distance, atol=2e-4)


def test_a_missing_encoder_folder_is_named(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(20))
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        stages=["embed", "cluster", "select"],
        embed={"method": "model", "model": str(tmp_path / "no-such-model")},
        cluster={"k": 2},
        select={"method": "all", "k": None},
    )
    proc = run_cli("run", str(cfg), check=False)
    assert proc.returncode == 2
    assert f"embed.model {tmp_path / 'no-such-model'}: no such folder" in proc.stderr
