"""Pipeline metrics reach the CSV logger per stage and agree with theory; the timeline is written."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lightning_asyncpipe.metrics import StageMax, StageMean, theoretical_bubble
from lightning_asyncpipe.schedule import async_1f1b, one_f_one_b, simulate, zero_bubble_h1
from tests.helpers.launch import run_script


def _last_values(path) -> dict[str, float]:
    rows = list(csv.DictReader(open(path)))
    last: dict[str, float] = {}
    for row in rows:
        last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return last


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("policy", "microbatches", "staleness", "copies"),
    [("pipedream", 1, [2, 1, 0], [3, 2, 1]), ("pipedream_2bw", 3, [1, 1, 1], [2, 2, 2]),
     ("pipedream_flush", 3, [0, 0, 0], [1, 1, 1])],  # fmt: skip
)
def test_metrics_in_csv_match_theory(tmp_path, policy: str, microbatches: int, staleness, copies) -> None:
    result = run_script("fit_metrics.py", tmp_path, policy, microbatches, timeout=180)
    assert result.returncode == 0, result.output[-5000:]
    last = _last_values(tmp_path / "csv" / "version_0" / "metrics.csv")
    if policy == "pipedream":  # with m = 1 a version per micro-batch in flight: the simulator's peak
        in_flight = simulate(async_1f1b(3, 1, 12)).peak_in_flight
        assert copies == [in_flight[s] for s in range(3)]
    for s in range(3):
        assert last[f"pipeline/stage{s}/max_staleness"] == staleness[s], (policy, s)
        assert last[f"pipeline/stage{s}/weight_copies"] == copies[s], (policy, s)
        assert 0.0 <= last[f"pipeline/stage{s}/bubble"] <= 1.0
        assert last[f"pipeline/stage{s}/activation_bytes"] > 0
    assert last["pipeline/samples_per_sec"] > 0
    trace = json.loads((tmp_path / "timeline" / "timeline.json").read_text())["traceEvents"]
    assert {e["tid"] for e in trace if e["ph"] == "X"} == {0, 1, 2}
    assert (tmp_path / "timeline" / "timeline.png").stat().st_size > 10_000


def test_stage_metrics_keep_each_stage_in_its_slot() -> None:
    mean, peak = StageMean(3, stage=1), StageMax(3, stage=2)
    mean.update(0.2, weight=1.0)
    mean.update(0.4, weight=3.0)
    peak.update(5)
    peak.update(2)
    torch.testing.assert_close(mean.compute(), torch.tensor([0.0, 0.35, 0.0], dtype=torch.float64))
    torch.testing.assert_close(peak.compute(), torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))


def test_theoretical_bubble() -> None:
    assert theoretical_bubble(one_f_one_b(4, 4))[0] == pytest.approx(3 / 7)
    assert theoretical_bubble(async_1f1b(4, 4, 50))[0] == pytest.approx(3 / 203)
    # ZB-H1 with weight gradients as long as forwards: a third of 1F1B's idle time
    assert theoretical_bubble(one_f_one_b(4, 8), weight_time=1.0)[0] == pytest.approx(9 / 33)
    assert theoretical_bubble(zero_bubble_h1(4, 8), weight_time=1.0)[0] == pytest.approx(3 / 27)


def test_timeline_picture_shows_weight_gradients(tmp_path) -> None:
    """A zero-bubble run's W actions get their own colour and legend entry in the timeline picture."""
    pytest.importorskip("matplotlib")
    from lightning_asyncpipe.trace import TimelineEvent, plot_timeline, write_chrome_trace

    timeline = simulate(zero_bubble_h1(2, 2), weight_time=1.0).timeline
    events = [TimelineEvent(s, 0, str(a), a.kind.value, b * 1e-3, e * 1e-3, 0.0)
              for s, evs in timeline.items() for b, e, a in evs]  # fmt: skip
    assert {e.kind for e in events} == {"F", "B", "W", "U"}
    assert plot_timeline(events, tmp_path / "zb.png").stat().st_size > 5_000
    trace = json.loads(write_chrome_trace(events, tmp_path / "zb.json").read_text())["traceEvents"]
    assert sum(e.get("cat") == "W" for e in trace) == 4
