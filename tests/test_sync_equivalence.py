"""Synchronous pipelines equal ordinary single-device training exactly.

Each layout launches real processes (gloo on 127.0.0.1) through Lightning's own launcher and
trains `SeqRegressor` for 6 optimizer steps with SGD+momentum and with AdamW, a StepLR scheduler
and gradient clipping (norm over all stages); weights and the logged per-step loss must equal a
plain one-device Trainer's.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.launch import run_script
from tests.helpers.reference import single_device_fit, train_losses
from tests.helpers.tolerance import loss_atol, training_atol

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores

SPECS = ["pipedream_flush:sgd", "gpipe:sgd", "zero_bubble:sgd", "pipedream_flush:adamw", "gpipe:adamw",
         "zero_bubble:adamw"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("devices", "stages"), [(2, 2), (3, 3), (4, 4), (4, 2)], ids=["2-stages", "3-stages", "4-stages", "2x2-replicas"]
)
def test_sync_policies_equal_single_device(tmp_path, devices: int, stages: int) -> None:
    result = run_script("fit_pipeline.py", tmp_path, devices, stages, *SPECS, timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    replicas = devices // stages
    for spec in SPECS:
        policy, optim = spec.split(":")
        # several replicas: Lightning's DistributedSampler shuffles with seed PL_GLOBAL_SEED (7) + epoch
        expected_weights, expected_losses = single_device_fit(optim, 8 * replicas, permutation_seed=7 if replicas > 1 else None)
        weights = torch.load(tmp_path / f"{policy}-{optim}.pt")
        assert weights.keys() == expected_weights.keys()
        # micro-batches, deferred weight gradients, the clipping norm summed per stage and (2x2) the
        # replicas' all-reduce reorder float32 sums: a few ulps per step (tests/helpers/tolerance.py)
        atol = training_atol(expected_weights, steps=6)
        for name, value in expected_weights.items():
            torch.testing.assert_close(weights[name], value, atol=atol, rtol=0, msg=f"{spec}: {name}")
        # the weights really moved (the comparison is not between two untouched initialisations)
        assert (expected_weights["net.0.weight"] - _initial()["net.0.weight"]).abs().max() > 1e-3
        losses = train_losses(json.loads((tmp_path / f"{policy}-{optim}.json").read_text()))
        assert len(losses) == 6
        assert losses == pytest.approx(expected_losses, abs=loss_atol(expected_losses, steps=6)), spec


def _initial() -> dict[str, torch.Tensor]:
    import lightning as L

    from tests.helpers.models import SeqRegressor

    L.seed_everything(7)
    return SeqRegressor(depth=4).state_dict()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_reference_really_clips(optimizer: str) -> None:
    """Gradient clipping at 0.3 is active in these runs, so the equality above covers the global norm."""
    clipped, _ = single_device_fit(optimizer, 8)
    unclipped, _ = single_device_fit(optimizer, 8, clip=None)
    assert max((clipped[k] - unclipped[k]).abs().max() for k in clipped) > 1e-4
