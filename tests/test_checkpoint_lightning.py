"""Checkpoints, callbacks and predict through a 3-stage pipeline inside Lightning.

One launch of tests/scripts/fit_checkpoint.py (3 processes) covers: ModelCheckpoint(monitor=
"val_loss") writing one consolidated file, EarlyStopping seeing the same val_loss on every rank,
trainer.predict(ckpt_path="best") returning predictions to the caller, and fit(ckpt_path=...)
resuming to exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import run_script
from tests.helpers.models import SeqRegressor, regression_data
from tests.helpers.tolerance import forward_atol, mse_atol


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ckpt")
    result = run_script("fit_checkpoint.py", out, timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    return out


@pytest.mark.multiprocess
def test_checkpoint_is_consolidated_and_loads_without_the_strategy(run) -> None:
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(3)]
    best = ranks[0]["best"]
    assert best and all(r["best"] == best for r in ranks)
    ckpt = torch.load(best, weights_only=False)
    assert list(ckpt["state_dict"]) == [f"net.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")]
    names = ckpt["optimizer_states"][0]["param_groups"][0]["param_names"]
    assert names == list(ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) == 8  # AdamW moments for every parameter of every stage
    # loads in this plain process, and predicts what the pipeline's trainer.predict(ckpt_path="best") returned
    model = SeqRegressor.load_from_checkpoint(best)
    x = regression_data(16, seed=2).tensors[0]
    with torch.no_grad():
        expected = model(x)
    predictions = torch.load(run / "predictions.pt")
    assert predictions.shape == (16, 4)
    # micro-batches of the batch against the whole batch: tests/helpers/tolerance.py
    torch.testing.assert_close(predictions, expected, atol=forward_atol(expected, depth=4, width=16), rtol=0)


@pytest.mark.multiprocess
def test_early_stopping_and_monitor_see_the_same_value_on_every_stage(run) -> None:
    ranks = [json.loads((run / f"rank{r}.json").read_text()) for r in range(3)]
    assert {r["val_loss"] for r in ranks} == {ranks[0]["val_loss"]}
    assert all(r["stopped"] == 1 and r["epochs"] == 2 for r in ranks)  # stopped early, on every rank alike


@pytest.mark.multiprocess
def test_fit_resumes_from_checkpoint_exactly(run) -> None:
    straight, resumed, first = (torch.load(run / f"{n}.pt") for n in ("straight", "resumed", "first"))
    for name in straight:  # the same arithmetic in the same order on both sides: bitwise
        assert torch.equal(resumed[name], straight[name]), name
    assert max((straight[k] - first[k]).abs().max() for k in straight) > 1e-4  # the third epoch did train


@pytest.mark.multiprocess
def test_validate_and_test_run_through_the_pipeline(run) -> None:
    import torch.nn.functional as F

    evaluated = json.loads((run / "evaluated.json").read_text())
    model = SeqRegressor.load_from_checkpoint(json.loads((run / "rank0.json").read_text())["best"])
    x, y = regression_data(16, seed=1).tensors
    with torch.no_grad():
        out = model(x)
    expected = (F.mse_loss(out[:8], y[:8]) + F.mse_loss(out[8:], y[8:])) / 2
    tolerance = mse_atol(out, y, depth=4, width=16)  # micro-batches against the batch: tolerance.py
    assert evaluated["validate"][0]["val_loss"] == pytest.approx(float(expected), abs=tolerance)
    assert evaluated["test"][0]["test_loss"] == pytest.approx(float(expected), abs=tolerance)
