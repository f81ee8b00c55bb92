"""Modules written the usual way, pipelined unchanged (issue 14), under gpipe, pipedream_flush and
zero_bubble (also with merged weight gradients) on 2, 3 and 4 processes (one launch per process count trains every case):

- a nanoGPT-style GPT (a ``ModuleList`` of blocks inside a ``ModuleDict``, the LM head tied to the
  token embedding, the loss computed in the model's forward from ``targets``) equals a plain
  one-device Trainer: weights (the tied pair one parameter, bitwise) and logged losses, after 6
  steps of AdamW with weight decay and gradient clipping;
- a torchvision-style ResNet (BatchNorm, in-place ReLU, downsample skips) equals one device
  accumulating gradients over the same micro-batches: weights and running statistics.
"""

from __future__ import annotations

import json
import math

import pytest
import torch


from tests.helpers.launch import run_script
from tests.helpers.reference import train_losses
from tests.helpers.tolerance import loss_atol, training_atol
from tests.helpers.zoo import GPTModule

pytestmark = pytest.mark.slow  # this file takes 40 s or more on 2 cores

# zero_bubble: the GPT's LayerNorms and embeddings and the ResNet's convolutions and BatchNorms
# cannot defer their weight gradients (computed in B), the linear layers compute theirs in W
# (zero_bubble_merged: zero_bubble with merge_weight_grads=True, most of them at the update)
POLICIES = ["gpipe", "pipedream_flush", "zero_bubble", "zero_bubble_merged"]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, list[float]]]:
    out = tmp_path_factory.mktemp("references")
    result = run_script("fit_zoo.py", out, 0, "gpt:none", "resnet:none", "lstm:none", timeout=240)
    assert result.returncode == 0, result.output[-5000:]
    return {name: (torch.load(out / f"{name}-0-none.pt"), train_losses(json.loads((out / f"{name}-0-none.json").read_text())))
            for name in ("gpt", "resnet", "lstm")}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, object]:
    out = {}
    for devices in (2, 3, 4):
        folder = out[devices] = tmp_path_factory.mktemp(f"zoo{devices}")
        specs = [f"{name}:{policy}" for name in ("gpt", "resnet") for policy in POLICIES]
        result = run_script("fit_zoo.py", folder, devices, *specs, timeout=400)
        assert result.returncode == 0, result.output[-5000:]
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("devices", [2, 3, 4])
def test_gpt_with_tied_head_equals_one_device(runs, references, devices: int) -> None:
    tmp_path = runs[devices]
    expected, expected_losses = references["gpt"]
    for policy in POLICIES:
        weights = torch.load(tmp_path / f"gpt-{devices}-{policy}.pt")
        assert weights.keys() == expected.keys()
        # the head and the embedding are one parameter, on the first and on the last stage
        assert torch.equal(weights["model.lm_head.weight"], weights["model.transformer.wte.weight"]), policy
        atol = training_atol(expected, steps=6)  # micro-batches reorder float32 sums: tolerance.py
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, atol=atol, rtol=0, msg=f"{devices} {policy}: {name}")
        # the checkpoint written during fit from the stages holds the user's names, the tied
        # pair included, and loads into a plain single-process module
        plain = GPTModule.load_from_checkpoint(tmp_path / f"gpt-{devices}-{policy}" / "last.ckpt")
        assert plain.model.lm_head.weight is plain.model.transformer.wte.weight  # still tied
        for name, value in plain.state_dict().items():
            assert torch.equal(value, weights[name]), name
        losses = train_losses(json.loads((tmp_path / f"gpt-{devices}-{policy}.json").read_text()))
        assert len(losses) == 6 and losses == pytest.approx(expected_losses, abs=loss_atol(expected_losses, 6)), policy
    start = _initial()
    assert max(float((expected[k] - start[k]).abs().max()) for k in expected) > 1e-3  # training moved the weights


def _initial() -> dict[str, torch.Tensor]:
    import lightning as L

    L.seed_everything(3)
    return GPTModule().state_dict()


@pytest.mark.multiprocess
@pytest.mark.parametrize("devices", [2, 3, 4])
def test_resnet_with_batchnorm_equals_one_device_accumulating_micro_batches(runs, references, devices: int) -> None:
    """BatchNorm per micro-batch (as GPipe without torchgpipe's DeferredBatchNorm): each
    micro-batch is normalised by its own statistics and updates the running statistics once;
    exactly what one device does accumulating gradients over the same micro-batches."""
    tmp_path = runs[devices]
    expected = references["resnet"][0]
    for policy in POLICIES:
        state = torch.load(tmp_path / f"resnet-{devices}-{policy}.pt")
        assert state.keys() == expected.keys()
        atol = training_atol(expected, steps=6)
        for name, value in expected.items():
            if name.endswith("num_batches_tracked"):
                assert int(state[name]) == int(value) == 24, name  # 6 steps x 4 micro-batches
            else:  # weights and running statistics
                torch.testing.assert_close(state[name], value, atol=atol, rtol=0, msg=f"{devices} {policy}: {name}")


@pytest.mark.multiprocess
def test_lstm_classifier_equals_one_device(references, tmp_path) -> None:
    """An ``nn.LSTM`` (its weights also in the layer's own flat list, held by weak reference: the
    partition could not move the other stages' copies to ``meta`` before) on 2 and 3 stages: equal to
    one device under pipedream_flush; pipedream_2bw trains and its checkpoint loads into a plain
    module (that the LSTM runs on the stashed weights: tests/policies/test_policy_units.py)."""
    from tests.helpers.zoo import LSTMModule

    expected, expected_losses = references["lstm"]
    for devices, specs in ((2, ["lstm:pipedream_flush"]), (3, ["lstm:pipedream_flush", "lstm:pipedream_2bw"])):
        result = run_script("fit_zoo.py", tmp_path, devices, *specs, timeout=300)
        assert result.returncode == 0, result.output[-5000:]
        weights = torch.load(tmp_path / f"lstm-{devices}-pipedream_flush.pt")
        atol = training_atol(expected, steps=6)
        for name, value in expected.items():
            torch.testing.assert_close(weights[name], value, atol=atol, rtol=0, msg=f"{devices}: {name}")
        losses = train_losses(json.loads((tmp_path / f"lstm-{devices}-pipedream_flush.json").read_text()))
        assert len(losses) == 6 and losses == pytest.approx(expected_losses, abs=loss_atol(expected_losses, 6))
    delayed = torch.load(tmp_path / "lstm-3-pipedream_2bw.pt")
    assert max(float((delayed[k] - expected[k]).abs().max()) for k in expected) > 1e-3  # one update behind
    plain = LSTMModule.load_from_checkpoint(tmp_path / "lstm-3-pipedream_2bw" / "last.ckpt")
    for key, value in plain.state_dict().items():
        assert torch.equal(value, delayed[key]), key


ASYNC = ["pipedream", "pipedream_2bw", "pipemare", "pipelined_backprop"]


@pytest.mark.multiprocess
def test_gpt_and_resnet_run_unchanged_under_every_asynchronous_policy(tmp_path) -> None:
    """Trains, every update lands, the tied head stays one parameter, and the checkpoint written
    from the stages is the final model and loads into a plain module (equality with reference.py:
    tests/test_tied_reference.py for the GPT, tests/test_policies_reference.py for Sequentials)."""
    # pipelined_backprop is defined on SGD's momentum: nanoGPT's AdamW gets its setup error instead
    specs = [f"{name}:{p}" for name in ("gpt", "resnet") for p in ASYNC if (name, p) != ("gpt", "pipelined_backprop")]
    result = run_script("fit_zoo.py", tmp_path, 2, *specs, timeout=400)
    assert result.returncode == 0, result.output[-5000:]
    import lightning as L

    from tests.helpers.zoo import ResNetModule

    for name, module_class in (("gpt", GPTModule), ("resnet", ResNetModule)):
        L.seed_everything(3)
        initial = module_class().state_dict()
        for policy in [p for p in ASYNC if (name, p) != ("gpt", "pipelined_backprop")]:
            weights = torch.load(tmp_path / f"{name}-2-{policy}.pt")
            losses = train_losses(json.loads((tmp_path / f"{name}-2-{policy}.json").read_text()))
            assert len(losses) == 6 and all(math.isfinite(x) for x in losses), (name, policy)
            assert max(float((weights[k] - initial[k]).abs().max()) for k in weights if "weight" in k) > 1e-3, policy
            plain = module_class.load_from_checkpoint(tmp_path / f"{name}-2-{policy}" / "last.ckpt")
            for key, value in plain.state_dict().items():
                assert torch.equal(value, weights[key]), (name, policy, key)
            if name == "gpt":
                assert plain.model.lm_head.weight is plain.model.transformer.wte.weight
                assert torch.equal(weights["model.lm_head.weight"], weights["model.transformer.wte.weight"]), policy
