"""Recall and precision of the exact stage and SemDeDup at finding near-duplicates planted in real text.

    python benchmarks/dedup_quality.py                       # the bundled pool, configs/semdedup.yaml
    python benchmarks/dedup_quality.py --text-dir /usr/share/vim/vim90/doc     # other real text
    python benchmarks/dedup_quality.py --input my.jsonl --set dedup.epsilon=0.2 --set embed.dim=1024

For a sample of the documents (--per-kind originals for each kind of edit, each original copied
once), an edited copy is made under a fresh id and shuffled into the pool:

- `drop`: 5% of the words removed;        `swap`: 5% of the words swapped with their neighbour;
- `tail`: the last 10-20% of the words cut; `case`: the whole text, or 20% of its words, re-cased;
- `typo`: one character edit (insert, delete, substitute, transpose) in 3% of the words;
- `exact`: an exact copy;                 `punct`: white space and punctuation changes only.

`configs/semdedup.yaml` (with any --set) runs on the result through the command line, as a user
runs it, and its scores/ are read back. A planted pair (original, copy) is found when both lead,
through `duplicate_of` (followed to a kept document), to the same kept document: one of them is
kept and the other points at it, or both point at one document of their group (an original dropped
for a third document that its copy is not close enough to, with the copy kept, counts as missed: the
greedy order's doing, not a split). Printed per kind:
recall of the exact stage alone (`exact duplicate` links only) and of exact + SemDeDup; the pairs
that SemDeDup could not see because k-means put the two in different clusters; and the cosine
of the pairs (the pipeline's TF-IDF, before and after the random projection) against the
threshold 1 - epsilon. Precision: the dropped documents that repeat what they point at (same
planted group, or a Jaccard similarity of word 3-shingles >= 0.5: real duplicates already in the
pool count as right) over all dropped documents. And the run's wall time.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import duckdb
import numpy as np
import pyarrow as pa
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("drop", "swap", "tail", "case", "typo", "exact", "punct")
LABEL = {
    "drop": "drop 5% of words",
    "swap": "swap 5% of words",
    "tail": "cut last 10-20%",
    "case": "case changes",
    "typo": "typos in 3% of words",
    "exact": "exact copy",
    "punct": "space/punct only",
}
WORD = re.compile(r"\S+")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


# --- reading real text --------------------------------------------------------------------------


def read_jsonl(path: str, id_field: str, text_field: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if isinstance(r.get(text_field), str) and r[text_field].strip():
                    out.append({"id": str(r[id_field]), "text": r[text_field]})
    return out


def read_text_dir(folder: str, pattern: str, rng: np.random.Generator) -> list[dict]:
    """Plain-text files -> documents: consecutive paragraphs of one file packed to a length drawn
    from 60-320 words (at most 600; fewer than 40 dropped), as data/build.py cuts the pool."""
    docs = []
    for path in sorted(glob.glob(os.path.join(folder, "**", pattern), recursive=True)):
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        name = os.path.relpath(path, folder)
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        current: list[str] = []
        words, goal = 0, int(rng.integers(60, 321))
        for p in paragraphs + [None]:
            n = len(p.split()) if p is not None else 0
            if current and (p is None or words + n > max(goal, 1) or words + n > 600):
                if 40 <= words <= 600:
                    docs.append({"id": f"{name}#{len(docs)}", "text": "\n\n".join(current)})
                current, words, goal = [], 0, int(rng.integers(60, 321))
            if p is not None and n <= 600:
                current.append(p)
                words += n
    return docs


# --- planting edited copies ---------------------------------------------------------------------


def _spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD.finditer(text)]


def _rebuild(text: str, spans, words: list[str | None]) -> str:
    """The text with word i replaced by words[i] (None: removed with the white space before it)."""
    out, pos = [], 0
    for (s, e), w in zip(spans, words):
        gap = text[pos:s]
        if w is None:
            if not out:  # the first word: drop the space after it instead
                pos = e
                while pos < len(text) and text[pos].isspace():
                    pos += 1
                continue
        else:
            out.append(gap + w)
        pos = e
    out.append(text[pos:])
    return "".join(out)


def _pick(rng, n: int, share: float) -> np.ndarray:
    k = max(1, int(round(share * n)))
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def edit(text: str, kind: str, rng: np.random.Generator) -> str:
    spans = _spans(text)
    words = [text[s:e] for s, e in spans]
    n = len(words)
    if kind == "exact":
        return text
    if kind == "drop":
        new: list[str | None] = list(words)
        for i in _pick(rng, n, 0.05):
            new[i] = None
        return _rebuild(text, spans, new)
    if kind == "swap":
        new = list(words)
        for i in _pick(rng, n - 1, 0.05):
            new[i], new[i + 1] = new[i + 1], new[i]
        return _rebuild(text, spans, new)
    if kind == "tail":
        keep = n - max(1, int(round(rng.uniform(0.10, 0.20) * n)))
        return text[: spans[keep - 1][1]]
    if kind == "case":
        how = rng.integers(3)
        if how == 0:
            return text.lower()
        if how == 1:
            return text.upper()
        new = list(words)
        for i in _pick(rng, n, 0.2):
            new[i] = rng.choice([str.upper, str.lower, str.title, str.swapcase])(new[i])
        return _rebuild(text, spans, new)
    if kind == "typo":
        new = list(words)
        for i in _pick(rng, n, 0.03):
            new[i] = _typo(new[i], rng)
        return _rebuild(text, spans, new)
    if kind == "punct":
        return _punctuation(text, rng)
    raise ValueError(kind)


def _typo(word: str, rng) -> str:
    letters = [j for j, c in enumerate(word) if c.isalpha()]
    if not letters:
        return word + rng.choice(list(LETTERS))
    j = int(rng.choice(letters))
    op = rng.integers(4)
    if op == 0:  # insert
        return word[:j] + rng.choice(list(LETTERS)) + word[j:]
    if op == 1 and len(word) > 1:  # delete
        return word[:j] + word[j + 1 :]
    if op == 2 and j + 1 < len(word) and word[j + 1] != word[j]:  # transpose
        return word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    other = [c for c in LETTERS if c != word[j].lower()]  # substitute
    return word[:j] + rng.choice(other) + word[j + 1 :]


def _punctuation(text: str, rng) -> str:
    """White space runs changed (never made or removed), ASCII punctuation added at word ends or
    removed: the same text for the exact stage's normalisation (lower-cased, punctuation taken
    out, white space collapsed), and never a word split or joined."""
    out = []
    for piece in re.split(r"(\s+)", text):
        if not piece:
            continue
        if piece.isspace():
            r = rng.random()
            out.append(" " if r < 0.15 else "  " if r < 0.25 else "\n" if r < 0.3 else piece)
            continue
        if rng.random() < 0.05:  # drop its punctuation (only where it does not separate letters)
            piece = re.sub(r"(?<!\w)[^\w\s]+|[^\w\s]+(?!\w)", "", piece) or piece
        if rng.random() < 0.05:
            piece += rng.choice([",", ";", ".", "!", "?", ":", "..."])
        out.append(piece)
    changed = "".join(out)
    return changed if changed != text else text + " ."


def plant(records: list[dict], per_kind: int, rng) -> tuple[list[dict], dict]:
    """The pool with per_kind copies of each kind shuffled in; {copy id: (original id, kind)}."""
    eligible = [i for i, r in enumerate(records) if len(r["text"].split()) >= 20]
    need = per_kind * len(KINDS)
    if need > len(eligible):
        raise SystemExit(f"--per-kind {per_kind}: {need} originals needed, {len(eligible)} documents of 20+ words")
    chosen = rng.choice(eligible, size=need, replace=False)
    copies, planted = [], {}
    for j, i in enumerate(chosen):
        kind = KINDS[j % len(KINDS)]
        cid = f"dup-{rng.integers(2**48):012x}"
        copies.append({"id": cid, "text": edit(records[i]["text"], kind, rng)})
        planted[cid] = (records[i]["id"], kind)
    pool = records + copies
    return [pool[i] for i in rng.permutation(len(pool))], planted


# --- the run and its scoring --------------------------------------------------------------------


def run(path: str, out: str, config: str, sets: list[str]) -> float:
    args = ["--set", f"input.path={path}", "--set", "input.id_field=id", "--set", f"output.dir={out}"]
    for s in sets:
        args += ["--set", s]
    started = time.time()
    subprocess.run(
        [sys.executable, "-m", "beamsift.pipeline.cli", "run", config, "--quiet", *args],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return time.time() - started


def effective(config: str, sets: list[str]) -> dict:
    with open(os.path.join(ROOT, config), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    values = {
        "embed.method": cfg.get("embed", {}).get("method", "svd"),
        "embed.dim": cfg.get("embed", {}).get("dim", 256),
        "cluster.k": cfg.get("cluster", {}).get("k", 16),
        "dedup.epsilon": cfg.get("dedup", {}).get("epsilon", 0.15),
        "featurize.buckets": cfg.get("featurize", {}).get("buckets", 10000),
        "featurize.max_ngram": cfg.get("featurize", {}).get("max_ngram", 2),
        "seed": cfg.get("seed", 0),
    }
    for s in sets:
        key, value = s.split("=", 1)
        if key in values:
            values[key] = yaml.safe_load(value)
    return values


def shingles(text: str) -> set:
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i : i + 3]) for i in range(max(1, len(w) - 2))}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / max(1, len(x | y))


def pair_cosines(pool: list[dict], pairs: list[tuple[str, str]], cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each pair's cosine under the pipeline's TF-IDF (idf over the whole pool, as the embed stage
    computes it when nothing is dropped before it), unprojected and after its projection."""
    from beamsift.transforms.featurize import hashed_ngram_features
    from beamsift.transforms.stages.embed import projection, smooth_idf, tfidf

    nb = cfg["featurize.buckets"]
    feats = hashed_ngram_features(pa.array([r["text"] for r in pool]), nb, cfg["featurize.max_ngram"])
    rows = np.repeat(np.arange(len(pool)), np.diff(feats.offsets))
    df = np.bincount(np.unique(rows.astype(np.int64) * nb + feats.buckets) % nb, minlength=nb)
    x = tfidf(feats, smooth_idf((df, len(pool)))).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1)).ravel())
    index = {r["id"]: i for i, r in enumerate(pool)}
    a = np.array([index[p] for p, _ in pairs])
    b = np.array([index[q] for _, q in pairs])
    raw = np.asarray(x[a].multiply(x[b]).sum(1)).ravel() / np.maximum(norms[a] * norms[b], 1e-12)
    if cfg["embed.method"] != "projection":
        return raw, np.full(len(pairs), np.nan)
    proj = projection(nb, cfg["embed.dim"], cfg["seed"])
    va, vb = np.asarray(x[a] @ proj), np.asarray(x[b] @ proj)
    va /= np.maximum(np.linalg.norm(va, axis=1, keepdims=True), 1e-12)
    vb /= np.maximum(np.linalg.norm(vb, axis=1, keepdims=True), 1e-12)
    return raw, (va * vb).sum(1)


def evaluate(pool: list[dict], planted: dict, out: str, cfg: dict, show: int) -> dict:
    rows = (
        duckdb.connect().execute(f"SELECT id, reason, duplicate_of, cluster FROM '{out}/scores/*.parquet'").fetchall()
    )
    reason = {r[0]: r[1] for r in rows}
    target = {r[0]: r[2] for r in rows if r[2] is not None}
    cluster = {r[0]: r[3] for r in rows}
    text = {r["id"]: r["text"] for r in pool}
    group = {}
    for cid, (oid, _) in planted.items():
        group[cid] = group[oid] = oid

    def root(d: str, exact_only: bool) -> str:
        seen = set()
        while d in target and d not in seen and (not exact_only or reason[d] == "exact duplicate"):
            seen.add(d)
            d = target[d]
        return d

    pairs = [(oid, cid) for cid, (oid, _) in planted.items()]
    raw, projected = pair_cosines(pool, pairs, cfg)
    threshold = 1 - cfg["dedup.epsilon"]
    per_kind = {k: {"n": 0, "exact": 0, "all": 0, "split": 0, "raw": [], "proj": [], "missed": []} for k in KINDS}
    for (oid, cid), c_raw, c_proj in zip(pairs, raw, projected):
        k = per_kind[planted[cid][1]]
        k["n"] += 1
        exact_linked = root(oid, True) == root(cid, True)
        found = root(oid, False) == root(cid, False)
        k["exact"] += exact_linked
        k["all"] += found
        # What SemDeDup compares is what the exact stage kept: the pair's two representatives.
        if not exact_linked and cluster[root(oid, True)] != cluster[root(cid, True)]:
            k["split"] += 1
        k["raw"].append(c_raw)
        k["proj"].append(c_proj)
        if not found:
            k["missed"].append((oid, cid, c_raw, c_proj, cluster[oid], cluster[cid], reason[oid], reason[cid]))
    dropped = list(target)
    wrong = []
    native = 0
    for d in dropped:
        t = target[d]
        if d in group and group.get(t) == group[d]:
            continue
        if d in group and group.get(root(t, False)) == group[d]:
            continue
        if jaccard(text[d], text[t]) >= 0.5:
            native += 1
            continue
        wrong.append(d)
    result = {
        "kinds": per_kind,
        "dropped": len(dropped),
        "native": native,
        "wrong": wrong,
        "threshold": threshold,
        "by_reason": {r: sum(1 for d in dropped if reason[d] == r) for r in ("exact duplicate", "near duplicate")},
    }
    if show:
        print(f"\n  up to {show} missed pairs per kind (original, copy, cosine raw/projected, clusters, reasons):")
        for kind in KINDS:
            for m in per_kind[kind]["missed"][:show]:
                print(f"    {kind:6s} {m[0]} {m[1]} cos {m[2]:.3f}/{m[3]:.3f} clusters {m[4]}/{m[5]} {m[6]}/{m[7]}")
        print(f"  up to {show} wrongly dropped (id -> duplicate_of, Jaccard of 3-shingles):")
        for d in wrong[:show]:
            print(f"    {d} -> {target[d]} ({reason[d]}) J={jaccard(text[d], text[target[d]]):.2f}")
            print(f"      {text[d][:150]!r}\n      {text[target[d]][:150]!r}")
    return result


def report(name: str, res: dict, seconds: float, cfg: dict) -> None:
    settings = ", ".join(f"{k}={cfg[k]}" for k in ("embed.method", "embed.dim", "cluster.k", "dedup.epsilon"))
    print(f"\n{name}: {settings}  ({seconds:.1f} s)")
    print(
        f"  {'kind':22s} {'planted':>7s} {'exact':>6s} {'+semdedup':>9s} {'split':>6s}"
        f"   cosine raw min / p5 / median   projected min / p5   (threshold {res['threshold']:.3f})"
    )
    tot = {"n": 0, "exact": 0, "all": 0, "split": 0}
    for kind in KINDS:
        k = res["kinds"][kind]
        for key in tot:
            tot[key] += k[key]
        r, p = np.array(k["raw"]), np.array(k["proj"])
        print(
            f"  {LABEL[kind]:22s} {k['n']:7d} {k['exact'] / k['n']:6.3f} {k['all'] / k['n']:9.3f} {k['split']:6d}"
            f"   {r.min():.3f} / {np.percentile(r, 5):.3f} / {np.median(r):.3f}"
            f"          {np.nanmin(p) if np.isfinite(p).any() else float('nan'):.3f} / "
            f"{np.nanpercentile(p, 5) if np.isfinite(p).any() else float('nan'):.3f}"
        )
    n = tot["n"]
    print(f"  {'all':22s} {n:7d} {tot['exact'] / n:6.3f} {tot['all'] / n:9.3f} {tot['split']:6d}")
    dropped, wrong = res["dropped"], len(res["wrong"])
    precision = (dropped - wrong) / dropped if dropped else 1.0
    print(
        f"  precision {precision:.3f}: {dropped} dropped ({res['by_reason']['exact duplicate']} exact, "
        f"{res['by_reason']['near duplicate']} near), {dropped - wrong - res['native']} in planted groups, "
        f"{res['native']} duplicates already in the pool (3-shingle Jaccard >= 0.5), {wrong} wrong"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input", default=os.path.join(ROOT, "data", "pool.jsonl.gz"), help="JSONL(.gz) of real text")
    src.add_argument("--text-dir", help="or a folder of plain-text files, cut into documents")
    ap.add_argument("--glob", default="*.txt", help="--text-dir's files (default *.txt)")
    ap.add_argument("--id-field", default="id")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--docs", type=int, default=0, help="use a seeded sample of this many documents (0: all)")
    ap.add_argument("--per-kind", type=int, default=200, help="originals copied for each kind of edit")
    ap.add_argument("--config", default="configs/semdedup.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to beamsift run")
    ap.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="run again with these --set keys (comma-separated), on the same planted pool; repeatable",
    )
    ap.add_argument("--show", type=int, default=0, help="print this many misses and wrong drops per kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    if args.text_dir:
        records, source = read_text_dir(args.text_dir, args.glob, rng), f"{args.text_dir}/**/{args.glob}"
    else:
        records, source = read_jsonl(args.input, args.id_field, args.text_field), args.input
    seen, unique = set(), []
    for r in records:  # a duplicate id would be rejected by the run, not de-duplicated
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append(r)
    records = unique
    if args.docs and args.docs < len(records):
        records = [records[i] for i in np.sort(rng.choice(len(records), args.docs, replace=False))]
    pool, planted = plant(records, args.per_kind, rng)
    words = sum(len(r["text"].split()) for r in records)
    print(
        f"{source}: {len(records):,} documents ({words:,} words) + {len(planted):,} planted copies "
        f"({args.per_kind} of each of {len(KINDS)} kinds of edit) = {len(pool):,}"
    )
    settings = [args.set] + [args.set + [s for s in g.split(",") if s] for g in args.grid]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pool.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for r in pool:
                f.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
        for i, sets in enumerate(settings):
            out = os.path.join(d, f"out{i}")
            seconds = run(path, out, args.config, sets)
            cfg = effective(args.config, sets)
            res = evaluate(pool, planted, out, cfg, args.show)
            report(f"{args.config} {' '.join('--set ' + s for s in sets)}".strip(), res, seconds, cfg)


if __name__ == "__main__":
    main()
