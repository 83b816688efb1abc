"""A shorter longest sampling period for Beam's state sampler, in every process that runs bundles.

Beam's SDK harness times each bundle's steps with a sampler thread that sleeps between samples,
from 2 ms growing by 1.2x up to 200 ms (``statesampler.DEFAULT_SAMPLING_PERIOD_MS``), and a bundle
ends by joining that thread: a bundle that ran for a second or more waits for the sampler's
current sleep, ~100 ms on average. A run is a few dozen steps, so that was 0.2 s of a
60,000-document DSIR run of 4-5 s (measured: 5.40 -> 5.20 s), more where bundles are long. At
20 ms the thread wakes 50 times a second in a long bundle (a few microseconds each), and a
bundle's end waits 10 ms on average. Installed when ``beamsift.transforms`` is imported, so on
every worker that unpickles a beamsift DoFn (the sampler of a worker's first stage is made
before, and keeps Beam's period).
"""

from __future__ import annotations

LONGEST_PERIOD_MS = 20


def shorten_state_sampling() -> None:
    try:
        from apache_beam.runners.worker import statesampler
    except ImportError:  # a Beam without the SDK harness's sampler: nothing to shorten
        return
    init = statesampler.StateSampler.__init__
    # Only Beam's own default is replaced: a Beam that samples otherwise is left as it is
    if init.__defaults__ == (statesampler.DEFAULT_SAMPLING_PERIOD_MS,) and LONGEST_PERIOD_MS < init.__defaults__[0]:
        init.__defaults__ = (LONGEST_PERIOD_MS,)
