"""Revolve's fidelity to Griewank & Walther (2000), in their convention: c slots with the
initial state included; reversing l steps advances t(l, c) steps, where
r = min{r : C(c+r, c) >= l} and t(l, c) = r*l - C(c+r, c+1). Checked three ways: the
closed form against the optimal recursion, the action plan (`reversal_plan`) and the
real schedule the planner emits for chains of tanh steps.

In their convention each reversal step also records one step evaluation. A tanh step's
backward reads its output, which is the next step's input state: the reversal that
starts from state k runs step k's backward with nothing to record. So on a tanh chain
the schedule evaluates t(l, c) + 1 steps (the last step once, for its own backward).
"""

from __future__ import annotations

import functools
from math import comb

import numpy as np
import pytest
import support

from remat_proto.policies import Revolve, StoreAll
from remat_server.checkpoint.planners.revolve import binomial_advances, reversal_plan
from remat_server.checkpoint.schedule import Compute
from remat_server.engine import Engine, RunRequest
from remat_server.errors import InvalidArgument
from remat_server.graph.ir import GraphSpec

ENGINE = Engine()

REFERENCE = {
    (6, 1): 15,
    (8, 2): 14,
    (10, 3): 15,
    (20, 3): 45,
    (100, 5): 316,
    (100, 10): 222,
    (1000, 10): 3636,
}


def t(l: int, c: int) -> int:
    r = 0
    while comb(c + r, c) < l:
        r += 1
    return r * l - comb(c + r, c + 1)


@functools.cache
def optimal(l: int, c: int) -> int:
    """Minimal advances by the recursion: snapshot after m steps, reverse the last l-m
    with one slot fewer, then the first m with all c. One slot: l(l-1)/2."""
    if l <= 1:
        return 0
    if c == 1:
        return l * (l - 1) // 2
    return min(m + optimal(l - m, c - 1) + optimal(m, c) for m in range(1, l))


def chain(l: int, width: int = 3, dtype: str = "float64", loss: bool = False) -> GraphSpec:
    """Without a loss, tl is the output (its cotangent is an input), so the forward graph
    is exactly l steps."""
    return support.tanh_chain(l, width, dtype, loss)


def plan_chain(l: int, c: int, loss: bool = False):
    if loss:
        return ENGINE.plan(chain(l, loss=True), wrt=("x",), loss="loss", policy=Revolve(c))
    return ENGINE.plan(chain(l), wrt=("x",), cotangent_outputs=("out",), policy=Revolve(c))


# --- the closed form ---------------------------------------------------------------------
@pytest.mark.parametrize("l,c", sorted(REFERENCE))
def test_binomial_advances_reference_values(l, c):
    assert binomial_advances(l, c) == t(l, c) == REFERENCE[(l, c)]


def test_closed_form_is_the_optimum_of_the_recursion():
    for l in range(1, 61):
        for c in range(1, 7):
            assert binomial_advances(l, c) == t(l, c) == optimal(l, c), (l, c)


# --- the action plan -----------------------------------------------------------------------
def replay(actions, l: int, c: int) -> tuple[int, int]:
    """Check the actions are executable and return (advances, most slots held at once).
    Slots: the initial state plus the snapshots; the state an advance ends on is the
    working state (it may be reversed from, but it is not a slot unless snapshotted)."""
    held, current, advances, most = {0}, None, 0, 1
    reversed_steps = []
    for action, i, j in actions:
        if action == "advance":
            assert i in held or i == current, f"advance from state {i}, which is not held"
            assert i < j <= l - len(reversed_steps) - 1, "advance past the next reversal"
            advances += j - i
            current = j
        elif action == "snapshot":
            assert i == current, "snapshot of a state that is not the working state"
            held.add(i)
            most = max(most, len(held))
        elif action == "reverse":
            expected = l - len(reversed_steps)
            assert i == expected, f"reversed step {i}, expected {expected}"
            assert i - 1 in held or i - 1 == current, f"reverse {i} without state {i - 1}"
            reversed_steps.append(i)
        elif action == "release":
            assert i in held or i == current, f"release of state {i}, which is not held"
            held.discard(i)
            current = None if i == current else current
        else:
            raise AssertionError(f"unknown action {action}")
    assert reversed_steps == list(range(l, 0, -1))
    assert held == {0}, "snapshots left unreleased"
    return advances, most


def test_reversal_plan_is_optimal_and_within_its_slots_on_a_grid():
    for l in range(1, 121):
        for c in range(1, 11):
            advances, most = replay(reversal_plan(l, c), l, c)
            assert advances == t(l, c), (l, c)
            assert most <= c, (l, c, most)


@pytest.mark.parametrize("l,c", sorted(REFERENCE))
def test_reversal_plan_reference_points(l, c):
    advances, most = replay(reversal_plan(l, c), l, c)
    assert advances == REFERENCE[(l, c)]
    assert most <= c
    if l > c:  # with fewer slots than steps, the plan uses them all
        assert most == c


# --- the real schedule ---------------------------------------------------------------------
def step_evaluations(plan, l: int, loss: bool = False) -> int:
    evaluations = plan.simulation.evaluations
    forward = {f"t{i}" for i in range(1, l + 1)} | ({"loss"} if loss else set())
    assert all(count == 1 for name, count in evaluations.items() if name not in forward)
    return sum(evaluations[name] for name in forward)


def test_schedule_step_evaluations_are_t_plus_one_on_a_grid():
    for l in range(2, 41):
        for c in range(1, 7):
            assert step_evaluations(plan_chain(l, c), l) == t(l, c) + 1, (l, c)


@pytest.mark.parametrize("l,c", [key for key in sorted(REFERENCE) if key[0] <= 100])
def test_schedule_reference_points(l, c):
    assert step_evaluations(plan_chain(l, c), l) == REFERENCE[(l, c)] + 1


@pytest.mark.parametrize("l,c", [(5, 1), (8, 2), (17, 3), (30, 4)])
def test_a_final_loss_node_is_one_more_step(l, c):
    # loss = sum(tl) is a segment of its own: l + 1 steps, the last reversed first, so
    # it is evaluated once (never advanced over).
    plan = plan_chain(l, c, loss=True)
    assert plan.simulation.evaluations["loss"] == 1
    assert step_evaluations(plan, l, loss=True) == t(l + 1, c) + 1


def test_schedule_holds_at_most_c_plus_one_chain_values():
    # c - 1 snapshots (the initial state is the input x), the working state and the step
    # being computed from it; the output tl is held apart (it is a result).
    for c in range(1, 7):
        most_seen = 0
        for l in range(2, 41):
            plan = plan_chain(l, c)
            live, most = set(), 0
            for step in plan.schedule.steps:
                if step.node.startswith("t") and step.node != f"t{l}":
                    (live.add if isinstance(step, Compute) else live.discard)(step.node)
                    most = max(most, len(live))
            assert most <= c + 1, (l, c, most)
            most_seen = max(most_seen, most)
        assert most_seen == c + 1
    # And the bytes follow: more slots, more memory, fewer evaluations.
    peaks = [plan_chain(40, c).simulation.peak_bytes for c in range(1, 7)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]


def test_a_single_step_is_not_a_chain():
    with pytest.raises(InvalidArgument, match="no chain structure"):
        plan_chain(1, 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("l", [5, 17])
def test_revolve_gradients_equal_store_all_on_the_chain(l, dtype):
    rng = np.random.default_rng(l)
    x = rng.standard_normal(3).astype(dtype)
    cotangent = rng.standard_normal(3).astype(dtype)
    for loss in (False, True):
        spec = chain(l, dtype=dtype, loss=loss)
        request = (
            dict(wrt=("x",), loss="loss")
            if loss
            else dict(wrt=("x",), cotangents={"out": cotangent})
        )
        store = ENGINE.run(RunRequest(spec, {"x": x}, policy=StoreAll(), **request))
        expected = x.astype(np.float64)
        for _ in range(l):
            expected = np.tanh(expected)
        np.testing.assert_allclose(
            store.outputs["out" if not loss else "loss"],
            expected if not loss else expected.sum(),
            rtol=1e-5,
        )
        for c in range(1, 5):
            result = ENGINE.run(RunRequest(spec, {"x": x}, policy=Revolve(c), **request))
            assert np.array_equal(result.grads["x"], store.grads["x"]), (loss, c)
            for name, value in store.outputs.items():
                assert np.array_equal(result.outputs[name], value)
            assert result.metrics.peak_bytes == result.metrics.predicted_peak_bytes
            # t + 1 evaluations of the l + loss steps, each first one not a recomputation
            assert result.metrics.recomputed_nodes == t(l + loss, c) + 1 - (l + loss)
