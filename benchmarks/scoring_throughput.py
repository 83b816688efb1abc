"""The model-scoring stage against a bare batched torch loop over the same model and data.

    python benchmarks/scoring_throughput.py [--docs 2000] [--pool data/pool.jsonl.gz]

1. trains a proxy GPT-2 once (beamsift, `proxy` stage, as configs/loss_reweight.yaml sets it);
2. scores --docs documents with it through `beamsift run` (stages [proxy, select], `proxy.model`
   set, so nothing is trained): the proxy stage's wall time from the manifest;
3. scores the same documents with the same model in a bare loop (tokenize, sort by length, batches
   of 16, the same scores), in the same process one after the other;
and prints docs/s and tokens/s of both, the pipeline's overhead, and exact GraNd against the
last-layer GraNd (bare loop, a subset).
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


def beamsift(config: dict, d: str, name: str) -> dict:
    import yaml

    path = os.path.join(d, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    subprocess.run(
        [sys.executable, "-m", "beamsift.pipeline.cli", "run", path, "--quiet", "--force"],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(config["output"]["dir"], "manifest.json")) as f:
        return json.load(f)


def bare_loop(model_dir: str, texts: list[str], context: int, exact: bool) -> tuple[float, int]:
    import torch
    from beamsift.transforms import models
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(os.cpu_count() or 1)
    model = models.load_model(os.path.join(model_dir, "proxy-0"))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(model_dir, "tokenizer"))
    started = time.time()
    ids, _ = models.encode(tokenizer, texts, context)
    order = np.argsort([len(i) for i in ids], kind="stable")
    for start in range(0, len(ids), 16):
        x, mask = models.pad([ids[i] for i in order[start : start + 16]])
        models.lm_scores(model, x, mask, exact)
    return time.time() - started, sum(len(i) for i in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--grand-docs", type=int, default=200)
    ap.add_argument("--pool", default=os.path.join(ROOT, "data", "pool.jsonl.gz"))
    args = ap.parse_args()
    with gzip.open(args.pool, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for _, line in zip(range(args.docs), f)]
    proxy = {"seeds": 1, "sample": 1000, "epochs": 2, "context": 256}
    with tempfile.TemporaryDirectory() as d:
        pool = os.path.join(d, "pool.jsonl")
        with open(pool, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        base = {"input": {"path": pool, "id_field": "id"}, "select": {"method": "all"}, "stages": ["proxy", "select"]}
        beamsift({**base, "proxy": proxy, "output": {"dir": os.path.join(d, "train")}}, d, "train")
        model_dir = os.path.join(d, "train", "artifacts", "proxy")
        manifest = beamsift(
            {**base, "proxy": {**proxy, "model": model_dir}, "output": {"dir": os.path.join(d, "score")}}, d, "score"
        )
        stage_s = manifest["timings"]["stages"]["proxy"]["wall_s"]
        texts = [r["text"] for r in records]
        bare_s, tokens = bare_loop(model_dir, texts, 256, exact=False)
        n = len(texts)
        print(f"{n:,} documents, {tokens:,} tokens (GPT-2 2 x 128, BPE 8,000, context 256; 2 cores)")
        print(
            f"  scoring stage (beamsift, FnApiRunner): {stage_s:6.1f} s  {n / stage_s:6.1f} docs/s  "
            f"{tokens / stage_s:8.0f} tokens/s"
        )
        print(
            f"  bare batched torch loop:               {bare_s:6.1f} s  {n / bare_s:6.1f} docs/s  "
            f"{tokens / bare_s:8.0f} tokens/s"
        )
        print(f"  pipeline overhead: {stage_s / bare_s - 1:+.1%}")
        sub = texts[: args.grand_docs]
        last_s, _ = bare_loop(model_dir, sub, 256, exact=False)
        exact_s, _ = bare_loop(model_dir, sub, 256, exact=True)
        print(
            f"  {len(sub)} documents: last-layer GraNd (with the other scores) {len(sub) / last_s:.1f} docs/s, "
            f"exact GraNd {len(sub) / exact_s:.1f} docs/s ({exact_s / last_s:.1f}x the time)"
        )


if __name__ == "__main__":
    main()
