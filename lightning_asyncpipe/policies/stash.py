"""Weight stashing: keeping older weight versions alive for the passes that still need them.

[Note: versions as parameter objects] The forward of a micro-batch records, in its autograd
graph, the parameter tensors it used. An optimizer update mutates the live parameters in place,
which would corrupt (or, through autograd's version counter, reject) every graph still waiting
for its backward. So when an update is due while the live version is still needed (by a graph in
flight or by a forward to come), the live parameters become the stashed version as they are,
untouched, and the module and the optimizer get fresh copies to update (moving the gradient and
the optimizer state with them). The stash costs exactly one copy per version in flight and no
copy at all when nothing needs the old version; backward passes find their version in their own
graph, and their gradients are then folded into the live parameters.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.base import ApplyUpdate, WeightPolicy

__all__ = ["StashingPolicy"]


class StashingPolicy(WeightPolicy):
    """Base of the policies whose forward and backward of a micro-batch use the same version.

    Subclasses define :meth:`forward_version`; the base keeps the versions alive, runs forwards
    on old versions (their tensors put in the parameters' places, :meth:`WeightPolicy.slots`),
    folds gradients of old versions into the live parameters and decides at each update whether
    the live version must be stashed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stash: dict[int, list[nn.Parameter]] = {}
        self._next_forward: Optional[int] = None

    def forward_version(self, microbatch: int) -> int:
        """The version the forward (and backward) of ``microbatch`` uses at this stage."""
        return self.updates

    def _names(self) -> list[str]:
        assert self.module is not None
        return [n for n, _ in self.module.named_parameters()]

    def forward(self, module: nn.Module, inputs: tuple[Tensor, ...], microbatch: int, training: bool) -> Any:
        version = self.forward_version(microbatch) if training else self.updates
        if training:
            self._next_forward = microbatch + 1
            self._note_forward(microbatch, version)
        if version == self.updates:
            return module(*inputs)
        if version not in self._stash:
            raise RuntimeError(f"stage {self.stage}: weight version {version} of micro-batch {microbatch} was not kept")
        return self.slots().run(module, self._stash[version], inputs)

    def after_backward(self, microbatch: int) -> None:
        version = self._forward_version.get(microbatch)
        super().after_backward(microbatch)
        old = self._stash.get(version) if version is not None else None
        if old is None:
            return
        for stashed, live in zip(old, self.slots().live()):
            if stashed.grad is not None:
                live.grad = stashed.grad if live.grad is None else live.grad.add_(stashed.grad)
                stashed.grad = None

    def _future_floor(self) -> int:
        """The oldest version a forward that has not run yet may use (versions only grow)."""
        if self._next_forward is None:
            return self.updates
        return min(self.updates, self.forward_version(self._next_forward))

    def update(self, batch: int, apply: ApplyUpdate) -> None:
        live, in_flight = self.updates, self.in_flight_versions()
        self.updates += 1  # look ahead: which versions do passes after this update still need?
        floor = self._future_floor()
        self.updates -= 1
        keep_from = min(in_flight | {floor})
        released: list[list[nn.Parameter]] = []
        for version in [v for v in self._stash if v < keep_from]:
            released.append(self._stash.pop(version))  # no graph in flight uses it and no forward to come will
        if live in in_flight or floor <= live:
            self._stash[live] = self._detach_live(released[0] if released else None)
        apply(batch, None)
        self._finish_update(batch)

    def _detach_live(self, recycle: Optional[list[nn.Parameter]] = None) -> list[nn.Parameter]:
        """Hand the live parameters over to the stash and give the module and optimizer copies
        (written into ``recycle``, the storage of a version just released, when there is one:
        double buffering without allocating)."""
        old = self.slots().live()
        swap: dict[int, nn.Parameter] = {}
        for i, param in enumerate(old):
            data = recycle[i].detach().copy_(param.detach()) if recycle is not None else param.detach().clone()
            fresh = nn.Parameter(data, requires_grad=param.requires_grad)
            fresh.grad, param.grad = param.grad, None
            swap[id(param)] = fresh
        self.slots().put(list(swap.values()))  # every place a parameter has (a tie inside the stage)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["params"] = [swap.get(id(p), p) for p in group["params"]]
            for param in old:
                if param in self.optimizer.state:
                    self.optimizer.state[swap[id(param)]] = self.optimizer.state.pop(param)
        for param in old:
            param.requires_grad_(param.requires_grad)
        return old

    def weight_copies(self) -> int:
        return 1 + len(self._stash)

    def _named_buffers(self) -> dict[str, dict[str, Tensor]]:
        names = self._names()
        return {f"stash.{v}": dict(zip(names, ps)) for v, ps in self._stash.items()}

    def _load_buffers(self, buffers: dict[str, dict[str, Tensor]]) -> None:
        names, self._stash = self._names(), {}
        for key, tensors in buffers.items():
            if not key.startswith("stash."):
                continue
            if missing := self._missing(tensors):
                raise PipelineConfigError(
                    f"The checkpoint keeps weight version {key[6:]} for {self.name}, but not for parameters "
                    f"{missing[:5]} of this stage: it was written for another model."
                )
            self._stash[int(key[6:])] = [nn.Parameter(tensors[n].clone()) for n in names]
