"""EL2N, GraNd and self-influence at flagging flipped labels, and at pruning, on 6 domains of the
bundled corpus.

    python benchmarks/label_noise.py [--docs 4800] [--noise 0.1] [--pool data/pool.jsonl.gz]

For each kind of noise (uniform: a flipped label goes to any other class; class-dependent: to a
fixed confusable neighbour), 10% of the labels of a 4,800-document pool are flipped and
`configs/el2n.yaml` is run on it through the command line, as a user runs it, with the proxy's
self-influence on its first layer too (`proxy.self_influence=true`, `influence_layers=first`:
PRESENCE's score). Printed:
- AUROC of el2n, grand, grand_last_layer, loss, self_influence and a random score at flagging the
  flipped documents;
- the pruning curve: a fresh classifier trained on the 30/50/70% kept by EL2N (highest first),
  with and without dropping the top 10% first, by PRESENCE-Sequential (the lowest self-influence:
  the highest dropped), and on random subsets of the same size, scored on held-out documents
  with their true labels;
- the wall time of the el2n run.
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

import duckdb
import numpy as np
from sklearn.metrics import roc_auc_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = ["kjv", "sqlite", "pydoc", "jargon", "manpages", "devil"]
# Class-dependent noise: each label flips to a domain that reads alike.
NEIGHBOUR = {
    "pydoc": "sqlite",
    "sqlite": "manpages",
    "manpages": "pydoc",
    "kjv": "devil",
    "devil": "jargon",
    "jargon": "devil",
}


def load(pool: str) -> list[dict]:
    with gzip.open(pool, "rt", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["source"] in DOMAINS]


def flip(records, noise, kind, rng):
    flipped = rng.random(len(records)) < noise
    out = []
    for r, f in zip(records, flipped):
        label = r["source"]
        if f:
            label = NEIGHBOUR[label] if kind == "class" else rng.choice([d for d in DOMAINS if d != label])
        out.append({"id": r["id"], "text": r["text"], "label": label})
    return out, flipped


def run_el2n(path: str, out: str) -> float:
    started = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "beamsift.pipeline.cli",
            "run",
            "configs/el2n.yaml",
            "--quiet",
            "--set",
            f"input.path={path}",
            "--set",
            "input.label_field=label",
            "--set",
            f"output.dir={out}",
            "--set",
            "proxy.self_influence=true",
            "--set",
            "proxy.influence_layers=first",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return time.time() - started


def accuracy_after_training(train, test, seed=0) -> float:
    """A fresh proxy classifier (the same kind) trained on ``train``'s (noisy) labels, scored on
    ``test``'s true labels."""
    import pyarrow as pa
    import torch
    from beamsift.transforms import models
    from beamsift.transforms.featurize import hashed_ngram_features

    def feats(texts):
        f = hashed_ngram_features(pa.array(texts), 10000)
        return [f.buckets[f.offsets[i] : f.offsets[i + 1]] for i in range(len(texts))]

    names = sorted(DOMAINS)
    index = {n: i for i, n in enumerate(names)}
    xb = feats([r["text"] for r in train])
    y = torch.tensor([index[r["label"]] for r in train])
    model = models.new_classifier(10000, len(names), names, 64, seed)

    def loss_of(m, batch):
        return torch.nn.functional.cross_entropy(m(batch[0])[0], batch[1])

    model, _ = models.train(
        model,
        lambda idx: (models.dense_features([xb[i] for i in idx], 10000), y[idx]),
        len(train),
        models.TrainSettings(epochs=10, learning_rate=1e-3),
        seed,
        loss_of,
    )
    xt = models.dense_features(feats([r["text"] for r in test]), 10000)
    with torch.no_grad():
        pred = model(xt)[0].argmax(-1).numpy()
    return float(np.mean(pred == np.array([index[r["source"]] for r in test])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=4800)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--pool", default=os.path.join(ROOT, "data", "pool.jsonl.gz"))
    ap.add_argument("--skip-pruning", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    records = load(args.pool)
    order = rng.permutation(len(records))
    pool = [records[i] for i in order[: args.docs]]
    test = [records[i] for i in order[args.docs :]][:1500]
    print(
        f"{len(pool)} documents from {len(DOMAINS)} domains, {args.noise:.0%} of labels flipped; "
        f"{len(test)} held-out documents with true labels"
    )
    with tempfile.TemporaryDirectory() as d:
        for kind in ("uniform", "class"):
            noisy, flipped = flip(pool, args.noise, kind, np.random.default_rng(1))
            path = os.path.join(d, f"{kind}.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                for r in noisy:
                    f.write(json.dumps(r) + "\n")
            out = os.path.join(d, f"out-{kind}")
            seconds = run_el2n(path, out)
            rows = (
                duckdb.connect()
                .execute(
                    f"SELECT id, el2n, grand, grand_last_layer, loss, self_influence FROM '{out}/scores/*.parquet'"
                )  # noqa: E501
                .fetchall()
            )
            by_id = {r[0]: r[1:] for r in rows}
            truth = np.array(flipped, dtype=int)
            scores = np.array([by_id[r["id"]] for r in pool], dtype=float)
            aurocs = {
                name: roc_auc_score(truth, scores[:, i])
                for i, name in enumerate(("el2n", "grand", "grand_last_layer", "loss", "self_influence"))
            }
            aurocs["random"] = roc_auc_score(truth, np.random.default_rng(2).random(len(pool)))
            print(f"\n{kind} noise: configs/el2n.yaml on {len(pool):,} documents in {seconds:.0f} s")
            print("  AUROC at flagging flipped labels: " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()))
            if args.skip_pruning:
                continue
            el2n = scores[:, 0]
            ranked = np.argsort(-el2n, kind="stable")
            by_si = np.argsort(scores[:, 4], kind="stable")  # lowest self-influence first
            print(
                "  accuracy on held-out true labels after pruning "
                "(keep share: el2n / el2n without the top 10% / PRESENCE-Sequential / random)"
            )
            for keep in (0.3, 0.5, 0.7):
                n = int(keep * len(pool))
                top = [noisy[i] for i in ranked[:n]]
                offset = int(0.1 * len(pool))
                band = [noisy[i] for i in ranked[offset : offset + n]]
                low_si = [noisy[i] for i in by_si[:n]]
                rand = [noisy[i] for i in np.random.default_rng(3).permutation(len(pool))[:n]]
                accs = [accuracy_after_training(s, test) for s in (top, band, low_si, rand)]
                print(f"    {keep:.0%}: " + " / ".join(f"{a:.3f}" for a in accs))
            full = accuracy_after_training(noisy, test)
            print(f"    100% (no pruning): {full:.3f}")


if __name__ == "__main__":
    main()
