"""A test's hold on a `beamsift` run, so that it is interrupted at a known point, not when a
timer happens to fire (a fast run under load could publish before the test looked).

On the PYTHONPATH of a run started by ``conftest.start_held`` (and so in every worker process
that run starts), with ``BEAMSIFT_TEST_HOLD`` set to

- ``done:<stage>``: the run is held just after ``<stage>`` wrote its done mark;
- ``publish``: the run is held just before the result is published (every file written).

Held, it writes the file ``BEAMSIFT_TEST_HELD`` names and waits for the signal the test sends;
if none comes (or the run's first process is gone), it fails the run rather than let it go on.
Nothing of beamsift is changed but these two functions, and only in such a run.
"""

import importlib.abc
import os
import sys
import time

HOLD = os.environ.get("BEAMSIFT_TEST_HOLD", "")
HELD = os.environ.get("BEAMSIFT_TEST_HELD", "")
os.environ.setdefault("BEAMSIFT_TEST_FIRST_PID", str(os.getpid()))  # workers inherit the driver's
_ORIGINAL = {}


def _hold() -> None:
    with open(HELD + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(HELD + ".tmp", HELD)
    first, deadline = int(os.environ["BEAMSIFT_TEST_FIRST_PID"]), time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.02)  # a signal to this process ends it here (its handler raises)
        if first != os.getpid() and not _alive(first):
            break
    raise RuntimeError(f"held at {HOLD} and never interrupted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def mark_done_then_hold(summary_path, path, record, *finishers):
    import beamsift.pipeline.resume  # noqa: F401  (a worker that unpickles this has not yet)

    out = _ORIGINAL["mark_done"](summary_path, path, record, *finishers)
    if HOLD == f"done:{record['stage']}":
        _hold()
    return out


def hold_then_finish(self, *args):
    import beamsift.pipeline.finish  # noqa: F401

    if HOLD == "publish":
        _hold()
    return _ORIGINAL["finish"](self, *args)


def _patch_resume(module):
    _ORIGINAL["mark_done"] = module._mark_done
    module._mark_done = mark_done_then_hold


def _patch_finish(module):
    _ORIGINAL["finish"] = module.FinishRun.__call__
    module.FinishRun.__call__ = hold_then_finish


PATCHES = {"beamsift.pipeline.resume": _patch_resume, "beamsift.pipeline.finish": _patch_finish}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the two modules as the other finders would, and patches each once it has run."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if HOLD:
    sys.meta_path.insert(0, _PatchOnImport())
