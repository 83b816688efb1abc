"""The ``beamsift`` command line.

    beamsift run CONFIG [--set dotted.key=value ...] [--overwrite] [-- BEAM_OPTIONS...]
    beamsift query OUTPUT_DIR "SQL"

Everything after ``--`` goes to Beam's PipelineOptions unchanged. Errors that are the user's to
fix (config, input, output folder, an impossible selection) exit with status 2 and one line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from beamsift.pipeline.config import ConfigError, load_config


class _DropBeamImportNotice(logging.Filter):
    """Importing Beam without its GCP extras logs a warning that concerns only BigQuery users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "apitools not found" not in record.getMessage()


class _DropReportedSelectionErrors(logging.Filter):
    """A SelectionError is the user's to fix and is reported in one line: Beam's worker log of
    it, with its traceback, would bury that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SelectionError" not in record.getMessage() and "SelectionError" not in str(record.exc_info)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger().addFilter(_DropBeamImportNotice())
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        if args.command == "run":
            return _run(args, beam_args)
        return _query(args)
    except UserError as e:
        print(f"beamsift: error: {e}", file=sys.stderr)
        return 2


class UserError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beamsift", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a selection pipeline from a YAML config")
    run.add_argument("config", help="YAML config (see configs/dsir.yaml)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output.dir")
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    query = sub.add_parser("query", help="SQL over a run's outputs (views selected, scores, rejected)")
    query.add_argument("output_dir")
    query.add_argument("sql")
    return parser


def _run(args, beam_args) -> int:
    from beamsift.pipeline.run import OutputExistsError, run_selection
    from beamsift.transforms.dsir import SelectionError
    from beamsift.transforms.read import InputError

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        raise UserError(str(e)) from None
    _quiet_logs(args.quiet)
    try:
        manifest = run_selection(cfg, overwrite=args.overwrite, beam_args=beam_args)
    except (InputError, OutputExistsError) as e:
        raise UserError(str(e)) from None
    except Exception as e:  # noqa: BLE001
        # A SelectionError is raised on a worker; runners re-raise it wrapped with a traceback.
        message = _find_selection_error(e, SelectionError)
        if message is None:
            raise
        raise UserError(message) from None
    print(summary_text(manifest))
    return 0


def _find_selection_error(e: BaseException, cls) -> str | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, cls):
            return str(e).split(" [while running", 1)[0].strip()
        text = str(e)
        marker = cls.__name__ + ": "
        if marker in text:
            line = text.split(marker, 1)[1].splitlines()[0]
            return line.split(" [while running", 1)[0].strip()
        e = e.__cause__ or e.__context__
    return None


def summary_text(manifest: dict) -> str:
    c = manifest["counts"]
    lines = [
        f"beamsift: wrote {manifest['config']['output']['dir']} in {manifest['timings']['total_s']:.1f} s",
        f"  input records   {c['input_records']:>10,}",
        f"  selected        {c['selected']:>10,}",
        f"  not selected    {c['not_selected']:>10,}"
        + "".join(f"\n    {k:<28}{v:>8,}" for k, v in c["not_selected_by_reason"].items()),
        f"  rejected        {c['rejected']:>10,}"
        + "".join(f"\n    {k:<28}{v:>8,}" for k, v in c["rejected_by_reason"].items()),
    ]
    kl = manifest["dsir"].get("kl")
    if kl:
        lines.append(
            f"  KL reduction    {kl['reduction']:>10.4f}  (KL(target||random) {kl['target_vs_random']:.4f}"
            f" -> KL(target||selected) {kl['target_vs_selected']:.4f})"
        )
    if c["accounted_for"] is False:
        lines.append("  WARNING: the counts do not add up to the input records")
    return "\n".join(lines)


def _query(args) -> int:
    import duckdb
    from beamsift.pipeline.query import QueryError, format_table, run_query

    try:
        columns, rows = run_query(args.output_dir, args.sql)
    except (QueryError, duckdb.Error) as e:
        raise UserError(str(e).splitlines()[0]) from None
    print(format_table(columns, rows))
    return 0


def _quiet_logs(quiet: bool) -> None:
    # Importing Beam configures the root logger; set levels on the loggers themselves.
    level = logging.ERROR if quiet else logging.WARNING
    for name in ("apache_beam", "root", ""):
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropReportedSelectionErrors())


if __name__ == "__main__":
    sys.exit(main())
