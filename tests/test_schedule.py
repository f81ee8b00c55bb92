"""Unit tests of lightning_asyncpipe.schedule: generators, text form, validator and simulator."""

from __future__ import annotations

import pytest

from lightning_asyncpipe.errors import ScheduleError
from lightning_asyncpipe.schedule import (
    Action,
    ActionKind,
    annotate,
    async_1f1b,
    async_1f1b_drain,
    async_1f1b_step,
    concat,
    format_table,
    forward_only,
    from_text,
    gpipe,
    one_f_one_b,
    simulate,
    to_text,
    validate,
    zero_bubble_h1,
)

F, B, W, U = ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.WEIGHT, ActionKind.UPDATE


def sched(text: str):
    return from_text(text)


# ---------------------------------------------------------------------------------------------- golden tables

GPIPE_2_2 = "stage 0: 0F0 0F1 .   .   0B0 0B1\nstage 1: .   1F0 1F1 1B0 1B1 ."

# 1F1B, 3 stages, 4 micro-batches: stage s warms up with p-1-s forwards, then alternates F/B.
ONE_F_ONE_B_3_4 = (
    "stage 0: 0F0 0F1 0F2 .   .   0B0 0F3 0B1 .   0B2 .   0B3\n"
    "stage 1: .   1F0 1F1 .   1B0 1F2 1B1 1F3 1B2 .   1B3 .\n"
    "stage 2: .   .   2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 .   ."
)


# ZB-H1, 3 stages, 4 micro-batches: 1F1B's F and B, stage s runs W(j) s backwards after B(j), and
# the W still owed fill the cool-down (one time unit per action).
ZERO_BUBBLE_3_4 = (
    "stage 0: 0F0 0F1 0F2 .   .   0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3\n"
    "stage 1: .   1F0 1F1 .   1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3\n"
    "stage 2: .   .   2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3"
)


def test_gpipe_table():
    assert format_table(gpipe(2, 2)) == GPIPE_2_2


def test_one_f_one_b_table():
    assert format_table(one_f_one_b(3, 4)) == ONE_F_ONE_B_3_4


def test_zero_bubble_table():
    assert format_table(zero_bubble_h1(3, 4)) == ZERO_BUBBLE_3_4
    assert to_text(zero_bubble_h1(3, 4)) == (
        "0: 0F0 0F1 0F2 0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3 0U0\n"
        "1: 1F0 1F1 1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3 1U0\n"
        "2: 2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3 2U0"
    )


@pytest.mark.parametrize("p, m", [(1, 3), (2, 2), (3, 4), (4, 2), (4, 8), (5, 7)])
def test_zero_bubble_keeps_one_f_one_b_order_of_f_and_b(p, m):
    """ZB-H1 moves only the W actions: without them it is 1F1B, for every batch of the stream."""
    for step in (0, 2):
        zb, flush = zero_bubble_h1(p, m, step), one_f_one_b(p, m, step)
        assert {s: [a for a in acts if a.kind is not W] for s, acts in zb.items()} == flush
        for s, acts in zb.items():  # W of every micro-batch, in B's order, before the update
            assert [a.index for a in acts if a.kind is W] == [a.index for a in acts if a.kind is B]
            assert acts[-1] == Action(s, U, step)


def test_generator_lists():
    assert to_text(gpipe(2, 2)) == "0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1B1 1U0"
    assert to_text(gpipe(2, 2, step=1)) == "0: 0F2 0F3 0B2 0B3 0U1\n1: 1F2 1F3 1B2 1B3 1U1"
    assert to_text(one_f_one_b(3, 4)) == (
        "0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3 0U0\n"
        "1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3 1U0\n"
        "2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2U0"
    )
    # fewer micro-batches than the warm-up: all forwards then all backwards
    assert to_text(one_f_one_b(4, 2)) == (
        "0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1B1 1U0\n2: 2F0 2F1 2B0 2B1 2U0\n3: 3F0 3B0 3F1 3B1 3U0"
    )
    assert to_text(async_1f1b(3, 2, 3)) == (
        "0: 0F0 0F1 0F2 0B0 0F3 0B1 0U0 0F4 0B2 0F5 0B3 0U1 0B4 0B5 0U2\n"
        "1: 1F0 1F1 1B0 1F2 1B1 1U0 1F3 1B2 1F4 1B3 1U1 1F5 1B4 1B5 1U2\n"
        "2: 2F0 2B0 2F1 2B1 2U0 2F2 2B2 2F3 2B3 2U1 2F4 2B4 2F5 2B5 2U2"
    )
    assert to_text(forward_only(2, 3)) == "0: 0F0 0F1 0F2\n1: 1F0 1F1 1F2"


# ---------------------------------------------------------------------------------------------- text form


@pytest.mark.parametrize(
    "text, action",
    [
        ("1F3", Action(1, F, 3)),
        ("0B2v1", Action(0, B, 2, 1)),
        ("12U40", Action(12, U, 40)),
        ("3F0v0", Action(3, F, 0, 0)),
        ("2W5", Action(2, W, 5)),
        ("1W0v3", Action(1, W, 0, 3)),
    ],
)
def test_action_parse_str_round_trip(text, action):
    assert Action.parse(text) == action
    assert str(action) == text
    assert Action.parse(str(action)) == action


def test_action_parse_strips_whitespace():
    assert Action.parse("  2B7 ") == Action(2, B, 7)


@pytest.mark.parametrize("text", ["", "F3", "1X3", "1F", "1F3v", "a1F3", "1F-3", "1f3"])
def test_action_parse_rejects(text):
    with pytest.raises(ScheduleError, match="Invalid action"):
        Action.parse(text)


@pytest.mark.parametrize(
    "schedule",
    [gpipe(3, 4), gpipe(2, 3, step=2), one_f_one_b(4, 6), zero_bubble_h1(4, 6, step=1), one_f_one_b(3, 2, step=1), async_1f1b(4, 3, 5),
     forward_only(3, 5), concat(gpipe(2, 2, 0), gpipe(2, 2, 1))],  # fmt: skip
)
def test_text_round_trip(schedule):
    assert from_text(to_text(schedule)) == schedule


def test_text_round_trip_with_versions():
    base = one_f_one_b(2, 2)
    versions = {(s, a.kind, a.index): 5 + a.index for s, acts in base.items() for a in acts}
    annotated = annotate(base, versions)
    assert str(annotated[0][0]) == "0F0v5"
    assert from_text(to_text(annotated)) == annotated


def test_from_text_rejects_bad_lines():
    with pytest.raises(ScheduleError, match="Invalid schedule line"):
        from_text("0 0F0 0B0")
    with pytest.raises(ScheduleError, match="Invalid schedule line"):
        from_text("x: 0F0")
    with pytest.raises(ScheduleError, match="Invalid action"):
        from_text("0: 0F0 0Q1")


# ---------------------------------------------------------------------------------------------- validate


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("m", range(1, 9))
def test_generators_validate(p, m):
    validate(gpipe(p, m), m)
    validate(one_f_one_b(p, m), m)
    validate(async_1f1b(p, m, 3), m)
    validate(concat(*(gpipe(p, m, k) for k in range(3))), m)
    validate(concat(*(one_f_one_b(p, m, k) for k in range(3))), m)
    validate(gpipe(p, m, step=4), m)
    validate(one_f_one_b(p, m, step=2), m)
    validate(zero_bubble_h1(p, m), m)
    validate(concat(*(zero_bubble_h1(p, m, k) for k in range(3))), m)
    validate(concat(*(zero_bubble_h1(p, m, k, merge_weight_grads=True) for k in range(3))), m)


def test_async_refill_validates():
    """Steps after a drain start from an empty pipeline (fill_step) and still validate."""
    p, m = 3, 2
    schedule = {
        s: [a for k in range(2) for a in async_1f1b_step(p, m, s, k)]
        + async_1f1b_drain(p, m, s, 1)
        + [a for k in range(2, 4) for a in async_1f1b_step(p, m, s, k, fill_step=2)]
        + async_1f1b_drain(p, m, s, 3, fill_step=2)
        for s in range(p)
    }
    validate(schedule, m)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0: 0F0 0F1 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1B1 1U0", r"Action 0F1 appears twice on stage 0: 0F0 0F1 0F1"),
        ("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1B0 1B1 1F1 1U0", r"Backward 1B1 comes before its forward on stage 1"),
        ("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0", r"Stage 1 runs forwards without backwards: \[1\]"),
        ("0: 0F0 0F1 0B0 0U0 0B1\n1: 1F0 1F1 1B0 1B1 1U0", r"Update 0U0 comes after 1 of the 2 backwards of batch 0 on stage 0"),
        ("0: 0F0 0F1 0B0 0W0 0W1 0B1 0U0\n1: 1F0 1F1 1B0 1B1 1U0",
         r"Weight gradient 0W1 comes before the backward 0B1 on stage 0"),
        ("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1W0 1B1 1U0 1W1",
         r"Weight gradient 1W1 comes after the update of its batch on stage 1"),
    ],
    ids=["duplicated", "backward-before-forward", "missing-backward", "update-before-backwards",
         "weight-gradient-before-backward", "update-before-weight-gradients"],
)
def test_validate_rejects_a_misplaced_action(text: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        validate(sched(text), 2)


def test_validate_weight_gradients_without_w_are_the_updates():
    """A stage may split some backwards and not others, or none: the update computes the weight
    gradients no W computed (merged); a W still needs its B before it and its batch's update after
    it; a backward of the next batch comes after the update (which applies all kept so far)."""
    validate(sched("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1W0 1B1 1U0"), 2)
    validate(sched("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1W0 1B1 1W1 1U0"), 2)
    with pytest.raises(ScheduleError, match=r"Stage 1 updates batches \[\], not the batches it trains"):
        validate(sched("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1W0 1B1"), 2)
    with pytest.raises(ScheduleError, match=r"Weight gradient 1W1 comes after the update of its batch"):
        validate(sched("0: 0F0 0F1 0B0 0B1 0U0\n1: 1F0 1F1 1B0 1W0 1B1 1U0 1W1"), 2)
    with pytest.raises(ScheduleError, match=r"Backward 1B2 of batch 1 comes before the update of batch 0"):
        validate(sched("0: 0F0 0F1 0B0 0B1 0U0 0F2 0F3 0B2 0B3 0U1\n"
                       "1: 1F0 1F1 1B0 1B1 1F2 1B2 1U0 1F3 1B3 1U1"), 2)  # fmt: skip


def test_validate_missing_or_wrong_update():
    with pytest.raises(ScheduleError, match=r"Stage 0 updates batches \[\], not the batches it trains"):
        validate(sched("0: 0F0 0B0\n1: 1F0 1B0 1U0"), 1)
    with pytest.raises(ScheduleError, match=r"Update 0U1 comes after 0 of the 1 backwards of batch 1"):
        validate(sched("0: 0F0 0B0 0U1\n1: 1F0 1B0 1U0"), 1)


def test_validate_action_on_wrong_stage():
    with pytest.raises(ScheduleError, match=r"Action 1F0 is listed for stage 0"):
        validate(sched("0: 1F0\n1: 1F0"), 1)


def test_validate_stages_disagree_on_microbatches():
    with pytest.raises(ScheduleError, match=r"Stage 1 runs micro-batches \[0\], stage 0 runs \[0, 1\]"):
        validate(sched("0: 0F0 0B0 0U0 0F1 0B1 0U1\n1: 1F0 1B0 1U0"), 1)


def test_validate_stage_numbering():
    with pytest.raises(ScheduleError, match=r"stages must be 0..1, got \[0, 2\]"):
        validate({0: [Action(0, F, 0)], 2: [Action(2, F, 0)]}, 1)


def test_validate_cross_stage_deadlock():
    # Each row is fine on its own, but stage 0 waits for 1B0 before sending F1, while stage 1 needs F1
    # (GPipe order) before it runs B0.
    text = "0: 0F0 0B0 0F1 0B1 0U0\n1: 1F0 1F1 1B0 1B1 1U0"
    with pytest.raises(ScheduleError, match=r"Schedule deadlocks: stage 0 waits at 0B0, stage 1 waits at 1F1\.") as e:
        validate(sched(text), 2)
    # the clock table so far is part of the message
    assert str(e.value).endswith("\nstage 0: 0F0 .\nstage 1: .   1F0")


def test_validate_three_stage_deadlock():
    # stage 0 wants B0 before F1; stages 1 and 2 (GPipe order) want F1 before B0
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(sched("0: 0F0 0B0 0F1 0B1 0U0\n1: 1F0 1F1 1B0 1B1 1U0\n2: 2F0 2F1 2B0 2B1 2U0"), 2)


# ---------------------------------------------------------------------------------------------- simulate


@pytest.mark.parametrize("p, m", [(1, 1), (1, 4), (2, 2), (2, 5), (3, 4), (4, 4), (4, 8), (5, 3)])
def test_sync_bubble(p, m):
    expected = (p - 1) / (m + p - 1)
    for schedule in (gpipe(p, m), one_f_one_b(p, m)):
        result = simulate(schedule, forward_time=1.0, backward_time=1.0)
        assert result.makespan == 2 * (m + p - 1)
        for s in range(p):
            assert result.bubble[s] == pytest.approx(expected)


@pytest.mark.parametrize("p, m", [(1, 3), (2, 2), (3, 4), (4, 2), (4, 8)])
def test_peak_in_flight_sync(p, m):
    assert simulate(gpipe(p, m)).peak_in_flight == {s: m for s in range(p)}
    assert simulate(one_f_one_b(p, m)).peak_in_flight == {s: min(p - s, m) for s in range(p)}


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("n_steps", [1, 2, 5])
def test_peak_in_flight_async(p, m, n_steps):
    # in steady state stage s keeps p-s micro-batches in flight (as 1F1B), whatever m is, bounded by
    # the number of micro-batches that exist at all
    assert simulate(async_1f1b(p, m, n_steps)).peak_in_flight == {s: min(p - s, n_steps * m) for s in range(p)}


def test_async_bubble_vanishes():
    p, m, n = 4, 4, 50
    async_result = simulate(async_1f1b(p, m, n))
    sync_result = simulate(concat(*(one_f_one_b(p, m, k) for k in range(n))))
    for s in range(p):
        # the pipeline fills and drains once: (p-1) / (n*m + p-1)
        assert async_result.bubble[s] == pytest.approx((p - 1) / (n * m + p - 1))
        assert sync_result.bubble[s] == pytest.approx((p - 1) / (m + p - 1))
        assert async_result.bubble[s] < sync_result.bubble[s]
        assert async_result.bubble[s] < 0.1
    assert async_result.makespan == 2 * (n * m + p - 1)
    # and it shrinks monotonically with the number of steps
    bubbles = [simulate(async_1f1b(p, m, k)).bubble[0] for k in (1, 2, 5, 10, 50)]
    assert bubbles == sorted(bubbles, reverse=True) and bubbles[0] == pytest.approx(3 / 7)


def test_simulate_per_stage_times_and_update_time():
    result = simulate(gpipe(2, 1), forward_time={0: 1.0, 1: 2.0}, backward_time={0: 3.0, 1: 4.0}, update_time=0.5)
    # 0F0 [0,1], 1F0 [1,3], 1B0 [3,7], 0B0 [7,10], updates take 0.5 after the last backward
    assert [(b, e, str(a)) for b, e, a in result.timeline[0]] == [(0.0, 1.0, "0F0"), (7.0, 10.0, "0B0"),
                                                                (10.0, 10.5, "0U0")]  # fmt: skip
    assert [(b, e, str(a)) for b, e, a in result.timeline[1]] == [(1.0, 3.0, "1F0"), (3.0, 7.0, "1B0"),
                                                                (7.0, 7.5, "1U0")]  # fmt: skip
    assert result.makespan == 10.5
    assert result.bubble[1] == pytest.approx(1 - 6.5 / 10.5)


def test_zero_bubble_bubble_is_smaller_than_pipedream_flush():
    """p = 4, m = 8 with equal F, B (input gradient) and W (weight gradient) times: 1F1B-with-flush
    runs B and W together (2 units) and idles (p-1)(F+B+W) = 9 units per stage; ZB-H1 fills the
    cool-down with W and idles (p-1)(F+B-W) = 3 (Qi et al. 2024, section 2.1): a third."""
    p, m = 4, 8
    zb = simulate(zero_bubble_h1(p, m), forward_time=1.0, backward_time=1.0, weight_time=1.0)
    flush = simulate(one_f_one_b(p, m), forward_time=1.0, backward_time=1.0, weight_time=1.0)
    assert flush.makespan == 3 * m + 3 * (p - 1) == 33
    assert zb.makespan == 3 * m + (p - 1) == 27
    for s in range(p):
        assert flush.bubble[s] == pytest.approx(9 / 33)
        assert zb.bubble[s] == pytest.approx(3 / 27)
        assert zb.bubble[s] < flush.bubble[s]
    # the memory of ZB-H1: every stage keeps at most p micro-batches until their W, stage 0's
    # 1F1B peak; 1F1B itself keeps p-s
    assert zb.peak_in_flight == {s: p for s in range(p)}
    assert flush.peak_in_flight == {s: p - s for s in range(p)}


ZERO_BUBBLE_MERGED_3_4 = """\
stage 0: 0F0 0F1 0F2 .   .   0B0 0F3 0W0 0B1 0W1 0B2 0W2 0B3 0U0
stage 1: .   1F0 1F1 .   1B0 1F2 1B1 1F3 1W0 1B2 1W1 1B3 1U0 .
stage 2: .   .   2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2U0 .   .   ."""


def test_zero_bubble_merged_keeps_w_only_in_the_cool_down():
    """merge_weight_grads: 1F1B's order, a W (the oldest owed) before each backward after the
    stage's last forward; the update computes the rest (the docstring's table)."""
    merged = zero_bubble_h1(3, 4, merge_weight_grads=True)
    assert format_table(merged) == ZERO_BUBBLE_MERGED_3_4
    for p, m in [(1, 3), (2, 8), (3, 4), (4, 2), (4, 8), (5, 7)]:
        for step in (0, 2):
            zb, flush = zero_bubble_h1(p, m, step, merge_weight_grads=True), one_f_one_b(p, m, step)
            assert {s: [a for a in acts if a.kind is not W] for s, acts in zb.items()} == flush
            assert not [a for a in zb[p - 1] if a.kind is W]  # the last stage's B waits for nobody
            for s, acts in zb.items():
                last_f = max(i for i, a in enumerate(acts) if a.kind is F)
                assert all(i > last_f for i, a in enumerate(acts) if a.kind is W)
                assert [a.index for a in acts if a.kind is W] == [a.index for a in acts if a.kind is B][
                    : sum(a.kind is W for a in acts)]  # the oldest first


@pytest.mark.parametrize("p, m", [(2, 8), (3, 8), (4, 8), (4, 16), (8, 16)])
def test_zero_bubble_merged_against_zb_h1_and_flush(p, m):
    """Unit F, B and W: merged W equals ZB-H1's makespan, less than 1F1B with every weight gradient
    at the update (the engine's pipedream_flush); when a W of one micro-batch costs 1.2 units and a
    merged one 1 (this CPU), merged beats both. Merged keeps all m micro-batches' (x, g) until U."""
    flush = simulate(one_f_one_b(p, m), 1.0, 1.0, update_time=float(m)).makespan
    for w_one, w_merged in [(1.0, 1.0), (1.2, 1.0)]:
        zb = simulate(zero_bubble_h1(p, m), 1.0, 1.0, weight_time=w_one).makespan
        merged = simulate(zero_bubble_h1(p, m, merge_weight_grads=True), 1.0, 1.0, weight_time=w_one,
                          merged_weight_time=w_merged)  # fmt: skip
        if w_one == w_merged:
            assert merged.makespan == pytest.approx(zb) and merged.makespan < flush
        else:
            assert merged.makespan < zb and merged.makespan < flush
        assert merged.peak_in_flight == {s: m for s in range(p)}  # (x, g) kept until the update
    assert simulate(zero_bubble_h1(2, 8, merge_weight_grads=True), 1.0, 1.0, weight_time=1.2,
                    merged_weight_time=1.0).makespan == pytest.approx(25.4)  # fmt: skip


def test_simulate_weight_time():
    """Without W actions a B is the whole backward (backward_time + weight_time); with them, B and W
    take their own times, W waits for no other stage, and an update computes the weight gradients
    no W computed (merged: merged_weight_time each, default weight_time)."""
    result = simulate(sched("0: 0F0 0B0 0W0 0U0\n1: 1F0 1B0 1U0"), 1.0, 2.0, weight_time=3.0)
    assert [(b, e, str(a)) for b, e, a in result.timeline[1]] == [(1.0, 2.0, "1F0"), (2.0, 4.0, "1B0"),
                                                                (4.0, 7.0, "1U0")]  # fmt: skip
    merged = simulate(sched("0: 0F0 0B0 0W0 0U0\n1: 1F0 1B0 1U0"), 1.0, 2.0, 0.5, weight_time=3.0,
                      merged_weight_time=1.0)  # fmt: skip
    assert [(b, e, str(a)) for b, e, a in merged.timeline[1]][-1] == (4.0, 5.5, "1U0")
    assert simulate(sched("0: 0F0 0B0 0U0\n1: 1F0 1B0 1U0"), 1.0, 2.0, weight_time=3.0).timeline[1][1][:2] == (2.0, 7.0)
    assert [(b, e, str(a)) for b, e, a in result.timeline[0]] == [(0.0, 1.0, "0F0"), (4.0, 6.0, "0B0"),
                                                                (6.0, 9.0, "0W0"), (9.0, 9.0, "0U0")]  # fmt: skip
    # the default weight_time of 0 keeps every earlier result
    assert simulate(one_f_one_b(3, 4)).makespan == simulate(zero_bubble_h1(3, 4)).makespan == 12


def test_simulate_empty_schedule():
    result = simulate({0: [], 1: []})
    assert result.makespan == 0.0 and result.bubble == {0: 0.0, 1: 0.0}


# ---------------------------------------------------------------------------------------------- async steps


@pytest.mark.parametrize("p, m, n", [(1, 2, 3), (2, 1, 4), (3, 2, 4), (4, 3, 3), (4, 1, 6)])
def test_async_step_structure(p, m, n):
    for s in range(p):
        warmup = p - 1 - s
        steps = [async_1f1b_step(p, m, s, k) for k in range(n)]
        for k, actions in enumerate(steps):
            assert all(a.stage == s for a in actions)
            # exactly the forwards of this step's m micro-batches, in order
            assert [a.index for a in actions if a.kind is F] == list(range(k * m, (k + 1) * m))
            # each forward F(j) is followed by B(j - warmup) when that micro-batch exists
            assert [a.index for a in actions if a.kind is B] == [j - warmup for j in range(k * m, (k + 1) * m)
                                                                 if j - warmup >= 0]  # fmt: skip
            # U(k') right after the last backward of batch k'
            for i, a in enumerate(actions):
                if a.kind is U:
                    assert actions[i - 1] == Action(s, B, (a.index + 1) * m - 1)
        drain = async_1f1b_drain(p, m, s, n - 1)
        assert all(a.kind is not F for a in drain)
        assert [a for acts in steps for a in acts] + drain == async_1f1b(p, m, n)[s]


@pytest.mark.parametrize("p, m, n", [(2, 2, 3), (3, 1, 5), (4, 2, 4), (4, 4, 3)])
def test_async_steps_are_atomic(p, m, n):
    """Everything a step receives is sent by a neighbour in the same or an earlier step, so a barrier
    between two steps cannot deadlock: every prefix of whole steps runs to the end."""
    step_of = {}
    for s in range(p):
        for k in range(n):
            for a in async_1f1b_step(p, m, s, k):
                step_of[(s, a.kind, a.index)] = k
    for (s, kind, j), k in step_of.items():
        if kind is F and s > 0:
            assert step_of[(s - 1, F, j)] <= k
        if kind is B and s < p - 1:
            assert step_of[(s + 1, B, j)] <= k
    for k in range(1, n + 1):
        simulate({s: [a for i in range(k) for a in async_1f1b_step(p, m, s, i)] for s in range(p)})


def test_async_gradient_delay_in_steps():
    # stage 0 of a 4-stage pipeline with m=1 backpropagates micro-batch j three steps after its forward
    acts = async_1f1b_step(4, 1, 0, 5)
    assert [str(a) for a in acts] == ["0F5", "0B2", "0U2"]
    assert [str(a) for a in async_1f1b_drain(4, 1, 0, 5)] == ["0B3", "0U3", "0B4", "0U4", "0B5", "0U5"]
    # the last stage has no warm-up and drains nothing
    assert [str(a) for a in async_1f1b_step(4, 1, 3, 5)] == ["3F5", "3B5", "3U5"]
    assert async_1f1b_drain(4, 1, 3, 5) == []
    # after a refill at step 5, no backward of an older micro-batch exists
    assert [str(a) for a in async_1f1b_step(4, 1, 0, 5, fill_step=5)] == ["0F5"]


def test_validate_rejects_backwards_out_of_forward_order() -> None:
    """Gradients travel first-in first-out: a stage that backwards out of its forward order would
    pair each gradient with the wrong micro-batch, so the validator refuses it (it cannot deadlock,
    which is why the simulator alone does not catch it)."""
    from lightning_asyncpipe.schedule import from_text

    swapped = from_text("0: 0F0 0F1 0B1 0B0 0U0\n1: 1F0 1F1 1B1 1B0 1U0")
    simulate(swapped)  # runs to the end...
    with pytest.raises(ScheduleError, match="first-in first-out"):
        validate(swapped, 2)  # ...but is rejected


def test_simulate_charges_the_link_time_for_each_message() -> None:
    """Each forward waits for its input to cross the link, each backward for its gradient: one
    micro-batch on 2 stages is F0, link, F1, B1, link, B0 (then each stage's update)."""
    result = simulate(one_f_one_b(2, 1), forward_time={0: 1.0, 1: 2.0}, backward_time=3.0, update_time={0: 0.5, 1: 0.25},
                      transfer_time=0.125)
    assert result.makespan == 1.0 + 0.125 + 2.0 + 3.0 + 0.125 + 3.0 + 0.5
    assert simulate(one_f_one_b(2, 1), 1.0, 1.0, 0.0, transfer_time=0.0).makespan == 4.0
