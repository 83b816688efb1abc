"""Live progress on a terminal: documents per stage, rate, elapsed time, and a bar for reading.

The workers write running totals into a local folder (``transforms/chain/meter.py``); a thread here
sums them a few times a second and redraws one line on the terminal. A stage that is training
a model (before it has documents to count) shows what it trains: the model, its seed, the epoch
and step, and the running training loss.
"""

from __future__ import annotations

import json
import os
import threading
import time

LABELS = {"write": "written"}


def read_totals(folder: str) -> dict[str, dict]:
    """{stage: {"docs": n, "bytes": n}} summed over the progress files in ``folder``; with
    ``"state"`` (what it is training) where a worker reports one."""
    totals: dict[str, dict[str, int]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return totals
    for name in names:
        if not name.endswith(".json"):
            continue
        stage = name.split(".", 1)[0]
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                part = json.load(f)
        except (OSError, ValueError):
            continue  # being replaced right now: next time
        entry = totals.setdefault(stage, {"docs": 0, "bytes": 0})
        entry["docs"] += int(part.get("docs", 0))
        entry["bytes"] += int(part.get("bytes", 0))
        if part.get("state"):
            entry["state"] = part["state"]
    return totals


def describe_state(state: dict) -> str:
    """A training step as a few words: ``training proxy-0 (seed 0) epoch 2/10 step 14/29 loss 5.31``."""
    model = state.get("model", "model")
    if "epoch" not in state:
        return f"training {model}"
    text = f"training {model}"
    if "seed" in state:
        text += f" (seed {state['seed']})"
    text += f" epoch {state['epoch']}/{state.get('epochs', '?')}"
    if "step" in state:
        text += f" step {state['step']}/{state.get('steps', '?')}"
    if state.get("loss") is not None:
        text += f" loss {float(state['loss']):.3f}"
    return text


def terminal_width(stream, default: int = 100) -> int:
    """The width of the terminal ``stream`` writes to; else $COLUMNS; else ``default``.

    Asked of the stream's own descriptor: stdout may be a pipe while the line goes to stderr."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        pass
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else default


def render(totals: dict, total_bytes: int, elapsed: float, rates: dict[str, float], width: int, stages=()) -> str:
    parts = []
    read = totals.get("read", {"docs": 0, "bytes": 0})
    if total_bytes:
        share = min(read["bytes"] / total_bytes, 1.0)
        filled = int(share * 16)
        parts.append(f"[{'#' * filled}{'.' * (16 - filled)}] {share:4.0%}")
    idle = []  # the parts of stages that have not begun: the first to go on a narrow terminal
    for stage in ["read", *stages, "write"]:
        entry = totals.get(stage, {})
        docs = entry.get("docs", 0)
        if entry.get("state") and not docs:
            parts.append(f"{LABELS.get(stage, stage)} {describe_state(entry['state'])}")
            continue
        text = f"{LABELS.get(stage, stage)} {docs:,}"
        if stage in rates:
            text += f" ({_short(rates[stage])} docs/s)"
        parts.append(text)
        if not docs:
            idle.append(text)
    return fit(parts, idle, f"{int(elapsed // 60)}:{int(elapsed % 60):02d}", width)


def fit(parts: list[str], idle: list[str], clock: str, width: int) -> str:
    """The parts and the clock joined by " | " in fewer than ``width`` characters (a line as
    wide as the terminal wraps): idle parts dropped first, then the middle cut with "…"; the
    clock always stays."""
    line = " | ".join([*parts, clock])
    if len(line) < width:
        return line
    busy = [p for p in parts if p not in idle]
    line = " | ".join([*busy, clock])
    if len(line) < width:
        return line
    tail = "… | " + clock
    room = width - 1 - len(tail)
    if room < 1:
        return clock[: max(width - 1, 1)]
    return " | ".join(busy)[:room] + tail


def _short(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:,.0f}"


class ProgressDisplay:
    """A context manager: one line on ``stream``, redrawn until the block ends, then cleared."""

    def __init__(self, stream, folder: str, total_bytes: int, stages=(), interval: float = 0.25):
        self.stream = stream
        self.stages = list(stages)
        self.folder = folder
        self.total_bytes = total_bytes
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._first_seen: dict[str, float] = {}
        self._last_change: dict[str, tuple[float, int]] = {}

    def __enter__(self):
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)
        self.draw()  # the final counts, for a log that keeps what a terminal erases
        self.stream.write("\r\x1b[K")
        self.stream.flush()
        return False

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.draw()

    def draw(self) -> None:
        now = time.time()
        totals = read_totals(self.folder)
        rates = {}
        for stage in ["read", *self.stages, "write"]:
            docs = totals.get(stage, {}).get("docs", 0)
            if docs and stage not in self._first_seen:
                self._first_seen[stage] = now - self.interval  # it began within the last interval
            if docs and self._last_change.get(stage, (0, 0))[1] != docs:
                self._last_change[stage] = (now, docs)
            if stage in self._first_seen:
                t_last, _ = self._last_change[stage]
                if t_last - self._first_seen[stage] >= 1:
                    rates[stage] = docs / (t_last - self._first_seen[stage])
        width = terminal_width(self.stream)
        line = render(totals, self.total_bytes, now - self.started, rates, width, self.stages)
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
