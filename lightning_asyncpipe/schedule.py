"""The pipeline schedule as data: typed actions, generators, a text form, a validator and a simulator.

A schedule maps each stage to the ordered list of actions that stage runs. Micro-batches are
numbered globally in data order: batch ``k`` holds micro-batches ``k*m .. k*m+m-1``. ``U`` actions
carry the batch whose gradient they apply. ``B`` is the whole backward of a micro-batch, unless the
schedule has ``W`` actions: then ``B`` computes the input gradient and ``W`` the weight gradient of
the layers that can defer it (:mod:`lightning_asyncpipe.wgrad`); the update computes those of the
micro-batches without a ``W``. The text form of an
action is ``"<stage><kind><index>"`` (``"1F3"``: stage 1, forward of micro-batch 3), optionally
followed by ``v<weight version>``.

Clock-cycle picture of the generators for 3 stages and 4 micro-batches (one time unit per
forward and backward, read with :func:`format_table`)::

    gpipe           0F0 0F1 0F2 0F3  .   .   .   .  0B0 0B1 0B2 0B3 0U0
    (stage 0 row)   all forwards, then all backwards, then one update: bubble (p-1)/(m+p-1)

    one_f_one_b     stage s warms up with min(p-1-s, m) forwards, then alternates one forward and
                    one backward, cools down, and updates: same bubble, only p-s micro-batches in flight

    zero_bubble_h1  1F1B's order of F and B, the backward split into B (input gradient) and W
                    (weight gradient); W actions fill the cool-down bubble (ZB-H1, see the function)

    async_1f1b      the 1F1B steady state kept across batches: stage s runs F(j) then B(j-(p-1-s))
                    forever and applies U(k) right after the last backward of batch k. Each
                    Lightning step runs exactly the forwards of its own batch, so a barrier between
                    steps cannot deadlock; the pipeline only drains when asked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional

from lightning_asyncpipe.errors import ScheduleError

__all__ = [
    "ActionKind",
    "Action",
    "Schedule",
    "forward_only",
    "gpipe",
    "one_f_one_b",
    "zero_bubble_h1",
    "async_1f1b_step",
    "async_1f1b_drain",
    "async_1f1b",
    "validate",
    "simulate",
    "SimResult",
    "format_table",
    "to_text",
    "from_text",
]


class ActionKind(str, Enum):
    """What one action does."""

    FORWARD = "F"
    BACKWARD = "B"
    WEIGHT = "W"
    UPDATE = "U"


_ACTION_RE = re.compile(r"^(\d+)([FBWU])(\d+)(?:v(\d+))?$")


@dataclass(frozen=True)
class Action:
    """One unit of work of one stage.

    Args:
        stage: the pipeline stage that runs it.
        kind: forward, backward (input gradient when the stage also has ``W``), weight gradient or update.
        index: the micro-batch (``F``, ``B``, ``W``) or the batch whose gradient is applied (``U``).
        weight_version: the number of updates the weights used by this action have seen, when a
            policy has annotated the plan; ``None`` otherwise.
    """

    stage: int
    kind: ActionKind
    index: int
    weight_version: Optional[int] = None

    def __str__(self) -> str:
        version = "" if self.weight_version is None else f"v{self.weight_version}"
        return f"{self.stage}{self.kind.value}{self.index}{version}"

    @staticmethod
    def parse(text: str) -> "Action":
        """Parse the text form, e.g. ``Action.parse("1F3")`` or ``Action.parse("0B2v1")``.

        Raises:
            ScheduleError: if ``text`` is not an action.
        """
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ScheduleError(f"Invalid action {text!r}: expected '<stage><F|B|W|U><index>[v<version>]', e.g. '1F3'.")
        stage, kind, index, version = match.groups()
        return Action(int(stage), ActionKind(kind), int(index), None if version is None else int(version))


Schedule = dict[int, list[Action]]
"""Stage -> the ordered actions of that stage."""


def _f(stage: int, j: int) -> Action:
    return Action(stage, ActionKind.FORWARD, j)


def _b(stage: int, j: int) -> Action:
    return Action(stage, ActionKind.BACKWARD, j)


def _w(stage: int, j: int) -> Action:
    return Action(stage, ActionKind.WEIGHT, j)


def _u(stage: int, k: int) -> Action:
    return Action(stage, ActionKind.UPDATE, k)


def forward_only(n_stages: int, n_microbatches: int) -> Schedule:
    """Evaluation: every stage forwards micro-batches ``0..m-1`` in order; nothing else."""
    return {s: [_f(s, j) for j in range(n_microbatches)] for s in range(n_stages)}


def gpipe(n_stages: int, n_microbatches: int, step: int = 0) -> Schedule:
    """GPipe for one batch: every forward, then every backward, then one update."""
    mbs = range(step * n_microbatches, (step + 1) * n_microbatches)
    return {
        s: [_f(s, j) for j in mbs] + [_b(s, j) for j in mbs] + [_u(s, step)] for s in range(n_stages)
    }


def one_f_one_b(n_stages: int, n_microbatches: int, step: int = 0) -> Schedule:
    """1F1B with a flush (PipeDream-Flush) for one batch: warm-up, steady 1F1B, cool-down, update."""
    base = step * n_microbatches
    schedule: Schedule = {}
    for s in range(n_stages):
        warmup = min(n_stages - 1 - s, n_microbatches)
        actions = [_f(s, base + j) for j in range(warmup)]
        for i in range(n_microbatches - warmup):
            actions += [_f(s, base + warmup + i), _b(s, base + i)]
        actions += [_b(s, base + j) for j in range(n_microbatches - warmup, n_microbatches)]
        schedule[s] = actions + [_u(s, step)]
    return schedule


def zero_bubble_h1(n_stages: int, n_microbatches: int, step: int = 0, merge_weight_grads: bool = False) -> Schedule:
    """ZB-H1 (Qi et al., ICLR 2024, "Zero Bubble Pipeline Parallelism", section 2.1) for one batch.

    The backward is split into ``B`` (the input gradient, which the previous stage waits for) and
    ``W`` (the weight gradient, which nobody waits for). The order of ``F`` and ``B`` is 1F1B's;
    stage ``s`` runs the ``W`` of a micro-batch ``s`` backwards after its ``B`` (right after the
    ``B`` on stage 0), and the ``W`` still owed at the end fill the cool-down, where 1F1B idles.
    Every stage then keeps at most ``p`` micro-batches in flight (until their ``W``): stage 0's
    1F1B peak. With equal ``F``, ``B``, ``W`` times the bubble of a stage shrinks from
    ``(p-1)(F+B+W)`` to ``(p-1)(F+B-W)``: a third. p = 3, m = 4 (one time unit per action)::

        stage 0: 0F0 0F1 0F2 .   .   0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3
        stage 1: .   1F0 1F1 .   1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3
        stage 2: .   .   2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3

    The same order as torch.distributed.pipelining's ``ScheduleInterleavedZeroBubble`` with one
    stage per rank.

    ``merge_weight_grads=True``: only the cool-down keeps ``W`` actions (before each backward
    after the stage's last forward, the ``W`` of the oldest micro-batch still owed; none on the last
    stage, whose backward waits for no other stage, so a ``W`` there only delays it); the other
    weight gradients are computed by the update, in one GEMM per layer over their micro-batches,
    as 1F1B with deferred weight gradients does. The same makespan when a ``W`` costs its share of
    the batch's weight-gradient GEMM; less where a ``W`` of one small micro-batch costs more (on a
    CPU its accumulation into the 4 MiB gradient costs ~1.2x here: see docs/benchmarks.md), for
    ``(x, g)`` kept until the update on every stage. p = 3, m = 4 (the update computes ``W(3)`` on
    stage 0, ``W(2), W(3)`` on stage 1, all four on stage 2)::

        stage 0: 0F0 0F1 0F2 .   .   0B0 0F3 0W0 0B1 0W1 0B2 0W2 0B3 0U0
        stage 1: .   1F0 1F1 .   1B0 1F2 1B1 1F3 1W0 1B2 1W1 1B3 1U0 .
        stage 2: .   .   2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3 2U0 .   .   .
    """
    if merge_weight_grads:
        return _one_f_one_b_cooldown_w(n_stages, n_microbatches, step)
    base = step * n_microbatches
    schedule: Schedule = {}
    for s in range(n_stages):
        warmup = min(n_stages - 1 - s, n_microbatches)
        actions = [_f(s, base + j) for j in range(warmup)]
        owed: list[int] = []  # micro-batches whose B is done and W is not
        for i in range(n_microbatches):
            if i < n_microbatches - warmup:
                actions.append(_f(s, base + warmup + i))
            actions.append(_b(s, base + i))
            owed.append(base + i)
            if len(owed) > s:
                actions.append(_w(s, owed.pop(0)))
        schedule[s] = actions + [_w(s, j) for j in owed] + [_u(s, step)]
    return schedule


def _one_f_one_b_cooldown_w(n_stages: int, n_microbatches: int, step: int) -> Schedule:
    """1F1B with a ``W`` (of the oldest micro-batch owed) before each backward of the cool-down, on
    every stage but the last (whose backward waits for no other stage: a ``W`` there would only
    delay it, and every stage before it)."""
    schedule: Schedule = {}
    for s, actions in one_f_one_b(n_stages, n_microbatches, step).items():
        if s == n_stages - 1:
            schedule[s] = actions
            continue
        last_forward = max(i for i, a in enumerate(actions) if a.kind is ActionKind.FORWARD)
        owed: list[int] = []
        out: list[Action] = []
        for i, a in enumerate(actions):
            if a.kind is ActionKind.BACKWARD and i > last_forward and owed:
                out.append(_w(s, owed.pop(0)))
            out.append(a)
            if a.kind is ActionKind.BACKWARD:
                owed.append(a.index)
        schedule[s] = out
    return schedule


def _backward_then_maybe_update(stage: int, i: int, m: int) -> list[Action]:
    return [_b(stage, i)] + ([_u(stage, i // m)] if (i + 1) % m == 0 else [])


def async_1f1b_step(n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int = 0) -> list[Action]:
    """The actions of ``stage`` during Lightning step ``step`` of the asynchronous 1F1B stream.

    Stage ``s`` runs ``F(j), B(j - (p-1-s))`` for the ``m`` micro-batches ``j`` of batch ``step``;
    backwards of micro-batches from before ``fill_step`` (the step at which the pipeline was last
    filled from empty) do not exist. ``U(k)`` follows the last backward of batch ``k``.
    """
    m, warmup = n_microbatches, n_stages - 1 - stage
    actions: list[Action] = []
    for j in range(step * m, (step + 1) * m):
        actions.append(_f(stage, j))
        if j - warmup >= fill_step * m:
            actions += _backward_then_maybe_update(stage, j - warmup, m)
    return actions


def async_1f1b_drain(n_stages: int, n_microbatches: int, stage: int, step: int, fill_step: int = 0) -> list[Action]:
    """The actions that complete every micro-batch still in flight at ``stage`` after step ``step``."""
    m, warmup = n_microbatches, n_stages - 1 - stage
    first = max((step + 1) * m - warmup, fill_step * m)
    return [a for i in range(first, (step + 1) * m) for a in _backward_then_maybe_update(stage, i, m)]


def async_1f1b(n_stages: int, n_microbatches: int, n_steps: int) -> Schedule:
    """``n_steps`` batches of the asynchronous 1F1B stream from an empty pipeline, then a drain."""
    return {
        s: [a for k in range(n_steps) for a in async_1f1b_step(n_stages, n_microbatches, s, k)]
        + async_1f1b_drain(n_stages, n_microbatches, s, n_steps - 1)
        for s in range(n_stages)
    }


def concat(*schedules: Schedule) -> Schedule:
    """Run ``schedules`` one after the other (e.g. several synchronous steps)."""
    stages = sorted({s for sch in schedules for s in sch})
    return {s: [a for sch in schedules for a in sch.get(s, [])] for s in stages}


def validate(schedule: Schedule, n_microbatches: int) -> None:
    """Check that ``schedule`` is complete, consistent and free of deadlock.

    Rules: every action sits in its own stage's list; every stage runs the same micro-batches;
    each ``(stage, kind, index)`` happens once; a backward follows its forward on the same stage;
    a weight gradient ``W(j)`` follows ``B(j)`` on the same stage (the update computes the weight
    gradients of the micro-batches without a ``W``); ``U(k)`` follows every backward (and every
    ``W``) of batch ``k``, happens once per batch and before any backward of batch ``k+1``; every
    stage forwards
    and backwards in one common order (transfers are first-in first-out); and the stages can run
    their lists concurrently to the end (checked by :func:`simulate`).

    Raises:
        ScheduleError: naming the first broken rule, with the offending stage's actions.
    """
    n_stages = len(schedule)
    if sorted(schedule) != list(range(n_stages)):
        raise ScheduleError(f"Schedule stages must be 0..{n_stages - 1}, got {sorted(schedule)}.")
    reference: Optional[set[int]] = None
    for s, actions in schedule.items():
        seen: set[tuple[ActionKind, int]] = set()
        done_b: dict[int, int] = {}
        listed_updates = {a.index for a in actions if a.kind is ActionKind.UPDATE}
        for a in actions:
            if a.stage != s:
                raise ScheduleError(f"Action {a} is listed for stage {s}.")
            if (a.kind, a.index) in seen:
                raise ScheduleError(f"Action {a} appears twice on stage {s}: {_row(actions)}")
            seen.add((a.kind, a.index))
            if a.kind is ActionKind.BACKWARD:
                if (ActionKind.FORWARD, a.index) not in seen:
                    raise ScheduleError(f"Backward {a} comes before its forward on stage {s}: {_row(actions)}")
                batch = a.index // n_microbatches
                if batch - 1 in listed_updates and (ActionKind.UPDATE, batch - 1) not in seen:
                    raise ScheduleError(
                        f"Backward {a} of batch {batch} comes before the update of batch {batch - 1} on stage {s} "
                        f"(an update applies every weight gradient computed before it): {_row(actions)}"
                    )
                done_b[a.index // n_microbatches] = done_b.get(a.index // n_microbatches, 0) + 1
            if a.kind is ActionKind.WEIGHT:
                if (ActionKind.BACKWARD, a.index) not in seen:
                    raise ScheduleError(
                        f"Weight gradient {a} comes before the backward {s}B{a.index} on stage {s} (W needs the "
                        f"output gradient that B receives): {_row(actions)}"
                    )
            if a.kind is ActionKind.UPDATE and done_b.get(a.index, 0) != n_microbatches:
                raise ScheduleError(
                    f"Update {a} comes after {done_b.get(a.index, 0)} of the {n_microbatches} backwards of batch "
                    f"{a.index} on stage {s}: {_row(actions)}"
                )
            if a.kind is ActionKind.WEIGHT and (ActionKind.UPDATE, a.index // n_microbatches) in seen:
                raise ScheduleError(
                    f"Weight gradient {a} comes after the update of its batch on stage {s}: {_row(actions)}"
                )
        forwards = {i for k, i in seen if k is ActionKind.FORWARD}
        backwards = {i for k, i in seen if k is ActionKind.BACKWARD}
        updates = {i for k, i in seen if k is ActionKind.UPDATE}
        if forwards != backwards:
            raise ScheduleError(f"Stage {s} runs forwards without backwards: {sorted(forwards ^ backwards)}.")
        if updates != {j // n_microbatches for j in forwards}:
            raise ScheduleError(f"Stage {s} updates batches {sorted(updates)}, not the batches it trains.")
        if reference is None:
            reference = forwards
        elif forwards != reference:
            raise ScheduleError(f"Stage {s} runs micro-batches {sorted(forwards)}, stage 0 runs {sorted(reference)}.")
    # Tensors between neighbours travel on FIFO channels: a stage must receive in the order its
    # neighbour sends, i.e. every stage forwards in one order and backwards in that same order.
    order = [a.index for a in schedule[0] if a.kind is ActionKind.FORWARD]
    for s, actions in schedule.items():
        forwards_in_order = [a.index for a in actions if a.kind is ActionKind.FORWARD]
        backwards_in_order = [a.index for a in actions if a.kind is ActionKind.BACKWARD]
        if forwards_in_order != order or backwards_in_order != order:
            raise ScheduleError(
                f"Stage {s} forwards in order {forwards_in_order} and backwards in order {backwards_in_order}; "
                f"transfers are first-in first-out, so every stage must forward and backward in stage 0's "
                f"forward order {order}: {_row(actions)}"
            )
    simulate(schedule)


def _row(actions: Sequence[Action]) -> str:
    return " ".join(str(a) for a in actions)


@dataclass
class SimResult:
    """The timeline of a schedule run with fixed action durations.

    Attributes:
        timeline: per stage, ``(start, end, action)`` in run order.
        makespan: end of the last action.
        bubble: per stage, the fraction of ``[0, makespan]`` the stage is idle.
        peak_in_flight: per stage, the most micro-batches forwarded and not yet backwarded.
    """

    timeline: dict[int, list[tuple[float, float, Action]]]
    makespan: float
    bubble: dict[int, float] = field(default_factory=dict)
    peak_in_flight: dict[int, int] = field(default_factory=dict)


def simulate(
    schedule: Schedule,
    forward_time: float | Mapping[int, float] = 1.0,
    backward_time: float | Mapping[int, float] = 1.0,
    update_time: float | Mapping[int, float] = 0.0,
    weight_time: float | Mapping[int, float] = 0.0,
    transfer_time: float = 0.0,
    merged_weight_time: Optional[float | Mapping[int, float]] = None,
) -> SimResult:
    """Run ``schedule`` on an idealised machine: each stage runs its list in order, each action as
    early as its dependencies allow (``F(j)`` at stage s after ``F(j)`` at s-1; ``B(j)`` at stage s
    after ``B(j)`` at s+1; ``W(j)`` only after the stage's earlier actions), plus ``transfer_time``
    for the tensors to cross the link (default: free).

    ``backward_time`` is the input-gradient part of a backward and ``weight_time`` its
    weight-gradient part: in a schedule with ``W`` actions, ``B`` takes ``backward_time`` and ``W``
    takes ``weight_time``; in one without, ``B`` is the whole backward and takes their sum. In a
    schedule with ``W`` actions, the micro-batches without one have their weight gradients computed
    by the stage's next ``U`` (merged), which takes ``merged_weight_time`` (default ``weight_time``) for each of
    them on top of ``update_time``: one GEMM over several micro-batches may cost less per
    micro-batch than a ``W`` of one. A micro-batch
    counts as in flight from its forward until its ``W`` or that ``U`` (its input and output
    gradient are kept for it) in a schedule that splits, until its ``B`` otherwise.

    Raises:
        ScheduleError: if the stages cannot all finish (a deadlock), with the clock table so far.
    """
    n_stages = len(schedule)

    def _dur(value: float | Mapping[int, float], s: int) -> float:
        return float(value[s]) if isinstance(value, Mapping) else float(value)

    any_w = any(a.kind is ActionKind.WEIGHT for actions in schedule.values() for a in actions)
    split = {s: any_w for s in schedule}  # a schedule with W actions splits every backward
    # on a stage that splits, an update computes the weight gradients of the backwards before it
    # that no W action computes (merged into one GEMM per layer): it takes their weight_time
    merged: dict[tuple[int, int], list[int]] = {}
    merged_w = weight_time if merged_weight_time is None else merged_weight_time
    for s, actions in schedule.items():
        if split[s]:
            with_w = {a.index for a in actions if a.kind is ActionKind.WEIGHT}
            pending: list[int] = []
            for a in actions:
                if a.kind is ActionKind.BACKWARD and a.index not in with_w:
                    pending.append(a.index)
                elif a.kind is ActionKind.UPDATE:
                    merged[(s, a.index)], pending = pending, []
    end: dict[tuple[int, ActionKind, int], float] = {}
    pos = {s: 0 for s in schedule}
    free = {s: 0.0 for s in schedule}
    timeline: dict[int, list[tuple[float, float, Action]]] = {s: [] for s in schedule}
    remaining = sum(len(a) for a in schedule.values())
    while remaining:
        progressed = False
        for s in range(n_stages):
            while pos[s] < len(schedule[s]):
                a = schedule[s][pos[s]]
                deps: list[tuple[int, ActionKind, int]] = []
                if a.kind is ActionKind.FORWARD and s > 0:
                    deps.append((s - 1, ActionKind.FORWARD, a.index))
                if a.kind is ActionKind.BACKWARD and s < n_stages - 1:
                    deps.append((s + 1, ActionKind.BACKWARD, a.index))
                if any(d not in end for d in deps):
                    break
                start = max([free[s]] + [end[d] + transfer_time for d in deps])
                duration = {
                    ActionKind.FORWARD: _dur(forward_time, s),
                    ActionKind.BACKWARD: _dur(backward_time, s) + (0.0 if split[s] else _dur(weight_time, s)),
                    ActionKind.WEIGHT: _dur(weight_time, s),
                    ActionKind.UPDATE: _dur(update_time, s) + len(merged.get((s, a.index), ())) * _dur(merged_w, s),
                }[a.kind]
                end[(s, a.kind, a.index)] = free[s] = start + duration
                timeline[s].append((start, start + duration, a))
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"stage {s} waits at {schedule[s][pos[s]]}" for s in schedule if pos[s] < len(schedule[s]))
            raise ScheduleError(f"Schedule deadlocks: {stuck}.\n{_format_timeline(timeline)}")
    makespan = max(free.values(), default=0.0)
    result = SimResult(timeline, makespan)
    for s, events in timeline.items():
        busy = sum(e - b for b, e, _ in events)
        result.bubble[s] = 0.0 if makespan == 0 else 1.0 - busy / makespan
        in_flight = peak = 0
        release = ActionKind.WEIGHT if split[s] else ActionKind.BACKWARD
        for _, _, a in events:
            in_flight += 1 if a.kind is ActionKind.FORWARD else -1 if a.kind is release else 0
            in_flight -= len(merged.get((s, a.index), [])) if a.kind is ActionKind.UPDATE else 0
            peak = max(peak, in_flight)
        result.peak_in_flight[s] = peak
    return result


def _format_timeline(timeline: Mapping[int, list[tuple[float, float, Action]]]) -> str:
    slots: dict[int, dict[int, str]] = {}
    for s, events in timeline.items():
        slots[s] = {int(b): str(a) for b, e, a in events if e > b}
    width = max((len(v) for row in slots.values() for v in row.values()), default=3)
    n_cols = max((max(row) + 1 for row in slots.values() if row), default=0)
    lines = []
    for s in sorted(slots):
        cells = [slots[s].get(t, ".").ljust(width) for t in range(n_cols)]
        lines.append(f"stage {s}: " + " ".join(cells).rstrip())
    return "\n".join(lines)


def format_table(schedule: Schedule) -> str:
    """The clock-cycle table of ``schedule`` (one time unit per forward, backward and weight gradient).

    Example::

        >>> print(format_table(gpipe(2, 2)))
        stage 0: 0F0 0F1 .   .   0B0 0B1
        stage 1: .   1F0 1F1 1B0 1B1 .
    """
    split = any(a.kind is ActionKind.WEIGHT for actions in schedule.values() for a in actions)
    return _format_timeline(simulate(schedule, weight_time=1.0 if split else 0.0).timeline)


def to_text(schedule: Schedule) -> str:
    """One line per stage: ``"0: 0F0 0F1 0B0 0B1 0U0"``."""
    return "\n".join(f"{s}: {_row(actions)}" for s, actions in sorted(schedule.items()))


def from_text(text: str) -> Schedule:
    """Parse :func:`to_text` output back into a schedule.

    Raises:
        ScheduleError: on a malformed line or action.
    """
    schedule: Schedule = {}
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            raise ScheduleError(f"Invalid schedule line {line!r}: expected '<stage>: <actions>'.")
        schedule[int(head)] = [Action.parse(tok) for tok in rest.split()]
    return schedule


def annotate(schedule: Schedule, versions: Mapping[tuple[int, ActionKind, int], int]) -> Schedule:
    """Return ``schedule`` with ``weight_version`` filled in from ``versions``."""
    return {
        s: [replace(a, weight_version=versions.get((s, a.kind, a.index), a.weight_version)) for a in actions]
        for s, actions in schedule.items()
    }
