"""Perplexity correlations on the bundled pool: do existing LMs' losses point at the target's domain?

    python benchmarks/perplexity_correlations.py [--models 12] [--fraction 0.2]
    python benchmarks/perplexity_correlations.py --save-models data/lms --models 8   # the demo's LMs

1. "Existing LMs": ``--models`` small GPT-2s (one layer, their own BPE), each trained in this run on
   its own mixture of the pool's domains (seeded Dirichlet weights, 400 documents, 3 epochs), as a field of
   public models differs in what it was trained on.
2. Their "benchmark error": their loss (bits per byte) on 200 held-out documents of the target
   (``data/target.jsonl``, Python documentation; the rest of the target is DSIR's, for the KL).
   Only its ranks matter to the estimators.
3. ``beamsift run`` with ``stages: [dsir, perplexity_correlations, select]``, ``domain_field:
   source``, each estimator, selecting ``--fraction`` of the pool by the domains' weights
   (``select.method: balanced`` over ``pc_domain``, quotas by ``pc_weight``, the best ``pc_score``
   within each), and once by ``pc_score`` alone (the paper's classifier, across domains), through
   the command line. Printed: each domain's estimate and weight, the KL
   reduction of the pick against a random pick of the same size (the manifest's, DSIR's n-gram
   KL to the target), and the wall time.

A method that works puts the weight on ``pydoc`` (the target's domain, 11% of the pool) and on
what reads like it, and the pick's KL to the target falls well below a random pick's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_models(pool: list[dict], n: int, folder: str, seed: int = 0) -> list[dict]:
    """n small LMs on seeded mixtures of the pool's domains; [{path, name, mixture}]."""
    from beamsift.transforms import models

    rng = np.random.default_rng(seed)
    domains = sorted({r["source"] for r in pool})
    by_domain = {d: [r["text"] for r in pool if r["source"] == d] for d in domains}
    out = []
    for i in range(n):
        mix = rng.dirichlet(np.full(len(domains), 0.5))
        counts = rng.multinomial(400, mix)
        texts = []
        for d, c in zip(domains, counts):
            idx = rng.choice(len(by_domain[d]), size=min(c, len(by_domain[d])), replace=False)
            texts += [by_domain[d][j] for j in idx]
        path = os.path.join(folder, f"lm{i:02d}")
        models.train_small_lm(texts, path, seed=i, vocab_size=500, dim=32, epochs=3, context=128)
        out.append({"path": path, "name": f"lm{i:02d}", "mixture": dict(zip(domains, mix.round(3).tolist()))})
    return out


def target_bpb(path: str, texts: list[str], context: int = 128) -> float:
    """The model's bits per byte on ``texts`` (the stage's own scoring: Σ nats / Σ bytes / ln 2)."""
    from beamsift.transforms.stages.perplexity_correlations import LanguageModels

    lms = LanguageModels([{"path": path}], context)
    nats, nbytes = lms.nats_and_bytes(lms.load(), texts)
    return float(nats.sum() / nbytes.sum() / np.log(2))


def run(config: dict, folder: str) -> tuple[dict, float]:
    import yaml

    path = os.path.join(folder, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    started = time.time()
    cmd = [sys.executable, "-m", "beamsift.pipeline.cli", "run", path, "--quiet", "--no-progress", "--force"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"beamsift run failed:\n{done.stdout}{done.stderr}")
    with open(os.path.join(config["output"]["dir"], "manifest.json")) as f:
        return json.load(f), time.time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--pool", default=os.path.join(ROOT, "data", "pool.jsonl.gz"))
    ap.add_argument("--target", default=os.path.join(ROOT, "data", "target.jsonl"))
    ap.add_argument("--save-models", default=None, help="train the LMs into this folder, print their errors, stop")
    args = ap.parse_args()
    pool, target = load(args.pool), load(args.target)
    held, dsir_target = [r["text"] for r in target[:200]], target[200:]
    with tempfile.TemporaryDirectory(prefix="beamsift-pc-") as tmp:
        folder = args.save_models or os.path.join(tmp, "lms")
        started = time.time()
        lms = train_models(pool, args.models, folder)
        for m in lms:
            m["error"] = round(target_bpb(m["path"], held), 4)
        print(
            f"{len(lms)} LMs trained in {time.time() - started:.0f} s; their 'benchmark error': bits per byte on 200 "
            "held-out target documents"
        )
        for m in lms:
            top = sorted(m["mixture"].items(), key=lambda kv: -kv[1])[:3]
            print(f"  {m['name']}: error {m['error']:.4f}; mixture " + ", ".join(f"{d} {w:.2f}" for d, w in top))
        if args.save_models:
            listing = [{"name": m["name"], "path": m["path"], "error": m["error"]} for m in lms]
            print(json.dumps(listing, indent=1))
            return
        target_path = os.path.join(tmp, "target.jsonl")
        with open(target_path, "w", encoding="utf-8") as f:
            for r in dsir_target:
                f.write(json.dumps(r) + "\n")
        share = {d: sum(r["source"] == d for r in pool) / len(pool) for d in sorted({r["source"] for r in pool})}
        selectors = {
            "by weight": {
                "method": "balanced",
                "group_column": "pc_domain",
                "quota": "score",
                "quota_column": "pc_weight",
                "column": "pc_score",
            },
            "by pc_score": {"method": "top", "column": "pc_score"},
            # No domain field: each document its own domain; keep what the projection keeps.
            "per document": {"method": "threshold", "column": "pc_weight", "min": 1.0e-300},
        }
        runs = [("spearmanr", "by weight"), ("sign_cdf", "by weight"), ("spearmanr", "by pc_score")]
        runs += [("spearmanr", "per document")]
        for estimator, how in runs:
            out = os.path.join(tmp, f"out-{estimator}-{how.replace(' ', '_')}")
            config = {
                "input": {"path": args.pool, "id_field": "id"},
                "target": {"path": target_path},
                "stages": ["dsir", "perplexity_correlations", "select"],
                "perplexity_correlations": {
                    "models": [{"path": m["path"], "name": m["name"], "error": m["error"]} for m in lms],
                    "domain_field": None if how == "per document" else "source",
                    "desired_fraction": args.fraction,
                    "estimator": estimator,
                    "context": 128,
                },
                "select": {**selectors[how], "fraction": None if how == "per document" else args.fraction},
                "seed": 0,
                "output": {"dir": out},
            }
            manifest, wall = run(config, tmp)
            import duckdb

            if how == "per document":  # no domains/: the sources' mean estimate and total weight
                rows = duckdb.sql(
                    f"SELECT source, avg(pc_estimate), sum(pc_weight) FROM '{out}/scores/*.parquet' "
                    "WHERE pc_estimate IS NOT NULL GROUP BY 1 ORDER BY 2 DESC"
                ).fetchall()
            else:
                rows = duckdb.sql(
                    f"SELECT domain, pc_estimate, pc_weight FROM '{out}/domains/*.parquet' ORDER BY pc_estimate DESC"
                ).fetchall()
            picked = dict(duckdb.sql(f"SELECT source, count(*) FROM '{out}/selected/*.parquet' GROUP BY 1").fetchall())
            kl = manifest["dsir"]["kl"]
            print(
                f"\n{estimator}, {how}: {wall:.0f} s; pick {manifest['counts']['selected']:,} documents; "
                f"KL(target || pick) {kl['target_vs_selected']:.4f} against {kl['target_vs_random']:.4f} for a "
                f"random pick: reduction {kl['reduction']:.4f}"
            )
            print(f"  {'domain':<10}{'estimate':>10}{'weight':>8}{'pool':>7}{'pick':>7}")
            n = max(manifest["counts"]["selected"], 1)
            for domain, est, weight in rows:
                print(f"  {domain:<10}{est:>10.3f}{weight:>8.3f}{share[domain]:>7.1%}{picked.get(domain, 0) / n:>7.1%}")


if __name__ == "__main__":
    main()
