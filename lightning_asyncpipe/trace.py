"""Per-action timelines of real runs: a Chrome / Perfetto trace and a PNG with one row per stage.

Times come from ``time.perf_counter`` in each process; on Linux that is the machine-wide
monotonic clock, so stages on one machine line up. (Across machines the rows are each aligned to
their own first action.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple, Optional

from lightning_asyncpipe.executor import ActionTiming
from lightning_asyncpipe.schedule import ActionKind

__all__ = ["TimelineRecorder", "TimelineEvent", "write_chrome_trace", "plot_timeline"]

_COLOURS = {ActionKind.FORWARD: "#4C72B0", ActionKind.BACKWARD: "#DD8452", ActionKind.WEIGHT: "#C44E52",
            ActionKind.UPDATE: "#55A868"}  # fmt: skip
_LABELS = {ActionKind.FORWARD: "forward", ActionKind.BACKWARD: "backward", ActionKind.WEIGHT: "weight gradient",
           ActionKind.UPDATE: "update"}  # fmt: skip


class TimelineEvent(NamedTuple):
    """One action of one stage: what, when (seconds), and how long it waited for a transfer."""

    stage: int
    step: int
    action: str
    kind: str
    start: float
    end: float
    wait: float


class TimelineRecorder:
    """Keeps the action timings of steps ``first_step .. first_step + n_steps - 1`` of one stage."""

    def __init__(self, stage: int, first_step: int = 2, n_steps: int = 6) -> None:
        self.stage, self.first_step, self.n_steps = stage, first_step, n_steps
        self.events: list[TimelineEvent] = []

    def record(self, step: int, timings: Sequence[ActionTiming]) -> None:
        if self.first_step <= step < self.first_step + self.n_steps:
            self.events += [TimelineEvent(self.stage, step, str(t.action), t.action.kind.value, t.start, t.end, t.wait)
                            for t in timings]  # fmt: skip


def write_chrome_trace(events: Sequence[TimelineEvent], path: str | Path) -> Path:
    """Write ``events`` as Chrome trace JSON (open in chrome://tracing or ui.perfetto.dev)."""
    t0 = min((e.start for e in events), default=0.0)
    trace = [
        {"name": e.action, "cat": e.kind, "ph": "X", "pid": 0, "tid": e.stage, "ts": (e.start - t0) * 1e6,
         "dur": (e.end - e.start) * 1e6, "args": {"step": e.step, "transfer_wait_us": e.wait * 1e6}}
        for e in events
    ]  # fmt: skip
    stages = sorted({e.stage for e in events})
    trace += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": s, "args": {"name": f"stage {s}"}} for s in stages]
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))
    return path


def plot_timeline(events: Sequence[TimelineEvent], path: str | Path, title: str = "") -> Optional[Path]:
    """Draw one row per stage (forward, backward, weight gradient, update; hatched: waiting for a transfer).

    Returns:
        The PNG's path, or ``None`` if matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    t0 = min((e.start for e in events), default=0.0)
    stages = sorted({e.stage for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(stages) + 1.4))
    for e in events:
        kind = ActionKind(e.kind)
        start_ms, wait_ms, dur_ms = (e.start - t0) * 1e3, e.wait * 1e3, (e.end - e.start) * 1e3
        if wait_ms > 0:
            ax.barh(e.stage, wait_ms, left=start_ms, height=0.6, color="none", edgecolor="#999999", hatch="///", lw=0)
        ax.barh(e.stage, max(dur_ms - wait_ms, 1e-3), left=start_ms + wait_ms, height=0.6, color=_COLOURS[kind])
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    shown = {ActionKind(e.kind) for e in events} | {ActionKind.FORWARD, ActionKind.BACKWARD, ActionKind.UPDATE}
    handles = [Patch(color=c, label=_LABELS[k]) for k, c in _COLOURS.items() if k in shown]
    handles.append(Patch(facecolor="none", edgecolor="#999999", hatch="///", label="waiting for a transfer"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(handles), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge(parts: Mapping[int, Sequence[TimelineEvent]] | Sequence[Sequence[TimelineEvent]]) -> list[TimelineEvent]:
    values = parts.values() if isinstance(parts, Mapping) else parts
    return sorted((e for part in values for e in part), key=lambda e: (e.start, e.stage))
