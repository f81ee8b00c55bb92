"""Which module of a LightningModule to pipeline, and where to cut it: the pipelined module found
or named, its *units* (the blocks of its containers of repeated blocks, or the layers of a
Sequential), and how many consecutive units each stage gets (``balance``). Used by
:mod:`lightning_asyncpipe.partition` before anything is captured or moved (see its docstring for
the options)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_asyncpipe.errors import BalanceError, PipelineConfigError
from lightning_asyncpipe.split import called_modules

__all__ = [
    "Balance",
    "MEASURED_BALANCES",
    "find_pipelined",
    "find_sequential",
    "check_parameters_inside",
    "compute_balance",
    "balance_by_cost",
    "find_units",
    "example_call",
]

Balance = Union[Literal["uniform", "parameters", "time", "memory"], Sequence[int]]
MEASURED_BALANCES = ("time", "memory")
"""Balances computed from a profile of the layers (resolved to counts before partitioning)."""


def find_pipelined(module: nn.Module, attr: Optional[str] = None) -> str:
    """The dotted path of the module to pipeline in ``module``.

    Named (``attr``, e.g. ``"net.model"``), or found: descending from ``module`` while exactly one
    child holds parameters (and the module holds none of its own), the last such child; the
    descent stops at an ``nn.Sequential`` and above a single ``torch.nn`` layer.

    Raises:
        PipelineConfigError: if ``attr`` names no module, or none can be found.
    """
    cls = type(module).__name__
    holders = [name for name, m in module.named_modules() if name and any(True for _ in m.parameters())]
    if attr is not None:
        try:
            target = module.get_submodule(attr)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Module) or isinstance(target, (nn.ModuleList, nn.ModuleDict)):
            what = "missing" if target is None else f"a {type(target).__name__} (it has no forward)"
            raise PipelineConfigError(
                f"AsyncPipeStrategy(sequential={attr!r}): {cls}.{attr} is {what}. Modules of {cls} that hold "
                f"parameters: {holders[:12] or 'none'}{' ...' if len(holders) > 12 else ''}."
            )
        return attr
    path, current = [], module
    # (parameters of the LightningModule itself are reported by check_parameters_inside)
    while not path or not isinstance(current, nn.Sequential) and not any(True for _ in current.parameters(recurse=False)):
        children = [(n, c) for n, c in current.named_children() if any(True for _ in c.parameters())]
        if len(children) != 1 or isinstance(children[0][1], (nn.ModuleList, nn.ModuleDict)) or _is_torch_layer(children[0][1]):
            break
        path.append(children[0][0])
        current = children[0][1]
    if not path:
        top = [n for n, c in module.named_children() if any(True for _ in c.parameters())]
        if len(top) == 1:  # a ModuleList / ModuleDict, run by the module's own forward
            kind = type(module.get_submodule(top[0])).__name__
            raise PipelineConfigError(
                f"AsyncPipeStrategy pipelines the submodule that holds {cls}'s layers, but they are in the {kind} "
                f"'{top[0]}', which has no forward of its own ({cls}.forward runs them), and pipelining the "
                f"LightningModule's own forward is not supported yet. Move the layers and the forward into one module "
                f"(e.g. self.model = MyNet(...), with {cls}.forward calling self.model(x))."
            )
        raise PipelineConfigError(
            f"AsyncPipeStrategy pipelines the submodule that holds {cls}'s layers, but "
            f"{'several top-level children hold parameters: ' + str(top) if top else cls + ' has no parameters'}. "
            f"Put the layers in one submodule that forward() calls (e.g. self.model = MyNet(...)), or name it with "
            f"AsyncPipeStrategy(sequential={top[0] if top else 'net'!r}) (a dotted path, e.g. 'net.model')."
        )
    return ".".join(path)


def _is_torch_layer(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.nn") and type(m) not in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_sequential(module: nn.Module, attr: Optional[str] = None) -> str:
    """Former name of :func:`find_pipelined` (any module, not only an ``nn.Sequential``)."""
    return find_pipelined(module, attr)


def check_parameters_inside(module: nn.Module, attr: str) -> None:
    """Raise if ``module`` has parameters outside its pipelined module ``attr``.

    Every stage would hold its own copy of such a parameter and train it differently.
    """
    outside = [n for n, _ in module.named_parameters() if not n.startswith(attr + ".")]
    if outside:
        shown = ", ".join(outside[:6]) + (", ..." if len(outside) > 6 else "")
        raise PipelineConfigError(
            f"AsyncPipeStrategy requires every parameter of {type(module).__name__} to live inside the pipelined "
            f"module '{attr}', but found {len(outside)} outside it: {shown}. Move those layers into '{attr}' (or "
            "pipeline a module that contains them all)."
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


def compute_balance(layers: Sequence[Any], n_stages: int, balance: Balance) -> list[int]:
    """Layer (unit) counts per stage for ``balance`` over ``layers`` (modules, or unit names).

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


def find_units(root: nn.Module, graph: Any) -> list[str]:
    """The names split points are chosen among, in the order forward runs them: the blocks of
    ``root``'s outermost containers of repeated blocks (``nn.ModuleList`` / ``nn.Sequential`` with
    at least two children of one class), or ``root``'s own layers if it is such a container, or
    else its children."""
    ran = called_modules(graph)
    order = {name: i for i, name in enumerate(ran)}

    def repeated(m: nn.Module) -> bool:
        kinds = [type(c) for c in m.children()]
        return isinstance(m, (nn.ModuleList, nn.Sequential)) and len(kinds) >= 2 and len(set(kinds)) < len(kinds)

    if repeated(root):
        return [n for n, _ in root.named_children() if n in order]
    containers: list[str] = []

    def visit(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            qualified = prefix + name
            if repeated(child):
                containers.append(qualified)
            else:
                visit(qualified + ".", child)

    visit("", root)
    units = [f"{c}.{n}" for c in containers for n, _ in root.get_submodule(c).named_children()]
    units = [u for u in units if u in order]
    if not units:
        units = [n for n, _ in root.named_children() if n in order]
    return sorted(units, key=order.__getitem__)


class _Called(Exception):
    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.call = args, kwargs


def example_call(module: nn.Module, attr: str) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The call of the pipelined module ``attr`` that ``module(example_input_array)`` makes, or
    ``None`` when the module has no ``example_input_array`` (Lightning's convention for a sample
    batch) or its forward does not call ``attr``."""
    example = getattr(module, "example_input_array", None)
    if example is None:
        return None

    def stop(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Called(args, kwargs)

    handle = module.get_submodule(attr).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        with torch.no_grad():
            if isinstance(example, dict):
                module(**example)
            else:
                module(*example) if isinstance(example, tuple) else module(example)
    except _Called as called:
        return called.call
    finally:
        handle.remove()
    return None


def _placeholder_call(root: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call of ``root`` for a capture without data: a tensor for each required argument and
    each argument that defaults to ``None`` (``targets=None``, ``mask=None``), the other defaults
    as they are."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for p in list(inspect.signature(type(root).forward).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = torch.empty(0) if p.default is p.empty or p.default is None else p.default
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = value
        else:
            args.append(value)
    return tuple(args), kwargs


def _unit_costs(root: nn.Module, units: Sequence[str], ran: Sequence[str]) -> list[float]:
    """Parameters per unit; those of layers outside the units count with the first unit when they
    run before it, with the last otherwise (each parameter once)."""
    seen: set[int] = set()

    def count(m: nn.Module) -> int:
        total = 0
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    costs = [float(count(root.get_submodule(u))) for u in units]
    first = ran.index(units[0]) if units[0] in ran else 0
    for name in ran:
        m = root.get_submodule(name)
        if any(name == u or name.startswith(u + ".") or u.startswith(name + ".") for u in units):
            continue
        extra = sum(p.numel() for p in m.parameters(recurse=False) if id(p) not in seen)
        for p in m.parameters(recurse=False):
            seen.add(id(p))
        costs[0 if ran.index(name) < first else -1] += extra
    return [max(c, 1.0) for c in costs]
