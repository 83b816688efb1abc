"""Object stores beyond the shipped configs (which tests/test_golden.py runs in a bucket): models
trained into a bucket and applied from it, `query` on a bucket, and an interrupted run that
leaves the previous result in the bucket as it was. On a real S3 server on loopback."""

from __future__ import annotations

import json
import signal

from conftest import ROOT, S3_BUCKET, WORKERS, run_cli, s3_keys, start_held

IN = f"s3://{S3_BUCKET}/in"
SMALL_PROXY = ["--set", "proxy.sample=200", "--set", "proxy.epochs=1", "--set", "proxy.vocab_size=300",
               "--set", "proxy.dim=16", "--set", "proxy.context=48", "--set", "proxy.seeds=1"]  # fmt: skip


def _objects(s3, prefix: str) -> dict[str, bytes]:
    return {k: s3["client"].get_object(Bucket=S3_BUCKET, Key=k)["Body"].read() for k in s3_keys(s3, prefix)}


def test_models_trained_into_a_bucket_are_applied_from_it_and_query_reads_the_result(s3):
    models, out = f"s3://{S3_BUCKET}/models/el2n", f"s3://{S3_BUCKET}/out/applied"
    data = ["--set", f"input.path={IN}/pool.jsonl", "--set", "select.k=25", *SMALL_PROXY]
    run_cli("train", "configs/el2n.yaml", *data, "--set", f"output.dir={models}", "--quiet", env=s3["env"])
    assert "models/el2n/artifacts/proxy/models.tar" in s3_keys(s3, "models/")
    run_cli("run", "configs/el2n.yaml", *data, "--set", f"output.dir={out}", "--set", f"proxy.model={models}",
            "--quiet", env=s3["env"])  # fmt: skip
    manifest = json.loads(_objects(s3, "out/applied/manifest.json")["out/applied/manifest.json"])
    assert manifest["inputs"]["proxy.model"] == [{"path": f"{models}/artifacts/proxy"}]
    assert "training" not in manifest  # applied, not trained
    proc = run_cli("query", out, "--format", "csv", "SELECT count(*) AS n, count(el2n) AS scored FROM selected",
                   env=s3["env"])  # fmt: skip
    assert proc.stdout.splitlines() == ["n,scored", "25,25"]
    proc = run_cli("query", f"s3://{S3_BUCKET}/out/none", "SELECT 1", env=s3["env"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"beamsift: error: s3://{S3_BUCKET}/out/none: no such folder"


def test_an_interrupted_run_leaves_the_previous_result_in_the_bucket_as_it_was(s3, tmp_path):
    out = f"s3://{S3_BUCKET}/out/interrupted"
    args = ["run", "configs/demo.yaml", "--set", f"input.path={IN}/pool.jsonl", "--set",
            f"target.path={IN}/target.jsonl", "--set", f"output.dir={out}", "--quiet"]  # fmt: skip
    run_cli(*args, "--set", "select.k=30", env=s3["env"])
    before = _objects(s3, "out/interrupted/")
    # Held with every file of the new result in the bucket, just before it would be published.
    held = tmp_path / "held"
    proc = start_held([*args, "--set", "select.k=40", "--overwrite", "--", *WORKERS], "publish", held, env=s3["env"])
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr
    assert _objects(s3, "out/interrupted/") == before
    # Its unfinished folder is removed, or kept for the same command to resume after the stages
    # that finished, until `beamsift clean` (which leaves the result as it is).
    if "kept " in stderr:
        run_cli("clean", out, env=s3["env"])
    assert [k for k in s3_keys(s3, "out/") if "beamsift-tmp-" in k] == []
    assert _objects(s3, "out/interrupted/") == before


def test_files_on_a_bucket_share_one_client_per_process(s3, monkeypatch):
    """Beam's S3 filesystem would build a boto3 session and client (~0.4 s) for every file."""
    import beamsift.transforms  # noqa: F401  (what every beamsift process imports first)
    import botocore.session
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    created = []
    real = botocore.session.Session.create_client

    def counted(self, *args, **kwargs):
        created.append(args)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(botocore.session.Session, "create_client", counted)
    options = PipelineOptions(
        [f"--s3_endpoint_url={s3['env']['AWS_ENDPOINT_URL']}", "--s3_region_name=eu-west-3",
         "--s3_access_key_id=test", "--s3_secret_access_key=test"]
    )  # fmt: skip
    FileSystems.set_options(options)
    for i in range(5):
        with FileSystems.create(f"s3://{S3_BUCKET}/clients/{i}.txt") as f:
            f.write(b"x")
    assert all(FileSystems.exists(f"s3://{S3_BUCKET}/clients/{i}.txt") for i in range(5))
    with FileSystems.open(f"s3://{S3_BUCKET}/clients/3.txt") as f:
        assert f.read() == b"x"
    assert len(created) == 1  # 11 file operations, one client (a new region: a new set of options)


def test_staging_tables_removed_in_a_bucket_take_their_objects_and_nothing_else(s3):
    """An object store has no folders: a table's objects go one by one, and a table whose name
    another's begins with (dedup.members, dedup.members.rows) keeps its own."""
    import beamsift.transforms  # noqa: F401
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from beamsift.transforms.chain.staging import remove_tables

    FileSystems.set_options(PipelineOptions([f"--s3_endpoint_url={s3['env']['AWS_ENDPOINT_URL']}",
                                             "--s3_access_key_id=test", "--s3_secret_access_key=test"]))  # fmt: skip
    staging = f"s3://{S3_BUCKET}/removal/_staging"
    for name in ("dedup.members/a.arrow", "dedup.members/b.arrow", "dedup.members.rows/a.i32", "dedup/a.arrow"):
        with FileSystems.create(f"{staging}/{name}") as f:
            f.write(b"x")
    remove_tables(staging, ["dedup.members"])
    assert s3_keys(s3, "removal/") == ["removal/_staging/dedup.members.rows/a.i32", "removal/_staging/dedup/a.arrow"]
    remove_tables(staging, ["dedup.members.rows", "dedup.members"])  # again, and one already gone
    assert s3_keys(s3, "removal/") == ["removal/_staging/dedup/a.arrow"]


def test_a_run_interrupted_in_a_bucket_resumes_there_with_the_recorded_result(s3, tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    from beamsift.pipeline.query import connect
    from conftest import TEXT_COLUMNS, assert_same_result, small_overrides

    out = f"s3://{S3_BUCKET}/out/resumed"
    args = ["run", "configs/demo.yaml", *small_overrides("demo", f"{IN}/pool.jsonl", f"{IN}/target.jsonl", out),
            "--quiet", "--", *WORKERS]  # fmt: skip
    proc = start_held(args, "done:dsir", tmp_path / "held", env=s3["env"])
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "the same command resumes after dsir" in stderr
    assert s3_keys(s3, "out/resumed/") == []  # nothing published

    again = run_cli(*args, env=s3["env"])
    assert "(resumed after dsir: its first stage kept by an interrupted run)" in again.stdout
    manifest = json.loads(_objects(s3, "out/resumed/manifest.json")["out/resumed/manifest.json"])
    assert s3_keys(s3, "out/resumed/") == sorted(f"out/resumed/{f}" for f in [*manifest["files"], "manifest.json"])
    assert s3_keys(s3, "out/.resumed") == []  # the kept prefix became the result
    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    con = connect(out)
    table = con.sql("SELECT * FROM scores ORDER BY id").to_arrow_table()
    con.close()
    table = table.select([c for c in table.column_names if c not in TEXT_COLUMNS])
    assert_same_result(table, pq.read_table(ROOT / "tests" / "golden" / "demo.parquet"))
