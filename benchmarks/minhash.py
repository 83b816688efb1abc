"""beamsift's minhash stage against datatrove's MinHash pipeline: near-duplicates planted in real text.

    python benchmarks/minhash.py                              # the bundled pool, 200 copies per edit
    python benchmarks/minhash.py --docs 2000 --per-kind 50    # a quick check
    python benchmarks/minhash.py --input my.jsonl.gz --ngram 5 --bands 20 --rows 5
    python benchmarks/minhash.py --skip-datatrove --set minhash.verify=true
    python benchmarks/minhash.py --datatrove-tokenizer split      # datatrove without spaCy only

The pool (the bundled one, or --input; --docs takes a seeded sample of it) gets edited copies of
--per-kind originals for each kind of edit of dedup_quality.py (drop, swap, tail, case, typo,
exact, punct), and is written as --files JSONL files that both tools read, in the same run, with
the same shingles (--ngram words) and bands x rows:

- beamsift: ``configs/minhash.yaml`` through the command line, as a user runs it (no runner
  flags; --set for more keys); its scores/ name each dropped document's kept one (duplicate_of).
- datatrove (0.10.1, its own venv, made on first use under benchmarks/.datatrove-venv, or pass
  --datatrove-python): its four steps, MinhashDedupSignature -> MinhashDedupBuckets (one task per
  band) -> MinhashDedupCluster -> MinhashDedupFilter, on a LocalPipelineExecutor with --workers
  processes and a task per input file, writing kept and removed documents as uncompressed JSONL
  with their cluster ids (save_cluster_id). A removed document's kept one is the member of its
  cluster that was not removed: datatrove keeps the union-find root (at each union the root of the
  larger side; of two equal sides the one that sorts first), which for a pair is the first in input
  order, for a larger cluster not always.

datatrove runs once per --datatrove-tokenizer. ``spacy``, its default for English: spaCy's blank
"en" tokenizer, rules that ship with the spacy package (nothing is downloaded at run time). It
tokenizes each document inside a spaCy memory zone, so every document's words are looked up in a
vocabulary emptied after the one before: about 80 ms a document here, most of datatrove's time.
``split``: a white-space split of datatrove's normalised text, the same words but where spaCy
splits one (``cannot``, ``id``, a curly quote or box-drawing character the normalisation leaves):
the speed of the MinHash steps themselves.

Scored alike for both, as dedup_quality.py scores SemDeDup: a planted pair (original, copy) is
found when both lead to the same kept document; precision is the dropped documents that repeat
what they point at (same planted group, or word 3-shingle Jaccard >= 0.5: real duplicates already
in the pool count as right) over all dropped. Time is end to end, process start to exit
(interpreter start, imports and output writing included). The one-minute load average is printed
before each run: right after another run it still shows that run's load.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dedup_quality as dq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATATROVE = "datatrove==0.10.1"
# The MinHash steps need xxhash (the shingle hash), orjson (JSONL reader and writer), regex (text
# normalisation), spacy (the English word tokenizer) and tokenizers (imported by datatrove.pipeline.dedup);
# none of datatrove's extras is installed whole.
DATATROVE_DEPS = [DATATROVE, "xxhash<4", "orjson", "regex", "spacy", "tokenizers"]

DATATROVE_SCRIPT = """
import sys
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

src, work, ngram, bands, rows, files, workers, tokenizer = sys.argv[1:9]
files, workers = int(files), int(workers)
config = MinhashConfig(n_grams=int(ngram), num_buckets=int(bands), hashes_per_bucket=int(rows))
language = "eng"  # spaCy's blank English tokenizer, datatrove's default
if tokenizer == "split":
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    language = SplitTokenizer()


def reader():
    return JsonlReader(src, glob_pattern="*.jsonl", id_key="id", text_key="text")


if __name__ == "__main__":
    signatures = LocalPipelineExecutor(
        [reader(), MinhashDedupSignature(f"{work}/signatures", config=config, language=language)],
        tasks=files, workers=workers, logging_dir=f"{work}/logs/signatures")
    buckets = LocalPipelineExecutor(
        [MinhashDedupBuckets(f"{work}/signatures", f"{work}/buckets", config=config)],
        tasks=config.num_buckets, workers=workers, logging_dir=f"{work}/logs/buckets", depends=signatures)
    clusters = LocalPipelineExecutor(
        [MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=config, save_cluster_id=True)],
        tasks=1, logging_dir=f"{work}/logs/clusters", depends=buckets)
    LocalPipelineExecutor(
        [reader(),
         MinhashDedupFilter(f"{work}/remove", load_cluster_ids=True,
                            exclusion_writer=JsonlWriter(f"{work}/removed", compression=None)),
         JsonlWriter(f"{work}/kept", compression=None)],
        tasks=files, workers=workers, logging_dir=f"{work}/logs/filter", depends=clusters).run()
"""


def datatrove_python(arg: str | None) -> str:
    if arg:
        return arg
    venv = ROOT / "benchmarks" / ".datatrove-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making datatrove's venv ({', '.join(DATATROVE_DEPS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *DATATROVE_DEPS], check=True)
    return str(python)


def timed(cmd: list[str], log: Path) -> float:
    print(f"load average before {log.stem}: {os.getloadavg()[0]:.2f}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as logf:
        code = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    elapsed = time.perf_counter() - start
    if code != 0:
        sys.exit(f"{' '.join(cmd[:4])}... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return elapsed


def beamsift_links(out: Path) -> tuple[dict, dict]:
    """{dropped id: kept id} from scores/, and the dropped count per reason."""
    rows = duckdb.connect().execute(f"SELECT id, reason, duplicate_of FROM '{out}/scores/*.parquet'").fetchall()
    target = {str(i): str(d) for i, _, d in rows if d is not None}
    reasons: dict[str, int] = {}
    for _, reason, d in rows:
        if d is not None:
            reasons[reason] = reasons.get(reason, 0) + 1
    return target, reasons


def datatrove_links(work: Path) -> tuple[dict, dict]:
    """{removed id: the kept member of its cluster}, from the filter's kept and removed documents."""

    def read(folder: str) -> list[tuple[str, int]]:
        out = []
        for path in sorted(glob.glob(str(work / folder / "*.jsonl"))):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    r = json.loads(line)
                    out.append((str(r["id"]), r.get("metadata", {}).get("minhash_cluster_id", -1)))
        return out

    kept_of = {c: i for i, c in read("kept") if c != -1}
    removed = read("removed")
    missing = [i for i, c in removed if c not in kept_of]
    if missing:
        sys.exit(f"datatrove removed {len(missing)} documents with no kept member in their cluster, e.g. {missing[:3]}")
    return {i: kept_of[c] for i, c in removed}, {"minhash": len(removed)}


def evaluate(pool: list[dict], planted: dict, target: dict) -> dict:
    """dedup_quality.evaluate's recall and precision, for any {dropped id: kept id}."""
    text = {r["id"]: r["text"] for r in pool}
    group = {}
    for cid, (oid, _) in planted.items():
        group[cid] = group[oid] = oid

    def root(d: str) -> str:
        seen = set()
        while d in target and d not in seen:
            seen.add(d)
            d = target[d]
        return d

    found = {k: [0, 0] for k in dq.KINDS}
    for cid, (oid, kind) in planted.items():
        found[kind][0] += 1
        found[kind][1] += root(oid) == root(cid)
    native = wrong = 0
    for d, t in target.items():
        if d in group and group[d] in (group.get(t), group.get(root(t))):
            continue
        if dq.jaccard(text[d], text[t]) >= 0.5:
            native += 1
        else:
            wrong += 1
    return {"found": found, "dropped": len(target), "native": native, "wrong": wrong}


MARK = ".beamsift-benchmark"  # in each folder this script writes: the only ones it ever removes


def fresh_dir(folder: Path) -> Path:
    """An empty ``folder`` of this script's own: one it made in an earlier run is emptied; any
    other folder of that name in --workdir is left alone, and the run stops."""
    if folder.exists():
        if not (folder / MARK).exists():
            sys.exit(f"{folder} exists and was not made by this benchmark: choose another --workdir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARK).touch()
    return folder


def write_pool(pool: list[dict], folder: Path, files: int) -> None:
    for i, part in enumerate(np.array_split(np.arange(len(pool)), files)):
        with open(folder / f"part-{i:05d}.jsonl", "w", encoding="utf-8") as f:
            for j in part:
                f.write(json.dumps({"id": pool[j]["id"], "text": pool[j]["text"]}, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(ROOT / "data" / "pool.jsonl.gz"), help="JSONL(.gz) of real text")
    ap.add_argument("--id-field", default="id")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--docs", type=int, default=0, help="a seeded sample of this many documents (0: all)")
    ap.add_argument("--per-kind", type=int, default=200, help="originals copied for each kind of edit")
    ap.add_argument("--ngram", type=int, default=5, help="words per shingle, both tools")
    ap.add_argument("--bands", type=int, default=14, help="bands (datatrove: buckets), both tools")
    ap.add_argument("--rows", type=int, default=8, help="min-hashes per band (datatrove: hashes per bucket)")
    ap.add_argument("--files", type=int, default=2, help="JSONL files the pool is written as (datatrove: a task each)")
    ap.add_argument("--workers", type=int, default=2, help="datatrove's worker processes")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more keys for beamsift run")
    ap.add_argument(
        "--datatrove-tokenizer",
        default="spacy,split",
        help="comma-separated, a datatrove run each: spacy (its English default), split (white space)",
    )
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--datatrove-python", default=None)
    ap.add_argument("--workdir", default=None, help="kept afterwards (default: a temporary folder, removed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    records, seen = [], set()
    for r in dq.read_jsonl(args.input, args.id_field, args.text_field):
        if r["id"] not in seen:  # a duplicate id would be rejected by beamsift's run
            seen.add(r["id"])
            records.append(r)
    if args.docs and args.docs < len(records):
        records = [records[i] for i in np.sort(rng.choice(len(records), args.docs, replace=False))]
    pool, planted = dq.plant(records, args.per_kind, rng)
    print(
        f"{args.input}: {len(records):,} documents + {len(planted):,} planted copies ({args.per_kind} of each of "
        f"{len(dq.KINDS)} kinds) = {len(pool):,}, in {args.files} files; {args.ngram}-word shingles, "
        f"{args.bands} bands x {args.rows} rows"
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="beamsift-minhash-"))
    try:
        data = fresh_dir(work / "pool")
        write_pool(pool, data, args.files)
        results = {}
        out = work / "beamsift-out"
        sets = [f"minhash.ngram={args.ngram}", f"minhash.bands={args.bands}", f"minhash.rows={args.rows}", *args.set]
        cmd = [sys.executable, "-m", "beamsift.pipeline.cli", "run", str(ROOT / "configs" / "minhash.yaml")]
        for s in [f"input.path={data}/*.jsonl", "input.id_field=id", f"output.dir={out}", *sets]:
            cmd += ["--set", s]
        seconds = timed([*cmd, "--force", "--quiet"], work / "beamsift.log")
        results["beamsift"] = (seconds, *beamsift_links(out))
        tokenizers = [] if args.skip_datatrove else [t for t in args.datatrove_tokenizer.split(",") if t]
        if tokenizers:
            python = datatrove_python(args.datatrove_python)
            script = work / "datatrove_minhash.py"
            script.write_text(DATATROVE_SCRIPT)
        for tok in tokenizers:
            if tok not in ("spacy", "split"):
                sys.exit(f"--datatrove-tokenizer: {tok!r} is not spacy or split")
            dt = fresh_dir(work / f"datatrove-{tok}")
            dt_args = [data, dt, args.ngram, args.bands, args.rows, args.files, args.workers, tok]
            seconds = timed([python, str(script), *map(str, dt_args)], work / f"datatrove-{tok}.log")
            results[f"datatrove/{tok}"] = (seconds, *datatrove_links(dt))

        kinds = "".join(f"{k:>7s}" for k in dq.KINDS)
        print(f"\n{'':<16}{'seconds':>8}{'docs/s':>9}  recall:{kinds}{'all':>7}{'precision':>11}{'dropped':>9}")
        notes = []
        for name, (seconds, target, reasons) in results.items():
            res = evaluate(pool, planted, target)
            f = res["found"]
            recall = "".join(f"{f[k][1] / f[k][0]:7.3f}" for k in dq.KINDS)
            total = sum(v[1] for v in f.values()) / sum(v[0] for v in f.values())
            dropped, wrong = res["dropped"], res["wrong"]
            precision = (dropped - wrong) / dropped if dropped else 1.0
            print(
                f"{name:<16}{seconds:8.1f}{len(pool) / seconds:9,.0f}         {recall}{total:7.3f}"
                f"{precision:11.3f}{dropped:9,}"
            )
            by_reason = ", ".join(f"{n:,} {r}" for r, n in sorted(reasons.items()))
            notes.append(
                f"{name}: dropped {by_reason}; {dropped - wrong - res['native']:,} in planted groups, "
                f"{res['native']:,} duplicates already in the pool (3-shingle Jaccard >= 0.5), {wrong:,} wrong"
            )
        print("\n".join(notes))
        for name in list(results)[1:]:
            print(f"speed-up (docs/s, beamsift / {name}): {results[name][0] / results['beamsift'][0]:.2f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
