"""Launching from the command line: every shipped config translates for the DataflowRunner
(``--dry_run=True`` needs no credentials) and the command says so in one line, runs nothing and
writes nothing; the shipped runner option sets; and the local runner's default worker processes."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, run_cli

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient", reason="apache-beam[gcp] is a test extra")

CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
DATAFLOW = ["--runner=DataflowRunner", "--dry_run=True", "--project=proj-123", "--region=us-central1",
            "--temp_location=gs://bucket/tmp"]  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_translates_for_dataflow_and_nothing_runs(tmp_path, name):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    args = ["run", f"configs/{name}.yaml", "--set", f"output.dir={out}", "--", *DATAFLOW]
    proc = run_cli(*args, env={"TMPDIR": str(tmp)})
    assert proc.stderr == ""
    line = proc.stdout.strip()
    assert "\n" not in line
    assert re.fullmatch(
        r"beamsift: dry run: the job translated for DataflowRunner \((\d+) transforms\); nothing ran and nothing "
        r"was written",
        line,
    ), line
    assert int(re.search(r"\((\d+) transforms", line).group(1)) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and list(tmp.iterdir()) == []


@pytest.mark.parametrize("runner", ["dataflow", "dataflow-gpu"])
def test_the_shipped_dataflow_option_sets_translate(tmp_path, runner):
    args = ["run", "configs/quality_diversity.yaml", "--runner-config", f"configs/runners/{runner}.yaml"]
    proc = run_cli(*args, "--set", f"output.dir={tmp_path / 'out'}", "--", "--dry_run=True")
    assert proc.stdout.startswith("beamsift: dry run: the job translated for DataflowRunner (")
    assert list(tmp_path.iterdir()) == []


def test_the_flink_option_set_names_the_flink_runner_and_its_worker_pools():
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions
    from beamsift.pipeline.cli import _runner_overrides
    from beamsift.pipeline.config import load_config

    cfg = load_config("configs/demo.yaml", _runner_overrides("configs/runners/flink.yaml"))
    options = PipelineOptions([f"--runner={cfg['beam.runner']}", *cfg["beam.options"]])
    assert cfg["beam.runner"] == "FlinkRunner"
    assert options.view_as(PortableOptions).environment_type == "EXTERNAL"


def test_a_real_submission_refuses_paths_on_this_machine_and_local_runners_refuse_no_wait(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("run", "configs/demo.yaml", "--set", f"output.dir={out}", "--", *DATAFLOW[:1], *DATAFLOW[2:],
                   check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"beamsift: error: output.dir {out} is on this machine's disk, which the DataflowRunner's workers do not "
        "see: put it on gs:// or s3:// (or a mount that every worker shares, with a local runner)"
    )
    proc = run_cli("run", "configs/demo.yaml", "--set", f"output.dir={out}", "--no-wait", check=False)
    assert proc.returncode == 2 and "--no-wait is for runners that run the job elsewhere" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_local_runner_takes_the_machines_cores_for_a_large_input_unless_told_otherwise(monkeypatch):
    from types import SimpleNamespace

    from apache_beam.options.pipeline_options import PipelineOptions
    from beamsift.pipeline import run
    from beamsift.pipeline.config import load_config

    monkeypatch.setattr(run.os, "cpu_count", lambda: 4)
    large, small = [SimpleNamespace(nbytes=run.AUTO_WORKERS_FEATURIZE_BYTES)], [SimpleNamespace(nbytes=1 << 20)]
    dsir = load_config("configs/dsir.yaml")
    options = PipelineOptions(["--runner=FnApiRunner"])
    assert run._local_workers(dsir, options, [], large) == 4
    assert run._local_workers(dsir, options, [], small) == 0  # a second process would cost more than it saves
    assert run._local_workers(dsir, options, ["--direct_num_workers=1"], large) == 0  # the user's choice
    assert run._local_workers(load_config("configs/el2n.yaml"), options, [], large) == 0  # torch uses the cores
    # DSIR featurizes on threads in one process: more processes pay off on a larger input only.
    medium = [SimpleNamespace(nbytes=run.AUTO_WORKERS_FEATURIZE_BYTES // 8)]
    assert run._local_workers(dsir, options, [], medium) == 0
    assert run._local_workers(load_config("configs/minhash.yaml"), options, [], medium) == 4
    dataflow = PipelineOptions(["--runner=DataflowRunner"])
    assert run._local_workers(dsir, dataflow, [], large) == 0


def test_local_worker_processes_size_their_math_pools_to_their_share_of_the_cores(monkeypatch):
    """Each of a local runner's worker processes gets a BLAS and OpenMP pool of its share of the
    cores (two workers each spinning a pool of every core took SemDeDup 1.8x as long); a value the
    user set is kept, and this process's environment is as it was after the run."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to
    from beamsift.pipeline import run

    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)  # what this process sees: one core a worker
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's
    before = dict(run.os.environ)
    options = PipelineOptions(
        ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    )

    def pools(_):  # in a worker (defined here: pickled by value, the test module is not importable there)
        import numpy  # noqa: F401  (its BLAS)
        import sklearn.cluster  # noqa: F401  (its OpenMP)
        from threadpoolctl import threadpool_info

        pools = [(pool["user_api"], pool["num_threads"]) for pool in threadpool_info()]
        return sorted({(api, threads) for api, threads in pools if api in ("blas", "openmp")})

    with run._math_threads(options):
        with beam.Pipeline(options=options) as p:
            found = p | beam.Create([0]) | beam.Map(pools)
            assert_that(found, equal_to([[("blas", 1), ("openmp", 3)]]))
    assert dict(run.os.environ) == before


def test_a_run_on_the_portable_runner_leaves_nothing_in_the_temp_dir(tmp_path):
    # The runner API's embedded job service (as Flink's and Dataflow's) stages a requirements cache
    # and folders of its own in the temp dir; a run leaves none of them behind.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    portable = ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"]
    args = ["run", "configs/demo.yaml", "--quiet", "--set", f"output.dir={out}", "--", *portable]
    run_cli(*args, env={"TMPDIR": str(tmp)})
    assert (out / "manifest.json").exists()
    assert list(tmp.iterdir()) == []
