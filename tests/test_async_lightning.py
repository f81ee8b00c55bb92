"""Asynchronous policies inside Lightning equal the executable specification.

3 stages, 3 micro-batches, 8 steps over 6-batch epochs, validation every 3 steps: the pipeline
drains after steps 2 (validation), 5 (epoch end and validation) and 7 (end of fit); gradient
clipping (per stage for asynchronous policies) and a StepLR schedule are on.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_asyncpipe.locate import compute_balance
from lightning_asyncpipe.reference import reference_train
from tests.helpers.launch import run_script
from tests.helpers.models import SeqRegressor, loader, regression_data
from tests.helpers.tolerance import training_atol

SPECS = [
    "pipedream:sgd", "pipedream:adamw", "pipedream:sgd:vertical_sync=True", "pipedream_2bw:adamw",
    "pipemare:sgd", "pipemare:adamw", "pipelined_backprop:sgd", "pipeoptim:adamw", "nesterov_async:nadam",
]  # fmt: skip


def _options(spec: str) -> dict[str, object]:
    parts = spec.split(":")
    return {k: v == "True" for k, v in (kv.split("=") for kv in parts[2].split(","))} if len(parts) > 2 else {}


@pytest.mark.multiprocess
def test_async_policies_in_lightning_equal_reference(tmp_path) -> None:
    result = run_script("fit_async.py", tmp_path, *SPECS, timeout=300)
    assert result.returncode == 0, result.output[-5000:]
    batches = list(loader(regression_data(48), 8))
    batches = batches + batches[:2]  # 8 steps: the second epoch starts over (no shuffling)
    for spec in SPECS:
        policy, optim = spec.split(":")[:2]
        L.seed_everything(11)
        module = SeqRegressor(optimizer=optim, depth=4)
        opt_factory, sched_factory = _factories(module)
        ref = reference_train(
            module.net, compute_balance(module.net, 3, "uniform"), policy, [tuple(b) for b in batches], 3,
            torch.nn.functional.mse_loss, opt_factory, sched_factory, clip_grad_norm=0.3, drain_after=(2, 5),
            policy_options=_options(spec),
        )  # fmt: skip
        weights = torch.load(tmp_path / (spec.replace(":", "_").replace(",", "_") + ".pt"))
        atol = training_atol(ref.state_dict, steps=8)  # 3 micro-batches: reordered float32 sums only
        for name, value in ref.state_dict.items():
            torch.testing.assert_close(weights[name], value, atol=atol, rtol=0, msg=f"{spec}: {name}")


def _factories(module: SeqRegressor):  # type: ignore[no-untyped-def]
    """The optimizer and scheduler of SeqRegressor.configure_optimizers, as factories."""

    def optimizer(params):  # type: ignore[no-untyped-def]
        hp = module.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=0.9)
        if hp.optimizer == "nadam":
            return torch.optim.NAdam(params, lr=hp.lr, weight_decay=0.01, decoupled_weight_decay=True)
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=0.01)

    return optimizer, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
