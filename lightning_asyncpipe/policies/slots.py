"""Running a stage's layers on other weights by putting them in the parameters' places.

``torch.func.functional_call`` does this by name on every call: it walks the module tree, resolves
each name and checks for ties, about 90 us per call on a stage of four ``nn.Linear`` layers, eight
calls a step for a stashing policy. The places of a stage's parameters do not change while it
trains (a policy swaps the *objects* in them, never the structure), so :class:`ParameterSlots`
finds them once and swaps the weights in and out directly: the same tensors reach the same layers,
a tie inside the stage stays one tensor, and autograd records the weights as it would under
``functional_call``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from torch import Tensor, nn

from lightning_asyncpipe.errors import AsyncPipeError
from lightning_asyncpipe.split import put_parameter

__all__ = ["ParameterSlots"]


class ParameterSlots:
    """Where each parameter of ``module`` sits: for ``module.parameters()`` in order (ties counted
    once), every ``(submodule, name)`` holding it.

    Args:
        module: the stage's layers, with their final structure.
    """

    def __init__(self, module: nn.Module) -> None:
        self.names = [n for n, _ in module.named_parameters()]
        params = list(module.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        self.places: list[list[tuple[nn.Module, str]]] = [[] for _ in params]
        for sub in module.modules():
            for leaf, p in sub._parameters.items():
                if p is not None and id(p) in index:
                    self.places[index[id(p)]].append((sub, leaf))

    def live(self) -> list[Any]:
        """The tensors in the places now (the live parameters, outside :meth:`run`).

        Raises:
            AsyncPipeError: if the stage's parameters changed places since they were found (a
                parameter removed or renamed, e.g. by pruning, or a tie broken): the weight
                versions a policy keeps are lists in this order and would no longer match.
        """
        out = []
        for places in self.places:
            sub, leaf = places[0]
            t = sub._parameters.get(leaf)
            if t is None or any(s._parameters.get(n) is not t for s, n in places[1:]):
                raise AsyncPipeError(
                    f"The stage's parameter {type(sub).__name__}.{leaf} changed place during training (removed, "
                    "renamed, or a tie broken, e.g. by a pruning callback or load_state_dict(assign=True)). "
                    "Policies that keep weight versions need the parameters of a stage to stay where they are; "
                    "change the model before fit, or use a synchronous policy."
                )
            out.append(t)
        return out

    def put(self, tensors: Sequence[Tensor]) -> None:
        """Put ``tensors`` (in :meth:`live`'s order) in the parameters' places."""
        for places, t in zip(self.places, tensors):
            for sub, leaf in places:
                put_parameter(sub, leaf, t)

    def run(self, module: nn.Module, weights: Union[Sequence[Tensor], Mapping[str, Tensor]],
            inputs: tuple[Any, ...]) -> Any:  # fmt: skip
        """``module(*inputs)`` with ``weights`` (in :meth:`live`'s order, or by parameter name:
        missing names keep the live tensor) in the parameters' places, then the live ones back."""
        live = self.live()
        if isinstance(weights, Mapping):
            weights = [weights.get(n, p) for n, p in zip(self.names, live)]
        self.put(weights)
        try:
            return module(*inputs)
        finally:
            self.put(live)
