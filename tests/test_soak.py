"""Soak (issue 6, point 6): benchmarks/soak.py runs 2,000 asynchronous steps on 3 stages (first, middle and last stage: 4 processes on 2 cores took 83 s, 3 take 57 s) through
Lightning and fails if any stage's RSS grows by 5% or more after warm-up, or if its open file
descriptors or threads grow."""

from __future__ import annotations

import json

import pytest

from tests.helpers.launch import ROOT, run_script

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores


@pytest.mark.multiprocess
def test_soak_holds_memory_descriptors_and_threads_flat(tmp_path) -> None:
    out = tmp_path / "soak.json"
    result = run_script(ROOT / "benchmarks" / "soak.py", "--steps", 2000, "--stages", 3, "--out", out, timeout=400)
    assert result.returncode == 0, result.output[-5000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["steps"] == 2000 and len(report["processes"]) == 3
    for stage in report["processes"]:
        assert stage["rss_growth"] < 0.05, stage
        assert stage["fds"][1] <= stage["fds"][0] and stage["threads"][1] <= stage["threads"][0], stage
