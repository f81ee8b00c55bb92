"""Splitting a module's pipelined ``nn.Sequential`` into stages and keeping only the local one.

``balance`` chooses how many consecutive layers each stage gets:

- ``"uniform"``: the same number of layers per stage (the first stages take the remainder);
- ``"parameters"``: contiguous stages that minimise the largest parameter count of a stage;
- ``"time"`` / ``"memory"``: contiguous stages that minimise the slowest (largest) stage, from
  each layer's measured forward + backward time (memory) on the stage's device; the strategy
  measures them (:mod:`lightning_asyncpipe.profiling`) and passes the resulting counts here;
- a list of layer counts, one per stage, e.g. ``[3, 2, 2]``.

Layers keep their original names, so the local stage's ``state_dict`` keys are the same as the
full model's (``net.5.weight`` stays ``net.5.weight`` on the stage that holds layer 5). Layers of
other stages are moved to the ``meta`` device: their memory is freed, their structure is kept so
the full model can be put back together at teardown.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_asyncpipe.errors import AsyncPipeError, BalanceError, PipelineConfigError

__all__ = [
    "Balance",
    "MEASURED_BALANCES",
    "StageModule",
    "Partition",
    "find_sequential",
    "check_parameters_inside",
    "compute_balance",
    "balance_by_cost",
    "partition_module",
    "restore_module",
    "computing",
]

Balance = Union[Literal["uniform", "parameters", "time", "memory"], Sequence[int]]
MEASURED_BALANCES = ("time", "memory")
"""Balances computed from a profile of the layers (resolved to counts before partitioning)."""


class StageModule(nn.Sequential):
    """The layers one stage holds, standing in for the user's ``nn.Sequential``.

    Calling it runs the local layers when the pipeline executor does so. When the user's own code
    calls it (``self.net(x)`` inside ``training_step``), the pipeline installs a ``call_handler``
    that decides what the call means on this stage: capture the input on the first stage, hand
    back the pipeline's output on the last stage.
    """

    def __init__(self, layers: "OrderedDict[str, nn.Module]", stage: int, n_stages: int, attr: str) -> None:
        super().__init__(layers)
        self.stage, self.n_stages, self.attr = stage, n_stages, attr
        self.call_handler: Optional[Any] = None
        self.executing = False

    def forward(self, *inputs: Any) -> Any:  # type: ignore[override]
        if self.call_handler is not None and not self.executing:
            return self.call_handler(inputs)
        if not self.executing and self.n_stages > 1:
            names = list(self._modules)
            raise AsyncPipeError(
                f"This process holds only stage {self.stage} (layers {names[0]}..{names[-1]}) of '{self.attr}'; it "
                "cannot run the whole model. Use trainer.predict(...), or load the checkpoint in a plain process "
                "with Model.load_from_checkpoint(path)."
            )
        x: Any = inputs[0] if len(inputs) == 1 else tuple(inputs)
        for layer in self:
            x = layer(x)
        return x


@contextmanager
def computing(module: nn.Module) -> Iterator[None]:
    """Mark ``module`` (a :class:`StageModule`) as run by the pipeline itself, not by user code."""
    if not isinstance(module, StageModule):
        yield
        return
    previous, module.executing = module.executing, True
    try:
        yield
    finally:
        module.executing = previous


@dataclass
class Partition:
    """Where the pipelined Sequential lives and which layers each stage holds."""

    attr: str
    counts: list[int]
    stage: int
    original: nn.Sequential
    local: StageModule

    @property
    def bounds(self) -> list[tuple[int, int]]:
        edges = [sum(self.counts[:i]) for i in range(len(self.counts) + 1)]
        return list(zip(edges[:-1], edges[1:]))


def find_sequential(module: nn.Module, attr: Optional[str] = None) -> str:
    """The attribute name of the pipelined ``nn.Sequential`` of ``module``.

    Raises:
        PipelineConfigError: if ``attr`` is not an ``nn.Sequential`` attribute, or if ``attr`` is
            ``None`` and the module has no top-level ``nn.Sequential`` or several.
    """
    candidates = [name for name, child in module.named_children() if isinstance(child, nn.Sequential)]
    cls = type(module).__name__
    if attr is not None:
        child = getattr(module, attr, None)
        if not isinstance(child, nn.Sequential):
            raise PipelineConfigError(
                f"AsyncPipeStrategy(sequential={attr!r}): {cls}.{attr} is "
                f"{'missing' if child is None else type(child).__name__}, not an nn.Sequential. "
                f"Top-level nn.Sequential attributes of {cls}: {candidates or 'none'}."
            )
        return attr
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise PipelineConfigError(
            f"AsyncPipeStrategy pipelines a top-level nn.Sequential of the LightningModule, but {cls} has none. "
            f"Top-level children: {[n for n, _ in module.named_children()] or 'none'}. Put the layers to pipeline "
            "in one nn.Sequential attribute (e.g. self.net = nn.Sequential(...)) and call it from forward()."
        )
    raise PipelineConfigError(
        f"AsyncPipeStrategy found several top-level nn.Sequential attributes in {cls}: {candidates}. Name the one "
        f"to pipeline with AsyncPipeStrategy(sequential={candidates[0]!r})."
    )


def check_parameters_inside(module: nn.Module, attr: str) -> None:
    """Raise if ``module`` has parameters outside its pipelined Sequential ``attr``.

    Every stage would hold its own copy of such a parameter and train it differently.
    """
    outside = [n for n, _ in module.named_parameters() if not n.startswith(attr + ".")]
    if outside:
        shown = ", ".join(outside[:6]) + (", ..." if len(outside) > 6 else "")
        raise PipelineConfigError(
            f"AsyncPipeStrategy requires every parameter of {type(module).__name__} to live inside the pipelined "
            f"nn.Sequential '{attr}', but found {len(outside)} outside it: {shown}. Move those layers into "
            f"'{attr}' (an embedding becomes its first layer, a head its last)."
        )


def balance_by_cost(costs: Sequence[float], n_stages: int, has_parameters: Optional[Sequence[bool]] = None) -> list[int]:
    """Contiguous layer counts (each >= 1) minimising the largest per-stage sum of ``costs``;
    with ``has_parameters`` (per layer), every stage gets at least one layer with parameters
    when possible (a stage without any would have nothing to optimize)."""
    n = len(costs)
    if has_parameters is not None and sum(map(bool, has_parameters)) >= n_stages:
        first_param = [0] * (n + 1)  # prefix count of layers with parameters
        for i, h in enumerate(has_parameters):
            first_param[i + 1] = first_param[i] + int(bool(h))
        valid = lambda j, i: first_param[i] > first_param[j]  # noqa: E731
    else:
        valid = lambda j, i: True  # noqa: E731
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n - (n_stages - k) + 1):
            for j in range(k - 1, i):
                if not valid(j, i):
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    counts, i = [], n
    for k in range(n_stages, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def compute_balance(layers: nn.Sequential, n_stages: int, balance: Balance) -> list[int]:
    """Layer counts per stage for ``balance``.

    Raises:
        BalanceError: if there are fewer layers than stages, or an explicit balance is malformed.
    """
    n_layers = len(layers)
    if n_layers < n_stages:
        raise BalanceError(
            f"AsyncPipeStrategy cannot split {n_layers} layers into {n_stages} stages: every stage needs at least one "
            f"layer. Use at most {n_layers} stages (devices = stages x replicas), or split the model into more layers."
        )
    if isinstance(balance, str):
        if balance == "uniform":
            return [n_layers // n_stages + (1 if s < n_layers % n_stages else 0) for s in range(n_stages)]
        if balance == "parameters":
            costs = [sum(p.numel() for p in layer.parameters()) for layer in layers]
            return balance_by_cost([max(c, 1) for c in costs], n_stages)
        if balance in MEASURED_BALANCES:
            raise BalanceError(
                f"balance={balance!r} is measured: profile the layers (lightning_asyncpipe.profiling) and pass the "
                "counts of balance_by_cost(layer_costs(...), n_stages); AsyncPipeStrategy does this at setup."
            )
        raise BalanceError(
            f"Unknown balance {balance!r}: use 'uniform', 'parameters', 'time', 'memory' or a list of layer counts "
            "per stage."
        )
    counts = [int(c) for c in balance]
    if len(counts) != n_stages or any(c < 1 for c in counts) or sum(counts) != n_layers:
        raise BalanceError(
            f"balance={list(balance)} must give {n_stages} positive layer counts (one per stage) summing to the "
            f"{n_layers} layers of the Sequential; e.g. {compute_balance(layers, n_stages, 'uniform')}."
        )
    return counts


def partition_module(
    module: nn.Module, n_stages: int, stage: int, balance: Balance = "uniform", attr: Optional[str] = None
) -> Partition:
    """Replace ``module``'s pipelined Sequential with the layers of ``stage`` only.

    Returns:
        The :class:`Partition`; :func:`restore_module` puts the full Sequential back.
    """
    attr = find_sequential(module, attr)
    check_parameters_inside(module, attr)
    original: nn.Sequential = getattr(module, attr)
    counts = compute_balance(original, n_stages, balance)
    lo = sum(counts[:stage])
    hi = lo + counts[stage]
    names = list(original._modules)
    local = StageModule(OrderedDict((names[i], original[i]) for i in range(lo, hi)), stage, n_stages, attr)
    local.train(original.training)
    for i, name in enumerate(names):
        if not lo <= i < hi:
            original[i].to("meta")
    setattr(module, attr, local)
    return Partition(attr, counts, stage, original, local)


def restore_module(module: nn.Module, part: Partition, full_state: Mapping[str, Tensor]) -> None:
    """Put the full Sequential back into ``module`` with the weights of ``full_state`` (a
    ``module.state_dict()``-shaped mapping holding every layer)."""
    device = next((t.device for t in part.local.state_dict().values()), torch.device("cpu"))
    for layer in part.original:
        if any(t.is_meta for t in layer.state_dict().values()):
            layer.to_empty(device=device)
    part.original.train(part.local.training)
    setattr(module, part.attr, part.original)
    prefix = part.attr + "."
    part.original.load_state_dict({k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)})
