"""Running a selection: check the inputs and the output folder, run the pipeline into a new
folder beside ``output.dir``, and publish it in one step when it is complete.

What can be checked before reading the corpus is checked first (the files, the fields of the
first records, a ``k`` the input's size already rules out, whether ``output.dir`` may be
written), so that a mistake costs a second, not a run. The output folder's rules, and why a
failed or interrupted run leaves the previous result as it was, are in ``output.py``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions, TestOptions
from beamsift.pipeline.build import MODEL_FILE, build_pipeline, input_spec
from beamsift.pipeline.config import Config
from beamsift.pipeline.finish import FinishRun
from beamsift.pipeline.manifest import RunFacts, add_metrics
from beamsift.pipeline.output import (
    MANIFEST,
    STAGING,
    OutputDirError,
    PendingOutput,
    abandoned_runs,
    check_output_dir,
    is_local,
    write_whole,
)
from beamsift.pipeline.report import REPORT, write_report
from beamsift.pipeline.resume import (
    code_version,
    describe_kept,
    finished_stages,
    read_run_file,
    write_run_file,
)
from beamsift.pipeline.saved import check_saved_models, check_target_labels
from beamsift.transforms.chain.meter import NAMESPACE
from beamsift.transforms.featurize import load_kernels_meanwhile
from beamsift.transforms.io.read import InputError, check_fields, expand_input, max_records, plan_read_tasks
from beamsift.transforms.stages import stage_kind, stage_of
from beamsift.transforms.stages.dsir import SelectionError, load_fitted_counts

OutputExistsError = OutputDirError  # the name earlier versions used

# Runners whose workers share this machine's disk, so that progress can travel through files.
LOCAL_RUNNERS = {"FnApiRunner", "DirectRunner", "SwitchingDirectRunner", "PortableRunner"}
# The local runners that run the job inside this command (the PortableRunner may hand it to Flink).
IN_PROCESS_RUNNERS = LOCAL_RUNNERS - {"PortableRunner"}

log = logging.getLogger("beamsift")


def run_selection(
    cfg: Config,
    overwrite: bool = False,
    beam_args: list[str] = (),
    progress=None,
    wait: bool = True,
    force: bool = False,
    check_only: bool = False,
    on_kept=None,
) -> dict:
    """Run the pipeline that ``cfg`` describes; return the manifest (also written to disk).

    A run whose fingerprint (``fingerprint``) equals the one of the result already in
    ``output.dir`` does no work and returns ``{"unchanged": True, ...}``; ``force`` runs it
    again (and replaces that result, as ``overwrite`` would). ``check_only``: make every check a
    run makes before it starts, then return what was found (``beamsift run --check``).

    ``progress``: a callable ``(progress_dir, total_bytes) -> context manager`` that shows live
    progress from the files that the workers write into ``progress_dir`` (see
    ``transforms/chain/meter.py``); None for no progress.

    A run that fails or is interrupted after some stages finished keeps them beside ``output.dir``
    (``resume.py``) and calls ``on_kept`` with a line that says so; the same run again resumes
    after the last of them.
    """
    started = time.time()
    options = pipeline_options(cfg, beam_args)
    # Beam's FileSystems learn an object store's endpoint and keys (--s3_endpoint_url, ...) only
    # from the options; every check below reads the inputs and the output folder through them.
    FileSystems.set_options(options)
    _share_object_store_options(options)
    launch = _launch_mode(options, wait)
    out = cfg["output.dir"].rstrip("/") or cfg["output.dir"]
    warnings: list[str] = []
    pool_files = _expand(cfg, "input", warnings)
    check_fields(pool_files, _spec(cfg, "input"), "input", cfg["input.label_field"])
    _check_k_possible(cfg, pool_files)
    inputs = {"input.path": _read_paths(cfg["input.path"], pool_files)}
    target_tasks = None
    fitted = None
    stages = cfg["stages"]
    if "dsir" in stages and cfg["dsir.model"]:
        fitted, model_path = _load_model(cfg["dsir.model"])
        _check_model_matches(fitted[2], cfg)
        inputs["dsir.model"] = [model_path]
    if "embed" in stages and cfg["embed.method"] == "model":
        inputs["embed.model"] = [_check_encoder(cfg["embed.model"])]
    saved = check_saved_models(cfg, pool_files)
    inputs.update({key: [os.path.abspath(f) if is_local(f) else f] for key, f in saved.items()})
    needs_target = any(stage_of(n).needs_target is not None and stage_of(n).needs_target(cfg) for n in stages)
    if needs_target and cfg["target.path"] is not None:
        target_files = _expand(cfg, "target", warnings)
        check_fields(target_files, _spec(cfg, "target"), "target")
        if "proxy" in stages and cfg["proxy.target_influence"] and cfg["input.label_field"]:
            check_target_labels(cfg, target_files, saved)
        target_tasks = plan_read_tasks(target_files, cfg["input.split_bytes"])
        inputs["target.path"] = _read_paths(cfg["target.path"], target_files)
    # A glob's files are described from one listing of it, not a request a file.
    described = {key: _describe(paths, cfg[key] if key.endswith(".path") else None) for key, paths in inputs.items()}
    fp = fingerprint(cfg, described)
    if launch != "dry_run" and not force and not check_only:
        published = _published_fingerprint(out)
        if published == fp:
            return {"unchanged": True, "output": out, "fingerprint": fp}
    if launch != "dry_run" or is_local(out):  # a dry run needs no credentials for the output's bucket
        check_output_dir(out, overwrite or force, inputs)
    if launch != "dry_run" and not is_local_runner(options):
        _check_workers_reach(options, {"output.dir": [out], **inputs})
    if check_only:
        return {
            "checked": True,
            "output": out,
            "output_state": "earlier" if _exists(out, MANIFEST) else "new",
            "fingerprint": fp,
            "files": pool_files,
            "pool_files": len(pool_files),
            "pool_bytes": sum(size for _, _, size in pool_files),
        }
    pool_tasks = plan_read_tasks(pool_files, cfg["input.split_bytes"])
    workers = _local_workers(cfg, options, beam_args, pool_tasks)
    if workers:  # the machine's cores, where the user chose none
        beam_args = [*beam_args, "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        options = pipeline_options(cfg, beam_args)

    kept_path, resumed = (None, []) if launch == "dry_run" else _kept_run(out, fp, stages)
    pending = PendingOutput(out, kept_path)
    staging = FileSystems.join(pending.path, STAGING)
    facts = RunFacts(
        run_id=pending.run_id,
        started=started,
        beam_options=options.get_all_options(drop_default=True),
        input_files=len(pool_files),
        inputs=described,
        warnings=tuple(warnings),
        runner=_runner_report(options, chosen_by_user=_user_chose_workers(cfg, beam_args)),
        fingerprint=fp,
        resumed=tuple(resumed),
    )

    def build(progress_dir):
        pipeline = beam.Pipeline(options=options)
        # The report: by the job itself where no command waits for it (or on a distributed
        # runner), else by this command once the runner has counted the stages' times (once).
        report_in_job = launch == "no_wait" or not is_local_runner(options)
        finish = FinishRun(cfg, out, pending.path, staging, facts, report=report_in_job)
        pool_paths = [f[0] for f in pool_files]
        build_pipeline(
            pipeline,
            cfg,
            pool_tasks,
            pool_paths,
            target_tasks,
            fitted,
            pending.path,
            staging,
            progress_dir,
            saved,
            finish,
            threads=worker_threads(options),
            resumed=tuple(resumed),
        )
        return pipeline

    if launch == "dry_run":  # translated, not run: nothing is written anywhere
        pipeline = build(None)
        with _submission_tempdir():
            pipeline.run()
        return {
            "dry_run": True,
            "runner": _runner_name(options),
            "transforms": _leaf_transforms(pipeline),
            "output": out,
        }
    if resumed:
        # What the writers after the chain wrote goes (a batch of rejects is named by its first
        # record, and batches differ from run to run); the stages' own files stay: a finished
        # stage's are replayed, an unfinished one writes the same names again.
        # No stage after the last finished one has a mark: a stage starts only once the one
        # before it has written its own (``resume.keep_stage``).
        pending.adopt(["selected/", "scores/", "rejected/", "clusters/", "examples/", MANIFEST, REPORT])
    else:
        pending.create(detached=not (launch == "wait" and is_local_runner(options)))
    write_run_file(staging, fp, stages, resumable=launch == "wait" and is_local_runner(options))
    try:
        with _progress_channel(progress, options, pool_tasks, cfg["stages"]) as progress_dir, _math_threads(options):
            if _runner_name(options) in IN_PROCESS_RUNNERS and _local_processes(options) == 1:
                load_kernels_meanwhile()  # the graph is built meanwhile (a second core)
            pipeline = build(progress_dir)
            # A runner outside this process stages files in the temp dir; the PortableRunner's job
            # service reads them until the job ends, so the folder lasts as long as the wait
            with _submission_tempdir() if _runner_name(options) not in IN_PROCESS_RUNNERS else contextlib.nullcontext():
                result = pipeline.run()
                if launch == "no_wait":
                    return {"submitted": True, "runner": _runner_name(options), "job": _job_id(result), "output": out,
                            "transforms": _leaf_transforms(pipeline)}  # fmt: skip
                state = result.wait_until_finish()
        if str(state).split(".")[-1] not in ("DONE", "None"):
            raise RuntimeError(f"the pipeline ended in state {state}")
    except BaseException as e:
        # Once the job has begun to publish, its folder is no longer ours to remove; a job that
        # runs on a distributed runner goes on without this command and publishes on its own.
        if not pending.publishing() and (is_local_runner(options) or not isinstance(e, KeyboardInterrupt)):
            # Kept where the same command may well succeed (an interrupt, a crash), not where the
            # config or the input must change first: that run has another fingerprint.
            kept = [] if _is_user_error(e) else finished_stages(staging, stages)
            if not kept:
                pending.discard()
            elif on_kept is not None:
                on_kept(
                    f"kept {describe_kept(kept, len(stages))} in {pending.path}: the same command resumes after "
                    f"{kept[-1]}; `beamsift clean {out}` removes what was kept"
                )
        _raise_user_error(e)
        raise
    manifest = _published_manifest(out, pending.run_id)
    add_metrics(manifest, _query_metrics(result), time.time() - started)
    if cfg["output.report"] and not cfg.train_only:  # with the stages' times the runner counted
        try:
            write_report(out, manifest)
            manifest["files"] = sorted({*manifest.get("files", []), REPORT})
        except Exception as e:  # noqa: BLE001 - a chart that fails must not fail a published run
            manifest.setdefault("warnings", []).append(
                f"report.html was not written ({type(e).__name__}: {e}); `beamsift report {out}` builds it"
            )
    _replace_manifest(out, manifest)
    return manifest


# The thread pools of numpy's BLAS, OpenMP (scikit-learn's k-means) and MKL, each sized to every
# core by default in every process.
MATH_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _math_threads(options: PipelineOptions):
    """Worker processes of a local runner size their math thread pools to their share of the
    cores (``worker_threads``), unless the user set them: two workers with a pool of every core
    each spin 4 threads on 2 cores, and SemDeDup's block products took 1.8x as long (100k documents,
    2 workers). Each worker reads the variables when it starts (they inherit this process's
    environment); this process has read them already, and they are restored after the run."""
    if _local_processes(options) < 2:
        yield
        return
    threads = str(worker_threads(options))
    previous = {name: os.environ.get(name) for name in MATH_THREAD_VARIABLES}
    os.environ.update({name: threads for name, value in previous.items() if value is None})
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)


@contextlib.contextmanager
def _submission_tempdir():
    """The temp dir while a job is submitted and waited on: the Dataflow runner leaves its staged
    files (the pickled session, a requirements cache) in the temp dir, the PortableRunner its
    requirements cache and three folders a run; here they go to one that is removed."""
    folder = tempfile.mkdtemp(prefix="beamsift-submit-")
    previous = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


# Below this much input a second process costs more to start than it saves.
AUTO_WORKERS_MIN_BYTES = 64 << 20
# A chain whose only heavy work is featurizing (DSIR and filters) already spreads it over the
# cores in one process (a pool featurizes while the bundle's thread reads and stages), so more
# processes pay off only on a larger input: 1 GB shared by the cores. Measured on 2 cores (DSIR,
# end to end, one process : two): 123 MB 5.5 s : 6.5 s; 246 MB 7.1-7.3 s : 8.0-8.3 s;
# 493 MB 10.7-11.0 s : 10.7-10.8 s.
AUTO_WORKERS_FEATURIZE_BYTES = 1 << 30
_FEATURIZE_ONLY = {"dsir", "select", "filter", "doc_length"}
AUTO_WORKERS_MAX = 8
_WORKER_OPTIONS = ("direct_running_mode", "direct_num_workers")


def pipeline_options(cfg: Config, beam_args) -> PipelineOptions:
    """The run's Beam options: the config's and the command line's, and Beam's type inference off
    unless either names it. Beam infers each transform's output type by disassembling its
    function's bytecode, then checks the types it found: beamsift's transforms declare no type
    hints, and their elements (Arrow tables, shard references) are pickled whatever is inferred,
    so the inference decides nothing and costs ~0.25 s of CPU a run (of a 4 s one)."""
    given = [*cfg["beam.options"], *beam_args]
    named = any(a.lstrip("-").split("=", 1)[0] in ("pipeline_type_check", "no_pipeline_type_check") for a in given)
    return PipelineOptions([f"--runner={cfg['beam.runner']}", *([] if named else ["--no_pipeline_type_check"]), *given])


def _local_workers(cfg: Config, options: PipelineOptions, beam_args, tasks) -> int:
    """How many worker processes the local runner gets by default: the machine's cores (up to
    8), for an input large enough to gain from them, when the user named no runner mode. Chains
    with model stages keep one process, whose torch already uses every core (two would compete)."""
    cores = os.cpu_count() or 1
    if _runner_name(options) not in IN_PROCESS_RUNNERS or _user_chose_workers(cfg, beam_args):
        return 0
    kinds = {stage_kind(n) for n in cfg["stages"]}
    models = bool(kinds & {"proxy", "excess_loss"}) or ("embed" in kinds and cfg["embed.method"] == "model")
    least = AUTO_WORKERS_MIN_BYTES
    if kinds <= _FEATURIZE_ONLY:
        least = max(least, AUTO_WORKERS_FEATURIZE_BYTES // cores)
    if cores < 2 or models or sum(t.nbytes for t in tasks) < least:
        return 0
    return min(cores, AUTO_WORKERS_MAX)


def _user_chose_workers(cfg: Config, beam_args) -> bool:
    """Whether the user named the local runner's mode or workers. As written: an option set to
    its default (--direct_num_workers=1) is a choice too."""
    named = {a.lstrip("-").split("=", 1)[0] for a in [*cfg["beam.options"], *beam_args] if a.startswith("--")}
    return bool(named & set(_WORKER_OPTIONS))


def _local_processes(options: PipelineOptions) -> int:
    """Worker processes of a runner inside this command (1 unless in multi-processing mode)."""
    # A view of the options, not ``get_all_options`` (a parser of every option Beam knows, ~6 ms
    # a call: asked ~15 times a run)
    direct = options.view_as(DirectOptions)
    multi = direct.direct_running_mode == "multi_processing"
    return int(direct.direct_num_workers or 1) if multi else 1


def worker_threads(options: PipelineOptions) -> int:
    """Threads a worker process may use for itself: on a runner inside this command, the machine's
    cores shared among its worker processes; elsewhere 1 (Dataflow runs a process per core)."""
    if _runner_name(options) not in IN_PROCESS_RUNNERS:
        return 1
    return max(1, (os.cpu_count() or 1) // _local_processes(options))


def _runner_report(options: PipelineOptions, chosen_by_user: bool) -> dict:
    """The runner, its worker processes and the threads each featurizes on, and whether beamsift
    chose them (the summary says so)."""
    report = {"name": _runner_name(options)}
    if report["name"] in IN_PROCESS_RUNNERS:
        report["workers"] = _local_processes(options)
        report["threads"] = worker_threads(options)
        report["workers_chosen_by"] = "user" if chosen_by_user else "beamsift"
    return report


def _check_workers_reach(options: PipelineOptions, paths: dict[str, list[str]]) -> None:
    """A distributed runner's workers see only shared stores, not this machine's disk."""
    for key, listed in paths.items():
        local = [p for p in listed if is_local(p)]
        if local:
            raise InputError(
                f"{key} {local[0]} is on this machine's disk, which the {_runner_name(options)}'s workers do not "
                "see: put it on gs:// or s3:// (or a mount that every worker shares, with a local runner)"
            )


def _launch_mode(options: PipelineOptions, wait: bool) -> str:
    """'dry_run' (translate only), 'no_wait' (submit and return) or 'wait'."""
    if options.view_as(TestOptions).dry_run:
        return "dry_run"
    if wait:
        return "wait"
    if _runner_name(options) in IN_PROCESS_RUNNERS:
        raise InputError(
            f"--no-wait is for runners that run the job elsewhere (Dataflow, Flink); the {_runner_name(options)} "
            "runs it in this command"
        )
    return "no_wait"


def _runner_name(options: PipelineOptions) -> str:
    return str(options.view_as(StandardOptions).runner or "FnApiRunner").split(".")[-1]


def is_local_runner(options: PipelineOptions) -> bool:
    return _runner_name(options) in LOCAL_RUNNERS


def _leaf_transforms(pipeline: beam.Pipeline) -> int:
    """How many primitive transforms the job has (what a runner schedules)."""
    transforms = pipeline.to_runner_api().components.transforms
    return sum(1 for t in transforms.values() if not t.subtransforms)


def _job_id(result) -> str | None:
    for attr in ("job_id", "_job_id"):
        value = getattr(result, attr, None)
        value = value() if callable(value) else value
        if value:
            return str(value)
    return None


def _is_user_error(e: BaseException) -> bool:
    errors = (InputError, OutputDirError, SelectionError)
    return isinstance(e, errors) or any(find_error(e, cls) is not None for cls in errors)


def _raise_user_error(e: BaseException) -> None:
    """An error that the job's last step raised on a worker, as the error it is: runners re-raise
    it wrapped in their own, with a worker's traceback."""
    for cls in (InputError, OutputDirError):
        if isinstance(e, cls):
            return
        message = find_error(e, cls)
        if message is not None:
            raise cls(message) from None


def find_error(e: BaseException, cls) -> str | None:
    """The message of a ``cls`` error raised on a worker, found in the runner's wrapped error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, cls):
            return str(e).split(" [while running", 1)[0].strip()
        text = str(e)
        marker = cls.__name__ + ": "
        if marker in text:
            line = text.split(marker, 1)[1].splitlines()[0]
            # Inside a repr of the worker's log the line ends in an escaped newline and a quote.
            return re.sub(r"(\\n|[\"'])+$", "", line.split(" [while running", 1)[0].strip())
        e = e.__cause__ or e.__context__
    return None


def _published_manifest(out: str, run_id: str) -> dict:
    try:
        with FileSystems.open(FileSystems.join(out, MANIFEST)) as f:
            manifest = json.loads(f.read())
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"the job finished, but {out} holds no manifest: {e}") from None
    if manifest.get("run_id") != run_id:
        raise RuntimeError(f"the job finished, but {out} holds another run's manifest ({manifest.get('run_id')})")
    return manifest


def _replace_manifest(out: str, manifest: dict) -> None:
    """The manifest again, with what the runner counted: one file replaced at once."""
    write_whole(FileSystems.join(out, MANIFEST), json.dumps(manifest, indent=2).encode())


# Beam's S3 options and the environment variables that boto3 reads when an option is not given.
_S3_ENVIRONMENT = {
    "s3_endpoint_url": "AWS_ENDPOINT_URL",
    "s3_access_key_id": "AWS_ACCESS_KEY_ID",
    "s3_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "s3_session_token": "AWS_SESSION_TOKEN",
    "s3_region_name": "AWS_DEFAULT_REGION",
}


def _share_object_store_options(options: PipelineOptions) -> None:
    """The S3 options after ``--``, as environment variables for the local runner's workers.

    The multi-process DirectRunner starts its workers without the pipeline options (their
    FileSystems would look for the bucket on AWS itself); they inherit this process's environment,
    where boto3 finds the endpoint, the keys and the region. Distributed runners hand the options
    to their workers themselves."""
    given = options.get_all_options()
    for option, variable in _S3_ENVIRONMENT.items():
        if given.get(option):
            os.environ[variable] = str(given[option])


def _spec(cfg: Config, section: str):
    return input_spec(cfg, section)


def _expand(cfg: Config, section: str, warnings: list[str]) -> list[tuple[str, str, int]]:
    pattern, key = cfg[f"{section}.path"], f"{section}.path"
    try:
        files = expand_input(pattern, cfg[f"{section}.format"], key)
    except InputError as e:
        if "no files match" not in str(e) or not is_local(pattern) or os.path.isabs(pattern):
            raise
        # Relative paths are read from the current folder (as every path on the command line
        # is), not from the config's: say so, and where the file is if it is there instead.
        hint = f" (relative paths are read from the current folder, {os.getcwd()}"
        config_dir = os.path.dirname(os.path.abspath(cfg.source)) if cfg.source.endswith((".yaml", ".yml")) else None
        if config_dir and config_dir != os.getcwd():
            beside = os.path.join(config_dir, pattern)
            if FileSystems.match([beside])[0].metadata_list or os.path.exists(beside):
                shown = os.path.relpath(beside)
                shown = os.path.normpath(beside) if shown.startswith("..") else shown
                hint += f"; the config's folder has it: write {shown}"
        raise InputError(str(e) + hint + ")") from None
    shadowed = _shadowed_beside_config(cfg, pattern, files)
    if shadowed:
        warnings.append(
            f"{key} {pattern} was read from the current folder ({os.path.abspath(files[0][0])}), but the config's "
            f"folder holds a different file by that path ({shadowed}); relative paths are read from the current "
            "folder: write the path you mean"
        )
    return files


def _config_dir(cfg: Config) -> str | None:
    return os.path.dirname(os.path.abspath(cfg.source)) if cfg.source.endswith((".yaml", ".yml")) else None


def _shadowed_beside_config(cfg: Config, pattern: str, files) -> str | None:
    """A file that the same relative path names beside the config, where it is not what was read."""
    config_dir = _config_dir(cfg)
    if not is_local(pattern) or os.path.isabs(pattern) or config_dir in (None, os.getcwd()):
        return None
    beside = os.path.join(config_dir, pattern)
    try:
        matched = [m.path for m in FileSystems.match([beside])[0].metadata_list]
    except Exception:  # noqa: BLE001 - an unreadable folder beside the config: nothing to say
        return None
    if os.path.isdir(beside.rstrip("/")):
        matched = [beside.rstrip("/")]
    read = {os.path.realpath(f[0]) for f in files} | {os.path.realpath(pattern.rstrip("/"))}
    other = [m for m in matched if os.path.realpath(m) not in read]
    return os.path.abspath(other[0]) if other else None


def fingerprint(cfg: Config, described: dict) -> str:
    """What decides a run's result: the content of its inputs (every file's path, size and
    modification time), the resolved config and beamsift's version. Not the runner: the result is
    the same on every runner and for any number of workers."""
    from importlib import metadata

    config = {k: v for k, v in cfg.to_dict().items() if k != "beam"}
    config["output"] = {k: v for k, v in config.get("output", {}).items() if k != "report"}
    try:
        version = metadata.version("beamsift")
    except metadata.PackageNotFoundError:
        version = "unknown"
    text = json.dumps({"inputs": described, "config": config, "beamsift": version}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _kept_run(out: str, fp: str, stages: list[str]) -> tuple[str | None, list[str]]:
    """The folder an interrupted run of this very fingerprint kept beside ``out``, and the stages
    it finished (the newest such run); (None, []) where there is none. Kept runs of another
    fingerprint are stale: the run's start removes them with the other abandoned folders."""
    code = code_version()
    for path, _ in sorted(abandoned_runs(out), key=lambda r: -float(r[1].get("created", 0))):
        run = read_run_file(path) or {}
        same = run.get("fingerprint") == fp and run.get("stages") == list(stages) and run.get("code") == code
        if same and run.get("resumable"):
            done = finished_stages(FileSystems.join(path, STAGING), stages)
            if done:
                return path, done
    return None, []


def _exists(folder: str, name: str) -> bool:
    try:
        return FileSystems.exists(FileSystems.join(folder, name))
    except Exception:  # noqa: BLE001 - an unreachable folder was refused by the checks already
        return False


def _published_fingerprint(out: str) -> str | None:
    """The fingerprint in ``out``'s manifest, if it holds a finished result."""
    try:
        with FileSystems.open(FileSystems.join(out, MANIFEST), compression_type="uncompressed") as f:
            return json.loads(f.read()).get("fingerprint")
    except Exception:  # noqa: BLE001 - no result there (or not a readable one): nothing to compare
        return None


def _describe(paths: list[str], pattern: str | None = None) -> list[dict]:
    """What a run read, as absolute paths with sizes and modification times: enough to tell later
    which files those were (on an object store, as the listing of ``pattern``, or of each path,
    gives them)."""
    listed = _listing(pattern) if pattern and not all(is_local(p) for p in paths) else {}
    out = []
    for path in paths:
        if not is_local(path):
            out.append(_describe_remote(path, listed))
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append({"path": os.path.abspath(path)})
            continue
        modified = dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).isoformat()
        entry = {"path": os.path.abspath(path), "modified": modified}
        if not os.path.isdir(path):
            entry["bytes"] = st.st_size
        out.append(entry)
    return out


def _listing(pattern: str) -> dict:
    """{path: its metadata} for the files ``pattern`` matches; {} where it cannot be listed."""
    with contextlib.suppress(Exception):  # a folder (a dataset), or a store that does not say
        return {m.path: m for m in FileSystems.match([pattern])[0].metadata_list}
    return {}


def _describe_remote(path: str, listed: dict) -> dict:
    entry = {"path": path}
    meta = listed.get(path) or _listing(path).get(path)
    if meta is not None:
        entry["bytes"] = meta.size_in_bytes
        if meta.last_updated_in_seconds:
            entry["modified"] = dt.datetime.fromtimestamp(meta.last_updated_in_seconds, dt.timezone.utc).isoformat()
    return entry


def _read_paths(pattern: str, files: list[tuple[str, str, int]]) -> list[str]:
    """What an input reads: its files, and a HuggingFace dataset's folder as a whole."""
    paths = [f[0] for f in files]
    if files and files[0][1] == "hf":
        paths.append(pattern.rstrip("/"))
    return paths


def _check_k_possible(cfg: Config, pool_files) -> None:
    k = cfg["select.k"]
    if k is None:
        return
    bound = max_records(pool_files, cfg["input.txt_mode"], enough=k)  # k or more: no need to count on
    if bound is not None and k > bound:
        raise InputError(
            f"select.k={k} is more than the input holds: {cfg['input.path']} has at most {bound:,} records; "
            "lower select.k (or use select.fraction)"
        )


def _load_model(path: str):
    """A fitted DSIR model from a run folder, its artifacts/ folder, or the .npz file itself."""
    if path.endswith(".npz"):
        candidates = [path]
    else:
        candidates = [FileSystems.join(path, MODEL_FILE), FileSystems.join(path, "artifacts", MODEL_FILE)]
    for model_path in candidates:
        if not FileSystems.exists(model_path):
            continue
        try:
            with FileSystems.open(model_path) as f:
                return load_fitted_counts(f.read()), model_path
        except Exception as e:  # noqa: BLE001 - any failure to read it is the same problem for the user
            raise InputError(f"dsir.model: cannot read a fitted model at {model_path}: {e}") from None
    raise InputError(
        f"dsir.model {path}: no {MODEL_FILE} there; give an earlier run's folder, its artifacts/ folder or the file"
    )


def _check_encoder(model: str | None) -> str:
    """The encoder for ``embed.method: model`` must load its config before any worker starts."""
    from beamsift.transforms.models.encoder import EncoderNotFound, encoder_width, resolve_encoder

    try:
        path = resolve_encoder(model)
    except EncoderNotFound as e:
        raise InputError(str(e)) from None
    if is_local(path) and (os.sep in path or path.startswith(".")) and not os.path.isdir(path):
        raise InputError(f"embed.model {path}: no such folder; give a transformers model folder or a hub id")
    try:
        encoder_width(path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"embed.model {path}: cannot load an encoder there: {first}") from None
    return os.path.abspath(path) if os.path.isdir(path) else path


def _check_model_matches(meta: dict, cfg: Config) -> None:
    for key, cfg_key in (
        ("num_buckets", "featurize.buckets"),
        ("max_ngram", "featurize.max_ngram"),
    ):
        if meta[key] != cfg[cfg_key]:
            raise InputError(f"dsir.model was fitted with {cfg_key}={meta[key]}, but the config sets {cfg[cfg_key]}")


@contextlib.contextmanager
def _progress_channel(progress, options: PipelineOptions, tasks, stages):
    """A local folder for the workers' progress files, shown by ``progress`` while the run lasts."""
    if progress is None or not is_local_runner(options):
        yield None
        return
    folder = tempfile.mkdtemp(prefix="beamsift-progress-")
    try:
        with progress(folder, sum(t.nbytes for t in tasks), list(stages)):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _query_metrics(result) -> dict:
    """beamsift's metrics by name: counters summed, distributions as (min, max)."""
    try:
        results = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # noqa: BLE001 - some runners report no metrics
        return {}
    out: dict = {}
    for c in results.get("counters", []):
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(value or 0)
    for d in results.get("distributions", []):
        value = d.committed if d.committed is not None else d.attempted
        if value is None or not value.count:
            continue
        lo, hi = out.get(d.key.metric.name, (value.min, value.max))
        out[d.key.metric.name] = (min(lo, value.min), max(hi, value.max))
    return out


__all__ = ["run_selection", "OutputDirError", "OutputExistsError", "SelectionError", "InputError"]
