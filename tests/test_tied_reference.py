"""The tied head of a nanoGPT under every policy: the raw engine on 2 and 3 real processes equals
the executable specification (:func:`lightning_asyncpipe.reference.reference_train_stages`), in
float64, after 6 batches with a drain in between, AdamW with nanoGPT's decay groups, gradient
clipping and a learning-rate schedule (SGD with momentum for pipelined_backprop, NAdam with the
same groups for nesterov_async).

The tied parameter is owned by stage 0 (the token embedding); the last stage (the head) uses, for
each micro-batch, the version stage 0's forward of it used, and sends its gradient to stage 0 at
its update (docs/concepts.md, "Parameters several stages use")."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lightning_asyncpipe.reference import reference_train_stages, split_stages
from tests.helpers import tied_cases as C
from tests.helpers.tolerance import training_atol64

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # this file takes 40 s or more on 2 cores
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "engine_vs_reference.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, str]:
    out = {}
    for p in (2, 3):
        d = str(tmp_path_factory.mktemp(f"tied{p}"))
        subprocess.run([sys.executable, SCRIPT, d, str(p), "tied_cases"], check=True, timeout=300, cwd=ROOT,
                       capture_output=True)  # fmt: skip
        out[p] = d
    return out


def _engine_state(out: str, index: int, p: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for rank in range(p):
        state.update(torch.load(os.path.join(out, f"{index}-{rank}.pt"))["state"])
    return state


def _reference(case: C.Case, p: int, tied: bool = True, policy: str | None = None,
               delay_offset: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    data = C.batches()
    stages, shared = split_stages(C.model().net, data[0][0], p, balance="uniform")
    return reference_train_stages(stages, policy or case.policy, data, case.microbatches, C.loss_fn,
                                  C.optimizer(case.optimizer), C.scheduler, C.CLIP, C.DRAIN_AFTER, case.options,
                                  shared=shared if tied else (), delay_offset=delay_offset).state_dict  # fmt: skip


@pytest.mark.parametrize("p", [2, 3])
def test_every_policy_equals_the_specification_with_a_tied_head(runs: dict[int, str], p: int) -> None:
    initial = {"net." + k: v for k, v in C.model().net.state_dict().items()}
    for i, case in enumerate(C.cases(p)):
        state, ref = _engine_state(runs[p], i, p), _reference(case, p)
        assert state.keys() == ref.keys() and "net.lm_head.weight" in state, case.name
        atol = training_atol64(ref, C.N_STEPS)  # float64: reordered sums only (measured <= 9e-16)
        for name, value in ref.items():
            torch.testing.assert_close(state[name], value, atol=atol, rtol=0, msg=f"{case.name}: {name}")
        # one parameter: the head and the embedding end bitwise equal, and they trained
        assert torch.equal(state["net.lm_head.weight"], state["net.transformer.wte.weight"]), case.name
        assert (state["net.lm_head.weight"] - initial["net.lm_head.weight"]).abs().max() > 1e-3, case.name


@pytest.mark.parametrize("p", [2, 3])
def test_the_comparison_can_fail(runs: dict[int, str], p: int) -> None:
    """A broken tie (each stage training its own copy) and a missing delay both show, by far more
    than the tolerance."""
    cases = C.cases(p)
    i = next(i for i, c in enumerate(cases) if c.policy == "pipedream" and not c.options and c.microbatches == 1)
    state = _engine_state(runs[p], i, p)
    atol = training_atol64(state, C.N_STEPS)
    for wrong in (_reference(cases[i], p, tied=False), _reference(cases[i], p, policy="pipedream_flush")):
        assert max(float((state[k] - v).abs().max()) for k, v in wrong.items()) > 1e6 * atol
    # a delay one update too long: PipeOptim predicting one update further, the Nesterov policy on W(k-2)
    for i in [i for i, c in enumerate(cases) if c.policy in ("pipeoptim", "nesterov_async") and c.microbatches > 1]:
        state = _engine_state(runs[p], i, p)
        wrong = _reference(cases[i], p, delay_offset=1)
        assert max(float((state[k] - v).abs().max()) for k, v in wrong.items()) > 1e6 * atol, cases[i].name
