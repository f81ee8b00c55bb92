"""Capturing a module's forward as a graph (torch.fx), for splitting into pipeline stages.

:func:`capture` records one call ``module(*args, **kwargs)``: the tensors among the arguments
become the graph's inputs, every other argument (``None``, numbers, strings, flags) is a constant
of the graph, so ``forward(idx, targets=None)`` gives one graph for training calls (``targets`` a
tensor) and another for generation (``targets=None``).

Modules of ``torch.nn`` itself (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.Conv2d``,
``nn.BatchNorm2d``, ...) stay whole: one ``call_module`` node each, so their parameters, buffers,
hooks and names are the user's own. The user's modules (blocks, attention, residual units) are
traced through, so anything may flow between them: residual streams, skip connections, masks,
integer position ids, several outputs.

What a graph cannot hold is Python control flow that depends on a tensor (its values, or its
sizes: the graph is recorded once and replayed for every micro-batch). ``assert`` on such a value
is recorded as a check that runs with the graph (nanoGPT's ``assert t <= block_size``); an ``if``,
a ``while``, ``len()``, iteration or ``bool()`` raises :class:`CaptureError` naming the line and
the ways out: compute the condition from module attributes or non-tensor arguments, use
``torch.where`` / ``torch.cond``, move it out of ``forward`` (into ``training_step``), or declare the
module that contains it a leaf (``leaf_modules=``: it then runs whole on one stage, untraced).
"""

from __future__ import annotations

import dis
import inspect
import linecache
import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_asyncpipe.errors import PipelineConfigError

__all__ = ["CaptureError", "Captured", "capture", "call_signature"]

_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(__file__))


class CaptureError(PipelineConfigError):
    """The module's forward cannot be captured as a graph."""


def _user_frame(start: Optional[FrameType]) -> Optional[FrameType]:
    frame = start
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
    return frame


def _where(frame: Optional[FrameType]) -> str:
    if frame is None:
        return "in forward"
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
    return f"at {frame.f_code.co_filename}:{frame.f_lineno} (`{line}`)"


def _in_assert(frame: FrameType) -> bool:
    """Whether ``frame`` is converting a value to bool for an ``assert`` statement."""
    instructions = list(dis.get_instructions(frame.f_code))
    for i, inst in enumerate(instructions[:-1]):
        if inst.offset == frame.f_lasti:
            jumps_if_true = inst.opname.startswith("POP_JUMP") and "IF_TRUE" in inst.opname
            return jumps_if_true and instructions[i + 1].opname == "LOAD_ASSERTION_ERROR"
    return False


_WAYS_OUT = (
    "A pipeline records forward once as a graph and replays it for every micro-batch, so Python control flow "
    "cannot depend on tensors (their values or sizes). Ways out: compute the condition from module attributes or "
    "non-tensor arguments; use torch.where or torch.cond; move it out of forward (into training_step); or declare "
    "the module that contains it a leaf (AsyncPipeStrategy(leaf_modules=[...]): it runs whole on one stage)."
)


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Sequence[str], flat: list[Any], spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)
        self._flat, self._spec = flat, spec

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaf_names or super().is_leaf_module(m, module_qualified_name)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Any, list[Any]]:  # fmt: skip
        positions = [i for i, v in enumerate(self._flat) if isinstance(v, Tensor)]
        proxies = [self.create_proxy("placeholder", f"input_{k}", (), {}) for k in range(len(positions))]

        def call(root: nn.Module, *tensors: Any) -> Any:
            leaves = list(self._flat)
            for i, t in zip(positions, tensors):
                leaves[i] = t
            args, kwargs = pytree.tree_unflatten(leaves, self._spec)
            return root_fn(root, *args, **kwargs)

        return call, [self.root, *proxies]

    def to_bool(self, obj: fx.Proxy) -> bool:
        frame = _user_frame(inspect.currentframe())
        if frame is not None and _in_assert(frame):
            self.create_proxy("call_function", torch._assert, (obj, f"assertion failed {_where(frame)}"), {})
            return True
        raise CaptureError(f"Cannot capture forward: a branch on a tensor {_where(frame)}. {_WAYS_OUT}")

    def iter(self, obj: fx.Proxy) -> Any:
        raise CaptureError(f"Cannot capture forward: iteration over a tensor {_where(_user_frame(inspect.currentframe()))}. "
                           f"{_WAYS_OUT}")  # fmt: skip


@dataclass
class Captured:
    """One captured call: the graph, and how the call's arguments map onto its inputs.

    Attributes:
        graph: inputs ``input_0 .. input_{n-1}`` (the call's tensors, in argument order), output
            the forward's return value (any structure of tensors and constants).
        module: the module the graph's ``call_module`` / ``get_attr`` targets are relative to.
        signature: :func:`call_signature` of the call (what a later call must match to reuse it).
    """

    graph: fx.Graph
    module: nn.Module
    signature: Any


def call_signature(args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The structure of a call with its tensors abstracted: equal for calls one graph serves."""
    flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return spec, tuple("tensor" if isinstance(v, Tensor) else (type(v), v if _hashable(v) else id(v)) for v in flat)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def capture(module: nn.Module, args: Sequence[Any], kwargs: Optional[dict[str, Any]] = None,
            leaf_modules: Sequence[str] = ()) -> Captured:  # fmt: skip
    """Record ``module(*args, **kwargs)`` (its class's ``forward``) as an fx graph.

    Raises:
        CaptureError: the forward has control flow on tensors or fails while being recorded; the
            message names the line and what to do.
    """
    kwargs = dict(kwargs or {})
    flat, spec = pytree.tree_flatten((tuple(args), kwargs))
    tracer = _Tracer(leaf_modules, flat, spec)
    try:
        graph = tracer.trace(module)
    except CaptureError:
        raise
    except Exception as err:  # an op or Python construct the recording cannot follow
        frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(_INTERNAL)]
        where = f"at {frames[-1].filename}:{frames[-1].lineno} (`{(frames[-1].line or '').strip()}`)" if frames else ""
        raise CaptureError(
            f"Cannot capture {type(module).__name__}.forward {where}: {type(err).__name__}: {err}. {_WAYS_OUT}"
        ) from err
    return Captured(graph, module, call_signature(args, kwargs))
