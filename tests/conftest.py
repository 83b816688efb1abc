"""Fixtures: small real inputs cut from the bundled demo corpus (data/README.md)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
# The runner of the tests that build a Beam pipeline by hand, named: Beam's DirectRunner would
# first try the Prism runner (a binary it downloads; offline, a failed start and an empty
# beam-temp* folder left in the temp dir each time) before falling back to this one.
TEST_RUNNER = "FnApiRunner"


def demo_records(n: int) -> list[dict]:
    out = []
    with gzip.open(DATA / "pool.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def target_records(n: int) -> list[dict]:
    with open(DATA / "target.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] = ()) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> dict:
    """600 pool documents and 100 target documents of real text, as JSONL files."""
    d = tmp_path_factory.mktemp("corpus")
    return {
        "pool": write_jsonl(d / "pool.jsonl", demo_records(600)),
        "target": write_jsonl(d / "target.jsonl", target_records(100)),
        "dir": d,
    }


def tree_of(path) -> dict:
    """Every file under ``path`` with its bytes: what "left intact" is checked against."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def make_config(tmp_path: Path, pool, target, out=None, **sections) -> Path:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "input": {"path": str(pool), "id_field": "id"},
        "target": {"path": str(target)},
        "dsir": {"min_tokens": 20},
        "select": {"k": 50},
        "seed": 1,
        "output": {"dir": str(out or tmp_path / "out")},
    }
    if "dsir" not in sections.get("stages", ["dsir"]):
        del cfg["dsir"]  # a section for a stage that 'stages' does not list is an error
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, check: bool = True, cwd=ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `beamsift` command line as a user would (``env``: variables to add)."""
    proc = subprocess.run(
        [sys.executable, "-m", "beamsift.pipeline.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"beamsift {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_held(args: list[str], at: str, held, env: dict | None = None) -> subprocess.Popen:
    """Start `beamsift ARGS` held at ``at`` by tests/hold/sitecustomize.py ("done:<stage>": just
    after that stage's done mark; "publish": just before the result is published), and return it
    once it is held there: a signal sent now interrupts it at that point, however fast it runs.
    ``held``: a file the hold writes (outside the run's folders and its temp dir)."""
    hook = os.pathsep.join(p for p in (str(ROOT / "tests" / "hold"), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "beamsift.pipeline.cli", *args],
        # As from a terminal: a suite started in the background (`cmd &`, nohup) has SIGINT
        # ignored, which its children inherit, and beamsift keeps an ignored SIGINT ignored.
        preexec_fn=_sigint_as_from_a_terminal,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            **(env or {}),
            "PYTHONPATH": hook,
            "BEAMSIFT_TEST_HOLD": at,
            "BEAMSIFT_TEST_HELD": str(held),
        },
    )
    deadline = time.time() + 300
    while not os.path.exists(held):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the run was never held at {at} (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.01)
    return proc


# ---- the shipped configs, small: the golden test and the runs on object stores ----

POOL_DOCS, TARGET_DOCS = 700, 150
# Small models: the same stages and methods, trained in seconds (threads=1: the same sums in the
# same order on any machine).
SMALL_MODELS = {
    "proxy": {"sample": 300, "epochs": 2, "vocab_size": 400, "dim": 32, "context": 64, "threads": 1},
    "embed": {"threads": 1},
}
TEXT_COLUMNS = {"text"}  # the input's own text: not a score


def small_overrides(name: str, pool, target, out) -> list[str]:
    """--set arguments that run shipped config ``name`` on ``pool`` with small models (the golden
    test's settings)."""
    from beamsift.pipeline.config import load_config

    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    sets = {"input.path": pool, "output.dir": out}
    if cfg["target.path"] is not None:
        sets["target.path"] = target
    stages = cfg["stages"] or ["dsir", "select"]
    model_sections = {"proxy"} if {"proxy", "excess_loss"} & set(stages) else set()
    if "embed" in stages and cfg["embed.method"] == "model":
        model_sections.add("embed")
    for section in model_sections:
        for key, value in SMALL_MODELS[section].items():
            sets[f"{section}.{key}"] = value
    if cfg["select.k"] is not None:
        sets["select.k"] = min(cfg["select.k"], 60)
    for key in ("embed.sample", "cluster.sample"):
        if key.split(".")[0] in stages and cfg[key] > POOL_DOCS:
            sets[key] = POOL_DOCS
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def assert_same_result(got, expected) -> None:
    """The same selected ids and the same value in every score column, document by document."""
    import numpy as np
    import pyarrow as pa

    assert got.column_names == expected.column_names
    assert got.num_rows == expected.num_rows
    selected = lambda t: [i for i, s in zip(t["id"].to_pylist(), t["selected"].to_pylist()) if s]  # noqa: E731
    assert selected(got) == selected(expected)
    for column in expected.column_names:
        a, b = got[column].to_pylist(), expected[column].to_pylist()
        if pa.types.is_floating(expected.schema.field(column).type):
            a = np.array([np.nan if v is None else v for v in a], dtype=np.float64)
            b = np.array([np.nan if v is None else v for v in b], dtype=np.float64)
            # Trained models' floats move by ~1e-5 between CPUs (AVX2 against AVX-512 kernels) with
            # the same seed and one thread; a change of method moves them far more.
            np.testing.assert_allclose(a, b, rtol=5e-4, atol=1e-4, equal_nan=True, err_msg=column)
        else:
            assert a == b, column


# ---- a real S3 server on loopback (moto's), for the runs on object stores ----

S3_BUCKET = "corpora"
# The multi-process runner: its workers share nothing with the launching process but the bucket.
WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A bucket on a moto S3 server on loopback, holding the golden test's slice of the data."""
    import boto3

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
    )  # fmt: skip
    deadline = time.time() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.2)
    client.create_bucket(Bucket=S3_BUCKET)
    d = tmp_path_factory.mktemp("s3data")
    write_jsonl(d / "pool.jsonl", demo_records(POOL_DOCS))
    write_jsonl(d / "target.jsonl", target_records(TARGET_DOCS))
    for name in ("pool.jsonl", "target.jsonl"):
        client.upload_file(str(d / name), S3_BUCKET, f"in/{name}")
    try:
        yield {"env": env, "client": client, "port": port}
    finally:
        server.terminate()
        server.wait(10)


def s3_keys(s3, prefix: str = "") -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _objects(s3, prefix: str) -> dict[str, bytes]:
    return {k: s3["client"].get_object(Bucket=S3_BUCKET, Key=k)["Body"].read() for k in s3_keys(s3, prefix)}
