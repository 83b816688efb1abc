"""PRESENCE (Thakkar et al. 2023): the weights of a group against a hand computation, the seeded
groups, the self-influence of the first layers against autograd, and the stage end to end: its
weights are the formula over the groups that (seed, id) make, on every runner."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms import models
from beamsift.transforms.featurize import hash_ids
from beamsift.transforms.stages.presence import group_of, grouped_weights, presence_weights, seeded_keys
from conftest import demo_records, make_config, write_jsonl


def test_the_weights_of_a_group_by_hand():
    # SI = 1, 2, 3: mean 2, variance 2/3, s = (-1.22474, 0, 1.22474); e^s = 0.293833, 1, 3.403298
    # (sum 4.697130); w = 3 e^s / sum.
    w = presence_weights(np.array([1.0, 2.0, 3.0]), tau=1.0)
    np.testing.assert_allclose(w, [0.187667, 0.638688, 2.173645], rtol=1e-5)
    assert w.mean() == pytest.approx(1.0)
    # tau = -1, the inverse phase: the same weights in the reverse order (down-weights high SI).
    np.testing.assert_allclose(presence_weights(np.array([1.0, 2.0, 3.0]), tau=-1.0), w[::-1], rtol=1e-9)
    # z-normalised: the scale of SI does not matter; equal values weigh 1 each.
    np.testing.assert_allclose(presence_weights(np.array([1e-4, 2e-4, 3e-4]), 1.0), w, rtol=1e-5)
    np.testing.assert_allclose(presence_weights(np.full(4, 0.3), 1.0), np.ones(4))


def test_groups_are_runs_of_the_seeded_order_and_the_short_last_one_joins_the_one_before():
    keys = np.array([5, 1, 4, 2, 3, 6, 7], np.uint64)
    orders = np.arange(7)
    idx, group = group_of(keys, orders, 3)
    np.testing.assert_array_equal(keys[idx], [1, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(group, [0, 0, 0, 1, 1, 1, 1])
    # Fewer than a group's size: one group of all of them.
    np.testing.assert_array_equal(group_of(keys[:2], orders[:2], 3)[1], [0, 0])
    si = np.array([3.0, 1.0, 9.0, 2.0, 4.0, 8.0, 7.0])
    w = grouped_weights(keys, orders, si, 3, 1.0)
    np.testing.assert_allclose(w[[1, 3, 4]], presence_weights(si[[1, 3, 4]], 1.0))
    np.testing.assert_allclose(w[[2, 0, 5, 6]], presence_weights(si[[2, 0, 5, 6]], 1.0))


def _autograd_squares(model, losses, params):
    out = []
    for loss in losses():
        model.zero_grad()
        loss.backward()
        out.append(float(sum((p.grad**2).sum() for p in params())))
    return np.array(out)


def test_first_layer_self_influence_against_autograd():
    model = models.new_classifier(num_buckets=20, num_labels=3, label_names=["a", "b", "c"], hidden=5, seed=3)
    x = models.dense_features([np.array([1, 1, 4]), np.array([7]), np.array([0, 2, 19])], 20)
    y = torch.tensor([0, 2, 1])

    def losses():
        for i in range(len(y)):
            yield torch.nn.functional.cross_entropy(model(x[i : i + 1])[0], y[i : i + 1])

    first = _autograd_squares(model, losses, lambda: [model.hidden.weight, model.hidden.bias])
    last = _autograd_squares(model, losses, lambda: [model.out.weight, model.out.bias])
    for layers, expected in (("first", first), ("last", last), ("all", first + last)):
        np.testing.assert_allclose(models.layer_grad_squares(model, (x, y), True, layers), expected, rtol=1e-4)

    lm = models.new_causal_lm(vocab_size=30, layers=2, dim=16, heads=2, context=12, seed=5).eval()
    ids = [[3, 9, 1, 20, 2, 2, 7], [5, 6], [8]]
    xl, mask = models.pad(ids)

    def lm_losses():
        for seq in ids[:2]:
            t = torch.tensor([seq])
            yield torch.nn.functional.cross_entropy(lm(input_ids=t).logits[0, :-1], t[0, 1:])

    block = _autograd_squares(lm, lm_losses, lambda: list(lm.transformer.h[0].parameters()))
    got = models.layer_grad_squares(lm, (xl, mask), False, "first")
    np.testing.assert_allclose(got[:2], block, rtol=1e-4)
    assert got[2] == 0.0  # one token: nothing to predict, no gradient
    everything = _autograd_squares(lm, lm_losses, lambda: list(lm.parameters()))
    np.testing.assert_allclose(models.layer_grad_squares(lm, (xl, mask), False, "all")[:2], everything, rtol=1e-4)


def test_the_stage_weighs_seeded_groups_by_the_formula(tmp_path):
    records = [{"id": r["id"], "text": r["text"], "label": r["source"]} for r in demo_records(150)]
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = make_config(
        tmp_path,
        pool,
        pool,
        input={"label_field": "label"},
        stages=["proxy", "reweight", "select"],
        proxy={"seeds": 1, "epochs": 2, "self_influence": True, "influence_layers": "first"},
        reweight={"strategy": "presence", "temperature": -1.0, "group_size": 16},
        select={"method": "weighted", "column": "weight", "k": 30},
    )
    # (On the multi-process runner from a bucket: the presence config's golden test.)
    run_selection(load_config(str(cfg)), overwrite=True)
    rows = (
        duckdb.connect()
        .execute(f"SELECT id, self_influence, weight, selected FROM '{tmp_path}/out/scores/*.parquet' ORDER BY id")
        .fetchall()
    )
    ids = [r[0] for r in rows]
    si = np.array([r[1] for r in rows])
    weight = np.array([r[2] for r in rows])
    assert np.all(si > 0) and sum(r[3] for r in rows) == 30
    # 150 documents: one partition; groups of 16 in the order of the seeded keys of the ids.
    keys = seeded_keys(hash_ids(pa.array(ids)), seed=1)  # make_config's seed
    expected = grouped_weights(keys, np.zeros(len(ids), np.int64), si, 16, -1.0)
    np.testing.assert_allclose(weight, expected, rtol=1e-9)
    assert weight.mean() == pytest.approx(1.0)
    assert np.corrcoef(si, weight)[0, 1] < 0  # tau < 0: high self-influence weighs less


FIRST = {"self_influence": True, "influence_layers": "first"}
PRESENCE = {"strategy": "presence", "temperature": -1.0, "group_size": 16}


@pytest.mark.parametrize(
    "proxy, reweight, message",
    [
        (FIRST, {**PRESENCE, "temperature": 0}, "reweight.temperature is PRESENCE's tau: finite and not 0, got 0"),
        ({}, PRESENCE, "reweight.column 'self_influence' is not a column of an earlier stage"),
        (FIRST, {"strategy": "mid", "group_size": 16}, "reweight.group_size is for strategy: presence"),
        ({"influence_layers": "all"}, {"strategy": "mid"}, "proxy.influence_layers is for self_influence"),
    ],
)
def test_presence_settings_that_cannot_work_are_named(tmp_path, proxy, reweight, message):
    from beamsift.pipeline.config import ConfigError

    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(20))
    cfg = make_config(tmp_path, pool, pool, stages=["proxy", "reweight", "select"], proxy=proxy, reweight=reweight)
    with pytest.raises(ConfigError, match=message):
        load_config(str(cfg))
