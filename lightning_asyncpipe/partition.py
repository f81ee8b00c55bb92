"""Splitting a LightningModule's pipelined module into stages and keeping only the local one.

The pipelined module is the submodule whose forward the user's step calls (``self.net(x)``,
``self.model(idx, targets)``): named with ``AsyncPipeStrategy(sequential="net.model")`` (a dotted
path) or found alone (the single child, descending, that holds every parameter). Its forward is
captured as a graph (:mod:`lightning_asyncpipe.capture`) and split into stage programs
(:mod:`lightning_asyncpipe.split`) before the modules named by the split points.

Split points are chosen among *units*: the blocks of the module's containers of repeated blocks
(``nn.ModuleList`` / ``nn.Sequential`` children, e.g. a GPT's ``transformer.h.0 ..`` or a
ResNet's ``layer1.0 .. layer4.1``), or the layers of a module that is itself an
``nn.Sequential``. ``balance`` chooses how many consecutive units each stage gets:

- ``"uniform"``: the same number of units per stage (the first stages take the remainder);
- ``"parameters"``: contiguous stages that minimise the largest parameter count of a stage (the
  layers before the first unit count with it, those after the last unit with the last);
- ``"time"`` / ``"memory"``: from each layer's measured cost (:mod:`lightning_asyncpipe.profiling`;
  for an ``nn.Sequential``), resolved to counts by the strategy;
- a list of unit counts, one per stage, e.g. ``[3, 2, 2]``;

or ``split_points=["blocks.2", "blocks.4"]`` names the first module of each stage after the first.

The local stage is a :class:`StageModule` put in the pipelined module's place: it holds this
stage's layers, parameters and buffers under the user's names (``net.transformer.h.2.attn...``
stays ``net.transformer.h.2.attn...``), the same objects, so optimizers, hooks and ``state_dict``
see the user's parameters. The rest of the module keeps its structure with its tensors on the
``meta`` device, so that the whole can be put back together at teardown. A parameter that several
stages use (a head tied to the embedding) is held by each of them (:attr:`Partition.shared`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_asyncpipe.capture import Captured, call_signature, capture
from lightning_asyncpipe.errors import AsyncPipeError, BalanceError, PipelineConfigError
from lightning_asyncpipe.split import StageProgram, called_modules, install, meta_values, resolve, split_graph

__all__ = [
    "Balance",
    "MEASURED_BALANCES",
    "StageModule",
    "Partition",
    "find_pipelined",
    "find_sequential",
    "check_parameters_inside",
    "compute_balance",
    "balance_by_cost",
    "find_units",
    "Plan",
    "plan_partition",
    "example_call",
    "partition_module",
    "restore_module",
    "computing",
]

Balance = Union[Literal["uniform", "parameters", "time", "memory"], Sequence[int]]
MEASURED_BALANCES = ("time", "memory")
"""Balances computed from a profile of the layers (resolved to counts before partitioning)."""


class StageModule(nn.Module):
    """This stage's part of the pipelined module, standing in for it.

    Holds the stage's layers, parameters and buffers under the user's names. Called by the
    pipeline (inside :func:`computing`), it runs its :class:`~lightning_asyncpipe.split.StageProgram`
    on the stage's input tensors. When the user's own code calls it (``self.net(x)`` inside
    ``training_step``), the pipeline installs a ``call_handler`` that decides what the call means
    on this stage: capture the call's arguments, or hand back the pipeline's output on the last
    stage. Indexing and iterating go over its top-level children, as for an ``nn.Sequential``.
    """

    def __init__(self, stage: int, n_stages: int, attr: str, whole: nn.Module) -> None:
        super().__init__()
        self.stage, self.n_stages, self.attr = stage, n_stages, attr
        self.call_handler: Optional[Any] = None
        self.executing = False
        self.program: Optional[StageProgram] = None
        self.__dict__["_whole"] = whole  # not a submodule: its other stages' tensors are on meta

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self.call_handler is not None and not self.executing:
            return self.call_handler(inputs, kwargs)
        if not self.executing:
            if self.n_stages == 1:
                return type(self._whole).forward(self._whole, *inputs, **kwargs)
            names = list(self._modules)
            raise AsyncPipeError(
                f"This process holds only stage {self.stage} ({names[0]}..{names[-1]}) of '{self.attr}'; it cannot "
                "run the whole model. Use trainer.predict(...), or load the checkpoint in a plain process with "
                "Model.load_from_checkpoint(path)."
            )
        if self.program is None:
            raise AsyncPipeError(f"Stage {self.stage} has no program to run (the pipeline selects one per call).")
        return self.program(self, *inputs)

    def __getitem__(self, index: int) -> nn.Module:
        return list(self._modules.values())[index]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._modules)


@contextmanager
def computing(module: nn.Module, program: Optional[StageProgram] = None) -> Iterator[None]:
    """Mark ``module`` (a :class:`StageModule`) as run by the pipeline itself, not by user code,
    optionally with ``program`` (the one of the micro-batch being computed)."""
    if not isinstance(module, StageModule):
        yield
        return
    previous = module.executing, module.program
    module.executing = True
    if program is not None:
        module.program = program
    try:
        yield
    finally:
        module.executing, module.program = previous


@dataclass
class Partition:
    """Where the pipelined module lives, where it is split, and what this stage holds.

    Attributes:
        attr: the pipelined module's dotted path in the LightningModule.
        counts: units per stage (empty when ``split_points`` were given).
        stage: this stage's index.
        original: the whole pipelined module (other stages' tensors on ``meta``).
        local: this stage's :class:`StageModule`, in ``original``'s place.
        units: the module names split points are chosen among.
        split_points: the module each stage after the first begins with.
        shared: parameters several stages hold: name -> stages.
        leaf_modules: modules run whole, not traced through.
    """

    attr: str
    counts: list[int]
    stage: int
    original: nn.Module
    local: StageModule
    units: list[str] = field(default_factory=list)
    split_points: list[str] = field(default_factory=list)
    shared: dict[str, list[int]] = field(default_factory=dict)
    leaf_modules: tuple[str, ...] = ()
    shared_params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    """This stage's copies of :attr:`shared` parameters."""
    aliases: list[list[str]] = field(default_factory=list, repr=False)
    """Names in ``original`` that are one parameter object (a tie), to restore as one."""
    programs_by_step: dict[Any, StageProgram] = field(default_factory=dict, repr=False)
    """Programs by (step method, batch structure), for the stages that do not capture each call."""
    _programs: dict[Any, StageProgram] = field(default_factory=dict, repr=False)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        edges = [sum(self.counts[:i]) for i in range(len(self.counts) + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def program(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> StageProgram:
        """This stage's program for a call ``module(*args, **kwargs)`` (one per call structure;
        tensors of any shape share it)."""
        key = call_signature(args, dict(kwargs))
        found = self._programs.get(key)
        if found is None:
            captured = capture(self.original, args, dict(kwargs), self.leaf_modules)
            values = meta_values(captured, self.inputs(args, kwargs))
            found = split_graph(captured, self.split_points, values).programs[self.stage]
            _install(self.local, self.original, found.attributes, self.stage)
            self._programs[key] = found
        return found

    @staticmethod
    def inputs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Tensor, ...]:
        """The first stage's inputs for a call: its tensors, in argument order."""
        return tuple(t for t in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(t, Tensor))


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


@dataclass
class Plan:
    """Where a module is split: what :func:`plan_partition` decides, before anything is moved."""

    attr: str
    root: nn.Module
    captured: Captured
    units: list[str]
    counts: list[int]
    split_points: list[str]
    split: Any  # lightning_asyncpipe.split.Split


def plan_partition(
    module: nn.Module,
    n_stages: int,
    balance: Balance = "uniform",
    attr: Optional[str] = None,
    split_points: Optional[Sequence[str]] = None,
    leaf_modules: Sequence[str] = (),
    example: Optional[tuple[Sequence[Any], Mapping[str, Any]]] = None,
) -> Plan:
    """Find the pipelined module, capture its forward and choose the split (nothing is changed):
    every error a partition can meet, in the process that calls it.

    ``example``: a typical call ``(args, kwargs)`` of the pipelined module (default: tensors for
    its required arguments and for those defaulting to ``None``).

    Raises:
        PipelineConfigError: no pipelined module, parameters outside it, a forward that cannot be
            captured (:class:`~lightning_asyncpipe.capture.CaptureError`), bad split points.
        BalanceError: fewer units than stages, or a malformed explicit balance.
    """
    attr = find_pipelined(module, attr)
    check_parameters_inside(module, attr)
    root = module.get_submodule(attr)
    args, kwargs = example if example is not None else _placeholder_call(root)
    captured = capture(root, tuple(args), dict(kwargs), leaf_modules)
    values = meta_values(captured, Partition.inputs(args, kwargs))
    units = find_units(root, captured.graph)
    counts: list[int] = []
    if split_points is None:
        if balance == "parameters":
            counts = balance_by_cost(_unit_costs(root, units, called_modules(captured.graph)), n_stages) \
                if len(units) >= n_stages else compute_balance(units, n_stages, "uniform")  # fmt: skip
        else:
            counts = compute_balance(units, n_stages, balance)
        split_points = [units[sum(counts[:s])] for s in range(1, n_stages)]
    elif len(split_points) != n_stages - 1:
        raise PipelineConfigError(
            f"split_points={list(split_points)} gives {len(split_points) + 1} stages, but the pipeline has {n_stages}: "
            f"name {n_stages - 1} modules (the first module of each stage after the first)."
        )
    split = split_graph(captured, list(split_points), values)
    return Plan(attr, root, captured, units, counts, list(split_points), split)


def partition_module(
    module: nn.Module,
    n_stages: int,
    stage: int,
    balance: Balance = "uniform",
    attr: Optional[str] = None,
    split_points: Optional[Sequence[str]] = None,
    leaf_modules: Sequence[str] = (),
    example: Optional[tuple[Sequence[Any], Mapping[str, Any]]] = None,
) -> Partition:
    """Replace ``module``'s pipelined module with this stage's part of it (:func:`plan_partition`
    decides where to split).

    Returns:
        The :class:`Partition`; :func:`restore_module` puts the whole module back.
    """
    plan = plan_partition(module, n_stages, balance, attr, split_points, leaf_modules, example)
    attr, root, captured, units, counts, split_points, split = (
        plan.attr, plan.root, plan.captured, plan.units, plan.counts, plan.split_points, plan.split)  # fmt: skip
    program = split.programs[stage]
    named = dict(root.named_parameters())
    shared_params = {n: named[n] for n, stages in split.shared.items() if stage in stages}
    names_of: dict[int, list[str]] = {}
    for n, p in root.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    local = StageModule(stage, n_stages, attr, root)
    local.train(root.training)
    held = list(program.attributes)
    if stage == 0:  # parameters and buffers forward never uses: kept (and checkpointed) by stage 0
        used = {id(t) for p in split.programs for name in p.attributes for t in _tensors(root, name)}
        held += [n for n, t in [*root.named_parameters(), *root.named_buffers()] if id(t) not in used]
    _install(local, root, held, stage)
    local.program = program
    _release(root, {id(t) for t in [*local.parameters(), *local.buffers()]})
    _set_submodule(module, attr, local)
    part = Partition(attr, counts, stage, root, local, units, list(split_points), split.shared, tuple(leaf_modules),
                     shared_params)  # fmt: skip
    part._programs[captured.signature] = program
    part.aliases = [names for names in names_of.values() if len(names) > 1]
    return part


def _tensors(root: nn.Module, name: str) -> list[Tensor]:
    value = resolve(root, name)
    if isinstance(value, nn.Module):
        return [*value.parameters(), *value.buffers()]
    return [value] if isinstance(value, Tensor) else []


def _install(local: StageModule, root: nn.Module, names: Sequence[str], stage: int) -> None:
    """Put ``root``'s ``names`` into ``local`` under the same names; refuse what this stage does
    not hold (its tensors are on ``meta``)."""

    def held(name: str, value: Any) -> None:
        tensors = [*value.parameters(), *value.buffers()] if isinstance(value, nn.Module) else [value]
        if any(isinstance(t, Tensor) and t.is_meta for t in tensors):
            raise PipelineConfigError(
                f"forward, called with these arguments, runs '{name}' on stage {stage}, which holds no copy of it: the "
                "partition was chosen from another call of forward. Set `self.example_input_array` in the "
                "LightningModule to a typical batch (its call of the pipelined module then decides the partition)."
            )

    install(local, root, names, held)


def _release(root: nn.Module, keep: set[int]) -> None:
    """Move every parameter and buffer of ``root`` not in ``keep`` to ``meta`` (in place: tied
    parameters stay one object)."""
    for m in root.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) not in keep and not p.is_meta:
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
        for name, b in m._buffers.items():
            if b is not None and id(b) not in keep and not b.is_meta:
                m._buffers[name] = torch.empty_like(b, device="meta")


def _set_submodule(module: nn.Module, attr: str, value: nn.Module) -> None:
    owner, _, leaf = attr.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def restore_module(module: nn.Module, part: Partition, full_state: Mapping[str, Tensor]) -> None:
    """Put the whole pipelined module back into ``module`` with the weights of ``full_state`` (a
    ``module.state_dict()``-shaped mapping holding every stage's tensors)."""
    device = next((t.device for t in part.local.state_dict().values()), torch.device("cpu"))
    for m in part.original.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_meta:
                torch.utils.swap_tensors(p, nn.Parameter(torch.empty_like(p, device=device), p.requires_grad))
        for name, b in m._buffers.items():
            if b is not None and b.is_meta:
                m._buffers[name] = torch.empty_like(b, device=device)
    part.original.train(part.local.training)
    _set_submodule(module, part.attr, part.original)
    for names in part.aliases:  # a policy may have given one of the names a new parameter object
        param = part.original.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            part.original.get_submodule(owner)._parameters[leaf] = param
    prefix = part.attr + "."
    part.original.load_state_dict({k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)})
