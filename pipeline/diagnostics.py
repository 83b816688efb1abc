"""Whether a run's scores can be trusted: how its models trained, and whether the columns that its
filters and selector rank on spread enough to rank.

The proxy and excess-loss stages report each model's training (``transforms/models/``
TrainRecord, judged against a baseline that needs no training: the unigram token frequencies of
the same tokenizer for a causal LM, the label prior for a classifier); the filters and the
selector sum their ranking column's spread over the documents they rank (``transforms/chain/``
``column_spread``). This module turns both into the manifest's ``training`` and each stage's
``ranked_by``, and into the summary's lines and warnings.
"""

from __future__ import annotations

from beamsift.transforms.models import BASELINE_MARGIN

# A ranking column "has too little spread to rank" below either: its values differ by less than
# 1% of their mean, or there are so few of them that ties (broken by the seeded id hash) decide.
MIN_CV = 0.01
MIN_DISTINCT = 10

BASELINE_NAMES = {"unigram": "the unigram token frequencies", "label prior": "the label prior"}


def training_report(summary: dict) -> list[dict]:
    """Every model the run trained, stage by stage: the manifest's ``training``."""
    return [{"stage": stage, **record} for stage, records in summary.get("training", {}).items() for record in records]


def add_spread(stages: list[dict], spread: dict) -> None:
    """Each filter's and the selector's ranking column's spread, as its stage entry's ``ranked_by``."""
    for entry in stages:
        for column, s in spread.get(entry["name"], {}).items():
            entry["ranked_by"] = {"column": column, **s, "enough_spread": enough_spread(s)}


def enough_spread(s: dict) -> bool | None:
    if not s["documents"]:
        return None
    if s["distinct_values"] < min(MIN_DISTINCT, s["documents"]):
        return False
    return s["cv"] is None or s["cv"] >= MIN_CV


def training_lines(manifest: dict) -> list[str]:
    """One summary line per trained model."""
    lines = []
    for r in manifest.get("training", []):
        stop = f"stopped early, kept epoch {r['stopping_epoch']}" if r["stopped"] == "early" else "all epochs"
        text = f"  training        {r['stage']}/{r['model']}: {r['epochs_run']} of {r['max_epochs']} epochs ({stop}); "
        loss, base = r["final_held_out_loss"], r["baseline"]["held_out_loss"]
        if loss is None or base is None:
            text += "no held-out documents to measure it on"
        else:
            text += f"held-out loss {loss:.3f} vs {base:.3f} for {r['baseline']['name']} ({r['loss_unit']}), "
            text += f"{abs(r['improvement']):.0%} {'lower' if r['improvement'] >= 0 else 'higher'}"
            if r.get("held_out_accuracy") is not None:
                text += f"; accuracy {r['held_out_accuracy']:.0%} vs {r['baseline']['accuracy']:.0%} (majority label)"
        lines.append(text)
    return lines


def training_warnings(manifest: dict) -> list[str]:
    """One line per model that is not clearly better than its baseline."""
    out = []
    for r in manifest.get("training", []):
        where = f"the {r['stage']} stage's model {r['model']}"
        if r["beats_baseline"] is None:
            out.append(
                f"{where} had no held-out documents (it trained on {r['trained_on']}): nothing shows that it "
                f"learned anything; raise proxy.sample (10 documents at least)"
            )
        elif not r["beats_baseline"]:
            baseline = BASELINE_NAMES.get(r["baseline"]["name"], r["baseline"]["name"])
            out.append(
                f"{where} is not clearly better than {baseline}: held-out loss {r['final_held_out_loss']:.3f} vs "
                f"{r['baseline']['held_out_loss']:.3f} {r['loss_unit']} (it needs {BASELINE_MARGIN:.0%} lower), so "
                f"its scores may rank noise; train it more (proxy.epochs, proxy.sample, proxy.learning_rate)"
            )
    return out


def spread_warnings(manifest: dict) -> list[str]:
    """One line per filter or selector whose ranking column barely varies over what it ranks."""
    out = []
    for entry in manifest.get("stages", []):
        s = entry.get("ranked_by")
        if not s or s["enough_spread"] is not False:
            continue
        what = f"the {entry['name']} stage ranks {s['documents']:,} documents by {s['column']}"
        if s["distinct_values"] < min(MIN_DISTINCT, s["documents"]):
            out.append(
                f"{what}, which has only {s['distinct_values']} distinct value(s): ties, broken at random, "
                "decide most of its ranking"
            )
        else:
            out.append(
                f"{what}, whose values barely differ (mean {s['mean']:.4g}, std {s['std']:.2g}, {s['cv']:.2%} of the "
                f"mean; under {MIN_CV:.0%}): its ranking is close to arbitrary"
            )
    return out


def diagnose(manifest: dict, summary: dict) -> None:
    """Add the run's ``training`` and each ranking stage's ``ranked_by`` to ``manifest``."""
    training = training_report(summary)
    if training:
        manifest["training"] = training
    add_spread(manifest.get("stages", []), summary.get("spread", {}))


def diagnostic_warnings(manifest: dict) -> list[str]:
    return training_warnings(manifest) + spread_warnings(manifest)
