"""Proxy and reference models, and the per-example scores computed under them.

Two kinds of model, both torch models that transformers saves and loads (``save_pretrained``):

- labelled text (``input.label_field``): ``NgramClassifier``, a bag-of-hashed-n-grams network
  (the n-grams beamsift already computes, L2-normalised; one hidden layer). Fast enough on CPU to
  train K of them on the whole pool, which is what EL2N and GraNd need (Paul et al. 2021);
- unlabelled text: a small GPT-2 trained from scratch with a byte-level BPE tokenizer that is
  trained on a sample of the data (HF ``tokenizers``).

Per example, for a model with softmax output p and target y (the label; for a causal LM, each
next token, averaged over the example's tokens):

    loss              cross-entropy (mean over tokens for a causal LM); perplexity = exp(loss)
    el2n              ‖p − onehot(y)‖₂                       (Paul et al. 2021, EL2N)
    grand             ‖∇_θ loss‖₂ over all parameters, exact, per example (torch.func vmap)
    grand_last_layer  ‖∇_W loss‖₂ of the output layer only: for one output (a label)
                      ‖p − y‖₂·sqrt(‖h‖² + 1) with h the layer's input and 1 for its bias; for a
                      causal LM ‖(1/T) Σ_t (p_t − y_t) h_tᵀ‖_F (GPT-2's head has no bias)

Each is averaged over the K proxies (``proxy.seeds``) by the caller.

torch and transformers are imported inside the functions, so that a run without model stages
never loads them.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import tempfile
from dataclasses import dataclass, field

import numpy as np

CLASSIFIER = "beamsift-ngram-classifier"


def _torch():
    import torch

    return torch


def device() -> str:
    """Where models run: the GPU when there is one."""
    return "cuda" if _torch().cuda.is_available() else "cpu"


def on_device(model, *tensors) -> tuple:
    """The tensors moved to the model's device (a no-op on the CPU)."""
    where = next(model.parameters()).device
    return tuple(t.to(where) for t in tensors)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


# ---- the bag-of-n-grams classifier -------------------------------------------------------


def _classifier_classes():
    """The config and model classes (defined on first use: they subclass transformers')."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    class NgramClassifierConfig(PretrainedConfig):
        model_type = CLASSIFIER

        def __init__(self, num_buckets=10000, hidden_size=64, label_names=("0", "1"), **kwargs):
            kwargs.pop("num_labels", None)
            kwargs.pop("label2id", None)
            kwargs["id2label"] = dict(enumerate(label_names))
            super().__init__(**kwargs)
            self.num_buckets = num_buckets
            self.hidden_size = hidden_size
            self.label_names = list(label_names)

    class NgramClassifier(PreTrainedModel):
        """x (L2-normalised hashed n-gram counts) -> ReLU(W1 x + b1) = h -> W2 h + b2 = logits."""

        config_class = NgramClassifierConfig
        base_model_prefix = "classifier"

        def __init__(self, config):
            super().__init__(config)
            self.hidden = torch.nn.Linear(config.num_buckets, config.hidden_size)
            self.out = torch.nn.Linear(config.hidden_size, config.num_labels)
            self.post_init()

        def forward(self, features):
            h = torch.relu(self.hidden(features))
            return self.out(h), h

    _CLASSES = (NgramClassifierConfig, NgramClassifier)
    return _CLASSES


_CLASSES = None


def dense_features(buckets: list[np.ndarray], num_buckets: int):
    """Documents' hashed n-gram bucket ids -> a (B, num_buckets) tensor of L2-normalised counts."""
    torch = _torch()
    x = torch.zeros(len(buckets), num_buckets)
    for i, b in enumerate(buckets):
        if len(b):
            counts = np.bincount(b, minlength=num_buckets).astype(np.float32)
            x[i] = torch.from_numpy(counts / np.linalg.norm(counts))
    return x


def new_classifier(num_buckets: int, num_labels: int, label_names: list[str], hidden: int, seed: int):
    torch = _torch()
    config_cls, model_cls = _classifier_classes()
    torch.manual_seed(seed)
    assert len(label_names) == num_labels
    config = config_cls(num_buckets=num_buckets, hidden_size=hidden, label_names=label_names)
    return model_cls(config).to(device())


def classifier_scores(model, x, y, exact_grand: bool) -> dict[str, np.ndarray]:
    """loss, el2n, grand_last_layer (and grand) of each example of a batch under a classifier."""
    torch = _torch()
    x, y = on_device(model, x, y)
    with torch.no_grad():
        logits, h = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        el2n = _label_errors(logits, y).norm(dim=-1)
        last = el2n * torch.sqrt((h * h).sum(-1) + 1.0)
    out = {"loss": _np(loss), "el2n": _np(el2n), "grand_last_layer": _np(last)}
    if exact_grand:
        out["grand"] = _np(classifier_grad_norms(model, x, y))
    return out


def classifier_grad_norms(model, x, y):
    """‖∇_θ loss‖₂ over all of the classifier's parameters, exactly, for each example, in closed
    form (Goodfellow 2015, "Efficient per-example gradient computations"): see
    ``classifier_layer_squares``. The same numbers as per-example autograd (tested), without a
    (batch × 640k) gradient tensor: ~100x faster at 10,000 buckets."""
    torch = _torch()
    first, last = classifier_layer_squares(model, x, y)
    return torch.sqrt(first + last)


def classifier_layer_squares(model, x, y):
    """(‖∇ first layer‖², ‖∇ last layer‖²) of each example's loss, weights and bias together. With
    e = p − onehot(y) at the output and δ = (W₂ᵀe) ⊙ 1[h > 0] at the hidden layer, each layer's
    weight gradient is an outer product, so ‖∇W₂‖² + ‖∇b₂‖² = ‖e‖²(‖h‖² + 1) and
    ‖∇W₁‖² + ‖∇b₁‖² = ‖δ‖²(‖x‖² + 1)."""
    torch = _torch()
    with torch.no_grad():
        logits, h = model(x)
        e = _label_errors(logits, y)
        delta = (e @ model.out.weight) * (h > 0).to(e.dtype)
        last = (e * e).sum(-1) * ((h * h).sum(-1) + 1.0)
        first = (delta * delta).sum(-1) * ((x * x).sum(-1) + 1.0)
        return first, last


def per_example_grad_norms(model, example_loss, batch: tuple) -> np.ndarray:
    """‖∇_θ example_loss(θ, *example)‖₂ over all parameters, exactly, for each example of a batch."""
    return np.sqrt(per_example_grad_squares(model, example_loss, batch))


def per_example_grad_squares(model, example_loss, batch: tuple, prefix: str = "") -> np.ndarray:
    """‖∇ example_loss(θ, *example)‖² over the parameters whose names start with ``prefix`` (all
    by default), exactly, for each example of a batch (per-sample gradients with torch.func: vmap
    over the batch of grad of one example's loss; the other parameters are held fixed)."""
    torch = _torch()
    params = {k: v.detach() for k, v in model.named_parameters() if k.startswith(prefix)}
    if not params:
        raise ValueError(f"the model has no parameters named {prefix}*")
    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, *([0] * len(batch))))(params, *batch)
    n = batch[0].shape[0]
    return _np(sum((g.reshape(n, -1) ** 2).sum(1) for g in grads.values()).detach())


# ---- the causal LM --------------------------------------------------------------------------


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (a sample of the data)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    # No progress bar: it goes to the worker's stdout, and a closed stdout (`beamsift run ... | head`)
    # made the trainer panic mid-run.
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def new_causal_lm(vocab_size: int, layers: int, dim: int, heads: int, context: int, seed: int):
    torch = _torch()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=dim,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,  # dropout costs ~8% of a step and an early-stopped proxy does not need it
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = "eager"  # what torch.func's vmap can trace (exact GraNd)
    return GPT2LMHeadModel(config).to(device())


def encode(tokenizer, texts: list[str], context: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, cut to the model's context; and how many texts were cut."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    cut = sum(len(i) > context for i in ids)
    return [i[:context] for i in ids], cut


def pad(ids: list[list[int]]):
    """(input_ids, mask) tensors, right-padded with 0."""
    torch = _torch()
    longest = max(max(len(i) for i in ids), 2)
    x = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest)
    for row, i in enumerate(ids):
        x[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        mask[row, : len(i)] = 1
    return x, mask


def _additive_mask(mask):
    """A ready 4D additive attention mask (B, 1, T, T): causal and padding. Given whole, GPT-2
    does not build one itself (the builder cannot be traced by vmap)."""
    torch = _torch()
    t = mask.shape[-1]
    allowed = torch.tril(torch.ones(t, t, dtype=mask.dtype, device=mask.device)) * mask[:, None, :]
    return ((1.0 - allowed) * torch.finfo(torch.float32).min)[:, None]


def lm_token_losses(model, x, mask, hidden: bool = True):
    """Per-token cross-entropy of each next token (B, T-1), its weights, logits and last hidden."""
    torch = _torch()
    out = model(input_ids=x, attention_mask=_additive_mask(mask), output_hidden_states=hidden)
    logits = out.logits[:, :-1]
    targets = x[:, 1:]
    weights = mask[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return losses, weights, logits, out.hidden_states[-1][:, :-1] if hidden else None, targets


def lm_losses(model, x, mask) -> np.ndarray:
    """Only the mean token loss of each example (NaN for an example of one token)."""
    torch = _torch()
    x, mask = on_device(model, x, mask)
    with torch.no_grad():
        losses, w, *_ = lm_token_losses(model, x, mask, hidden=False)
        loss = _np((losses * w).sum(1) / w.sum(1).clamp(min=1))
    loss[_np(w.sum(1) == 0)] = np.nan
    return loss


def lm_scores(model, x, mask, exact_grand: bool) -> dict[str, np.ndarray]:
    """loss, perplexity, el2n, grand_last_layer (and grand) of each example under a causal LM.

    An example of one token has no next token to predict: its scores are NaN."""
    torch = _torch()
    x, mask = on_device(model, x, mask)
    with torch.no_grad():
        losses, w, logits, h, targets = lm_token_losses(model, x, mask)
        n = w.sum(1)
        denom = n.clamp(min=1)
        loss = (losses * w).sum(1) / denom
        err = _token_errors(logits, targets, w)
        el2n = (err.norm(dim=-1) * w).sum(1) / denom
        last = torch.linalg.matrix_norm(_head_grads(err, h, w))
    out = {"loss": _np(loss), "el2n": _np(el2n), "grand_last_layer": _np(last)}
    if exact_grand:
        out["grand"] = per_example_grad_norms(model, _lm_example_loss(model), (x, mask))
    empty = _np(n == 0)
    for v in out.values():
        v[empty] = np.nan
    out["perplexity"] = np.exp(out["loss"])
    return out


def _lm_example_loss(model):
    """One example's mean token loss as a function of (some of) the parameters, for torch.func."""
    torch = _torch()

    def example_loss(params, xi, mi):
        o = torch.func.functional_call(model, params, (xi[None],), {"attention_mask": _additive_mask(mi[None])})
        token_losses = torch.nn.functional.cross_entropy(o.logits[0, :-1], xi[1:], reduction="none")
        wi = mi[1:]
        return (token_losses * wi).sum() / wi.sum().clamp(min=1)

    return example_loss


INFLUENCE_LAYERS = ("first", "last", "all")
LM_FIRST_LAYER = "transformer.h.0."  # GPT-2's first transformer block


def layer_grad_squares(model, batch, labelled: bool, layers: str) -> np.ndarray:
    """‖∇ℓ‖² of each example's loss over the chosen layers: ``last`` the output layer (from the
    forward pass), ``first`` the first layer (the classifier's hidden layer, the causal LM's first
    transformer block: PRESENCE's choice), ``all`` every parameter."""
    if layers not in INFLUENCE_LAYERS:
        raise ValueError(f"unknown influence layers {layers!r}; one of {INFLUENCE_LAYERS}")
    if layers == "last":
        g = last_layer_grads(model, batch, labelled)
        return _np((g.reshape(len(g), -1) ** 2).sum(1))
    batch = on_device(model, *batch)
    if labelled:
        first, last = classifier_layer_squares(model, *batch)
        return _np(first if layers == "first" else first + last)
    x, mask = batch
    squares = per_example_grad_squares(
        model, _lm_example_loss(model), (x, mask), LM_FIRST_LAYER if layers == "first" else ""
    )
    squares[_np(mask[:, 1:].sum(1) == 0)] = 0.0  # no next token: no gradient
    return squares


# ---- influence: last-layer gradients ------------------------------------------------------


def last_layer_grads(model, batch, labelled: bool):
    """Each example's gradient of its loss with respect to the output layer's weights (and bias,
    for the classifier), as a (B, outputs, inputs) tensor, from the forward pass alone."""
    torch = _torch()
    batch = on_device(model, *batch)
    with torch.no_grad():
        if labelled:
            x, y = batch
            logits, h = model(x)
            a = torch.cat([h, torch.ones(len(h), 1, device=h.device)], dim=1)
            return _label_errors(logits, y)[:, :, None] * a[:, None, :]
        x, mask = batch
        _, w, logits, h, targets = lm_token_losses(model, x, mask)
        return _head_grads(_token_errors(logits, targets, w), h, w)


def _label_errors(logits, y):
    """p − onehot(y) for each example: the error at a classifier's output."""
    torch = _torch()
    return torch.softmax(logits, dim=-1) - torch.nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)


def _token_errors(logits, targets, w):
    """p_t − onehot(y_t) for each next token (B, T, V), zero at padding."""
    torch = _torch()
    err = torch.softmax(logits, dim=-1)
    err.scatter_add_(-1, targets[..., None], -torch.ones_like(targets[..., None], dtype=err.dtype))
    return err * w[..., None]


def _head_grads(err, h, w):
    """∇_W of each example's mean token loss for the output layer: (1/T) Σ_t e_t h_tᵀ (B, V, d)."""
    torch = _torch()
    return torch.bmm(err.transpose(1, 2), h * w[..., None]) / w.sum(1).clamp(min=1)[:, None, None]


def gradient_alignment(grads, direction) -> np.ndarray:
    """Cosine of each example's gradient with a direction (the target's mean gradient): > 0
    where a step on the example lowers the target's loss."""
    flat = grads.reshape(len(grads), -1)
    d = direction.reshape(-1).to(flat.device)
    cos = flat @ d / (flat.norm(dim=1) * d.norm()).clamp(min=1e-30)
    return _np(cos)


# ---- training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 3e-3
    holdout: float = 0.1  # share of the sample held out to decide when to stop
    patience: int = 1  # epochs without a better held-out loss before stopping


# A model "beats its baseline" when its held-out loss is at least this share below the
# baseline's: a model that is only a little better than counting tokens (or labels) ranks
# documents by little more than their length or label.
BASELINE_MARGIN = 0.10


@dataclass
class TrainRecord:
    """How one model's training went, epoch by epoch (the manifest's ``training``)."""

    train_loss: list = field(default_factory=list)  # mean loss over each epoch's training batches
    held_out_loss: list = field(default_factory=list)  # after each epoch, on the held-out share
    epochs_run: int = 0
    best_epoch: int = 0  # the epoch whose model is kept; 0 where nothing was held out
    stopped_early: bool = False
    train_idx: np.ndarray | None = None  # which examples it trained on, and which were held out
    held_idx: np.ndarray | None = None

    def as_dict(self, max_epochs: int) -> dict:
        # No best epoch with held-out losses: every one was NaN (training diverged).
        best = self.held_out_loss[self.best_epoch - 1 if self.best_epoch else -1] if self.held_out_loss else None
        return {
            "trained_on": int(len(self.train_idx)),
            "held_out": int(len(self.held_idx)),
            "epochs_run": self.epochs_run,
            "max_epochs": max_epochs,
            "stopping_epoch": self.best_epoch or self.epochs_run,
            "stopped": "early" if self.stopped_early else "max_epochs",
            "train_loss": [_round(x) for x in self.train_loss],
            "held_out_loss": [_round(x) for x in self.held_out_loss],
            "final_held_out_loss": _round(best) if best is not None else None,
        }


def _round(x: float) -> float:
    return float(f"{x:.5g}")


def judge(record: dict, baseline_loss: float | None) -> dict:
    """``record`` with its baseline's held-out loss and whether the model beats it."""
    loss = record["final_held_out_loss"]
    record["baseline"]["held_out_loss"] = _round(baseline_loss) if baseline_loss is not None else None
    if loss is None or baseline_loss is None or not math.isfinite(baseline_loss) or baseline_loss <= 0:
        record["beats_baseline"] = None  # nothing held out: nothing to judge by
        return record
    record["improvement"] = _round(1 - loss / baseline_loss)
    record["beats_baseline"] = bool(loss <= (1 - BASELINE_MARGIN) * baseline_loss)
    return record


def unigram_loss(ids: list[list[int]], train_idx, held_idx, vocab_size: int) -> float | None:
    """A causal LM's baseline: the cross-entropy (nats per token) of the held-out documents' next
    tokens under the training documents' token frequencies, add-one smoothed over the vocabulary."""
    targets = [t for i in held_idx for t in ids[i][1:]]
    if not targets:
        return None
    seen = [t for i in train_idx for t in ids[i]]
    counts = np.bincount(np.asarray(seen, dtype=np.int64), minlength=vocab_size)[:vocab_size] + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[np.asarray(targets, dtype=np.int64)].mean())


def prior_baseline(y: np.ndarray, train_idx, held_idx, num_labels: int) -> tuple[float | None, float | None]:
    """A classifier's baseline on the held-out examples: the cross-entropy of the training labels'
    prior (add-one smoothed), and the accuracy of always answering the most frequent label."""
    if not len(held_idx):
        return None, None
    counts = np.bincount(y[train_idx], minlength=num_labels) + 1.0
    p = counts / counts.sum()
    held = y[held_idx]
    return float(-np.log(p[held]).mean()), float((held == np.argmax(counts)).mean())


def train(
    model,
    batches_of,
    n: int,
    settings: TrainSettings,
    seed: int,
    loss_of,
    checkpoints: list | None = None,
    weight_of=None,
    report=None,
):
    """Adam on ``n`` examples with early stopping on a held-out share; returns the best model
    (lowest held-out loss) and a TrainRecord of how training went.

    ``batches_of(indices)`` builds a batch; ``loss_of(model, batch)`` is the mean batch loss;
    ``weight_of(batch)`` its weight in an epoch's mean loss (default: its examples; a causal LM's:
    its tokens, so that the epoch's loss is per token). ``report(epoch, step, steps, loss)``, if
    given, is told of each step (the live progress display).
    Stopping on held-out loss keeps a proxy in its early phase of training, before it memorises
    noisy labels (what EL2N needs to flag them; Paul et al. 2021). ``checkpoints``: if a list,
    each epoch's (learning rate, state) is appended (TracIn).
    """
    torch = _torch()
    weight_of = weight_of or (lambda batch: len(batch[0]))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    held = max(int(n * settings.holdout), 1) if n >= 10 else 0
    holdout, train_idx = order[:held], order[held:]
    record = TrainRecord(train_idx=train_idx, held_idx=holdout)
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    best, best_state, stale = math.inf, None, 0
    steps = -(-len(train_idx) // settings.batch_size)
    for epoch in range(1, settings.epochs + 1):
        model.train()
        shuffled = rng.permutation(train_idx)
        total = weight = 0.0
        for step, start in enumerate(range(0, len(shuffled), settings.batch_size), 1):
            batch = on_device(model, *batches_of(shuffled[start : start + settings.batch_size]))
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            opt.step()
            w = float(weight_of(batch))
            total, weight = total + loss.detach().item() * w, weight + w
            if report is not None:
                report(epoch, step, steps, total / max(weight, 1e-12))
        record.epochs_run = epoch
        record.train_loss.append(total / max(weight, 1e-12))
        if checkpoints is not None:
            checkpoints.append((settings.learning_rate, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        if not held:
            continue
        model.eval()
        with torch.no_grad():
            total = weight = 0.0
            for start in range(0, held, settings.batch_size * 4):
                batch = on_device(model, *batches_of(holdout[start : start + settings.batch_size * 4]))
                w = float(weight_of(batch))
                total, weight = total + float(loss_of(model, batch)) * w, weight + w
        held_loss = total / max(weight, 1e-12)
        record.held_out_loss.append(held_loss)
        if held_loss < best - 1e-6:
            best, stale, record.best_epoch = held_loss, 0, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                record.stopped_early = epoch < settings.epochs
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        if checkpoints is not None:
            del checkpoints[record.best_epoch :]  # TracIn sums over the path to the model that is kept
    model.eval()
    return model, record


# ---- moving models between workers ---------------------------------------------------------


def pack(objects: dict) -> bytes:
    """{name: model or tokenizer} -> one tar of their save_pretrained folders."""
    quiet_transformers()
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as d, tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, obj in objects.items():
            obj.save_pretrained(os.path.join(d, name))
            tar.add(os.path.join(d, name), arcname=name)
    return buffer.getvalue()


def unpack(data: bytes, folder: str) -> None:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(folder, filter="data")


def quiet_transformers() -> None:
    """No progress bars or load reports from transformers in a pipeline's workers."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(path: str):
    """A model saved by ``save_pretrained``: ours (the classifier) or any transformers causal LM."""
    quiet_transformers()
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type == CLASSIFIER:
        return _classifier_classes()[1].from_pretrained(path).to(device()).eval()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return model.to(device()).eval()


def train_small_lm(
    texts: list[str], folder: str, seed: int, vocab_size: int = 500, dim: int = 32, epochs: int = 2, context: int = 128
) -> None:
    """A small causal LM (GPT-2, one layer) and its BPE trained on ``texts``, saved with
    ``save_pretrained`` into ``folder`` (model and tokenizer together, the layout a hub model has):
    the "existing LMs" that tests and benchmarks of perplexity correlations load like any other."""
    torch = _torch()
    quiet_transformers()
    tok = train_tokenizer(texts, vocab_size)
    ids, _ = encode(tok, texts, context)
    ids = [i for i in ids if len(i) >= 2]
    model = new_causal_lm(len(tok), 1, dim, 2, context, seed)

    def loss_of(m, batch):
        losses, w, *_ = lm_token_losses(m, *batch, hidden=False)
        return (losses * w).sum() / w.sum().clamp(min=1)

    settings = TrainSettings(epochs=epochs, batch_size=16, learning_rate=3e-3, patience=epochs)
    model, _ = train(model, lambda idx: pad([ids[i] for i in idx]), len(ids), settings, seed, loss_of)
    with torch.no_grad():
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
