"""beamsift's DSIR against the reference implementation, end to end, on the same 2 cores.

    python benchmarks/dsir_vs_reference.py --docs 200000            # both, one after the other
    python benchmarks/dsir_vs_reference.py --docs 60000 --corpus multilingual
    python benchmarks/dsir_vs_reference.py --docs 1000000 --skip-reference   # memory at scale

``--corpus english`` (default): the bundled demo pool repeated with distinct ids (data/README.md),
written as uncompressed JSONL; the target is the bundled target. ``--corpus multilingual``: the
translated manual pages this machine has in 8 languages (German, French, Russian, Japanese,
Chinese, Spanish, Polish, Korean; /usr/share/man/<lang>, rendered by groff as data/build.py
renders the English ones) cut into documents at paragraph boundaries and repeated with distinct
ids; the target is a held-out tenth of the German documents (not in the pool). beamsift runs
with the default config (no runner flags: it picks its workers) unless ``--beamsift-flags`` says
otherwise; the load average is printed before each run (measure on a quiet machine).

The reference (`data-selection` 1.0.3, p-lambda/dsir) needs nltk==3.8.1 and numpy<2, so it runs
from its own venv, made on first use under benchmarks/.refvenv (or pass --reference-python), with
2 processes. Both select k documents with at least 100 word tokens (the reference's
min_example_length) into 10,000 buckets.

Printed per tool: end-to-end documents/s (process start to exit, fitting included), peak RSS
summed over the tool's process tree, and the KL reduction of its selection, evaluated by one
function for both: KL(target ‖ random k) − KL(target ‖ selected), over the same random subset.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from beamsift.transforms.featurize import bucket_counts, hashed_ngram_features
from beamsift.transforms.stages.dsir import kl_divergence

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = 10000
MIN_TOKENS = 100

REFERENCE_SCRIPT = """
import sys, numpy as np
from data_selection import HashedNgramDSIR
pool, target, cache, out, k = sys.argv[1:6]
dsir = HashedNgramDSIR([pool], [target], cache_dir=cache, num_proc=2, ngrams=2,
                       num_buckets=10000, min_example_length=100)
dsir.fit_importance_estimator(num_tokens_to_fit="auto")
dsir.compute_importance_weights()
np.random.seed(0)  # the reference draws its Gumbel noise from numpy's global generator
dsir.resample(out_dir=out, num_to_sample=int(k), cache_dir=cache + "/resampled")
"""


def build_corpus(path: Path, n_docs: int) -> None:
    with gzip.open(ROOT / "data" / "pool.jsonl.gz", "rt", encoding="utf-8") as f:
        base = [json.loads(line) for line in f]
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n_docs):
            r = dict(base[i % len(base)])
            r["id"] = f"{r['id']}-r{i // len(base)}"
            out.write(json.dumps(r) + "\n")


LANGUAGES = ("de", "fr", "ru", "ja", "zh_CN", "es", "pl", "ko")
GROFF = ["groff", "-t", "-k", "-Kutf8", "-Tutf8", "-man", "-P-cbou", "-rLL=3000n", "-rHY=0", "-dAD=l"]


def _man_paragraphs(path: str) -> list[str]:
    """A manual page's paragraphs as plain text (groff, no wrapping, no formatting codes)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        source = f.read()
    if source.startswith(b".so "):
        return []  # a stub that includes another page
    text = subprocess.run(GROFF, input=source, capture_output=True).stdout.decode("utf-8", "replace")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paragraphs[1:-1] if len(p) > 40]  # less the header and footer lines


def multilingual_documents(languages=LANGUAGES) -> list[dict]:
    """Documents of 1,500-6,000 characters packed from each page's paragraphs, per language."""
    docs = []
    for lang in languages:
        pages = sorted(p for p in glob.glob(f"/usr/share/man/{lang}/man*/*") if os.path.isfile(p))
        for page in pages:
            text = ""
            for para in _man_paragraphs(page):
                text = f"{text} {para}".strip()
                if len(text) >= 1500:
                    docs.append({"id": f"{lang}-{len(docs):06d}", "text": text[:6000], "source": lang})
                    text = ""
    return docs


def build_multilingual(path: Path, target: Path, n_docs: int) -> None:
    docs = multilingual_documents()
    if not docs:
        sys.exit("no translated manual pages under /usr/share/man/<lang>: --corpus multilingual needs them")
    german = [d for d in docs if d["source"] == "de"]
    held_out = {d["id"] for d in german[::10]}
    with open(target, "w", encoding="utf-8") as out:
        for d in german[::10]:
            out.write(json.dumps(d, ensure_ascii=False) + "\n")
    base = [d for d in docs if d["id"] not in held_out]
    counts = {lang: sum(d["source"] == lang for d in base) for lang in LANGUAGES}
    print("multilingual base documents: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n_docs):
            r = dict(base[i % len(base)])
            r["id"] = f"{r['id']}-r{i // len(base)}"
            out.write(json.dumps(r, ensure_ascii=False) + "\n")


def _tree_rss(pid: int) -> dict[int, int]:
    """Resident memory of a process and each of its descendants, in bytes (Linux /proc)."""
    out, stack = {}, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out[p] = int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return out


def timed(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Run cmd; return (wall seconds, peak RSS of its process tree, of its largest process)."""
    start = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
        peak = [0, 0]

        def sample():
            while proc.poll() is None:
                rss = _tree_rss(proc.pid)
                peak[0] = max(peak[0], sum(rss.values()))
                peak[1] = max([peak[1], *rss.values()])
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        elapsed = time.perf_counter() - start  # not after the sampler's last sleep (up to 0.1 s)
        sampler.join()
    if code != 0:
        sys.exit(f"{' '.join(cmd[:3])}... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return elapsed, peak[0], peak[1]


def reference_python(arg: str | None) -> str:
    if arg:
        return arg
    venv = ROOT / "benchmarks" / ".refvenv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(
            "making the reference's venv (data-selection 1.0.3, nltk 3.8.1, numpy<2) ...",
            flush=True,
        )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "data-selection==1.0.3",
                "nltk==3.8.1",
                "numpy<2",
            ],
            check=True,
        )
    return str(python)


def evaluate(corpus: Path, target: Path, selections: dict[str, set], k: int, seed: int = 0) -> dict:
    """KL reduction of each selection against the same uniformly random k-subset."""
    with open(target, encoding="utf-8") as f:
        target_texts = [json.loads(line)["text"] for line in f]
    target_counts = bucket_counts(hashed_ngram_features(pa.array(target_texts), BUCKETS), BUCKETS)
    n = sum(1 for _ in open(corpus, "rb"))
    random_rows = np.zeros(n, dtype=bool)
    random_rows[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    counts = {name: np.zeros(BUCKETS, np.int64) for name in [*selections, "random"]}
    with open(corpus, encoding="utf-8") as f:
        row = 0
        while True:
            lines = [line for _, line in zip(range(20000), f)]
            if not lines:
                break
            records = [json.loads(line) for line in lines]
            feats = hashed_ngram_features(pa.array([r["text"] for r in records]), BUCKETS)
            ids = [r["id"] for r in records]
            counts["random"] += bucket_counts(feats, BUCKETS, rows=random_rows[row : row + len(lines)])
            for name, chosen in selections.items():
                mask = np.array([i in chosen for i in ids])
                counts[name] += bucket_counts(feats, BUCKETS, rows=mask)
            row += len(lines)
    kl_random = kl_divergence(target_counts, counts["random"], 1e-8)
    return {name: kl_random - kl_divergence(target_counts, counts[name], 1e-8) for name in selections}


def _summarise(runs: list[tuple[float, int, int]]) -> dict:
    seconds = sorted(r[0] for r in runs)
    return {
        "seconds": seconds[len(seconds) // 2],
        "all_seconds": [r[0] for r in runs],
        "rss": max(r[1] for r in runs),
        "rss_one": max(r[2] for r in runs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=None, help="documents to select (default: docs / 20)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reference-python", default=None)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating")
    ap.add_argument("--corpus", choices=("english", "multilingual"), default="english")
    ap.add_argument(
        "--beamsift-flags", default="", help="Beam options for beamsift (default: none, the default config)"
    )
    ap.add_argument(
        "--beamsift-python",
        default=sys.executable,
        help="the Python of the beamsift install to time (default: this one). The README's install "
        "(`pip install -e .`) starts faster than the test extras' (apache-beam[gcp] makes every "
        "`import apache_beam` load the Dataflow client, ~0.3 s a process)",
    )
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="beamsift-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        compare(args, work)
    finally:
        if args.workdir is None:  # a folder of its own (the corpus, both outputs: 0.1-0.5 GB)
            shutil.rmtree(work, ignore_errors=True)


def compare(args, work: Path) -> None:
    """Build the corpus in ``work`` (unless it is there), time both tools, print the table."""
    k = args.k or args.docs // 20
    corpus = work / f"pool-{args.corpus}-{args.docs}.jsonl"
    target = ROOT / "data" / "target.jsonl" if args.corpus == "english" else work / "target-de.jsonl"
    if not corpus.exists() or not target.exists():
        if args.corpus == "english":
            build_corpus(corpus, args.docs)
        else:
            build_multilingual(corpus, target, args.docs)
    size_mb = corpus.stat().st_size / 1e6
    print(
        f"corpus: {args.docs:,} {args.corpus} documents, {size_mb:.0f} MB JSONL; k = {k:,}; "
        f"the reference with 2 processes, beamsift with {args.beamsift_flags or 'the default config'}"
    )

    results = {}
    out = work / "beamsift-out"
    beamsift_cmd = [
        args.beamsift_python,
        "-m",
        "beamsift.pipeline.cli",
        "run",
        str(ROOT / "configs" / "dsir.yaml"),
        "--set",
        f"input.path={corpus}",
        "--set",
        f"target.path={target}",
        "--set",
        "input.id_field=id",
        "--set",
        f"select.k={k}",
        "--set",
        f"dsir.min_tokens={MIN_TOKENS}",
        "--set",
        f"output.dir={out}",
        "--overwrite",
        "--force",  # the same command again is a run again, not "already holds this result"
        "--quiet",
        *(["--", *args.beamsift_flags.split()] if args.beamsift_flags else []),
    ]
    ref_cmd = None
    if not args.skip_reference:
        py = reference_python(args.reference_python)
        script = work / "reference.py"
        script.write_text(REFERENCE_SCRIPT)
        ref_out, cache = work / "reference-out", work / "reference-cache"
        ref_cmd = [py, str(script), str(corpus), str(target), str(cache), str(ref_out), str(k)]

    # This VM's speed drifts by ±20% over minutes: alternate the tools and report medians.
    runs: dict[str, list] = {"beamsift": [], "reference": []}
    for _ in range(args.repeat):
        print(f"load average before beamsift: {os.getloadavg()[0]:.2f}", flush=True)
        runs["beamsift"].append(timed(beamsift_cmd, work / "beamsift.log"))
        if ref_cmd is not None:
            for d in (ref_out, cache):
                subprocess.run(["rm", "-rf", str(d)], check=True)
            print(f"load average before the reference: {os.getloadavg()[0]:.2f}", flush=True)
            runs["reference"].append(timed(ref_cmd, work / "reference.log"))

    ids = {r[0] for r in duckdb.connect().execute(f"SELECT id FROM '{out}/selected/*.parquet'").fetchall()}
    manifest = json.loads((out / "manifest.json").read_text())
    results["beamsift"] = {**_summarise(runs["beamsift"]), "ids": ids}
    if ref_cmd is not None:
        ref_ids = set()
        for path in glob.glob(str(ref_out / "*.jsonl")):
            with open(path, encoding="utf-8") as f:
                ref_ids |= {json.loads(line)["id"] for line in f}
        results["reference"] = {**_summarise(runs["reference"]), "ids": ref_ids}

    kl = evaluate(corpus, target, {name: r["ids"] for name, r in results.items()}, k)
    header = f"{'':<11}{'seconds':>9}{'docs/s':>10}{'peak RSS (all / largest process)':>34}"
    print(f"{header}{'selected':>10}{'KL reduction':>14}")
    for name, r in results.items():
        print(
            f"{name:<11}{r['seconds']:>9.1f}{args.docs / r['seconds']:>10,.0f}"
            f"{r['rss'] / 2**20:>20,.0f} MB / {r['rss_one'] / 2**20:>5,.0f} MB"
            f"{len(r['ids']):>10,}{kl[name]:>14.4f}"
        )
    print(f"beamsift's own manifest KL reduction: {manifest['dsir']['kl']['reduction']:.4f}")
    for name, r in results.items():
        print(f"{name} seconds per run: {', '.join(f'{t:.1f}' for t in r['all_seconds'])} (median shown)")
    if "reference" in results:
        ratio = results["reference"]["seconds"] / results["beamsift"]["seconds"]
        overlap = len(results["beamsift"]["ids"] & results["reference"]["ids"]) / k
        print(f"speed-up (docs/s, beamsift / reference): {ratio:.1f}x; selections overlap {overlap:.0%}")


if __name__ == "__main__":
    main()
