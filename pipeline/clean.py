"""``beamsift clean OUTPUT_DIR``: remove what runs into ``OUTPUT_DIR`` left beside it.

A run that fails or is interrupted after some of its stages finished keeps its folder beside the
output (``.NAME.beamsift-tmp-ID``) so that the same command resumes after them (``resume.py``).
This removes those folders, and any other that a killed run of this machine left, never one whose
run is still going, and never the output itself.
"""

from __future__ import annotations

import argparse

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from beamsift.pipeline.output import abandoned_runs, is_local, remove_tree
from beamsift.pipeline.resume import finished_stages, read_run_file

HELP = "remove the finished stages that interrupted runs into an output folder kept to resume from"
HELP_DESCRIPTION = (
    "Remove the folders that failed or interrupted runs into OUTPUT_DIR kept beside it (their finished "
    "stages, for the same command to resume after), and what killed runs left there. The output itself, "
    "a run still going (a job on Dataflow or Flink included) and anything beamsift did not write stay."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output.dir of the runs")


def main(args: argparse.Namespace) -> int:
    out = args.output_dir.rstrip("/") or args.output_dir
    if not is_local(out):  # boto3 and Google's libraries take the endpoint and keys from the environment
        FileSystems.set_options(PipelineOptions([]))
    try:
        runs = abandoned_runs(out)
        _remove(runs)
    except Exception as e:  # noqa: BLE001 - an unreachable bucket, a permission: the user's to fix
        from beamsift.pipeline.query import QueryError

        raise QueryError(f"{out}: cannot clean beside it: {type(e).__name__}: {e}") from None
    if not runs:
        print(f"beamsift: nothing to clean beside {out}")
    return 0


def _remove(runs: list) -> None:
    for path, _ in runs:
        run = read_run_file(path) or {}
        stages = finished_stages(FileSystems.join(path, "_staging"), run.get("stages", []))
        kept = f"kept after {stages[-1]}" if stages else "left by a killed run"
        size = _size(path)
        remove_tree(path)
        print(f"beamsift: removed {path} ({kept}; {size / 1e6:,.1f} MB)")


def _size(path: str) -> int:
    """The bytes under ``path`` (one listing)."""
    found = FileSystems.match([path.rstrip("/") + "/**"])[0].metadata_list
    return sum(m.size_in_bytes for m in found)
