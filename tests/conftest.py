"""Fixtures: small real inputs cut from the bundled demo corpus (data/README.md)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


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
