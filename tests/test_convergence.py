"""Every policy learns, and PipeMare's techniques stabilise a learning rate plain asynchrony cannot take.

One launch of tests/scripts/convergence.py (4 processes, raw engine, 300 steps of a teacher-student
regression with SGD + momentum 0.9). The numbers of a run are in docs/concepts.md.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.launch import run_script

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores


def _final(curve: list[float]) -> float:
    return sum(curve[-20:]) / 20


@pytest.fixture(scope="module")
def curves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    out = tmp_path_factory.mktemp("conv") / "curves.json"
    result = run_script("convergence.py", out, 300, timeout=400)
    assert result.returncode == 0, result.output[-5000:]
    return json.loads(out.read_text())["curves"]


@pytest.mark.multiprocess
def test_every_policy_within_ten_percent_of_sync(curves: dict[str, list[float]]) -> None:
    sync = _final(curves["sync"])
    assert sync < 0.1 * curves["sync"][0]  # the task is learned: the loss fell more than tenfold
    for label in ("gpipe", "pipedream", "pipedream_vsync", "pipedream_2bw", "pipemare", "pipelined_backprop"):
        assert _final(curves[label]) <= 1.10 * sync, (label, _final(curves[label]), sync)


@pytest.mark.multiprocess
def test_pipemare_techniques_stabilise_a_high_learning_rate(curves: dict[str, list[float]]) -> None:
    first = curves["high/sync"][0]
    assert _final(curves["high/sync"]) < 0.1 * first  # synchronous training copes with this rate
    plain, both = curves["high/pipemare_plain"], curves["high/pipemare"]
    assert max(plain) > 10 * first  # plain asynchronous training blows up
    assert max(both) <= 1.5 * first  # with both techniques it does not
    assert _final(both) < 0.2 * _final(plain)
