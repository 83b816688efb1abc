"""The per-class answer to Beam's "does this DoFn use state or timers" is Beam's own answer."""

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from beamsift.pipeline import beam_costs
from conftest import TEST_RUNNER


class _Plain(beam.DoFn):
    def process(self, x):
        yield x


class _Stateful(beam.DoFn):
    COUNT = userstate.ReadModifyWriteStateSpec("count", VarIntCoder())
    FLUSH = userstate.TimerSpec("flush", TimeDomain.WATERMARK)

    def process(self, kv, count=beam.DoFn.StateParam(COUNT), flush=beam.DoFn.TimerParam(FLUSH)):  # noqa: B008 (Beam's way)
        seen = (count.read() or 0) + 1
        count.write(seen)
        yield kv[0], seen

    @userstate.on_timer(FLUSH)
    def flush(self):
        return []


class _Borrowing(beam.DoFn):
    """Holds a bound method of a stateful DoFn: its answer is not its class's alone."""

    def __init__(self, other):
        self.other_process = other.process


def test_per_class_answers_are_beams_own():
    beam_costs.keep_dofn_specs_per_class()
    for dofn in (_Plain(), _Stateful(), _Stateful(), _Borrowing(_Stateful()), _Borrowing(_Plain())):
        assert userstate.get_dofn_specs(dofn) == beam_costs._BEAMS_OWN(dofn), type(dofn).__name__
    state, timers = userstate.get_dofn_specs(_Stateful())
    assert {s.name for s in state} == {"count"} and len(timers) == 1
    assert userstate.get_dofn_specs(_Borrowing(_Stateful()))[0]  # not the (empty) answer of its class
    assert not userstate.get_dofn_specs(_Borrowing(_Plain()))[0]


def test_a_stateful_pipeline_still_runs_with_its_state():
    beam_costs.keep_dofn_specs_per_class()
    with beam.Pipeline(TEST_RUNNER) as p:
        counts = p | beam.Create([("a", 1), ("a", 2), ("b", 3)]) | beam.ParDo(_Stateful())
        assert_that(counts | beam.combiners.Count.PerKey(), equal_to([("a", 2), ("b", 1)]))
        assert_that(counts | "Max" >> beam.CombinePerKey(max), equal_to([("a", 2), ("b", 1)]), label="max")


def test_kept_option_views_read_and_write_the_same_values():
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

    beam_costs.keep_option_views()
    options = PipelineOptions(["--direct_num_workers=3"])
    direct = options.view_as(DirectOptions)
    assert options.view_as(DirectOptions) is direct and direct.direct_num_workers == 3
    options.view_as(StandardOptions).runner = TEST_RUNNER
    assert options.view_as(StandardOptions).runner == TEST_RUNNER
    assert beam_costs._BEAMS_VIEW_AS(options, StandardOptions).runner == TEST_RUNNER  # Beam's own view
    assert direct.view_as(StandardOptions).runner == TEST_RUNNER  # a view of a view
    fresh = PipelineOptions([])
    assert fresh.view_as(DirectOptions) is not direct and fresh.view_as(DirectOptions).direct_num_workers == 1
    with beam.Pipeline(options=options.view_as(StandardOptions).view_as(PipelineOptions)) as p:
        assert_that(p | beam.Create([1, 2]) | beam.Map(lambda x: x * 2), equal_to([2, 4]))


def test_state_samplers_made_after_beamsift_is_imported_sleep_at_most_20_ms():
    from apache_beam.runners.worker import statesampler
    from apache_beam.utils.counters import CounterFactory
    from beamsift import transforms  # noqa: F401 (installs the shorter period)
    from beamsift.transforms.state_sampling import LONGEST_PERIOD_MS, shorten_state_sampling

    shorten_state_sampling()  # a second time changes nothing
    assert statesampler.StateSampler("step", CounterFactory()).sampling_period_ms == LONGEST_PERIOD_MS == 20
    # A period asked for explicitly is Beam's to keep
    assert statesampler.StateSampler("step", CounterFactory(), sampling_period_ms=500).sampling_period_ms == 500


def _bytes_held_by_output_streams(_):
    import gc

    from apache_beam.runners.worker.bundle_processor import DataOutputOperation

    ops = [o for o in gc.get_objects() if isinstance(o, DataOutputOperation)]
    return sum(op.output_stream.size() for op in ops if getattr(op, "output_stream", None) is not None)


def test_a_finished_step_gives_back_its_output_buffer():
    from beamsift import transforms  # noqa: F401 (installs the release)
    from beamsift.transforms.output_buffers import release_finished_output_buffers

    release_finished_output_buffers()  # a second time changes nothing
    with beam.Pipeline(TEST_RUNNER) as p:
        # The first step sends 4 MB on to the shuffle; the step after it looks at what the
        # harness's operations still hold while it runs (its own output stream is near empty)
        held = (
            p
            | beam.Create(range(4))
            | beam.Map(lambda i: (i % 2, "x" * 2**20))
            | beam.GroupByKey()
            | beam.Map(_bytes_held_by_output_streams)
        )
        assert_that(held, _each_under_a_megabyte)


def _each_under_a_megabyte(sizes):
    assert sizes and max(sizes) < 2**20, f"output streams still hold {sizes} bytes"
