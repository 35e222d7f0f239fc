"""The thread plan chosen by measurement (dera_gguf/runtime/threads.py): given what each plan costs, the faster one
runs, the slower one is retried ever more rarely, and a change in costs is followed. Timings here are made up
(a cost per plan), so the tests check the choice, not this machine's speed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dera_gguf.runtime.threads import PlanChoice, ThreadPlan, size_class


def drive(choice: PlanChoice, cost: dict, runs: int, rows: int = 1) -> list:
    """Run ``choice`` ``runs`` times where plan p costs ``cost[p]`` seconds a row; the plans it picked."""
    picked = []
    for _ in range(runs):
        plan = choice.pick()
        choice.record(plan, cost[plan] * rows, rows)
        picked.append(plan)
    return picked


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("faster", [True, False])
def test_the_faster_plan_runs_once_both_are_timed(first, faster):
    choice = PlanChoice(first)
    cost = {faster: 1.0, not faster: 1.5}
    picked = drive(choice, cost, 2000)
    assert picked[:2] == [first, not first]  # in turn while trying both
    assert choice.best == faster
    slower = picked[8:].count(not faster)
    assert 0 < slower <= 12  # retried with intervals doubling from 16 runs: 16, 32, ..., 1024
    assert picked[-100:].count(faster) >= 99


def test_exploring_costs_at_most_a_few_percent():
    choice = PlanChoice(True)
    cost = {True: 3.0, False: 1.0}  # the first plan three times slower (an overloaded machine's threads)
    drive(choice, cost, 5000)
    spent = sum(cost[p] for p in drive(choice, cost, 5000))
    assert spent / (5000 * cost[False]) < 1.01


def test_the_first_run_of_each_plan_is_left_out():
    choice = PlanChoice(True)
    choice.record(True, 100.0, 1)  # a graph being built
    choice.record(False, 2.0, 1)
    choice.record(True, 1.0, 1)
    choice.record(False, 2.0, 1)
    assert choice.seconds == {True: 1.0, False: 2.0}


def test_a_change_in_costs_is_followed():
    choice = PlanChoice(True)
    drive(choice, {True: 1.0, False: 1.3}, 300)
    assert choice.best is True
    drive(choice, {True: 2.0, False: 1.3}, 3000)  # the machine got busy
    assert choice.best is False


def test_costs_are_compared_per_row():
    choice = PlanChoice(True)
    for rows in [1, 2, 3, 4] * 10:
        plan = choice.pick()
        choice.record(plan, (0.9 if plan else 1.0) * rows, rows)
    assert choice.best is True


def test_size_classes():
    assert [size_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 17, 300)] == [1, 2, 4, 4, 8, 8, 16, 32, 256]


class FakeContext:
    def __init__(self):
        self.ctx = SimpleNamespace(ctx=None)
        self.done = 0


def test_a_measured_plan_runs_every_context_and_times_runs_that_name_their_rows(monkeypatch):
    threads = []
    monkeypatch.setattr("llama_cpp.llama_set_n_threads", lambda ctx, n, n_batch: threads.append(n))
    plan = ThreadPlan(2, 2, True, measured=True)
    contexts = [FakeContext(), FakeContext()]

    def work(context):
        context.done += 1

    try:
        for _ in range(10):
            plan.run(contexts, work, rows=5)
        plan.run(contexts, work)  # rows unknown: the default plan, not timed
        plan.run(contexts[:1], work, rows=5)  # one context: nothing to choose
    finally:
        plan.close()
    assert [c.done for c in contexts] == [12, 11]
    assert list(plan.chosen()) == [(2, 8)]
    assert sum(plan.choices[(2, 8)].timed.values()) == 10
    assert set(threads[:4]) == {1, 2}  # both plans tried first: one thread each at once, two one after the other
    twin = plan.copy()  # other contexts of the same models: the same measurements, its own decode threads
    assert twin.choices is plan.choices and twin.measured
