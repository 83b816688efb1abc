"""The output folder: beamsift deletes only what beamsift wrote, and a run that does not finish
leaves the previous result as it was.

A run writes into a new sibling folder (``.NAME.beamsift-tmp-ID`` next to ``output.dir``) whose
first file is a marker; only when that folder is complete (every shard, then the manifest) does
it take the place of ``output.dir``:

- on a local disk by one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), or where that is not
  available two renames, the old result first moved aside and then removed;
- on object stores (``gs://``, ``s3://``), where a rename is a copy, by copying the new files over
  the old ones with the manifest last, then removing the old files that the new run did not write.
  The new result is complete in the sibling folder until the copy is done.

A folder is beamsift's own when it holds the marker or the manifest of an earlier run, and
nothing else than what beamsift wrote: the manifest lists every file of the run (``files``), and
a file at any depth that it does not list is the user's. Any other folder is refused, even with
``--overwrite``: the user's files are never deleted, whatever ``output.dir`` says.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid

from apache_beam.io.filesystems import FileSystems
from beamsift.transforms.chain.staging import write_in_pieces

MANIFEST = "manifest.json"
MARKER = "_beamsift_output"
STAGING = "_staging"
OUTPUT_DIRS = ("selected", "scores", "rejected", "clusters", "domains", "examples", "artifacts")
OWN_ENTRIES = frozenset(OUTPUT_DIRS) | {MANIFEST, MARKER, STAGING, "report.html"}
TMP_TAG = ".beamsift-tmp-"
PUBLISHING = ".publishing"


class OutputDirError(RuntimeError):
    """The output folder cannot be used: the message says why and what to do."""


def is_local(path: str) -> bool:
    return FileSystems.get_filesystem(path).scheme() in (None, "file")


def files_under(path: str) -> list[str]:
    """Everything under ``path`` at any depth, relative to it: files, symbolic links, and empty
    folders (as ``name/``), so that nothing a user put there goes unseen."""
    if not is_local(path):
        base = path.rstrip("/") + "/"
        return sorted(m.path[len(base) :] for m in FileSystems.match([base + "**"])[0].metadata_list)
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel = os.path.relpath(dirpath, path)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        found += [prefix + name for name in filenames + links]
        if prefix and not filenames and not dirnames and not links:
            found.append(prefix)
    return sorted(found)


def _foreign(out: str, files: list[str]) -> list[str]:
    """The files under ``out`` that beamsift did not write, by the manifest's list of its files;
    for a result of a version that kept no list, what does not look like its fixed layout."""
    listed = _listed_files(out)
    own = {MANIFEST, MARKER}
    if listed is not None:
        return [f for f in files if f not in own and f not in listed]
    return [f for f in files if f not in own and not _LEGACY.fullmatch(f)]


# What versions before the manifest's list of files wrote: part files, DSIR's model, centroids.
_LEGACY = re.compile(
    r"(selected|scores|rejected|clusters)/part-[\w.-]+\.parquet|artifacts/dsir_model\.npz|artifacts/cluster/centroids\.npy"
)


def _listed_files(out: str) -> set[str] | None:
    try:
        with FileSystems.open(FileSystems.join(out, MANIFEST)) as f:
            listed = json.loads(f.read()).get("files")
    except Exception:  # noqa: BLE001 - no manifest, or not ours: nothing is listed
        return None
    return set(listed) if isinstance(listed, list) else None


def exists(path: str) -> bool:
    """A file or folder at ``path``; on an object store, which has no folders, an object with that
    key or any object under it."""
    if is_local(path):
        return os.path.lexists(path)
    return FileSystems.exists(path) or bool(files_under(path))


def _inside(path: str, folder: str) -> bool:
    """True where ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _absolute(path: str) -> str:
    return os.path.realpath(path) if is_local(path) else path.rstrip("/")


def check_output_dir(out: str, overwrite: bool, inputs: dict[str, list[str]]) -> None:
    """Refuse an ``output.dir`` that beamsift may not write, before any work is done.

    ``inputs`` maps a config key (``input.path``, ``target.path``, ``dsir.model``) to the paths it
    reads: files, or folders read whole (a HuggingFace dataset, a model).
    """
    real_out = _absolute(out)
    for key, paths in inputs.items():
        for path in paths:
            real = _absolute(path)
            if _inside(real, real_out):
                raise OutputDirError(
                    f"output.dir {out} holds {path}, which {key} reads: beamsift would overwrite its own "
                    "input; choose an output.dir outside the input"
                )
            if _inside(real_out, real):
                raise OutputDirError(
                    f"output.dir {out} is inside {path}, which {key} reads; choose an output.dir outside the input"
                )
    if is_local(out) and os.path.islink(out):
        raise OutputDirError(f"output.dir {out} is a symbolic link; give the folder itself")
    if is_local(out) and os.path.lexists(out) and not os.path.isdir(out):
        raise OutputDirError(f"output.dir {out} is a file, not a folder")
    files = files_under(out)  # none for a folder (or prefix) that is not there
    if not files:
        return
    if not (MARKER in files or _is_beamsift_manifest(out)):
        foreign = [f for f in files if f.split("/", 1)[0] not in OWN_ENTRIES] or files
        raise OutputDirError(
            f"output.dir {out} {_holds(foreign)}, which beamsift did not write; beamsift replaces only its own "
            "outputs: choose a new or empty folder"
        )
    foreign = _foreign(out, files)
    if foreign:
        raise OutputDirError(
            f"output.dir {out} {_holds(foreign)}, which beamsift did not write (its manifest lists every file "
            "of the run); move it out, or choose a new folder: beamsift never deletes files it did not write"
        )
    if MANIFEST in files and not overwrite:
        raise OutputDirError(
            f"output.dir {out} holds the result of an earlier run; pass --overwrite to replace it "
            "(it is replaced only once the new run is complete)"
        )


def _holds(paths: list[str]) -> str:
    shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f"holds {shown}"


def _is_beamsift_manifest(out: str) -> bool:
    try:
        with FileSystems.open(FileSystems.join(out, MANIFEST)) as f:
            return "beamsift_version" in json.loads(f.read())
    except Exception:  # noqa: BLE001 - unreadable or not JSON: not ours
        return False


def _sibling(out: str, run_id: str) -> str:
    out = out.rstrip("/")
    parent, name = os.path.split(out) if is_local(out) else out.rsplit("/", 1)
    return (
        os.path.join(parent or ".", f".{name}{TMP_TAG}{run_id}")
        if is_local(out)
        else f"{parent}/.{name}{TMP_TAG}{run_id}"
    )


class PendingOutput:
    """A new result being written next to ``output.dir``, published only when complete."""

    def __init__(self, out: str, path: str | None = None):
        self.out = out.rstrip("/") or out
        self.run_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = path or _sibling(self.out, self.run_id)
        # Beside the folder while it is being published: the launching command then never
        # removes it (a half-done copy on an object store keeps the complete new result there).
        self.flag = self.path + PUBLISHING

    def create(self, detached: bool = False) -> None:
        """Make the folder and write the marker first: whatever happens next, it is ours.
        ``detached``: the job runs elsewhere (Dataflow, Flink) and may write here after this
        process is gone, so that no later run takes the folder for abandoned."""
        remove_abandoned_runs(self.out)
        if is_local(self.path):
            try:
                os.makedirs(self.path)
            except OSError as e:
                raise OutputDirError(f"output.dir {self.out}: cannot create a folder beside it: {e.strerror}") from None
        self._mark(detached)

    def adopt(self, drop: list[str]) -> None:
        """Take over the folder an interrupted run kept (``self.path``): the marker now names this
        process, and what that run wrote under the prefixes in ``drop`` goes."""
        remove_abandoned_runs(self.out, keep=self.path)
        self._mark()
        stale = [f for f in files_under(self.path) if any(f.startswith(d) for d in drop)]
        files = [FileSystems.join(self.path, f) for f in stale if not f.endswith("/")]
        if files:
            FileSystems.delete(files)
        if is_local(self.path):  # the folders they leave empty
            for dirpath, _, _ in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
                if dirpath != self.path and not os.listdir(dirpath):
                    os.rmdir(dirpath)

    def _mark(self, detached: bool = False) -> None:
        marker = {"written_by": "beamsift", "pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
        if detached:
            marker["detached"] = True
        with FileSystems.create(FileSystems.join(self.path, MARKER)) as f:
            f.write(json.dumps(marker).encode())

    def publish(self) -> None:
        """Put the complete new result in the place of ``output.dir``."""
        # Checked again: the user may have put a file into the old result while this run lasted.
        foreign = _foreign(self.out, files_under(self.out))
        if foreign:
            raise OutputDirError(
                f"output.dir {self.out} {_holds(foreign)}, put there while the run lasted, which beamsift did not "
                "write; nothing was published and the previous result is as it was: move it out and run again"
            )
        with FileSystems.create(self.flag) as f:
            f.write(self.run_id.encode())
        try:
            if is_local(self.out):
                _swap_local(self.path, self.out)
            else:
                _copy_over(self.path, self.out)
        except Exception as e:  # noqa: BLE001
            raise OutputDirError(
                f"publishing to {self.out} failed ({e}); the complete new result is in {self.path}"
            ) from None
        FileSystems.delete([self.flag])

    def publishing(self) -> bool:
        """True once publishing has begun: the folder is then no longer this command's to remove."""
        return FileSystems.exists(self.flag)

    def discard(self) -> None:
        """Remove the unfinished result (and its staging shards); ``output.dir`` is untouched."""
        remove_tree(self.path)


def _swap_local(new: str, out: str) -> None:
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):
        shutil.rmtree(new)  # it now holds the old result
        return
    # No atomic exchange here: move the old result aside, the new one in, then drop the old.
    aside = new + "-old"
    os.rename(out, aside)
    os.rename(new, out)
    shutil.rmtree(aside)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def _copy_over(new: str, out: str) -> None:
    """Object stores: copy the new files in, the manifest last, then drop the old run's others."""
    old = set(files_under(out))
    listed = _listed_files(out)  # only what the old run wrote is removed
    ours = (lambda f: f in listed or f == MARKER) if listed is not None else _LEGACY.fullmatch
    new_files = [f for f in files_under(new) if f != MANIFEST]
    if MANIFEST in old:  # first: while files are being replaced the folder is not a complete run
        FileSystems.delete([FileSystems.join(out, MANIFEST)])
    FileSystems.copy([FileSystems.join(new, f) for f in new_files], [FileSystems.join(out, f) for f in new_files])
    stale = [FileSystems.join(out, f) for f in sorted(old - set(new_files) - {MANIFEST}) if ours(f)]
    if stale:
        FileSystems.delete(stale)
    FileSystems.copy([FileSystems.join(new, MANIFEST)], [FileSystems.join(out, MANIFEST)])
    remove_tree(new)


def write_whole(path: str, data: bytes) -> None:
    """Write a file whole or not at all: on a local disk into a temporary file beside it, synced,
    then renamed over ``path`` (nothing half-written is left where it fails); an object's upload
    is atomic as it is."""
    if not is_local(path):
        with FileSystems.create(path) as f:
            write_in_pieces(f, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write_in_pieces(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_tree(path: str) -> None:
    """Remove a folder that beamsift made (its run folder, its staging)."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    # An object store has no folders: every object under the prefix, one by one (a delete of the
    # prefix itself removes one object of that very name, if any).
    files = files_under(path)
    if files:
        FileSystems.delete([FileSystems.join(path, f) for f in files])


def remove_abandoned_runs(out: str, keep: str | None = None) -> None:
    """Remove the sibling folders of runs into ``out`` that were killed (no process, same host),
    all but ``keep`` (the kept run that this one resumes)."""
    for path, _ in abandoned_runs(out):
        if path != keep:
            remove_tree(path)
    if not is_local(out):
        return
    parent, name = os.path.split(os.path.abspath(out))
    prefix = f".{name}{TMP_TAG}"
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            path = os.path.join(parent, entry)
            if not entry.startswith(prefix):
                continue
            # A publish that was cut short or failed: its message named the folder; left to the
            # user, and the flag removed once the folder is gone.
            if entry.endswith(PUBLISHING) and not os.path.lexists(path[: -len(PUBLISHING)]):
                with contextlib.suppress(OSError):
                    os.remove(path)
            # An old result moved aside by a swap that was cut short: removed only if it is one.
            elif entry.endswith("-old") and os.path.isdir(path) and _is_beamsift_manifest(path):
                shutil.rmtree(path, ignore_errors=True)


def abandoned_runs(out: str) -> list[tuple[str, dict]]:
    """The sibling folders of runs into ``out`` whose process is gone (their marker names this
    host and a process that no longer runs), with their markers; never one being published, nor
    one of a job that runs on its own (``create(detached=True)``)."""
    if is_local(out):
        parent, name = os.path.split(os.path.abspath(out))
        try:
            entries = os.listdir(parent)
        except OSError:
            return []
        prefix = f".{name}{TMP_TAG}"
        folders = [
            os.path.join(parent, e) for e in entries if e.startswith(prefix) and not e.endswith((PUBLISHING, "-old"))
        ]
        folders = [f for f in folders if os.path.isdir(f) and not os.path.lexists(f + PUBLISHING)]
    else:
        parent, name = out.rstrip("/").rsplit("/", 1)
        try:
            found = FileSystems.match([f"{parent}/.{name}{TMP_TAG}*/{MARKER}"])[0].metadata_list
        except Exception:  # noqa: BLE001 - nothing there to list
            return []
        folders = [m.path[: -len(MARKER) - 1] for m in found]
        folders = [f for f in folders if not FileSystems.exists(f + PUBLISHING)]
    runs = []
    for folder in folders:
        try:
            with FileSystems.open(FileSystems.join(folder, MARKER), compression_type="uncompressed") as f:
                marker = json.loads(f.read())
        except Exception:  # noqa: BLE001 - no marker: not a run folder of ours
            continue
        if marker.get("detached"):  # a Dataflow or Flink job's: it may still be writing
            continue
        if marker.get("host") == socket.gethostname() and not _alive(int(marker.get("pid", 0))):
            runs.append((folder, marker))
    return runs


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
