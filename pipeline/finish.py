"""The pipeline's own last step: write the manifest, then put the new result in the place of
``output.dir`` (``output.py``'s rules), on a worker.

It is a step of the job, not of the command that launched it, so that a Dataflow or Flink job
that outlives that command (``--no-wait``, a closed laptop) still publishes completely and
atomically, or not at all. It runs once every other write of the job is done: the summary it
starts from is a combine over every writer's output, and the writes that nothing downstream
reads (a stage's saved settings) are its side inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading

from apache_beam.io.filesystems import FileSystems
from beamsift.pipeline.build import make_chain
from beamsift.pipeline.diagnostics import diagnose, diagnostic_warnings
from beamsift.pipeline.manifest import (
    RunFacts,
    check_reject_share,
    ensure_every_output_has_a_shard,
    result_warnings,
    selection_manifest,
    train_manifest,
)
from beamsift.pipeline.output import MANIFEST, PendingOutput, files_under, remove_tree
from beamsift.pipeline.report import REPORT, build_report
from beamsift.pipeline.resume import RUN_FILE
from beamsift.transforms.chain.staging import write_parquet
from beamsift.transforms.io.examples import EXAMPLES_FILE, examples_table
from beamsift.transforms.io.schema import output_column


class FinishRun:
    """summary -> the manifest in the run's folder, then the folder published as ``output.dir``.

    A run that must not be published (``input.max_reject_share``, a file the user put into
    ``output.dir`` meanwhile) fails here with the reason, and ``output.dir`` stays as it was."""

    def __init__(self, cfg, out: str, folder: str, staging: str, facts: RunFacts, report: bool = True):
        self.cfg, self.out, self.folder, self.staging, self.facts = cfg, out, folder, staging, facts
        self.report = report  # build report.html here (where no command waits to build it)

    def __call__(self, summary: dict, *_writes_done) -> str:
        with _signals_deferred():  # a Ctrl-C now would land between two renames
            manifest = self._manifest(summary)
            if not self.cfg.train_only:
                self._examples_and_report(summary, manifest)
            # Every file of the result, so that a later --overwrite removes these and nothing else.
            manifest["files"] = [f for f in files_under(self.folder) if f != MANIFEST]
            with FileSystems.create(FileSystems.join(self.folder, MANIFEST)) as f:
                f.write(json.dumps(manifest, indent=2).encode())
            PendingOutput(self.out, self.folder).publish()
        return self.out

    def _manifest(self, summary: dict) -> dict:
        cfg = self.cfg
        # The run file first: a removal cut short leaves no folder that looks resumable.
        if FileSystems.exists(FileSystems.join(self.staging, RUN_FILE)):
            FileSystems.delete([FileSystems.join(self.staging, RUN_FILE)])
        remove_tree(self.staging)
        if cfg.train_only:
            manifest = train_manifest(cfg, summary, self.facts, self.folder)
        else:
            chain = make_chain(cfg, self.staging)
            ensure_every_output_has_a_shard(self.folder, chain, output_column(cfg["input.text_field"]))
            manifest = selection_manifest(cfg, summary, self.facts)
            check_reject_share(cfg, manifest)
        manifest["inputs"] = self.facts.inputs
        diagnose(manifest, summary)  # how the models trained; whether the ranked columns spread
        manifest["warnings"] = (
            list(self.facts.warnings)
            + diagnostic_warnings(manifest)
            + ([] if cfg.train_only else result_warnings(manifest))
        )
        return manifest

    def _examples_and_report(self, summary: dict, manifest: dict) -> None:
        """examples/ (the documents at both ends of every score) and report.html. The report is
        a view of the result, not part of it: where it cannot be built, the run still publishes,
        and a warning says why (``beamsift report`` builds it later)."""
        write_parquet(examples_table(summary.get("examples") or {}), FileSystems.join(self.folder, EXAMPLES_FILE))
        if not (self.cfg["output.report"] and self.report):
            return
        try:
            page = build_report(self.folder, manifest, title=self.out)
        except Exception as e:  # noqa: BLE001 - a chart that fails must not lose the run
            manifest["warnings"].append(f"report.html was not written ({type(e).__name__}: {e}); "
                                        f"`beamsift report {self.out}` builds it")  # fmt: skip
            return
        with FileSystems.create(FileSystems.join(self.folder, REPORT)) as f:
            f.write(page.encode("utf-8"))


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done, then act on them (in the main thread,
    where the in-process runner runs this step; elsewhere signals cannot be held)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            os.kill(os.getpid(), caught[0])
