"""Diversity stages: what cluster-balanced selection does to a DSIR pick, and what embedding +
k-means cost in the pipeline against plain scikit-learn / transformers on the same documents.

    python benchmarks/diversity.py                     # the bundled pool, k=700, 16 clusters
    python benchmarks/diversity.py --docs 400 --k 100 --clusters 8 --encoder-docs 64   # a smoke run

1. Selection quality at the same budget k (every run: ``beamsift run configs/dsir.yaml --set ...``,
   ``input.id_field=id``, seed 0):

   - (a) DSIR: stages [dsir, select], importance resampling; run again as [dsir, embed, cluster,
     select] (same pick, checked id for id) to know the clusters of its pick;
   - (b) DSIR + cluster-balanced: [dsir, embed (svd), cluster, select], ``select.method: balanced``,
     ``select.column: dsir_key`` (importance resampling within each cluster), one row per quota;
   - (c) sensitivity sampling: the same chain, ``select.method: sensitivity``;
   - (d) Quad: [dsir, embed, cluster, proxy, select], ``select.method: quad`` with the proxy and
     bandit settings of ``configs/quad.yaml`` (the dsir stage only for the KL and the
     eligibility: Quad does not read its scores), and again with the authors' α and offset; the
     documents its bandit scored are printed.

   Per run: the KL of the pick's n-grams to the target's, the KL reduction against the random
   baseline of the same size, the clusters and source domains the pick covers, and the largest
   domain's share of the pick. The manifest's ``dsir.kl.target_vs_random`` is used only where it
   is the random baseline (the importance selector); the balanced and sensitivity selectors write
   no baseline (``_in_random`` all false), so their manifest reduction is measured against an empty
   set. The baseline depends only on the pool, k and the seed, so run (a)'s is used for every row.

2. Throughput of embed + cluster, model-free (svd):

   - beamsift: ``[embed, cluster, select]`` minus ``[select]`` (``select.method: all``, no DSIR),
     by the manifests' ``timings.total_s`` (includes the SVD and k-means fits and Beam's extra
     steps), and the stages' busy time from ``timings.stages`` (the per-shard work only: the
     fits run outside the metered units);
   - plain: HashingVectorizer (the same WordPunct 1-2-grams into ``featurize.buckets`` buckets) →
     TfidfTransformer (sublinear tf, smooth idf) → TruncatedSVD fitted on the same sample size →
     L2 norm → MiniBatchKMeans fitted on a sample → ``predict`` on all. Shown from the text and
     without the hashing (beamsift's delta excludes it: featurize runs for every chain).

3. Throughput with all-MiniLM-L6-v2 (``embed.method: model``) on ``--encoder-docs`` documents:
   beamsift as in 2; plain: transformers AutoModel, mean pooling, batches of 32, 256 tokens, then
   MiniBatchKMeans fit + predict; batches sorted by length (as the stage) and in input order.

Everything runs one after the other in this process and its children, on all cores. Run it on a
quiet machine: with other work on the cores, multi-threaded OpenBLAS (the SVD fits, in beamsift
and in the plain baseline alike) was measured 40x slower (7 s instead of 0.15 s for one fit), so
the throughput numbers then say little. The script prints the load average it started with.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "dsir.yaml")


# configs/quad.yaml's proxy and bandit, on the chain above (a block: a twentieth of the budget).
QUAD = {
    "stages": "[dsir, embed, cluster, proxy, select]",
    "proxy.seeds": 1,
    "proxy.sample": 1000,
    "proxy.epochs": 8,
    "proxy.batch_size": 16,
    "proxy.vocab_size": 2000,
    "proxy.dim": 64,
    "proxy.context": 128,
    "select.method": "quad",
    "select.quad_clusters": 4,
    "select.quad_alpha": 0.05,
    "select.quad_offset": 0.08,
}
# The constants of the authors' code (alpha 1e-4, offset 0.002: the selector's defaults).
QUAD_PAPER = {**QUAD, "select.quad_alpha": 0.0001, "select.quad_offset": 0.002}


def beamsift(out: str, sets: dict) -> tuple[dict, float]:
    """``beamsift run configs/dsir.yaml --set ...`` into ``out``: (manifest, wall seconds)."""
    cmd = [sys.executable, "-m", "beamsift.pipeline.cli", "run", CONFIG, "--quiet", "--no-progress", "--force"]
    for key, value in {**sets, "output.dir": out}.items():
        cmd += ["--set", f"{key}={value}"]
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        sys.exit(f"beamsift run failed ({' '.join(cmd[3:])}):\n{done.stdout}{done.stderr}")
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f), wall


def pick_stats(out: str) -> dict:
    """Counts of the pick from scores/ and selected/ (duckdb)."""
    import duckdb

    con = duckdb.connect()
    scores = f"read_parquet('{out}/scores/*.parquet')"
    selected = f"read_parquet('{out}/selected/*.parquet')"
    has_cluster = "cluster" in [r[0] for r in con.sql(f"DESCRIBE SELECT * FROM {scores}").fetchall()]
    n, domains = con.sql(f"SELECT count(*), count(DISTINCT source) FROM {selected}").fetchall()[0]
    top_domain = con.sql(
        f"SELECT source, count(*) AS n FROM {selected} GROUP BY 1 ORDER BY n DESC, source LIMIT 1"
    ).fetchall()
    top_domain, top_n = top_domain[0] if top_domain else (None, 0)
    ids = {r[0] for r in con.sql(f"SELECT id FROM {selected}").fetchall()}
    mean_lw = con.sql(f"SELECT avg(dsir_log_weight / n_ngrams) FROM {selected}").fetchall()[0][0]
    stats = {"n": n, "domains": domains, "top_domain": top_domain, "top_share": top_n / n if n else float("nan")}
    stats.update(ids=ids, mean_lw=mean_lw, clusters=None, clusters_total=None)
    if has_cluster:
        stats["clusters"], stats["clusters_total"], n_sel = con.sql(
            f"SELECT count(DISTINCT cluster) FILTER (WHERE selected), count(DISTINCT cluster), "
            f"count(*) FILTER (WHERE selected) FROM {scores}"
        ).fetchall()[0]
        assert n_sel == n, (n_sel, n)
    return stats


def centroids(out: str):
    path = os.path.join(out, "artifacts", "cluster", "centroids.npy")
    return np.load(path) if os.path.exists(path) else None


def quality(args, pool: str, tmp: str, n_docs: int) -> None:
    common = {
        "input.path": pool,
        "input.id_field": "id",
        "target.path": args.target,
        "select.k": args.k,
    }
    chain = {
        "stages": "[dsir, embed, cluster, select]",
        "embed.method": "svd",
        "embed.dim": args.dim,
        "cluster.k": args.clusters,
    }
    runs = {
        "plain": ("(a) DSIR [dsir, select]", {"stages": "[dsir, select]", "select.method": "importance"}),
        "dsir": ("(a) DSIR (+ clusters)", {**chain, "select.method": "importance"}),
    }
    for quota in ("sqrt", "uniform", "proportional"):
        runs[f"bal_{quota}"] = (
            f"(b) balanced, quota {quota}",
            {**chain, "select.method": "balanced", "select.column": "dsir_key", "select.quota": quota},
        )
    if not args.skip_sensitivity:
        runs["sens"] = ("(c) sensitivity", {**chain, "select.method": "sensitivity"})
    if not args.skip_quad:
        runs["quad"] = ("(d) Quad (configs/quad.yaml)", {**chain, **QUAD})
        runs["quad_paper"] = ("(d) Quad, alpha 1e-4, offset 0.002", {**chain, **QUAD_PAPER})
    results = {}
    for name, (label, sets) in runs.items():
        out = os.path.join(tmp, name)
        manifest, wall = beamsift(out, {**common, **sets})
        results[name] = (label, manifest, wall, pick_stats(out), centroids(out))
    print(
        f"\n1. Selection quality: k = {args.k} of {n_docs:,} documents, {args.clusters} clusters "
        f"(svd, dim {args.dim}), seed 0"
    )
    base = results["plain"][1]["dsir"]
    kl_random = base["kl"]["target_vs_random"]
    print(
        f"   {base['eligible']:,} eligible (>= 100 tokens); KL(target || random pick of {args.k}) = {kl_random:.4f} "
        f"(run (a)'s baseline, used for every row)"
    )
    head = (
        f"   {'method':<34}{'KL sel':>8}{'KL red.':>9}{'% way':>7}{'manifest red.':>15}{'clusters':>10}"
        f"{'domains':>9}{'largest domain':>22}{'lw/ngram':>10}{'s':>6}{'scored':>8}"
    )
    print(head)
    print("   " + "-" * (len(head) - 3))
    for label, manifest, wall, s, _ in results.values():
        kl = manifest["dsir"]["kl"]
        red = kl_random - kl["target_vs_selected"]
        clusters = f"{s['clusters']}/{s['clusters_total']}" if s["clusters"] is not None else "-"
        largest = f"{s['top_domain']} {s['top_share']:.0%}"
        print(
            f"   {label:<34}{kl['target_vs_selected']:>8.4f}{red:>9.4f}{red / kl_random:>7.0%}"
            f"{kl['reduction']:>15.4f}{clusters:>10}{s['domains']:>9}{largest:>22}{s['mean_lw']:>10.3f}{wall:>6.1f}"
            f"{manifest['quad']['documents_scored'] if 'quad' in manifest else '-':>8}"
        )
    # Checks.
    import duckdb

    n_domains = duckdb.sql(
        f"SELECT count(DISTINCT source) FROM read_parquet('{tmp}/plain/scores/*.parquet') WHERE dsir_key IS NOT NULL"
    ).fetchall()[0][0]
    print(
        f"   domains: of the {n_domains} among eligible documents. KL red. = KL(target || random) - KL sel; "
        f"% way = KL red. / KL(target || random); lw/ngram = mean dsir_log_weight / n_ngrams of the pick"
    )
    notes = []
    same = results["plain"][3]["ids"] == results["dsir"][3]["ids"]
    notes.append(
        f"[dsir, select] and [dsir, embed, cluster, select] (importance) select the same ids: {same}"
        + ("" if same else f" ({len(results['plain'][3]['ids'] ^ results['dsir'][3]['ids'])} differ)")
    )
    ref = results["dsir"][4]
    differ = [n for n, r in results.items() if r[4] is not None and not np.array_equal(r[4], ref)]
    notes.append("every clustered run fitted the same centroids: " + ("yes" if not differ else f"no ({differ})"))
    wrong_k = [n for n, r in results.items() if r[3]["n"] != args.k]
    if wrong_k:
        notes.append(f"runs that did not select exactly k={args.k}: {wrong_k}")
    bad_base = [
        n for n, r in results.items() if not np.isclose(r[1]["dsir"]["kl"]["target_vs_random"], kl_random, rtol=1e-9)
    ]
    if bad_base:
        notes.append(
            "manifest dsir.kl.target_vs_random differs from the importance run's in: "
            + ", ".join(f"{n} ({results[n][1]['dsir']['kl']['target_vs_random']:.3f})" for n in bad_base)
            + " (no random baseline written: 'manifest red.' is not a KL reduction there)"
        )
    for note in notes:
        print(f"   check: {note}")


def wordpunct_hashing(n_features: int, max_ngram: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=n_features,
        token_pattern=r"\w+|[^\w\s]+",
        lowercase=True,
        ngram_range=(1, max_ngram),
        alternate_sign=False,
        norm=None,
    )


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def plain_svd_kmeans(texts: list[str], dim: int, k: int, sample: int, buckets: int) -> dict:
    """Seconds of each step of the plain scikit-learn pipeline."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.preprocessing import normalize

    t = {}
    s = time.perf_counter()
    counts = wordpunct_hashing(buckets, 2).transform(texts)
    t["hash"] = time.perf_counter() - s
    s = time.perf_counter()
    tfidf = TfidfTransformer(sublinear_tf=True, smooth_idf=True, norm=None).fit_transform(counts)
    rows = sample_rows(len(texts), sample)
    n_comp = max(1, min(dim, len(rows) - 1, tfidf.shape[1] - 1))
    svd = TruncatedSVD(n_components=n_comp, random_state=0, algorithm="randomized", n_iter=5).fit(tfidf[rows])
    vectors = normalize(svd.transform(tfidf)).astype(np.float32)
    t["tfidf+svd"] = time.perf_counter() - s
    s = time.perf_counter()
    km = MiniBatchKMeans(n_clusters=k, random_state=0, n_init=3).fit(vectors[sample_rows(len(texts), sample, 1)])
    labels = km.predict(vectors)
    t["kmeans"] = time.perf_counter() - s
    t["clusters"] = len(np.unique(labels))
    return t


def stage_busy(manifest: dict, names=("embed", "cluster")) -> float:
    stages = manifest["timings"]["stages"]
    return sum(stages.get(n, {}).get("busy_s", 0.0) for n in names)


def throughput_svd(args, pool: str, tmp: str, n_docs: int, texts: list[str]) -> None:
    common = {"input.path": pool, "input.id_field": "id", "select.method": "all", "select.k": "null"}
    base, base_wall = beamsift(os.path.join(tmp, "t_base"), {**common, "stages": "[select]"})
    emb, emb_wall = beamsift(
        os.path.join(tmp, "t_svd"),
        {
            **common,
            "stages": "[embed, cluster, select]",
            "embed.method": "svd",
            "embed.dim": args.dim,
            "cluster.k": args.clusters,
        },
    )
    delta = emb["timings"]["total_s"] - base["timings"]["total_s"]
    busy = stage_busy(emb)
    plain = plain_svd_kmeans(texts, args.dim, args.clusters, 20000, 10000)
    plain_all = plain["hash"] + plain["tfidf+svd"] + plain["kmeans"]
    plain_nohash = plain_all - plain["hash"]
    print(f"\n2. Embed + cluster, model-free (svd, dim {args.dim}, k-means {args.clusters}): {n_docs:,} documents")
    print(f"   {'':<58}{'seconds':>9}{'docs/s':>10}")
    rows = [
        ("beamsift run [embed, cluster, select] - [select] (total_s)", delta),
        ("beamsift embed + cluster busy_s (per-shard work, no fits)", busy),
        ("plain sklearn, from the text (hash, tf-idf, svd, kmeans)", plain_all),
        ("plain sklearn, without hashing the text", plain_nohash),
    ]
    for label, sec in rows:
        print(f"   {label:<58}{sec:>9.2f}{n_docs / max(sec, 1e-9):>10,.0f}")
    with_s, without_s = emb["timings"]["total_s"], base["timings"]["total_s"]
    print(f"   beamsift total_s: {with_s:.2f} s with the stages, {without_s:.2f} s without")
    print(
        f"   plain steps: hash {plain['hash']:.2f} s, tf-idf + svd {plain['tfidf+svd']:.2f} s, "
        f"MiniBatchKMeans fit + predict {plain['kmeans']:.2f} s ({plain['clusters']} clusters used)"
    )
    ratio, ratio_text = plain_nohash / max(delta, 1e-9), plain_all / max(delta, 1e-9)
    print(
        f"   ratio beamsift / plain (docs/s): {ratio:.2f}x against the plain pipeline without hashing "
        f"(beamsift's delta excludes featurize, which every chain runs); {ratio_text:.2f}x against it from the text"
    )


def plain_encoder(texts: list[str], k: int, sort: bool) -> tuple[float, float, float]:
    """(load s, encode s, kmeans s) of the plain transformers loop + MiniBatchKMeans."""
    import torch
    from beamsift.transforms.models.encoder import resolve_encoder
    from sklearn.cluster import MiniBatchKMeans
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    s = time.perf_counter()
    path = resolve_encoder(None)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    load = time.perf_counter() - s
    s = time.perf_counter()
    order = np.argsort([len(t) for t in texts], kind="stable") if sort else np.arange(len(texts))
    out = np.zeros((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), 32):
            rows = order[start : start + 32]
            batch = tokenizer(
                [texts[r] for r in rows], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    encode = time.perf_counter() - s
    s = time.perf_counter()
    MiniBatchKMeans(n_clusters=k, random_state=0, n_init=3).fit(out).predict(out)
    return load, encode, time.perf_counter() - s


def throughput_encoder(args, records: list[dict], tmp: str) -> None:
    sub = records[: args.encoder_docs]
    n = len(sub)
    path = os.path.join(tmp, "encoder_pool.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in sub:
            f.write(json.dumps(r) + "\n")
    k = min(args.clusters, n)
    common = {"input.path": path, "input.id_field": "id", "select.method": "all", "select.k": "null"}
    base, _ = beamsift(os.path.join(tmp, "e_base"), {**common, "stages": "[select]"})
    emb, _ = beamsift(
        os.path.join(tmp, "e_model"),
        {**common, "stages": "[embed, cluster, select]", "embed.method": "model", "cluster.k": k},
    )
    delta = emb["timings"]["total_s"] - base["timings"]["total_s"]
    busy = stage_busy(emb)
    enc_busy = stage_busy(emb, ("embed",))
    texts = [r["text"] for r in sub]
    load, enc_sorted, km = plain_encoder(texts, k, sort=True)
    _, enc_plain, km2 = plain_encoder(texts, k, sort=False)
    print(f"\n3. Embed + cluster with all-MiniLM-L6-v2 (batch 32, 256 tokens, k-means {k}): {n:,} documents")
    print(f"   {'':<58}{'seconds':>9}{'docs/s':>10}")
    rows = [
        ("beamsift run [embed, cluster, select] - [select] (total_s)", delta),
        ("beamsift embed + cluster busy_s (no model load, no fit)", busy),
        ("  of which embed busy_s", enc_busy),
        ("plain loop, sorted by length, + MiniBatchKMeans", enc_sorted + km),
        ("plain loop, input order, + MiniBatchKMeans", enc_plain + km2),
    ]
    for label, sec in rows:
        print(f"   {label:<58}{sec:>9.2f}{n / max(sec, 1e-9):>10.1f}")
    print(f"   plain model load {load:.2f} s (not counted); plain k-means fit + predict {km:.2f} s")
    sorted_s, order_s = enc_sorted + km, enc_plain + km2
    print(
        f"   ratio beamsift / plain (docs/s): {sorted_s / max(delta, 1e-9):.2f}x whole-run delta vs sorted loop; "
        f"{sorted_s / max(busy, 1e-9):.2f}x stage busy vs sorted loop; "
        f"{order_s / max(delta, 1e-9):.2f}x whole-run delta vs input-order loop"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=None, help="the first N documents of the pool (default: all)")
    ap.add_argument("--k", type=int, default=700, help="the selection budget")
    ap.add_argument("--clusters", type=int, default=16, help="cluster.k")
    ap.add_argument("--dim", type=int, default=128, help="embed.dim (svd)")
    ap.add_argument("--encoder-docs", type=int, default=500, help="documents for the MiniLM throughput")
    ap.add_argument("--skip-encoder", action="store_true", help="skip the MiniLM throughput")
    ap.add_argument("--skip-sensitivity", action="store_true", help="skip (c), sensitivity sampling")
    ap.add_argument("--skip-quad", action="store_true", help="skip (d), Quad")
    ap.add_argument("--pool", default=os.path.join(ROOT, "data", "pool.jsonl.gz"))
    ap.add_argument("--target", default=os.path.join(ROOT, "data", "target.jsonl"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    started = time.time()
    with gzip.open(args.pool, "rt", encoding="utf-8") if args.pool.endswith(".gz") else open(args.pool) as f:
        records = [json.loads(line) for line in f if line.strip()]
    total = len(records)
    if args.docs is not None:
        records = records[: args.docs]
    tmp = tempfile.mkdtemp(prefix="beamsift-diversity-")
    try:
        pool = args.pool
        if len(records) < total:
            pool = os.path.join(tmp, "pool.jsonl")
            with open(pool, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        n = len(records)
        print(f"pool: {n:,} of {total:,} documents of {args.pool}; target: {args.target}")
        load = os.getloadavg()[0]
        print(f"load average {load:.2f} on {os.cpu_count()} cores at the start", end="")
        print(
            ": WARNING, other work is running; the timings will not hold (multi-threaded BLAS, e.g. the SVD "
            "fit, slows down many times over on busy cores)"
            if load > 0.5
            else ""
        )
        quality(args, pool, tmp, n)
        throughput_svd(args, pool, tmp, n, [r["text"] for r in records])
        if not args.skip_encoder:
            throughput_encoder(args, records, tmp)
        print(f"\ntotal {time.time() - started:.0f} s")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
