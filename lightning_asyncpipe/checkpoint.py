"""Consolidated checkpoints: the stages' weights and optimizer states as one single-model file.

Weights: every stage's ``state_dict`` uses the full model's key names (see
:mod:`lightning_asyncpipe.partition`), so the consolidated ``state_dict`` is the union of the
stages' dicts and loads into the plain module with ``Model.load_from_checkpoint(path)``.

Pipeline state (under ``checkpoint["asyncpipe"]``): the step counter and the weight-version
policy's state after the drain every checkpoint starts with (weight versions still needed,
velocity buffers, update counters), tensors keyed by parameter name like the optimizer state.

Optimizer state: stored in the standard ``torch.optim`` layout with parameter indices numbered
in the *full* model's ``named_parameters()`` order (what ``configure_optimizers`` of a single-device
run produces), plus the parameter names of each group (``param_names``), which is what a pipeline
of any number of stages uses to give each stage its own entries back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_asyncpipe.errors import AsyncPipeError, PipelineConfigError

__all__ = [
    "optimizer_state_by_name", "merge_optimizer_states", "load_optimizer_state_by_name", "merge_pipeline_states",
    "PIPELINE_STATE_KEY",
]  # fmt: skip

PIPELINE_STATE_KEY = "asyncpipe"
"""Where a checkpoint keeps the drained pipeline's state (step counter, policy state)."""


def _names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameters named instead of numbered."""
    names = _names(module)
    sd = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    groups = []
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"]):
        group_names = [names[id(p)] for p in group["params"]]
        index_to_name.update(zip(sd_group["params"], group_names))
        groups.append({**{k: v for k, v in sd_group.items() if k not in ("params", "param_names")}, "param_names": group_names})
    return {"state": {index_to_name[i]: s for i, s in sd["state"].items()}, "param_groups": groups}


def merge_optimizer_states(parts: Sequence[Mapping[str, Any]], full_order: Sequence[str]) -> dict[str, Any]:
    """Merge per-stage named optimizer states into one standard state dict numbered by ``full_order``."""
    position = {n: i for i, n in enumerate(full_order)}
    n_groups = max(len(p["param_groups"]) for p in parts)
    groups: list[dict[str, Any]] = []
    for g in range(n_groups):
        members = [p["param_groups"][g] for p in parts if g < len(p["param_groups"])]
        names = sorted({n for m in members for n in m["param_names"]}, key=lambda n: position[n])
        groups.append({**{k: v for k, v in members[0].items() if k != "param_names"},
                       "params": [position[n] for n in names], "param_names": names})  # fmt: skip
    state = {position[n]: s for p in parts for n, s in p["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, module: nn.Module, saved: Mapping[str, Any]) -> None:
    """Load the entries of a consolidated state dict that belong to this stage's ``optimizer``.

    Raises:
        PipelineConfigError: if the checkpoint lacks names (not written by this package) or holds
            no state for a local parameter's group.
    """
    if any("param_names" not in g for g in saved["param_groups"]):
        raise PipelineConfigError(
            "This checkpoint's optimizer state has no parameter names, so it cannot be split over pipeline stages. "
            "Resume from a checkpoint written by AsyncPipeStrategy, or load only the weights."
        )
    names = _names(module)
    by_name: dict[str, Tensor] = {}
    index_of = {n: i for g in saved["param_groups"] for n, i in zip(g["param_names"], g["params"])}
    for n, i in index_of.items():
        if i in saved["state"]:
            by_name[n] = saved["state"][i]
    local_groups, local_state, k = [], {}, 0
    for g, group in enumerate(optimizer.param_groups):
        local_names = [names[id(p)] for p in group["params"]]
        if g >= len(saved["param_groups"]) or not set(local_names) <= set(saved["param_groups"][g]["param_names"]):
            saved_names = saved["param_groups"][g]["param_names"] if g < len(saved["param_groups"]) else []
            missing = sorted(set(local_names) - set(saved_names))
            raise PipelineConfigError(
                f"The checkpoint's optimizer has no entry for parameters {missing[:5]} of param group {g}: it was "
                "written for another model or another optimizer configuration."
            )
        hyper = {k2: v for k2, v in saved["param_groups"][g].items() if k2 not in ("params", "param_names")}
        local_groups.append({**hyper, "params": list(range(k, k + len(local_names)))})
        for n in local_names:
            if n in by_name:
                local_state[k] = by_name[n]
            k += 1
    optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})


def merge_pipeline_states(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the stages' :meth:`~lightning_asyncpipe.pipeline.StagePipeline.state_dict` into one.

    Raises:
        AsyncPipeError: if the stages disagree on the policy, the step or the update count (they
            cannot after a drain: every stage applies one update per batch).
    """
    for key in ("policy", "step", "updates"):
        if len({p[key] for p in parts}) != 1:
            raise AsyncPipeError(f"Pipeline stages disagree on {key!r}: {[p[key] for p in parts]}")
    tensors: dict[str, dict[str, Tensor]] = {}
    for part in parts:
        for buffer, by_name in part["tensors"].items():
            tensors.setdefault(buffer, {}).update(by_name)
    return {**parts[0], "tensors": tensors}
