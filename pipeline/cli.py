"""The ``beamsift`` command line.

    beamsift run CONFIG [--set dotted.key=value ...] [--overwrite] [--quiet] [-- BEAM_OPTIONS...]
    beamsift query OUTPUT_DIR "SQL" [--format table|csv|json|markdown] [--max-width N]
    beamsift train CONFIG [--set dotted.key=value ...] [--overwrite] [--quiet] [-- BEAM_OPTIONS...]
    beamsift export OUTPUT_DIR (--to-hf PATH | --to-jsonl PATH) [--columns A,B] [--shard-docs N] [--gzip]
    beamsift report OUTPUT_DIR [-o FILE]
    beamsift init [PATH]

Everything after ``--`` goes to Beam's PipelineOptions unchanged. Errors that are the user's to
fix (config, input, output folder, an impossible selection) exit with status 2 and one line;
Ctrl-C exits with 130 and SIGTERM with 143, after removing what the run had written.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback


class _DropBeamImportNotice(logging.Filter):
    """Importing Beam without its GCP extras logs a warning that concerns only BigQuery users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


def _import_beam_without_pandas() -> None:
    """Import Beam as if pandas were not installed. Beam imports pandas (~0.2 s, a tenth of its
    import) where it is installed (``datasets`` brings it), for the types of its DataFrame API,
    which beamsift does not use; without it Beam leaves that API out. pandas stays importable
    afterwards (``export --to-hf``)."""
    if "pandas" in sys.modules or "apache_beam" in sys.modules:
        return
    sys.modules["pandas"] = None  # an ImportError to whoever imports it meanwhile
    try:
        import apache_beam  # noqa: F401
    finally:
        del sys.modules["pandas"]


# Before the config, which imports the stages and with them Beam.
logging.getLogger().addFilter(_DropBeamImportNotice())
_import_beam_without_pandas()

from beamsift.pipeline.config import ConfigError, load_config, read_yaml  # noqa: E402
from beamsift.transforms.chain.heap import glibc  # noqa: E402

TEMPLATE = "dsir.yaml"


class UserError(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the same clean-up as for Ctrl-C runs."""


class _DropReportedErrors(logging.Filter):
    """A SelectionError (or an InputError, an OutputDirError that the job's last step raises) is
    the user's to fix and is reported in one line: Beam's worker log of it, with its traceback,
    would bury that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + str(record.exc_info)
        return not any(name in text for name in ("SelectionError", "InputError", "OutputDirError"))


def _fewer_malloc_arenas(arenas: int = 2) -> None:
    """At most ``arenas`` glibc malloc arenas in this process and in the worker processes a local
    runner starts (they inherit the variable). Every thread that allocates gets an arena of its
    own by default (up to 8 a core), and what a thread frees stays in its arena: Beam's gRPC and
    bundle threads then hold the peak of every transfer. Measured with DSIR on two workers from
    100k to 1M documents (``benchmarks/scale.py``): the process tree's peak RSS +21-28% by
    default, +9% with 2 arenas, the same wall time. A value the user set is kept."""
    os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    libc = glibc()
    if libc is not None:
        with contextlib.suppress(AttributeError, ValueError):  # no mallopt, or the user's value no number
            libc.mallopt(-8, int(os.environ["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX


def main(argv: list[str] | None = None) -> int:
    # torch makes its (here unused) compiler cache folder in the temp dir on first use; a run
    # leaves nothing there, so it goes to the user's cache folder (worker processes inherit this).
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "beamsift", "torchinductor"))
    _fewer_malloc_arenas()
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    try:
        if args.command == "run":
            return _run(args, beam_args)
        if args.command == "init":
            return _init(args)
        if args.command == "train":
            return _run(args, beam_args, train=True)
        return _command(args)  # query, report, export
    except UserError as e:
        print(f"beamsift: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`beamsift ... | head`): nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated) or _signals_received[-1:] == [signal.SIGTERM]
        what = "terminated" if terminated else "interrupted"
        kept = f"; {e.args[0]}" if e.args and isinstance(e.args[0], str) else ""
        print(f"beamsift: {what}; nothing was published, and output.dir is as it was{kept}", file=sys.stderr)
        status = 143 if terminated else 130
        if as_program:
            _exit_despite_lingering_threads(status)
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_signals_received: list[int] = []


def _exit_despite_lingering_threads(status: int) -> None:
    """Exit now if a thread would hold the interpreter's exit: Beam's state sampler thread, for
    one, keeps running when an interrupt cuts a bundle short, and the command would never end."""
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if others:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _on_signal(signum, frame):
    # Raised where the program is; Beam may wrap it in its own error, so it is also recorded.
    _signals_received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("beamsift")
    except metadata.PackageNotFoundError:
        return "unknown"


def template_path() -> str:
    """The commented template config shipped with the package (the repository's configs/)."""
    from importlib import resources

    return str(resources.files("beamsift.configs") / TEMPLATE)


RUN_EPILOG = """\
overriding keys:
  --set dotted.key=value  overrides one key of CONFIG; the value is YAML (5000, 0.1, null,
                          [a, b]). Repeat it for more keys. Setting select.k replaces a
                          select.fraction that CONFIG sets, and the other way round.
  -- BEAM_OPTIONS         everything after a lone -- goes to Beam's PipelineOptions, e.g.
                          -- --direct_running_mode=multi_processing --direct_num_workers=2
                          -- --runner=PortableRunner --job_endpoint=embed --environment_type=LOOPBACK

output.dir:
  A run writes into a new folder beside output.dir and puts it in place only when it is
  complete: an error, Ctrl-C or a kill leaves the earlier result as it was. An output.dir
  that holds anything beamsift did not write (or an input) is refused; beamsift never
  deletes your files.

the config:
  Every key, commented, is in the template: {template}
  `beamsift init my.yaml` copies it for you to edit.
"""


def _parser() -> argparse.ArgumentParser:
    from beamsift.pipeline import clean, export, query, report

    parser = argparse.ArgumentParser(prog="beamsift", description="Data selection for ML training on Apache Beam.")
    parser.add_argument("--version", action="version", version=f"beamsift {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{run,train,query,report,export,init}")
    run = sub.add_parser(
        "run",
        help="run a selection pipeline from a YAML config",
        description="Read, score and select a corpus as CONFIG says; write selected/, scores/, "
        "rejected/, artifacts/ and manifest.json to output.dir.",
        epilog=RUN_EPILOG.format(template=template_path()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="YAML config (a template: `beamsift init`)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier beamsift result in output.dir")
    run.add_argument(
        "--check",
        action="store_true",
        help="check the config, the inputs, output.dir and saved models, estimate each stage's time from a sample "
        "run of the first records, and stop: nothing is written to output.dir",
    )
    run.add_argument(
        "--check-sample",
        type=query.whole_number(1),
        default=500,
        metavar="N",
        help="--check: records of the sample run (500)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="run even when output.dir already holds this run's result (same inputs, config and version)",
    )
    run.add_argument("--quiet", action="store_true", help="print only the summary: no progress, no Beam logs")
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show live progress (default: on a terminal, for local runners)",
    )
    run.add_argument(
        "--runner-config",
        metavar="FILE",
        help="a runner's option set (configs/runners/*.yaml): its beam section replaces the config's",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="Dataflow, Flink: submit the job and return; the job publishes output.dir itself when it is done",
    )
    q = sub.add_parser(
        "query",
        help=query.HELP,
        description=query.HELP_DESCRIPTION,
        epilog=query.HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_arguments(q)
    report.add_arguments(
        sub.add_parser(
            "report",
            help="build report.html for an earlier output (local or in a bucket)",
            description="Build OUTPUT_DIR/report.html again: the counts as a funnel, every score's histogram "
            "with the selection marked, the selection's make-up by category and cluster, the documents at both "
            "ends of every score, the time of each stage. One self-contained file.",
        )
    )
    export.add_arguments(sub.add_parser("export", help=export.HELP, description=export.HELP_DESCRIPTION))
    clean.add_arguments(sub.add_parser("clean", help=clean.HELP, description=clean.HELP_DESCRIPTION))
    train = sub.add_parser(
        "train",
        help="train the models of a config's first model stage once, to reuse with proxy.model",
        description="Run CONFIG's stages up to its first model stage (proxy or excess_loss), train its models "
        "on the sample as `run` would, and save them under output.dir/artifacts/<stage>/ without scoring the "
        "pool. A later run applies them with proxy.model (or excess_loss.model) set to that folder.",
    )
    train.add_argument("config", help="YAML config with a proxy or excess_loss stage")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier beamsift result in output.dir")
    train.add_argument("--quiet", action="store_true", help="print only the summary")
    train.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    init = sub.add_parser(
        "init",
        help="write a commented template config to edit",
        description=f"Copy the commented template config ({template_path()}) to PATH.",
    )
    init.add_argument("path", nargs="?", default="beamsift.yaml", help="where to write it (default: beamsift.yaml)")
    return parser


def _init(args) -> int:
    import shutil

    if os.path.exists(args.path):
        raise UserError(f"{args.path} already exists; give another path")
    try:
        shutil.copyfile(template_path(), args.path)
    except OSError as e:
        raise UserError(f"cannot write {args.path}: {e.strerror}") from None
    print(f"beamsift: wrote {args.path}; edit input.path, target.path and output.dir, then run:")
    print(f"  beamsift run {args.path}")
    return 0


def _run(args, beam_args, train: bool = False) -> int:
    try:
        cfg = load_config(args.config, _runner_overrides(getattr(args, "runner_config", None)) + args.set)
        if train:
            cfg = training_config(cfg)
    except ConfigError as e:
        raise UserError(str(e)) from None
    _quiet_logs(args.quiet)
    from beamsift.pipeline.output import OutputDirError
    from beamsift.pipeline.run import find_error, run_selection
    from beamsift.transforms.io.read import InputError
    from beamsift.transforms.stages.dsir import SelectionError

    if getattr(args, "check", False):
        from beamsift.pipeline.check import run_check

        try:
            return run_check(cfg, args, _runner_overrides(getattr(args, "runner_config", None)) + args.set, beam_args)
        except (InputError, OutputDirError, SelectionError) as e:
            raise UserError(str(e)) from None
    show_progress = args.progress if args.progress is not None else (not args.quiet and sys.stderr.isatty())
    progress = _progress_display if show_progress else None
    log_path = os.path.join(tempfile.gettempdir(), f"beamsift-{os.getpid()}.log")
    keep_log = False  # only where the error line points at it
    kept: list[str] = []  # the line that says which finished stages a failed run kept
    try:
        with _workers_stderr_to(log_path if (args.quiet or show_progress) else None):
            wait = not getattr(args, "no_wait", False)
            manifest = run_selection(cfg, overwrite=args.overwrite, beam_args=beam_args, progress=progress, wait=wait,
                                     force=getattr(args, "force", False), on_kept=kept.append)  # fmt: skip
    except (InputError, OutputDirError) as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(*kept) from None
    except Exception as e:  # noqa: BLE001
        if _signals_received:  # a signal that Beam re-raised as its own error
            raise KeyboardInterrupt(*kept) from None
        # A SelectionError is raised on a worker; runners re-raise it wrapped with a traceback.
        message = find_error(e, SelectionError)
        if message is not None:
            raise UserError(message) from None
        with open(log_path, "a", encoding="utf-8") as f:
            traceback.print_exc(file=f)
        keep_log = True
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        also = f"; {kept[0]}" if kept else ""
        raise UserError(f"the run failed: {last[:300]} (the full traceback is in {log_path}){also}") from None
    finally:
        if not keep_log:
            with contextlib.suppress(OSError):
                os.remove(log_path)
    if manifest.get("unchanged"):
        print(
            f"beamsift: {manifest['output']} already holds this run's result (the same inputs, config and beamsift "
            f"version: fingerprint {manifest['fingerprint']}); nothing to do. --force runs it again"
        )
        return 0
    if manifest.get("dry_run"):
        print(
            f"beamsift: dry run: the job translated for {manifest['runner']} ({manifest['transforms']} transforms); "
            "nothing ran and nothing was written"
        )
        return 0
    if manifest.get("submitted"):
        job = f" as job {manifest['job']}" if manifest.get("job") else ""
        print(
            f"beamsift: submitted to {manifest['runner']}{job} ({manifest['transforms']} transforms); not waiting. "
            f"When it is done, the job itself publishes the result to {manifest['output']} "
            f'(its manifest.json last): beamsift query {manifest["output"]} "SELECT count(*) FROM selected"'
        )
        return 0
    if train:
        stage = cfg["stages"][-2]
        folder = os.path.join(cfg["output.dir"], "artifacts", stage)
        print(f"beamsift: trained the {stage} stage's models in {manifest['timings']['total_s']:.1f} s: {folder}")
        print(f"  apply them with --set {stage}.model={folder} (or {stage}.model: in the config)")
        from beamsift.pipeline.diagnostics import training_lines

        for line in training_lines(manifest) + [f"  WARNING: {w}" for w in manifest.get("warnings", [])]:
            print(line)
        return 0
    print(summary_text(manifest))
    return 0


def _runner_overrides(path: str | None) -> list[str]:
    """``--runner-config FILE``: its ``beam`` section as overrides (``--set`` still wins)."""
    if path is None:
        return []
    import json

    raw = read_yaml(path, f"--runner-config {path}")
    if not isinstance(raw, dict) or set(raw) != {"beam"} or not isinstance(raw["beam"], dict):
        raise ConfigError(
            f"--runner-config {path}: expected one section, beam (runner, options), as in configs/runners/"
        )
    beam = raw["beam"]
    unknown = set(beam) - {"runner", "options"}
    if unknown:
        raise ConfigError(f"--runner-config {path}: beam has only runner and options, not {sorted(unknown)}")
    out = [f"beam.runner={beam['runner']}"] if "runner" in beam else []
    return out + ([f"beam.options={json.dumps(beam['options'])}"] if "options" in beam else [])


def training_config(cfg):
    """``cfg`` cut after its first model stage, selecting nothing, with scoring switched off."""
    import dataclasses

    from beamsift.transforms.stages import STAGES, stage_of

    stages = cfg["stages"]
    model_stages = [i for i, name in enumerate(stages) if stage_of(name).trains]
    if not model_stages:
        kinds = " or ".join(kind for kind, s in STAGES.items() if s.trains)
        raise ConfigError(f"{cfg.source}: `beamsift train` needs a {kinds} stage in 'stages' (got {stages})")
    data = cfg.to_dict()
    data["stages"] = stages[: model_stages[0] + 1] + ["select"]
    data["select"].update({"method": "all", "k": None, "fraction": None})
    return dataclasses.replace(cfg, data=data, train_only=True)


def _progress_display(folder: str, total_bytes: int, stages: list[str]):
    from beamsift.pipeline.progress import ProgressDisplay

    return ProgressDisplay(_terminal, folder, total_bytes, stages)


class _SavedStderr:
    """Where our own messages go while fd 2 is redirected: the terminal's original stderr."""

    stream = sys.stderr

    def write(self, text):
        self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def fileno(self):
        return self.stream.fileno()  # the progress line asks the terminal its width


_terminal = _SavedStderr()


@contextlib.contextmanager
def _workers_stderr_to(path: str | None):
    """Send fd 2 (Beam's logs, and the worker processes', which inherit it) to a log file, while
    our own progress line keeps the real stderr."""
    if path is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    _terminal.stream = os.fdopen(os.dup(saved), "w", encoding="utf-8", errors="replace")
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            _terminal.stream.close()
            _terminal.stream = sys.stderr


def summary_text(manifest: dict) -> str:
    from beamsift.pipeline.diagnostics import training_lines

    c = manifest["counts"]
    out = manifest["config"]["output"]["dir"]
    width = max([14, *(len(k) for k in c["not_selected_by_reason"]), *(len(k) for k in c["rejected_by_reason"])])
    lines = [
        f"beamsift: selected {c['selected']:,} of {c['input_records']:,} input records "
        f"in {manifest['timings']['total_s']:.1f} s{_resumed_note(manifest)}",
        f"  {'selected':<{width + 2}}{c['selected']:>10,}",
        f"  {'not selected':<{width + 2}}{c['not_selected']:>10,}",
        *(f"    {k:<{width}}{v:>10,}" for k, v in c["not_selected_by_reason"].items()),
        f"  {'rejected':<{width + 2}}{c['rejected']:>10,}",
        *(f"    {k:<{width}}{v:>10,}" for k, v in c["rejected_by_reason"].items()),
    ]
    kl = manifest.get("dsir", {}).get("kl")
    if kl:
        gap = kl["target_vs_random"]
        share = f"{kl['reduction'] / gap:.0%} of the way" if gap > 0 else "no gap"
        lines.append(
            f"  KL reduction    {kl['reduction']:>10.4f}  the selection's n-grams are that much closer to the "
            f"target's than a random pick's\n"
            f"                              (KL {gap:.4f} -> {kl['target_vs_selected']:.4f}, {share} to the target; "
            "0 = no better than random, higher is better)"
        )
    runner = manifest.get("runner", {})
    if runner.get("workers_chosen_by") == "beamsift":
        if runner.get("workers", 1) > 1:
            lines.append(
                f"  runner          {runner['name']}, {runner['workers']} worker processes (this machine's cores; "
                "-- --direct_num_workers=1 for one)"
            )
        elif runner.get("threads", 1) > 1:
            lines.append(
                f"  runner          {runner['name']}, one process featurizing on {runner['threads']} threads (this "
                "machine's cores; a larger input gets a process per core)"
            )
    lines += training_lines(manifest)
    lines += [f"  WARNING: {w}" for w in manifest.get("warnings", [])]
    if manifest.get("clusters"):
        sizes = [cl["size"] for cl in manifest["clusters"]]
        covered = sum(1 for cl in manifest["clusters"] if cl["selected"])
        lines.append(
            f"  clusters        {len(sizes):>10,}  {min(sizes):,} to {max(sizes):,} documents each; "
            f"the selection draws on {covered} of them (clusters/)"
        )
    pc = manifest.get("perplexity_correlations")
    if pc and pc.get("per_document"):
        lines.append(
            f"  documents       {pc['documents']:>10,}  weighed one by one by perplexity correlations (no domain "
            f"field); {pc['included']:,} kept by the projection: {pc['budget_tokens']:,.0f} of {pc['tokens']:,} tokens"
        )
    elif pc:
        lines.append(
            f"  domains         {pc['domains']:>10,}  weighed by perplexity correlations; {pc['included']} included "
            "(domains/)"
        )
    if manifest.get("quad"):
        q = manifest["quad"]
        lines.append(
            f"  quad            {q['rounds']:>10,}  rounds; {q['blocks_probed']} blocks probed, {q['blocks_chosen']} "
            f"chosen, {q['blocks_filled']} filled; {q['documents_scored']:,} documents scored"
        )
    clusters = "clusters/ (one row per cluster), " if "clusters" in manifest else ""
    if pc and not pc.get("per_document"):
        clusters += "domains/ (one row per domain), "
    lines += [
        f"  outputs         {out}/  selected/ (documents), scores/ (every document's scores), {clusters}rejected/, "
        "manifest.json",
        f'  next            beamsift query {out} "SELECT reason, count(*) AS n FROM scores GROUP BY 1 ORDER BY n DESC"',
    ]
    return "\n".join(lines)


def _resumed_note(manifest: dict) -> str:
    stages = manifest.get("resumed", {}).get("stages")
    if not stages:
        return ""
    kept = f"{len(stages)} finished stages" if len(stages) > 1 else "its first stage"
    return f" (resumed after {stages[-1]}: {kept} kept by an interrupted run)"


def _command(args) -> int:
    """``query``, ``report`` or ``export``: its module's ``main``, whose own error is the user's to fix."""
    import importlib

    from beamsift.pipeline.export import ExportError
    from beamsift.pipeline.query import QueryError

    main_of = importlib.import_module(f"beamsift.pipeline.{args.command}").main
    try:
        return main_of(args)
    except (QueryError, ExportError) as e:
        raise UserError(str(e)) from None


def _quiet_logs(quiet: bool) -> None:
    # Importing Beam configures the root logger; set levels on the loggers themselves.
    level = logging.ERROR if quiet else logging.WARNING
    for name in ("apache_beam", "root", ""):
        logging.getLogger(name).setLevel(level)
    logging.basicConfig()  # the handler that Beam would add on its first log line, filtered from the start
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropReportedErrors())


def entry() -> None:
    """The ``beamsift`` command: ``main()``, then a quick exit. Python's own exit tears down every
    module and frees every object one at a time (0.3-0.5 s after a run that held 500 MB); the
    kernel frees a process's memory at once. The exit handlers still run (temporary folders,
    logging), and a thread still at work (none, after any command) gets the usual exit."""
    code = main()
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
