"""When speculation drafts (issue 23): the decisions as pure functions of acceptance and measured costs,
the cost table, and the pace driven through whole texts on simulated machines.

Simulated machines: a step's cost is a function of its rows, and the clock the speculation reads
advances by it, so that what is checked (time with drafts against time without, for the same
tokens) does not depend on how fast or loaded the machine running the tests is.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dera_gguf.speculation import costs
from dera_gguf.speculation import verify as speculative
from dera_gguf.speculation.costs import UNMEASURED_ROW, StepCosts, ratio_at, step_costs
from dera_gguf.speculation.pace import Acceptance, Pace, best_draft, expected_tokens, may_probe, probe_cost
from dera_gguf.speculation.verify import NgramLookup, Speculation

acceptances = st.floats(0.0, 0.999)


@pytest.fixture(autouse=True)
def new_process():
    """Every test starts as a new process would: no step measured."""
    costs.forget()
    yield
    costs.forget()


# ------------------------------------------------------------------ pure decisions


@given(acceptances, st.integers(0, 16))
def test_expected_tokens_is_the_geometric_series(a, d):
    assert expected_tokens(a, d) == pytest.approx((1 - a ** (d + 1)) / (1 - a))


@given(acceptances, st.integers(0, 6))
def test_expected_tokens_is_the_mean_of_simulated_steps(a, d):
    """Monte Carlo: each drafted token passes with probability a while those before it passed."""
    rng = np.random.default_rng(0)
    passes = rng.random((100_000, d)) < a
    emitted = 1 + np.cumprod(passes, axis=1).sum(axis=1) if d else np.ones(100_000)
    assert expected_tokens(a, d) == pytest.approx(emitted.mean(), rel=0.02)


cost_tables = st.lists(st.floats(1.0, 12.0), min_size=8, max_size=8).map(lambda r: np.maximum.accumulate(r))


@given(acceptances, st.integers(1, 8), cost_tables, st.floats(0.0, 0.3))
def test_best_draft_is_the_size_with_most_tokens_per_cost_if_it_beats_a_plain_step(a, longest, table, margin):
    ratio = lambda k: float(table[k - 2])  # k = 2 ... 9 rows
    closed = [(1 - a ** (d + 1)) / (1 - a) / ratio(d + 1) for d in range(1, longest + 1)]
    d = best_draft(a, longest, ratio, margin)
    if max(closed) < 1 + margin - 1e-12:
        assert d == 0
    elif max(closed) > 1 + margin + 1e-12:
        assert closed[d - 1] == pytest.approx(max(closed))


@given(acceptances, st.integers(1, 8))
def test_no_draft_pays_where_every_row_costs_a_whole_step(a, longest):
    assert best_draft(a, longest, lambda k: float(k), margin=0.0) == 0


@given(st.floats(0.2, 0.999), st.integers(1, 8))
def test_free_verification_drafts_the_longest_draft(a, longest):
    assert best_draft(a, longest, lambda k: 1.0, margin=0.1) == longest


@given(acceptances, acceptances, st.integers(1, 8), cost_tables, st.floats(0.0, 0.3))
def test_more_acceptance_never_stops_a_draft(a, b, longest, table, margin):
    low, high = sorted((a, b))
    ratio = lambda k: float(table[k - 2])
    if best_draft(low, longest, ratio, margin):
        assert best_draft(high, longest, ratio, margin)


@given(acceptances, st.integers(1, 8), cost_tables, st.floats(0.5, 1.0), st.floats(0.0, 0.3))
def test_cheaper_verification_never_stops_a_draft(a, longest, table, cheaper, margin):
    dear = lambda k: float(table[k - 2])
    cheap = lambda k: 1.0 + cheaper * (dear(k) - 1.0)
    if best_draft(a, longest, dear, margin):
        assert best_draft(a, longest, cheap, margin)


@given(acceptances, st.integers(1, 8), cost_tables, st.floats(0.3, 1.0), st.floats(0.0, 0.3))
def test_drafts_that_emitted_less_than_expected_never_draft_more(a, longest, table, calibration, margin):
    ratio = lambda k: float(table[k - 2])
    if best_draft(a, longest, ratio, margin, calibration):
        assert best_draft(a, longest, ratio, margin)


def test_calibration_is_what_drafts_emitted_per_token_expected():
    pace = Pace(memory=1.0)
    assert pace.calibration == 1.0  # before any draft: as expected
    pace.drafted("lookup-4", drafted=8, passed=2, expected=7.0)  # emitted 3
    pace.drafted("lookup-4", drafted=8, passed=8, expected=7.0)  # emitted 9
    assert pace.calibration == pytest.approx((8 + 3 + 9) / (8 + 7 + 7))


@given(acceptances, st.integers(1, 8), st.floats(0.0, 20.0))
def test_a_probe_needs_a_budget_for_its_worst_case_and_a_draft_that_mostly_passes(a, d, budget):
    worst = d * UNMEASURED_ROW  # every extra row a whole step, and nothing drafted passing
    promising = (1 - a ** (d + 1)) / (1 - a) >= 1 + d / 2
    assert probe_cost(d) == worst
    assert may_probe(a, d, budget) == (budget >= worst and promising)
    assert may_probe(None, d, budget) == (budget >= worst)  # acceptance learned only by drafting


@given(st.dictionaries(st.integers(2, 12), st.floats(1.0, 10.0), min_size=1), st.integers(1, 16))
def test_an_unmeasured_size_costs_the_most_it_could(known, rows):
    """Measured sizes cost what was measured; any other the least of: the next larger measured size, and the
    next smaller one (or a one-row step) plus a whole step per row."""
    points = {1: 1.0, **known}
    if rows in points:
        assert ratio_at(rows, known) == points[rows]
        return
    below = max(k for k in points if k < rows)
    bounds = [points[below] + UNMEASURED_ROW * (rows - below)]
    bounds += [points[min(k for k in points if k > rows)]] if rows < max(points) else []
    assert ratio_at(rows, known) == pytest.approx(min(bounds))


def test_acceptance_starts_at_zero_and_counts_tested_tokens():
    acceptance = Acceptance(memory=1.0)
    assert acceptance.rate("lookup-4") == 0.0  # never seen: no evidence that it passes
    acceptance.add("lookup-4", passed=8, drafted=8)  # 8 tested, 8 passed
    acceptance.add("lookup-4", passed=2, drafted=8)  # 3 tested (the third failed), 2 passed
    assert acceptance.rate("lookup-4") == pytest.approx(10 / (11 + 1))
    assert acceptance.rate("lookup-1") == 0.0  # kinds are apart


# ------------------------------------------------------------------ the cost table


def test_step_costs_price_a_batch_in_one_row_steps():
    table = StepCosts(weight=0.5)
    table.record(5, 0.050)  # before any one-row step: nothing to compare with
    assert table.measured(5) == 0
    for _ in range(4):
        table.record(1, 0.010)
    table.record(5, 0.030)
    assert table.step_seconds == pytest.approx(0.010)
    assert table.ratio(5) == pytest.approx(3.0) and table.measured(5) == 1
    assert table.ratio(2) == pytest.approx(1.0 + UNMEASURED_ROW)  # unmeasured: as dear as it could be
    assert table.ratio(4) == pytest.approx(3.0)  # no dearer than the measured larger size
    assert table.ratio(7) == pytest.approx(3.0 + 2 * UNMEASURED_ROW)


def test_costs_are_kept_per_process_and_key():
    step_costs("a").record(1, 0.01)
    assert step_costs("a").measured(1) == 1 and step_costs("b").measured(1) == 0
    costs.forget()
    assert step_costs("a").measured(1) == 0


# ------------------------------------------------------------------ the pace on simulated machines


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(speculative.time, "perf_counter", clock)
    return clock


def copy_text(seed: int = 0, n: int = 2000) -> np.ndarray:
    """A phrase of 40 tokens, then copies of it with a token changed now and then: text to copy."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(10, 5000, 40)
    out = []
    while len(out) < n:
        copy = phrase.copy()
        copy[rng.integers(0, 40)] = rng.integers(10, 5000)
        out.extend(copy)
    return np.array(out[:n], dtype=np.intc)


def loose_text(seed: int = 0, n: int = 2000) -> np.ndarray:
    """Tokens from a vocabulary of 12: short matches everywhere, and drafts from them fail most of the time."""
    return np.random.default_rng(seed).integers(0, 12, n).astype(np.intc)


def generate(spec: Speculation, clock: Clock, text: np.ndarray, prompt: int, n: int, cost) -> float:
    """Simulated ``generate()``: ``text`` is what the sampler picks; a step verifying k rows costs ``cost(k)``
    seconds and emits the drafted tokens that match the text, then one more. Returns the seconds spent."""
    spec.restart()
    start, pos = clock.now, prompt
    while pos < prompt + n:
        draft = spec(text[:pos])
        passed = int(np.cumprod(draft == text[pos : pos + len(draft)]).sum()) if len(draft) else 0
        clock.now += cost(1 + len(draft))
        pos += passed + 1
    spec(text[:pos])  # the call that times the last step
    return clock.now - start


def dear(k: int) -> float:
    """A machine where a batch brings nothing: k rows cost k one-row steps (and some)."""
    return 0.010 * (1 + 1.1 * (k - 1))


def cheap(k: int) -> float:
    """A machine where extra rows cost little (a GPU, a model whose weights dominate)."""
    return 0.010 * (1 + 0.1 * (k - 1))


def lookup_speculation() -> Speculation:
    return Speculation(NgramLookup(), room=lambda length: 64, key=lambda: "simulated")


@pytest.mark.parametrize("text", [copy_text, loose_text])
def test_where_verification_does_not_pay_drafting_costs_at_most_the_exploration_share(clock, text):
    spec = lookup_speculation()
    n = 400
    seconds = generate(spec, clock, text(), 40, n, dear)
    plain = n * dear(1)
    probe = dear(spec.pace.max_draft + 1) - dear(1)
    assert seconds <= plain * (1 + spec.pace.explore) + probe


def test_a_fresh_engine_drafts_nothing_until_probes_are_paid_for(clock):
    """No step measured in the process: the first steps of a copyable text are plain ones."""
    spec = lookup_speculation()
    generate(spec, clock, copy_text(), 40, 20, cheap)
    assert spec.stats.verifications == 0


def test_where_verification_pays_copying_gets_faster_and_the_next_engine_starts_from_it(clock):
    first = lookup_speculation()
    n = 1000
    seconds = generate(first, clock, copy_text(), 40, n, cheap)
    assert first.stats.probes > 0 and first.stats.verifications > first.stats.probes
    assert seconds < 0.75 * n * cheap(1)
    second = lookup_speculation()  # same process, same kind of step: no probing needed
    generate(second, clock, copy_text(seed=1), 40, 200, cheap)
    assert second.stats.probes == 0 and second.stats.verifications > 0


def test_untimed_pace_drafts_whatever_steps_cost(clock):
    spec = lookup_speculation()
    spec.pace = Pace(timed=False)
    generate(spec, clock, copy_text(), 40, 60, dear)
    assert spec.stats.verifications > 5


def test_a_drafters_catch_up_after_a_pause_is_paid_from_the_budget_not_priced_into_its_batch():
    """A drafter of its own first catches up with what the text gained while nothing was drafted (a new
    reply's whole prompt): that time is the pause's, so the batch is priced without it, and the
    exploration budget pays it (a probe's, with the rest of what the probe cost beyond plain steps)."""
    for probe in (True, False):
        pace, table = Pace(), StepCosts()
        for _ in range(3):
            table.record(1, 0.010)
        pace.record(table, 9, 1.050, 5, probe, overhead=1.0)
        assert table.ratio(9) == pytest.approx(5.0)
        paid = (1.050 - 5 * 0.010) if probe else 1.0
        assert pace.budget == pytest.approx(pace.explore * 1.050 - paid)
