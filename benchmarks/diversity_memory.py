"""Peak memory of the diversity chain at 100k and 1M documents, against DSIR alone on the same data.

    python benchmarks/diversity_memory.py --docs 100000
    python benchmarks/diversity_memory.py --docs 1000000

The corpus is made of the bundled pool's real text: each document is 60–300 words taken as spans
from random pool documents (seeded), so that it is not a copy of another (a corpus of repeated
documents would be all duplicates); then 5% of them are planted again as near-duplicates (a few
words dropped) under fresh ids, for the dedup stage to find.

Two runs of ``beamsift run`` on that corpus, their process trees sampled every 0.1 s for RSS:

- ``dsir``: ``configs/dsir.yaml`` (the baseline: nothing global but the n-gram model);
- ``diversity``: ``configs/quality_diversity.yaml`` without its proxy stages (DSIR → top 40% →
  SVD embedding → k-means → exact + SemDeDup → cluster-balanced by ``dsir_key``). The proxy's
  memory is its training sample (``proxy.sample``), whatever the corpus; on 2 CPU cores it would
  score 400,000 documents in hours, not minutes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from dsir_vs_reference import timed  # noqa: E402


def build_corpus(path: Path, n_docs: int, seed: int = 0, duplicate_share: float = 0.05) -> int:
    rng = random.Random(seed)
    with gzip.open(ROOT / "data" / "pool.jsonl.gz", "rt", encoding="utf-8") as f:
        words = [json.loads(line)["text"].split() for line in f]
    words = [w for w in words if len(w) >= 40]
    n_base = int(n_docs / (1 + duplicate_share))
    planted = 0
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n_base):
            doc: list[str] = []
            target = rng.randint(60, 300)
            while len(doc) < target:
                src = words[rng.randrange(len(words))]
                start = rng.randrange(len(src))
                doc += src[start : start + rng.randint(20, 80)]
            text = " ".join(doc[:target])
            out.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
            if rng.random() < duplicate_share:
                copy = text.split()
                for _ in range(max(1, len(copy) // 40)):
                    del copy[rng.randrange(len(copy))]
                out.write(json.dumps({"id": f"d{i}-copy", "text": " ".join(copy)}) + "\n")
                planted += 1
    return planted


def _without_proxy(tmp: Path) -> Path:
    """configs/quality_diversity.yaml less its proxy and the filter on the proxy's EL2N."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "quality_diversity.yaml").read_text())
    cfg["stages"] = [s for s in cfg["stages"] if s not in ("proxy", "filter_hardest")]
    for section in ("proxy", "filter_hardest"):
        cfg.pop(section, None)
    cfg["input"]["path"] = str(ROOT / cfg["input"]["path"])
    cfg["target"]["path"] = str(ROOT / cfg["target"]["path"])
    path = tmp / "diversity.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=0, help="0: one process (FnApiRunner); n: multi-process")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="beamsift-divmem-"))
    corpus = tmp / "pool.jsonl"
    planted = build_corpus(corpus, args.docs)
    n = sum(1 for _ in open(corpus, encoding="utf-8"))
    print(f"{n:,} documents ({planted:,} planted near-duplicates), {corpus.stat().st_size / 2**20:,.0f} MB")
    beam = (
        ["--", "--direct_running_mode=multi_processing", f"--direct_num_workers={args.workers}"] if args.workers else []
    )
    common = [
        sys.executable, "-m", "beamsift.pipeline.cli", "run", "--quiet", "--no-progress", "--force",
        "--set", f"input.path={corpus}", "--set", "input.split_bytes=8000000",
    ]  # fmt: skip
    runs = {
        "dsir": [
            *common,
            str(ROOT / "configs" / "dsir.yaml"),
            "--set", f"output.dir={tmp / 'dsir'}",
            "--set", "select.k=10000",
        ],
        "diversity": [
            *common,
            str(_without_proxy(tmp)),
            "--set", f"output.dir={tmp / 'diversity'}",
            "--set", "select.column=dsir_key",
            "--set", "select.fraction=null", "--set", "select.k=10000",
        ],
    }  # fmt: skip
    print(f"{'run':<11}{'seconds':>9}{'docs/s':>10}{'peak RSS (all / largest process)':>36}")
    for name, cmd in runs.items():
        wall, rss, rss_one = timed([*cmd, *beam], tmp / f"{name}.log")
        print(f"{name:<11}{wall:>9.1f}{n / wall:>10,.0f}{rss / 2**20:>22,.0f} MB / {rss_one / 2**20:>5,.0f} MB")
    manifest = json.loads((tmp / "diversity" / "manifest.json").read_text())
    for stage in manifest["stages"]:
        taken = ", ".join(f"{k} {v:,}" for k, v in stage["taken_out"].items()) or "-"
        print(f"  {stage['name']:<8} in {stage['in']:>9,}  out {stage['out']:>9,}  taken out: {taken}")
    if not args.keep:
        import shutil

        shutil.rmtree(tmp)
    else:
        print(f"kept {tmp}")


if __name__ == "__main__":
    main()
