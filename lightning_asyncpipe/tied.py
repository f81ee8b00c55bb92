"""Parameters that several stages use: one logical parameter, owned by the first stage that uses it.

A GPT's head tied to its token embedding is used by the first stage (the embedding) and by the
last (the head) (:attr:`~lightning_asyncpipe.partition.Partition.shared`). It stays one parameter:

- The **owner**, the first stage that uses it, holds it as a parameter: its optimizer, its policy
  (versions, stashing, learning-rate factors, clipping) treat it like any other of its weights.
- Every **other holder** keeps a read-only *mirror*: the parameter is taken out of its module's
  parameters (so its optimizer and policy never see it) and a buffer of the same name holds the
  owner's weights. For the passes of micro-batch ``j`` the mirror holds the version the owner's
  forward of ``j`` uses (:meth:`~lightning_asyncpipe.policies.base.WeightPolicy.forward_version_at`):
  every use of the parameter by one micro-batch sees one version, and the holder's gradient is
  the gradient of that version.
- At its update of batch ``k`` a holder sends its gradient contribution of batch ``k`` to the
  owner; the owner adds it to its own before its update (so clipping and the replicas'
  averaging see the whole gradient), applies the update, and sends the new weights to the
  holders. Later stages apply their update of batch ``k`` no later than the owner does, and the
  owner's new weights are sent before its next forward that uses them, so nothing waits for
  work not yet done (no step boundary is crossed backwards).

Synchronous policies see version ``k`` everywhere: this is exactly one parameter in one process.
Messages go over a process group of the holders of one replica (not the neighbours' groups).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_asyncpipe.split import put_parameter
from lightning_asyncpipe.topology import Topology
from lightning_asyncpipe.wgrad import grad_into_live

__all__ = ["SharedParameters"]


class _Mirror:
    """A holder's read-only copy of a parameter another stage owns, by version."""

    def __init__(self, name: str, param: nn.Parameter, places: list[tuple[nn.Module, str]], owner_stage: int,
                 owner_rank: int, group: Any) -> None:  # fmt: skip
        self.name, self.param, self.places, self.group = name, param, places, group
        self.owner_stage, self.owner_rank = owner_stage, owner_rank
        self.latest: Optional[int] = None
        self.versions: dict[int, Tensor] = {}
        self.used: dict[int, int] = {}  # micro-batch -> version, until its batch's update
        self._recv: Optional[tuple[Any, Tensor]] = None
        self._send: Optional[Any] = None
        current = param.detach().requires_grad_(param.requires_grad)
        for module, name in places:
            del module._parameters[name]
            module.register_buffer(name, current)

    def current(self) -> Tensor:
        module, name = self.places[0]
        return module._buffers[name]  # type: ignore[return-value]

    def _version(self, t: Tensor) -> Tensor:
        # a linear layer may defer the weight gradient of a mirror like a parameter's (one GEMM per
        # batch, into the installed version's grad: the holder sums every version's anyway)
        return grad_into_live(t.requires_grad_(self.param.requires_grad), self.param)

    def start(self, version: int) -> None:
        """Number the weights the mirror holds now (a fresh run's 0, a resumed run's update count)."""
        self.latest, self.versions, self.used = version, {version: self._version(self.current())}, {}

    def install(self, version: int) -> None:
        t = self.versions[version]
        for module, name in self.places:
            module._buffers[name] = t

    def receive_until(self, version: int) -> None:
        """Receive the owner's versions, in order, until ``version`` is held."""
        assert self.latest is not None
        while self.latest < version:
            if self._recv is None:
                self.post()
            work, buf = self._recv  # type: ignore[misc]
            work.wait()
            self._recv = None
            self.latest += 1
            self.versions[self.latest] = self._version(buf)

    def post(self) -> None:
        buf = torch.empty_like(self.param, memory_format=torch.contiguous_format).detach()
        self._recv = (dist.irecv(buf, src=self.owner_rank, group=self.group), buf)

    def gradient(self) -> Tensor:
        """The sum of this holder's gradients over every version, cleared."""
        total = torch.zeros_like(self.param).detach()
        for t in self.versions.values():
            if t.grad is not None:
                total += t.grad
                t.grad = None
        return total

    def send_gradient(self) -> None:
        if self._send is not None:
            self._send.wait()
        self._send = dist.isend(self.gradient(), dst=self.owner_rank, group=self.group)

    def release_until(self, microbatch_end: int) -> None:
        """Forget micro-batches before ``microbatch_end`` and the versions nothing needs any more."""
        self.used = {j: v for j, v in self.used.items() if j >= microbatch_end}
        assert self.latest is not None
        keep = min([*self.used.values(), self.latest])
        for v in [v for v in self.versions if v < keep]:
            del self.versions[v]

    def close(self) -> None:
        """Give the module its parameter back, with the newest weights."""
        if self._send is not None:
            self._send.wait()
        with torch.no_grad():
            if self.latest is not None:
                self.param.copy_(self.versions[self.latest])
            else:
                self.param.copy_(self.current())
        for module, name in self.places:
            del module._buffers[name]
            put_parameter(module, name, self.param)


class SharedParameters:
    """This stage's part in keeping parameters several stages use one parameter.

    Every rank must construct it, at the same point and in the same order (it creates one process
    group per shared parameter and replica, and the owner sends its initial weights).

    Args:
        shared: parameter name -> the stages that use it (ascending; the first owns it).
        module: this stage's module (its parameters by the same names as in the full module for the
            owner; for other holders the parameter object is looked up by identity).
        params: this stage's parameter objects of ``shared``, by the same names.
        stage: this stage.
        topology: stages and replicas.
        rank: this process's global rank.
    """

    def __init__(self, shared: Mapping[str, Sequence[int]], module: nn.Module, params: Mapping[str, nn.Parameter],
                 stage: int, topology: Topology, rank: int) -> None:  # fmt: skip
        self.policy: Any = None
        self.n_microbatches = 1
        self._owned: dict[str, tuple[str, list[int], Any]] = {}  # name -> (name in module, holder ranks, group)
        self._sends: list[Any] = []
        self._mirrors: dict[str, _Mirror] = {}
        groups: dict[str, Any] = {}
        for name in sorted(shared):
            for replica in range(topology.n_replicas):
                ranks = [topology.rank_of(s, replica) for s in shared[name]]
                group = dist.new_group(ranks) if dist.is_initialized() else None
                if rank in ranks:
                    groups[name] = (group, ranks)
        for name, (group, ranks) in groups.items():
            param, owner = params[name], shared[name][0]
            if stage == owner:
                local = next(n for n, p in module.named_parameters(remove_duplicate=False) if p is param)
                self._owned[name] = (local, ranks[1:], group)
                with torch.no_grad():  # the holders start from the owner's weights
                    for r in ranks[1:]:
                        dist.send(param.detach().contiguous(), dst=r, group=group)
            else:
                places = [(m, n) for m in module.modules() for n, p in m._parameters.items() if p is param]
                mirror = _Mirror(name, param, places, owner, ranks[0], group)
                with torch.no_grad():
                    dist.recv(mirror.current(), src=ranks[0], group=group)
                self._mirrors[name] = mirror
        self._module = module

    def __bool__(self) -> bool:
        return bool(self._owned or self._mirrors)

    def bind(self, policy: Any, n_microbatches: int) -> None:
        """The stage's policy (it knows which version the owner's forward of a micro-batch uses)."""
        self.policy, self.n_microbatches = policy, n_microbatches
        self.restart()

    def restart(self, saved: Optional[Mapping[str, Mapping[str, Tensor]]] = None) -> None:
        """Number the mirrors' weights by the policy's update count; after a checkpoint is loaded,
        ``saved`` (the merged policy state's tensors) gives the older versions the owner kept
        (PipeDream-2BW's next batch uses the version before the newest)."""
        for mirror in self._mirrors.values():
            mirror.start(self.policy.updates)
            for key, by_name in (saved or {}).items():
                if key.startswith("stash.") and mirror.name in by_name:
                    weights = by_name[mirror.name].detach().to(mirror.param.device, mirror.param.dtype).clone()
                    mirror.versions[int(key[len("stash."):])] = mirror._version(weights)

    def select(self, microbatch: int, training: bool) -> None:
        """Put into the mirrors the owner's version that the passes of ``microbatch`` use."""
        for mirror in self._mirrors.values():
            if training:
                version = self.policy.forward_version_at(mirror.owner_stage, microbatch)
                version = mirror.used.setdefault(microbatch, version)
            else:
                version = mirror.latest  # type: ignore[assignment]
            mirror.receive_until(version)
            mirror.install(version)

    def before_update(self, batch: int) -> None:
        """Holders send their gradient of ``batch``; the owner adds them to its own."""
        for mirror in self._mirrors.values():
            mirror.send_gradient()
            mirror.release_until((batch + 1) * self.n_microbatches)
        for name, (local, ranks, group) in self._owned.items():
            param = self._module.get_parameter(local)  # a policy may have swapped in a new object
            for r in ranks:
                buf = torch.empty_like(param, memory_format=torch.contiguous_format).detach()
                dist.recv(buf, src=r, group=group)
                param.grad = buf if param.grad is None else param.grad.add_(buf)

    def after_update(self) -> None:
        """The owner sends its new weights to the holders."""
        for work in self._sends:
            work.wait()
        self._sends = []
        for name, (local, ranks, group) in self._owned.items():
            weights = self._module.get_parameter(local).detach().clone()
            self._sends += [dist.isend(weights, dst=r, group=group) for r in ranks]

    def settle(self) -> None:
        """After a drain: the mirrors take the owner's newest weights (every stage has applied the
        same number of updates)."""
        for mirror in self._mirrors.values():
            mirror.receive_until(self.policy.updates)
            mirror.install(self.policy.updates)
            mirror.used = {}
            # PipeDream-2BW keeps its one-update delay across a drain: the next batch uses the
            # version before the newest
            for v in [v for v in mirror.versions if v < self.policy.updates - 1]:
                del mirror.versions[v]

    def close(self) -> None:
        """Give every module its parameters back (the mirrors' newest weights in them)."""
        for work in self._sends:
            work.wait()
        self._sends = []
        for mirror in self._mirrors.values():
            mirror.close()
        self._mirrors = {}
