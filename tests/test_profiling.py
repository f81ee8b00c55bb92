"""Layer profiles and the measured balances ("time", "memory")."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_asyncpipe import PipelineConfigError
from lightning_asyncpipe.errors import BalanceError
from lightning_asyncpipe.locate import balance_by_cost, compute_balance
from lightning_asyncpipe.profiling import layer_costs, profile_layers, sequential_input
from tests.helpers.launch import run_script
from tests.helpers.models import SeqRegressor


def test_profile_sees_heavy_layers_and_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2048), nn.ReLU(), nn.Linear(2048, 16), nn.BatchNorm1d(16),
                           nn.Dropout(0.5))  # fmt: skip
    before = {k: v.clone() for k, v in layers.state_dict().items()}
    x = torch.randn(512, 16)
    rng = torch.get_rng_state()
    profiles = profile_layers(layers, (x,), torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in layers.state_dict().items())
    assert all(p.grad is None for p in layers.parameters())
    times = layer_costs(profiles, "time", 8, 2)
    assert times[1] > 3 * times[0] and times[3] > 3 * times[0]  # 128x the multiply-adds
    # memory: parameters (4x) plus what the forward keeps, for min(m, p) micro-batches in flight
    assert profiles[1].parameter_bytes == (16 * 2048 + 2048) * 4
    assert profiles[1].saved_bytes == 512 * 16 * 4  # the input, not the weight
    assert profiles[2].saved_bytes == 512 * 2048 * 4 and profiles[2].parameter_bytes == 0
    assert layer_costs(profiles, "memory", 8, 2)[2] == 2 * 512 * 2048 * 4


def test_measured_balances_need_costs_in_compute_balance() -> None:
    with pytest.raises(BalanceError, match="balance='time' is measured"):
        compute_balance(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 2, "time")
    assert balance_by_cost([10.0, 0.1, 0.1, 0.1, 0.1], 2) == [1, 4]
    # a stage without parameters would have an empty optimizer: the first layer joins the next one
    assert balance_by_cost([10.0, 0.1, 0.1, 0.1, 0.1], 2, [False, True, False, True, True]) == [2, 3]


def test_sequential_input_is_one_microbatch_of_the_example() -> None:
    model = SeqRegressor()
    model.example_input_array = torch.randn(8, 2, 4)  # forward flattens: the Sequential sees (8, 8)
    (sample,) = sequential_input(model, model.net, microbatches=4)
    assert sample.shape == (2, 8)
    torch.testing.assert_close(sample, model.example_input_array[:2].flatten(1))


def test_missing_example_input_is_a_clear_error_before_launch() -> None:
    import lightning as L

    from lightning_asyncpipe import AsyncPipeStrategy
    from tests.helpers.launch import child_processes
    from tests.helpers.models import loader, regression_data

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=AsyncPipeStrategy(balance="time"), max_steps=1,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(PipelineConfigError, match="set `self.example_input_array`"):
        trainer.fit(SeqRegressor(), loader(regression_data(), 8))
    assert not child_processes()


@pytest.mark.multiprocess
def test_time_balance_through_lightning_isolates_the_heavy_layer(tmp_path) -> None:
    result = run_script("fit_balance_time.py", tmp_path, timeout=120)
    assert result.returncode == 0, result.output[-5000:]
    chosen = json.loads((tmp_path / "balance.json").read_text())
    # uniform: [3, 3]; the heavy layer alone would leave stage 0 without parameters (an empty optimizer)
    assert chosen["counts"] == [2, 4]
    assert chosen["costs"][0] > sum(chosen["costs"][1:])
