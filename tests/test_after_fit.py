"""validate / test / predict before and after fit, and ``trainer.save_checkpoint`` after fit, in
several orders and for every policy (issue 13, point 1): each call sees the weights a plain module
would hold at that point, and the file saved after fit is the consolidated checkpoint that
ModelCheckpoint wrote at the end of fit (it loads into a plain module and resumes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_asyncpipe.checkpoint import PIPELINE_STATE_KEY
from lightning_asyncpipe.policies import available_policies
from tests.helpers.launch import run_script
from tests.helpers.models import SeqRegressor, regression_data
from tests.helpers.tolerance import forward_atol, mse_atol

ORDERS = {
    "eval-fit-save-eval": "validate,test,predict,fit,save,predict,test,validate",
    "fit-eval-save": "fit,predict,test,validate,save",
}


@pytest.fixture(scope="module", params=list(ORDERS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp(request.param)
    result = run_script("fit_orders.py", out, ORDERS[request.param], *available_policies(), timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    return out, ORDERS[request.param].split(",")


def _calls(run: tuple[Path, list[str]], policy: str) -> tuple[Path, list[list]]:
    """The policy's folder and its ``[call, result]`` list, in the order the script made the calls."""
    folder = run[0] / policy
    return folder, json.loads((folder / "calls.json").read_text())


def _plain(state: dict[str, torch.Tensor]) -> SeqRegressor:
    model = SeqRegressor(optimizer="sgd", lr=0.05, depth=4)
    model.load_state_dict(state)
    return model.eval()


def _expected(model: SeqRegressor) -> tuple[float, float, list[list[float]]]:
    """val/test loss over the two batches of 8 (what the scripts evaluate on), its tolerance (the
    pipeline runs micro-batches of each batch: tests/helpers/tolerance.py), and the predictions."""
    x, y = regression_data(16, seed=1).tensors
    with torch.no_grad():
        out = model(x)
        loss = (F.mse_loss(out[:8], y[:8]) + F.mse_loss(out[8:], y[8:])) / 2
        predictions = model(regression_data(16, seed=2).tensors[0])
    tolerance = mse_atol(out, y, depth=4, width=16)
    return float(loss), tolerance, predictions.tolist()


def _assert_same(a: object, b: object, where: str) -> None:
    """Equal nested dicts / lists of tensors and plain values (tensors bitwise)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", available_policies())
def test_save_checkpoint_after_fit_is_the_consolidated_checkpoint(run, policy: str) -> None:
    folder, calls = _calls(run, policy)
    saved, fitted, evaluated_since_fit = [], False, False
    for call, name in calls:
        fitted = fitted or call == "fit"
        evaluated_since_fit = evaluated_since_fit or (fitted and call in ("validate", "test", "predict"))
        if call == "save":
            saved.append((name, torch.load(folder / name, weights_only=False), evaluated_since_fit))
    assert saved, calls
    last = torch.load(folder / "last.ckpt", weights_only=False)
    final = torch.load(folder / "weights.pt")["final"]
    for file, ckpt, evaluated_since_fit in saved:
        assert list(ckpt["state_dict"]) == list(last["state_dict"]) == list(final)
        for name, value in last["state_dict"].items():
            assert torch.equal(ckpt["state_dict"][name], value), name
            assert torch.equal(final[name], value), name
        fit_loop, last_fit_loop = ckpt["loops"]["fit_loop"], last["loops"]["fit_loop"]
        if evaluated_since_fit:
            # trainer.validate/test/predict(model, loader) attach new data and drop the training
            # loader (Lightning's data connector, as under DDP): its position is then not saved
            fit_loop, last_fit_loop = ({k: v for k, v in d.items() if k != "state_dict"} for d in (fit_loop, last_fit_loop))
        assert ckpt["global_step"] == last["global_step"] == 7 and fit_loop == last_fit_loop
        assert len(ckpt["optimizer_states"][0]["state"]) == 8  # every stage's momentum
        _assert_same(ckpt["optimizer_states"], last["optimizer_states"], "optimizer_states")
        assert ckpt[PIPELINE_STATE_KEY]["policy"] == policy and ckpt[PIPELINE_STATE_KEY]["step"] == 7
        _assert_same(ckpt[PIPELINE_STATE_KEY], last[PIPELINE_STATE_KEY], PIPELINE_STATE_KEY)
        # and it loads into a plain single-process module
        plain = SeqRegressor.load_from_checkpoint(folder / file)
        for name, value in plain.state_dict().items():
            assert torch.equal(value, final[name]), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", available_policies())
def test_evaluation_before_and_after_fit_sees_the_current_weights(run, policy: str) -> None:
    folder, calls = _calls(run, policy)
    weights = torch.load(folder / "weights.pt")
    assert any(not torch.equal(weights["initial"][k], weights["final"][k]) for k in weights["final"])  # fit trained
    fitted = False
    for call, result in calls:
        if call == "fit":
            fitted = True
            continue
        if call == "save":
            continue
        loss, tolerance, predictions = _expected(_plain(weights["final" if fitted else "initial"]))
        if call == "predict":
            expected = torch.tensor(predictions)  # micro-batches against the whole batch: tolerance.py
            torch.testing.assert_close(torch.tensor(result), expected, atol=forward_atol(expected, 4, 16), rtol=0)
        else:
            key = "val_loss" if call == "validate" else "test_loss"
            assert result[0][key] == pytest.approx(loss, abs=tolerance), (call, fitted)
