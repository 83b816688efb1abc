"""report.html: written by every run, rebuilt by ``beamsift report``, one self-contained page that a
real headless browser renders with its charts; and examples/, the documents at both ends of every
score, the same as a plain sort of scores/ finds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import duckdb
import numpy as np
import pytest
from conftest import S3_BUCKET, demo_records, make_config, run_cli, s3_keys, target_records, write_jsonl

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")
SELECTED_RGB = np.array([0x2F, 0x6F, 0xB3]) / 255  # the report's colour for the selection


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run with every section: DSIR's KL, clusters, near duplicates, a categorical
    field, several shards."""
    tmp = tmp_path_factory.mktemp("report")
    records = demo_records(500)
    copies = [{**r, "id": f"copy-{i}"} for i, r in enumerate(records[:8])]
    pool = write_jsonl(tmp / "pool.jsonl", records + copies)
    target = write_jsonl(tmp / "target.jsonl", target_records(100))
    cfg = make_config(
        tmp,
        pool,
        target,
        stages=["dsir", "embed", "cluster", "dedup", "select"],
        embed={"method": "projection", "dim": 64},
        cluster={"k": 4, "sample": 300, "passes": 1},
        select={"method": "balanced", "k": 80, "column": "dsir_key"},
        input={"path": str(pool), "id_field": "id", "split_bytes": 100_000},
    )
    proc = run_cli("run", str(cfg), "--quiet")
    return {"out": tmp / "out", "cfg": cfg, "stdout": proc.stdout}


def test_every_run_writes_a_self_contained_report_with_every_section(run):
    out = run["out"]
    page = (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert "report.html" in manifest["files"] and "examples/part-00000.parquet" in manifest["files"]
    # Nothing fetched: no script, no stylesheet link, no image by address; the charts inline SVG.
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    images = re.findall(r"<svg [^>]*role='img'", page)
    for heading in ("From the records read to the selection", "How close the selection is to the target",
                    "Every score: the selection against the rest", "What the selection is made of",
                    "Clusters (4)", "Duplicates found", "The documents at both ends of every score",
                    "Time by stage"):  # fmt: skip
        assert heading in page, heading
    # One histogram per numeric score column, the funnel, the make-up by source, the clusters, the times.
    scores = [c for c, t, *_ in duckdb.sql(f"DESCRIBE SELECT * FROM '{out}/scores/*.parquet'").fetchall()
              if t in ("DOUBLE", "INTEGER", "BIGINT") and c != "cluster"]  # fmt: skip
    assert len(images) == len(scores) + 4
    assert "by source" in page and "exact duplicate" in page  # the 8 planted copies
    assert f"{manifest['counts']['selected']:,}" in page


def test_examples_are_the_ends_of_each_score_as_a_plain_sort_finds_them(run):
    out = run["out"]
    db = duckdb.connect()
    assert len(list((out / "selected").glob("*.parquet"))) > 1  # several writers' parts merged
    examples = db.execute(
        f'SELECT "column", "end", rank, value, id, selected FROM \'{out}/examples/*.parquet\' ORDER BY ALL'
    ).fetchall()
    columns = sorted({e[0] for e in examples})
    assert {"dsir_log_weight", "dsir_key", "cluster_distance"} <= set(columns)
    for column in columns:
        for end, order in (("top", "DESC"), ("bottom", "ASC")):
            expected = db.execute(
                f"SELECT \"{column}\", id::VARCHAR, selected FROM '{out}/scores/*.parquet' "
                f'WHERE isfinite("{column}") ORDER BY "{column}" {order}, id::VARCHAR LIMIT 5'
            ).fetchall()
            got = [(v, i, s) for c, e, _, v, i, s in sorted(examples, key=lambda x: x[2]) if c == column and e == end]
            assert got == expected, (column, end)
    texts = dict(db.execute(f"SELECT id::VARCHAR, text FROM '{out}/examples/*.parquet'").fetchall())
    records = {r["id"]: r["text"] for r in demo_records(500)}
    assert all(records.get(i, t)[:300] == t for i, t in texts.items())


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium (apt-get install chromium-headless-shell)")
def test_the_report_renders_in_a_real_headless_browser(run, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [_browser(), "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
         "--window-size=1200,2400", f"--screenshot={shot}", (run["out"] / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert "CONSOLE" not in proc.stderr and "net::ERR" not in proc.stderr, proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64) / 255
    background = pixels[5, 5]
    drawn = np.abs(pixels - background).sum(axis=-1) > 0.1
    assert drawn.mean() > 0.05  # not a blank page
    blue = np.abs(pixels - SELECTED_RGB).sum(axis=-1) < 0.08
    assert blue.sum() > 2_000  # the charts' bars of the selection were decoded and drawn


def test_beamsift_report_rebuilds_it_and_a_later_overwrite_still_replaces_the_output(run, tmp_path):
    out = run["out"]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"].remove("report.html")  # an output from before reports
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "report.html").write_text("the user's own page")  # not in the manifest: not beamsift's
    mine = run_cli("report", str(copy), check=False)
    assert mine.returncode == 2 and "holds a report.html that beamsift did not write" in mine.stderr
    assert (copy / "report.html").read_text() == "the user's own page"
    (copy / "report.html").unlink()
    proc = run_cli("report", str(copy))
    assert "report.html" in proc.stdout and (copy / "report.html").exists()
    assert "report.html" in json.loads((copy / "manifest.json").read_text())["files"]
    assert "Every score" in (copy / "report.html").read_text()
    run_cli("run", str(run["cfg"]), "--quiet", "--overwrite", "--set", f"output.dir={copy}")
    missing = run_cli("report", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 2 and "no readable manifest.json" in missing.stderr


def test_report_of_an_output_in_a_bucket(s3, tmp_path):
    pool = write_jsonl(tmp_path / "pool.jsonl", demo_records(200))
    out = f"s3://{S3_BUCKET}/reports/demo"
    cfg = make_config(tmp_path, pool, pool, out=out, select={"k": 30})
    run_cli("run", str(cfg), "--quiet", env=s3["env"])
    assert "reports/demo/report.html" in s3_keys(s3, "reports/demo/")
    local = tmp_path / "again.html"
    run_cli("report", out, "-o", str(local), env=s3["env"])
    page = local.read_text()
    assert "Every score" in page and "dsir_log_weight" in page
