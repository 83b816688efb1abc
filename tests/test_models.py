"""Model scores on cases small enough to check by hand or against autograd in a loop, and the
proxy stage end to end: K-seed means, labels it cannot use, the same scores on every runner."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pytest
import torch
from beamsift.pipeline.config import load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms import models
from conftest import demo_records, make_config, write_jsonl


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = models.new_classifier(num_buckets=20, num_labels=3, label_names=["a", "b", "c"], hidden=5, seed=3)
    buckets = [np.array([1, 1, 4]), np.array([7]), np.array([0, 2, 19, 19, 19]), np.array([3, 3])]
    x = models.dense_features(buckets, 20)
    y = torch.tensor([0, 2, 1, 1])
    return model, x, y


def test_el2n_and_loss_by_hand(classifier):
    model, x, y = classifier
    scores = models.classifier_scores(model, x, y, exact_grand=False)
    logits = model(x)[0].detach().numpy()
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(3)[y.numpy()]
    np.testing.assert_allclose(scores["el2n"], np.linalg.norm(p - onehot, axis=1), rtol=1e-5)
    np.testing.assert_allclose(scores["loss"], -np.log(p[np.arange(4), y.numpy()]), rtol=1e-5)
    # The features: L2-normalised counts (document 0: buckets 1, 1, 4 -> (2, 1) / sqrt(5)).
    np.testing.assert_allclose(x[0, [1, 4]].numpy(), np.array([2, 1]) / np.sqrt(5), rtol=1e-6)


def _loop_grad_norms(model, losses_of, params=None):
    norms = []
    for loss in losses_of():
        model.zero_grad()
        loss.backward()
        ps = params() if params else list(model.parameters())
        norms.append(float(torch.sqrt(sum((p.grad**2).sum() for p in ps))))
    return np.array(norms)


def test_exact_and_last_layer_grand_of_the_classifier_against_autograd(classifier):
    model, x, y = classifier
    scores = models.classifier_scores(model, x, y, exact_grand=True)

    def losses():
        for i in range(len(y)):
            yield torch.nn.functional.cross_entropy(model(x[i : i + 1])[0], y[i : i + 1])

    np.testing.assert_allclose(scores["grand"], _loop_grad_norms(model, losses), rtol=1e-4)
    last = _loop_grad_norms(model, losses, params=lambda: [model.out.weight, model.out.bias])
    np.testing.assert_allclose(scores["grand_last_layer"], last, rtol=1e-4)
    assert np.all(scores["grand"] > scores["grand_last_layer"])  # the hidden layer adds to it


@pytest.fixture(scope="module")
def tiny_lm():
    model = models.new_causal_lm(vocab_size=40, layers=1, dim=16, heads=2, context=12, seed=5).eval()
    ids = [[3, 9, 1, 30, 2, 2, 7], [5, 6], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [8]]
    return model, ids


def test_lm_scores_against_autograd_and_padding(tiny_lm):
    model, ids = tiny_lm
    x, mask = models.pad(ids)
    scores = models.lm_scores(model, x, mask, exact_grand=True)

    def losses():
        for seq in ids[:3]:
            t = torch.tensor([seq])
            logits = model(input_ids=t).logits[0, :-1]
            yield torch.nn.functional.cross_entropy(logits, t[0, 1:])

    expected_loss = [float(loss.detach()) for loss in losses()]
    np.testing.assert_allclose(scores["loss"][:3], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(scores["perplexity"][:3], np.exp(expected_loss), rtol=1e-5)
    np.testing.assert_allclose(scores["grand"][:3], _loop_grad_norms(model, losses), rtol=1e-4)
    head = _loop_grad_norms(model, losses, params=lambda: [model.lm_head.weight])
    # The head is tied to the input embedding: its gradient here is the output layer's part only.
    assert model.lm_head.weight is model.transformer.wte.weight
    out_part = []
    for seq in ids[:3]:
        t = torch.tensor([seq])
        out = model(input_ids=t, output_hidden_states=True)
        h = out.hidden_states[-1][0, :-1]
        p = torch.softmax(out.logits[0, :-1], -1)
        e = p - torch.nn.functional.one_hot(t[0, 1:], 40)
        out_part.append(float(torch.linalg.matrix_norm(e.T @ h).detach()) / len(seq[1:]))
    np.testing.assert_allclose(scores["grand_last_layer"][:3], out_part, rtol=1e-4)
    assert np.all(head >= np.array(out_part) - 1e-6)
    # EL2N of a causal LM: ||softmax - onehot(next token)|| averaged over the tokens.
    t = torch.tensor([ids[1]])
    p = torch.softmax(model(input_ids=t).logits[0, 0], -1)
    expected = float((p - torch.nn.functional.one_hot(t[0, 1], 40)).norm().detach())
    assert scores["el2n"][1] == pytest.approx(expected, rel=1e-5)
    # A document of one token has no next token: no scores, not a crash.
    assert all(np.isnan(scores[k][3]) for k in ("loss", "el2n", "grand", "grand_last_layer"))


def _labelled(n=240):
    return [{"id": r["id"], "text": r["text"], "label": r["source"]} for r in demo_records(n)]


def _run(tmp_path, pool, beam_args=(), **sections):
    cfg = make_config(tmp_path, pool, pool, **sections)
    manifest = run_selection(load_config(str(cfg)), overwrite=True, beam_args=list(beam_args))
    return manifest, tmp_path / "out"


def test_the_proxy_scores_are_the_mean_over_its_seeds(tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", _labelled())
    sections = {
        "input": {"label_field": "label"},
        "stages": ["proxy", "select"],
        "proxy": {"seeds": 2, "epochs": 3},
        "select": {"method": "top", "column": "el2n", "k": 10},
    }
    manifest, out = _run(tmp_path, pool, **sections)
    assert manifest["counts"]["selected"] == 10
    rows = duckdb.connect().execute(f"SELECT id, el2n, loss FROM '{out}/scores/*.parquet' ORDER BY id").fetchall()
    # Score the pool under each saved proxy, outside the pipeline, and average.
    import pyarrow as pa
    from beamsift.transforms.featurize import hashed_ngram_features

    records = sorted(_labelled(), key=lambda r: r["id"])
    f = hashed_ngram_features(pa.array([r["text"] for r in records]), 10000)
    x = models.dense_features([f.buckets[f.offsets[i] : f.offsets[i + 1]] for i in range(len(records))], 10000)
    per_seed = []
    for k in (0, 1):
        model = models.load_model(str(out / "artifacts" / "proxy" / f"proxy-{k}"))
        index = {n: i for i, n in enumerate(model.config.label_names)}
        y = torch.tensor([index[r["label"]] for r in records])
        per_seed.append(models.classifier_scores(model, x, y, exact_grand=False))
    assert not np.allclose(per_seed[0]["el2n"], per_seed[1]["el2n"])  # two different proxies
    np.testing.assert_allclose([r[1] for r in rows], (per_seed[0]["el2n"] + per_seed[1]["el2n"]) / 2, rtol=1e-5)
    np.testing.assert_allclose([r[2] for r in rows], (per_seed[0]["loss"] + per_seed[1]["loss"]) / 2, rtol=1e-5)


def test_documents_without_a_usable_label_keep_a_reason(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _labelled())
    sections = {
        "input": {"label_field": "label"},
        "stages": ["proxy", "select"],
        "proxy": {"seeds": 1, "epochs": 2},
        "select": {"method": "top", "column": "loss", "k": 5},
    }
    _, first = _run(tmp_path / "a", train, **sections)
    records = _labelled(60)
    records[0] = {k: v for k, v in records[0].items() if k != "label"}
    records[1]["label"] = "poetry"  # a label the proxy never saw
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    sections["proxy"] = {"model": str(first / "artifacts" / "proxy")}
    manifest, out = _run(tmp_path / "b", pool, **sections)
    reasons = dict(duckdb.connect().execute(f"SELECT id, reason FROM '{out}/scores/*.parquet'").fetchall())
    assert reasons[records[0]["id"]] == "no label" and reasons[records[1]["id"]] == "unknown label"
    assert manifest["counts"]["not_selected_by_reason"]["no label"] == 1
    assert json.loads((out / "manifest.json").read_text())["counts"]["accounted_for"] is True


RUNNERS = {
    "multiprocess": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    "portable": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_same_model_scores_and_ids_on_every_runner(tmp_path, runner):
    pool = write_jsonl(tmp_path / "pool.jsonl", _labelled(200))
    sections = {
        "input": {"label_field": "label", "batch_size": 32},
        "stages": ["proxy", "select"],
        "proxy": {"seeds": 1, "epochs": 2, "threads": 1},
        "select": {"method": "band", "column": "el2n", "offset": 0.1, "k": 20},
    }
    _, a = _run(tmp_path / "a", pool, **sections)
    _, b = _run(tmp_path / "b", pool, RUNNERS[runner], **sections)
    q = "SELECT id, el2n, selected FROM '{}/scores/*.parquet' ORDER BY id"
    ra, rb = duckdb.connect().execute(q.format(a)).fetchall(), duckdb.connect().execute(q.format(b)).fetchall()
    assert [r[0] for r in ra] == [r[0] for r in rb] and [r[2] for r in ra] == [r[2] for r in rb]
    np.testing.assert_allclose([r[1] for r in ra], [r[1] for r in rb], rtol=1e-6)
    assert sum(r[2] for r in ra) == 20
    assert os.path.isdir(a / "artifacts" / "proxy" / "proxy-0")


def test_last_layer_gradients_and_their_alignment_against_autograd(classifier, tiny_lm):
    model, x, y = classifier
    grads = models.last_layer_grads(model, (x, y), labelled=True)
    for i in range(len(y)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1])[0], y[i : i + 1]).backward()
        expected = torch.cat([model.out.weight.grad, model.out.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(grads[i], expected, rtol=1e-5, atol=1e-7)
    # Alignment: the cosine of each example's gradient with a direction.
    direction = grads[:2].mean(0)
    cos = models.gradient_alignment(grads, direction)
    flat = grads.reshape(4, -1)
    expected = (flat @ direction.reshape(-1)) / (flat.norm(dim=1) * direction.norm())
    np.testing.assert_allclose(cos, expected.numpy(), rtol=1e-5)
    assert cos[0] > 0 and -1 <= cos.min() and cos.max() <= 1
    lm, ids = tiny_lm
    x, mask = models.pad(ids[:3])
    grads = models.last_layer_grads(lm, (x, mask), labelled=False)
    scores = models.lm_scores(lm, x, mask, exact_grand=False)
    np.testing.assert_allclose(grads.reshape(3, -1).norm(dim=1).numpy(), scores["grand_last_layer"], rtol=1e-5)


def test_influence_columns_of_the_proxy_stage(tmp_path):
    records = _labelled(240)
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    target = write_jsonl(tmp_path / "target.jsonl", [r for r in records if r["label"] == "pydoc"][:20])
    cfg = make_config(
        tmp_path,
        pool,
        target,
        input={"label_field": "label"},
        stages=["proxy", "select"],
        proxy={"seeds": 1, "epochs": 3, "self_influence": True, "target_influence": True},
        select={"method": "top", "column": "target_influence", "k": 20},
    )
    run_selection(load_config(str(cfg)), overwrite=True)
    rows = (
        duckdb.connect()
        .execute(
            f"SELECT label, target_influence, self_influence, grand_last_layer FROM '{tmp_path}/out/scores/*.parquet'"
        )
        .fetchall()
    )
    by_label = {}
    for label, ti, si, _ in rows:
        by_label.setdefault(label, []).append(ti)
        assert si >= 0 and -1 <= ti <= 1
    # The target is Python documentation: its own domain aligns with it best.
    means = {k: np.mean(v) for k, v in by_label.items()}
    assert max(means, key=means.get) == "pydoc"
    # TracIn over the checkpoints kept (up to the best epoch): Σ_t η_t ||g_t||², one per epoch.
    ckpts = sorted(p.name for p in (tmp_path / "out" / "artifacts" / "proxy").iterdir() if p.name.startswith("ckpt-"))
    assert ckpts and all(c.startswith("ckpt-0-") for c in ckpts)


def test_train_once_then_apply_gives_the_same_scores(tmp_path):
    from conftest import run_cli

    pool = write_jsonl(tmp_path / "pool.jsonl", _labelled(150))
    sections = {
        "input": {"label_field": "label"},
        "stages": ["proxy", "select"],
        "proxy": {"seeds": 1, "epochs": 2},
        "select": {"method": "top", "column": "el2n", "k": 10},
    }
    direct = make_config(tmp_path / "direct", pool, pool, **sections)
    run_cli("run", str(direct))
    trained = make_config(tmp_path / "train", pool, pool, **sections)
    proc = run_cli("train", str(trained))
    folder = tmp_path / "train" / "out" / "artifacts" / "proxy"
    assert f"--set proxy.model={folder}" in proc.stdout and (folder / "proxy-0" / "config.json").exists()
    applied = make_config(tmp_path / "apply", pool, pool, **{**sections, "proxy": {"model": str(folder)}})
    run_cli("run", str(applied))
    q = "SELECT id, el2n, selected FROM '{}/out/scores/*.parquet' ORDER BY id"
    a = duckdb.connect().execute(q.format(tmp_path / "direct")).fetchall()
    b = duckdb.connect().execute(q.format(tmp_path / "apply")).fetchall()
    # The same weights give the same scores up to float32 rounding: training scores its pool in
    # other batches than applying does, and a matmul's sums may round in another order.
    assert [(i, s) for i, _, s in a] == [(i, s) for i, _, s in b]
    assert [e for _, e, _ in a] == pytest.approx([e for _, e, _ in b], rel=1e-5, abs=1e-6)
    missing = run_cli("run", str(applied), "--set", f"proxy.model={tmp_path}/none", "--overwrite", check=False)
    assert missing.returncode == 2 and missing.stderr.startswith(
        f"beamsift: error: proxy.model {tmp_path}/none: no such"
    )
