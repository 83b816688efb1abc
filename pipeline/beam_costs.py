"""Beam's graph-building costs that grow with the number of transforms, cut where it is safe.

Beam asks, for every ParDo, about 4 times while building and translating a pipeline, whether
its DoFn declares user state or timers (``userstate.get_dofn_specs``). Each answer inspects the
signature of every method the DoFn has (~30, most inherited from ``DoFn``): a run's ~160 ParDos
cost ~38,000 ``inspect.signature`` calls, 0.45 s of every run (measured: a 200-document DSIR run,
2.72 s -> 2.25 s end to end). The answer depends only on the DoFn's methods, which its class
holds, so it is kept per class; a DoFn holding bound methods of its own (instance attributes,
which ``get_dofn_specs`` also inspects) is asked each time, as before.

Beam also asks the pipeline's options for a view of one options class (``view_as``) ~1,250
times a run, ~3 times per transform applied; each view parses the command line again with an
argparse parser of every option Beam knows (16,500 add_argument calls in all,
0.35 s of every run). Views of one options object share its values (``_all_options``), so the
first view of each class is kept for that object and handed out again.

Only the process that builds the pipeline is touched, and only the answers' cost: every caller
gets the sets that Beam's own function gives, and a view that reads and writes the same values.
The kept answers grow with the DoFn and options classes of the code, not with the data.
"""

from __future__ import annotations

import types
import weakref

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import userstate

_BEAMS_OWN = userstate.get_dofn_specs
_per_class: dict[type, tuple[frozenset, frozenset]] = {}


def _get_dofn_specs(dofn) -> tuple[set, set]:
    if any(isinstance(v, types.MethodType) for v in getattr(dofn, "__dict__", {}).values()):
        return _BEAMS_OWN(dofn)
    cls = type(dofn)
    if cls not in _per_class:
        state, timers = _BEAMS_OWN(dofn)
        _per_class[cls] = (frozenset(state), frozenset(timers))
    state, timers = _per_class[cls]
    return set(state), set(timers)


def keep_dofn_specs_per_class() -> None:
    """Answer ``get_dofn_specs`` once per DoFn class from now on in this process (idempotent)."""
    userstate.get_dofn_specs = _get_dofn_specs


_BEAMS_VIEW_AS = PipelineOptions.view_as
_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _view_as(self, cls):
    try:
        kept = _views.setdefault(self, {})
    except TypeError:  # an options object that cannot be weakly referenced: Beam's own way
        return _BEAMS_VIEW_AS(self, cls)
    view = kept.get(cls)
    if view is None or view._flags is not self._flags or view._all_options is not self._all_options:
        view = kept[cls] = _BEAMS_VIEW_AS(self, cls)
    return view


def keep_option_views() -> None:
    """Hand out one view per options object and class from now on in this process (idempotent)."""
    PipelineOptions.view_as = _view_as
