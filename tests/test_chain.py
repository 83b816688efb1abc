"""The stage chain: filters take documents out with a reason, the selector's methods pick the
budget from what is left. Checked on documents whose scores are known by construction (a
document of i words has n_tokens = i), so every expected set is written down by hand."""

from __future__ import annotations

import re

import apache_beam as beam
import duckdb
import numpy as np
import pytest
from beamsift.pipeline.config import ConfigError, load_config
from beamsift.pipeline.run import run_selection
from beamsift.transforms.chain.meter import NAMESPACE
from beamsift.transforms.selectors.core import SelectionError, top_k_order
from beamsift.transforms.selectors.cut import Cut
from conftest import TEST_RUNNER, make_config, write_jsonl

N = 40


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """40 documents, doc-i with i words (i = 1..40), so n_tokens = i."""
    d = tmp_path_factory.mktemp("counted")
    pool = write_jsonl(d / "pool.jsonl", [{"id": f"doc-{i}", "text": " ".join(["word"] * i)} for i in range(1, N + 1)])
    return pool


def _run(tmp_path, pool, target, **sections):
    cfg = make_config(tmp_path, pool, target, **sections)
    manifest = run_selection(load_config(str(cfg)), overwrite=True)
    con = duckdb.connect()
    rows = con.execute(f"SELECT n_tokens, selected, reason FROM '{tmp_path}/out/scores/*.parquet'").fetchall()
    return manifest, {n: (s, r) for n, s, r in rows}


def _picked(rows) -> set[int]:
    return {n for n, (s, _) in rows.items() if s}


@pytest.mark.parametrize(
    "select, expected",
    [
        ({"method": "top", "column": "n_tokens", "k": 3}, {38, 39, 40}),
        ({"method": "bottom", "column": "n_tokens", "k": 3}, {1, 2, 3}),
        # A band: skip the top 10% (4 documents), keep the next 5.
        ({"method": "band", "column": "n_tokens", "offset": 0.1, "k": 5}, {32, 33, 34, 35, 36}),
        ({"method": "threshold", "column": "n_tokens", "min": 10, "max": 13}, {10, 11, 12, 13}),
        ({"method": "threshold", "column": "n_tokens", "min": 10, "k": 2}, {39, 40}),
        ({"method": "all"}, set(range(1, N + 1))),
    ],
)
def test_each_selector_method(tmp_path, counted, small_corpus, select, expected):
    sections = {"stages": ["select"], "select": {"k": None, **select}}
    manifest, rows = _run(tmp_path, counted, small_corpus["target"], **sections)
    assert _picked(rows) == expected
    assert manifest["counts"]["selected"] == len(expected)
    reasons = {r for _, (s, r) in rows.items() if not s}
    if select["method"] == "band":
        assert {r for n, (s, r) in rows.items() if n > 36} == {"above the band"}
        assert {r for n, (s, r) in rows.items() if n < 32} == {"below the cut"}
    elif select["method"] != "all":
        assert reasons == {"below the cut"}


def test_weighted_selection_is_seeded_and_of_size_k(tmp_path, counted, small_corpus):
    sections = {"stages": ["select"], "select": {"method": "weighted", "column": "n_tokens", "k": 10}}
    _, a = _run(tmp_path / "a", counted, small_corpus["target"], **sections)
    _, b = _run(tmp_path / "b", counted, small_corpus["target"], **sections)
    _, c = _run(tmp_path / "c", counted, small_corpus["target"], seed=7, **sections)
    assert _picked(a) == _picked(b) and len(_picked(a)) == 10 and _picked(a) != _picked(c)
    assert {r for _, (s, r) in a.items() if not s} == {"not sampled"}


def test_weighted_keys_sample_in_proportion_to_the_weight():
    # k = 1 of weights (1, 2, 5): the Gumbel key log w + G picks item i with probability w_i / 8.
    cut = Cut("weight", "weighted", k=1)
    hashes = np.array([101, 202, 303], dtype=np.uint64)
    wins = np.zeros(3)
    for seed in range(6000):
        wins[top_k_order(cut.keys(np.array([1.0, 2.0, 5.0]), hashes, seed), hashes, 1)[0]] += 1
    np.testing.assert_allclose(wins / 6000, [1 / 8, 2 / 8, 5 / 8], atol=0.02)


def test_a_chain_keeps_every_reason(tmp_path, counted, small_corpus):
    # Keep the longest 50% (20 documents: 21..40), then drop the top 10% of those (2: 39, 40)
    # and keep the next 25% (5: 34..38); select the 3 shortest of what is left.
    sections = {
        "stages": ["filter", "filter_band", "select"],
        "filter": {"column": "n_tokens", "keep_top": 0.5},
        "filter_band": {"column": "n_tokens", "drop_top": 0.1, "keep_top": 0.25},
        "select": {"method": "bottom", "column": "n_tokens", "k": 3},
    }
    manifest, rows = _run(tmp_path, counted, small_corpus["target"], **sections)
    assert _picked(rows) == {34, 35, 36}
    by_reason = {}
    for n, (_, r) in rows.items():
        by_reason.setdefault(r, set()).add(n)
    assert by_reason == {
        "filtered: n_tokens below the 50th percentile": set(range(1, 21)),
        "filtered: n_tokens above the 90th percentile": {39, 40},
        "filtered: n_tokens below the 65th percentile": set(range(21, 34)),
        "below the cut": {37, 38},
        None: {34, 35, 36},
    }
    stages = {s["name"]: s for s in manifest["stages"]}
    assert (stages["filter"]["in"], stages["filter"]["out"]) == (40, 20)
    assert (stages["filter_band"]["in"], stages["filter_band"]["out"]) == (20, 5)
    assert (stages["select"]["in"], stages["select"]["out"]) == (5, 3)
    assert manifest["counts"]["not_selected_by_reason"]["below the cut"] == 2


def test_dsir_then_a_filter_then_a_band(tmp_path, small_corpus):
    # The example chain: DSIR -> keep the top 40% by log weight -> a band of what is left.
    sections = {
        "stages": ["dsir", "filter", "select"],
        "filter": {"column": "dsir_log_weight", "keep_top": 0.4},
        "select": {"method": "band", "column": "n_tokens", "offset": 0.1, "k": None, "fraction": 0.5},
    }
    manifest, _ = _run(tmp_path, small_corpus["pool"], small_corpus["target"], **sections)
    con = duckdb.connect()
    scores = con.execute(f"SELECT dsir_log_weight, n_tokens, selected, reason FROM '{tmp_path}/out/scores/*.parquet'")
    rows = scores.fetchall()
    eligible = [r for r in rows if r[3] != "too short"]
    kept = sorted((r for r in eligible if not (r[3] or "").startswith("filtered")), key=lambda r: -r[0])
    assert len(kept) == round(0.4 * len(eligible))
    # Everything the filter kept has a higher log weight than everything it took out.
    out = [r[0] for r in eligible if (r[3] or "").startswith("filtered")]
    assert min(r[0] for r in kept) >= max(out)
    assert {r[3] for r in eligible if r not in kept} == {"filtered: dsir_log_weight below the 60th percentile"}
    picked = [r for r in kept if r[2]]
    assert len(picked) == round(0.5 * len(kept))
    assert manifest["counts"]["selected"] == len(picked)


def test_a_budget_larger_than_what_is_left(tmp_path, counted, small_corpus):
    sections = {
        "stages": ["filter", "select"],
        "filter": {"column": "n_tokens", "keep_top": 0.25},
        "select": {"method": "top", "column": "n_tokens", "k": 20},
    }
    with pytest.raises(Exception, match="select.k=20 is larger than the 10 eligible documents") as info:
        _run(tmp_path, counted, small_corpus["target"], **sections)
    assert "30 were taken out as 'filtered: n_tokens below the 75th percentile'" in str(info.value)
    assert SelectionError.__name__ in repr(info.value) or "SelectionError" in str(info.value)


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"stages": ["dsir"]}, "'stages' must end with select, once"),
        ({"stages": ["dsri", "select"]}, "unknown stage 'dsri' in 'stages' (did you mean 'dsir'?)"),
        ({"stages": ["filter", "select"], "filter": {"keep_top": 0.5}}, "filter.column needs a column"),
        (
            {"stages": ["filter", "select"], "filter": {"column": "loss", "keep_top": 0.5}},
            "filter.column has 'loss', not a column of an earlier stage: one of ['n_tokens']",
        ),
        ({"stages": ["filter", "select"], "filter": {"column": "n_tokens"}}, "filter: set one of keep_top"),
        ({"stages": ["select"], "select": {"method": "top"}}, "select.method 'top' needs select.column"),
        ({"stages": ["select"], "select": {"method": "threshold", "column": "n_tokens"}}, "needs select.min"),
        (
            {"stages": ["select"], "filter_x": {"column": "n_tokens"}},
            "the section 'filter_x' configures the 'filter_x' stage, which 'stages' does not list",
        ),
        (
            {"stages": ["proxy", "reweight", "embed", "cluster", "select"], "select": {"method": "sensitivity"}},
            "writes a weight column, and so does the reweight stage",
        ),
        (
            {
                "stages": ["embed", "cluster", "select"],
                "cluster": {"passes": 2, "model": "x"},
                "select": {"method": "all"},
            },
            "with cluster.model the centroids are given",
        ),
        (
            {"stages": ["embed", "cluster", "select"], "select": {"method": "all", "quota_column": "n_tokens"}},
            "goes with",
        ),
        (
            {"stages": ["dsir", "embed", "cluster", "select"], "embed": {"batch_size": 0}},
            "'embed.batch_size' must be at",
        ),
        (
            {"stages": ["dsir", "embed", "cluster", "select"], "cluster": {"passes": -1}},
            "'cluster.passes' must be >= 0",
        ),
    ],
)
def test_chain_config_errors(tmp_path, small_corpus, sections, message):
    cfg = make_config(tmp_path, small_corpus["pool"], small_corpus["target"], **sections)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(cfg))


def test_a_column_two_stages_write_is_written_once():
    from beamsift.transforms.chain import Chain
    from beamsift.transforms.io.write import score_fields

    chain = Chain(
        "/tmp/x",
        ("proxy", "excess_loss", "select"),
        {"proxy": (("loss", "double"), ("el2n", "double")), "excess_loss": (("loss", "double"),), "select": ()},
    )
    names = [f.name for f in score_fields(chain)]
    assert names.count("loss") == 1 and names.index("loss") < names.index("el2n")
    assert chain.producer("loss") == "excess_loss"


def test_a_fit_in_a_map_step_counts_in_its_stage_timings():
    """The SVD, k-means and proxy fits run in Map steps: Metered puts their time in the stage's."""
    import time

    import apache_beam as beam
    from beamsift.pipeline.run import _query_metrics
    from beamsift.transforms.chain.meter import Metered, stage_timings

    def fit(x, pause):
        time.sleep(pause)
        return x

    p = beam.Pipeline(runner=TEST_RUNNER)
    _ = p | beam.Create([1]) | beam.Map(Metered("fitting", fit), 0.2)
    result = p.run()
    result.wait_until_finish()
    timing = stage_timings(_query_metrics(result))["fitting"]
    assert timing["busy_s"] >= 0.2 and timing["wall_s"] >= 0.2


class _SideBySideWork(beam.DoFn):
    """Each element's work on a thread of the DoFn's own: its outputs (one tagged where odd), a
    counter, and how many elements were in hand at once."""

    def setup(self):
        import threading

        from beamsift.transforms.chain.side_by_side import SideBySide

        self.shards, self.lock, self.now, self.most = SideBySide(2, "test"), threading.Lock(), 0, 0

    def process(self, x):
        yield from self.shards.submit(self.work, x)

    def work(self, x):
        import time

        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        beam.metrics.Metrics.counter(NAMESPACE, "seen").inc(x)
        time.sleep(0.005)
        with self.lock:
            self.now -= 1
        return [x, beam.pvalue.TaggedOutput("odd", x)] if x % 2 else [x]

    def finish_bundle(self):
        yield from self.shards.rest()
        beam.metrics.Metrics.counter(NAMESPACE, "more_than_two").inc(int(self.most > 2))
        self.most = 0

    def teardown(self):
        self.shards.close()


def test_side_by_side_gives_every_output_counts_its_metrics_and_holds_two_at_a_time():
    from apache_beam.testing.util import assert_that, equal_to
    from beamsift.pipeline.run import _query_metrics

    p = beam.Pipeline(runner=TEST_RUNNER)
    out = p | beam.Create(range(40)) | beam.ParDo(_SideBySideWork()).with_outputs("odd", main="all")
    assert_that(out.all, equal_to(list(range(40))), label="all")
    assert_that(out.odd, equal_to(list(range(1, 40, 2))), label="odd")
    result = p.run()
    result.wait_until_finish()
    metrics = _query_metrics(result)
    assert metrics["seen"] == sum(range(40))  # counted on the elements' threads, not lost
    assert metrics["more_than_two"] == 0  # never more elements in hand than threads
