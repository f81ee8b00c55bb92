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

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_asyncpipe.capture import Captured, call_signature, capture
from lightning_asyncpipe.errors import AsyncPipeError, PipelineConfigError
from lightning_asyncpipe.locate import (
    Balance,
    _placeholder_call,
    _unit_costs,
    balance_by_cost,
    check_parameters_inside,
    compute_balance,
    find_pipelined,
    find_units,
)
from lightning_asyncpipe.split import (
    StageProgram, called_modules, install, meta_values, put_parameter, resolve, split_graph,
)

__all__ = [
    "StageModule",
    "Partition",
    "Plan",
    "plan_partition",
    "partition_module",
    "restore_module",
    "computing",
]



class StageModule(nn.Module):
    """This stage's part of the pipelined module, standing in for it.

    Holds the stage's layers, parameters and buffers under the user's names. Called by the
    pipeline (inside :func:`computing`), it runs its :class:`~lightning_asyncpipe.split.StageProgram`
    on the stage's input tensors. When the user's own code calls it (``self.net(x)`` inside
    ``training_step``), the pipeline installs a ``call_handler`` that decides what the call means
    on this stage: capture the call's arguments, or hand back the pipeline's output on the last
    stage. Indexing and iterating go over its top-level children, as for an ``nn.Sequential``.

    The rest of the user's module stays reachable through it, as user code expects of
    ``self.model``: its plain attributes (``self.model.config``, ``self.model.num_classes``; read
    and written on the whole module) and the methods and properties of its class, run on this
    stage's part (nanoGPT's ``self.model.configure_optimizers(...)`` groups this stage's
    parameters, the ones the stage's optimizer may hold). A submodule, parameter or buffer that
    another stage holds is refused with a clear error instead of handing out its ``meta`` copy.
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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # this stage's submodules, parameters and buffers
        except AttributeError:
            whole = self.__dict__.get("_whole")
            if whole is None:
                raise
        if name in whole.__dict__:  # the user's plain attributes (config, num_classes)
            return whole.__dict__[name]
        for klass in type(whole).__mro__:  # its class's methods and properties, bound to this stage
            if klass is nn.Module:
                break
            if name in vars(klass):
                found = vars(klass)[name]
                if isinstance(found, classmethod):
                    return found.__get__(whole, type(whole))
                return found.__get__(self, type(self)) if hasattr(found, "__get__") else found
        if name in whole._modules or name in whole._parameters or name in whole._buffers:
            raise AttributeError(
                f"'{self.attr}.{name}' is not on stage {self.stage}: this process holds only stage {self.stage} of "
                f"'{self.attr}' ({', '.join(self._modules) or 'no submodules'}). Reach other stages' layers after fit "
                "(the whole module is restored then), or through the pipeline (call the module once per step)."
            )
        raise AttributeError(f"'{type(whole).__name__}' object has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        whole = self.__dict__.get("_whole")
        if (whole is not None and name in whole.__dict__ and name not in self.__dict__
                and not isinstance(value, (nn.Module, Tensor))):  # fmt: skip
            setattr(whole, name, value)  # a plain attribute of the user's module: one copy, kept after fit
        else:
            super().__setattr__(name, value)

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
    parameters stay one object). Non-persistent buffers (causal masks, rotary frequencies) stay:
    no state dict carries them back to the whole module after fit or into a checkpoint's net."""
    for m in root.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) not in keep and not p.is_meta:
                _swap_parameter(root, p, nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
        for name, b in m._buffers.items():
            if b is not None and id(b) not in keep and not b.is_meta and name not in m._non_persistent_buffers_set:
                m._buffers[name] = torch.empty_like(b, device="meta")


def _swap_parameter(root: nn.Module, p: nn.Parameter, new: nn.Parameter) -> None:
    """Make ``p`` hold ``new``'s data in place (ties stay one object); a parameter something holds a
    weak reference to (a recurrent layer's flat weights) cannot be swapped in place: ``new`` then
    takes its places in ``root`` instead."""
    try:
        torch.utils.swap_tensors(p, new)
    except RuntimeError as err:
        if "weakref" not in str(err):
            raise
        for m in root.modules():
            for name, q in list(m._parameters.items()):
                if q is p:
                    put_parameter(m, name, new)


def _set_submodule(module: nn.Module, attr: str, value: nn.Module) -> None:
    owner, _, leaf = attr.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, leaf, value)


def materialize(module: nn.Module, state: Mapping[str, Tensor], prefix: str, device: torch.device) -> None:
    """Give ``module``'s meta parameters and buffers (the other stages' layers) real, zeroed storage
    on ``device``, in the dtype of their entry ``prefix + name`` of ``state`` (a stage's precision
    plugin converts the stage's modules, not the meta copies of the others)."""
    for owner, m in module.named_modules():
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is not None and name in m._non_persistent_buffers_set and t.device != device:
                m._buffers[name] = t.to(device)  # kept whole on every stage (see _release)
            if t is None or not t.is_meta:
                continue
            found = state.get(f"{prefix}{owner}.{name}" if owner else f"{prefix}{name}")
            fresh = torch.zeros_like(t, device=device, dtype=found.dtype if found is not None else t.dtype)
            if name in m._parameters:
                _swap_parameter(module, t, nn.Parameter(fresh, t.requires_grad))
            else:
                m._buffers[name] = fresh


def restore_module(module: nn.Module, part: Partition, full_state: Mapping[str, Tensor]) -> None:
    """Put the whole pipelined module back into ``module`` with the weights of ``full_state`` (a
    ``module.state_dict()``-shaped mapping holding every stage's tensors)."""
    device = next((t.device for t in part.local.state_dict().values()), torch.device("cpu"))
    materialize(part.original, full_state, part.attr + ".", device)
    part.original.train(part.local.training)
    _set_submodule(module, part.attr, part.original)
    for names in part.aliases:  # a policy may have given one of the names a new parameter object
        param = part.original.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            put_parameter(part.original.get_submodule(owner), leaf, param)
    prefix = part.attr + "."
    part.original.load_state_dict({k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)})
