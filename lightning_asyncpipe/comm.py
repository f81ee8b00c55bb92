"""Moving activations and gradients between neighbouring stages: a transport protocol and its
torch.distributed point-to-point implementation.

Activations flow ``s -> s+1`` and gradients ``s+1 -> s``; each direction between two neighbours is
a FIFO channel on its own process group (so with NCCL a pending receive in one direction never
blocks a send in the other). Sends and receives are non-blocking: ``send_*`` returns at once and
the tensor is kept alive until its transfer completes; ``recv_*`` returns a :class:`PendingRecv`
whose ``wait()`` yields the tensors.

[Note: shape negotiation] The receiver of an activation must know shapes and dtypes before it can
post a receive. Both neighbours see the same batch (every stage of a replica reads the same data),
so the executor passes a *key* derived from the micro-batch's own shapes. The first message of a
key is preceded by a small header (count, dtypes, shapes, requires_grad flags); afterwards both
sides use the cached description. A sender whose output no longer matches the description cached
for that key raises :class:`ShapeError` instead of sending bytes the receiver would misread.
Gradient messages need no header: they have the shapes of the activations they answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_asyncpipe.errors import ShapeError, StageFailure
from lightning_asyncpipe.topology import Topology

__all__ = [
    "TensorMeta", "PendingRecv", "Transport", "TorchP2PTransport", "LocalTransport", "LocalHub", "PipelineGroups",
]  # fmt: skip

_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]  # fmt: skip
_MAX_TENSORS, _MAX_DIMS = 16, 8
_HEADER_LEN = 1 + _MAX_TENSORS * (3 + _MAX_DIMS)


@dataclass(frozen=True)
class TensorMeta:
    """Shape, dtype and whether a gradient flows back for one tensor crossing a stage boundary."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @staticmethod
    def of(t: Tensor) -> "TensorMeta":
        return TensorMeta(tuple(t.shape), t.dtype, bool(t.requires_grad))


def metas_of(tensors: Sequence[Tensor], requires_grad: Optional[Sequence[bool]] = None) -> tuple[TensorMeta, ...]:
    flags = [t.requires_grad for t in tensors] if requires_grad is None else list(requires_grad)
    return tuple(TensorMeta(tuple(t.shape), t.dtype, bool(f)) for t, f in zip(tensors, flags))


def _encode(metas: Sequence[TensorMeta]) -> Tensor:
    if len(metas) > _MAX_TENSORS or any(len(m.shape) > _MAX_DIMS for m in metas):
        raise ShapeError(
            f"A stage output may hold at most {_MAX_TENSORS} tensors of at most {_MAX_DIMS} dimensions; got "
            f"{[m.shape for m in metas]}."
        )
    header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
    header[0] = len(metas)
    for i, m in enumerate(metas):
        if m.dtype not in _DTYPES:
            raise ShapeError(f"Stage outputs of dtype {m.dtype} cannot be sent; supported: {_DTYPES}.")
        base = 1 + i * (3 + _MAX_DIMS)
        header[base : base + 3] = torch.tensor([_DTYPES.index(m.dtype), int(m.requires_grad), len(m.shape)])
        header[base + 3 : base + 3 + len(m.shape)] = torch.tensor(m.shape, dtype=torch.int64)
    return header


def _decode(header: Tensor) -> tuple[TensorMeta, ...]:
    values = header.tolist()
    metas = []
    for i in range(int(values[0])):
        base = 1 + i * (3 + _MAX_DIMS)
        dtype_code, requires_grad, ndim = values[base : base + 3]
        shape = tuple(int(d) for d in values[base + 3 : base + 3 + ndim])
        metas.append(TensorMeta(shape, _DTYPES[dtype_code], bool(requires_grad)))
    return tuple(metas)


class PendingRecv(Protocol):
    """A receive in progress."""

    def wait(self) -> tuple[Tensor, ...]:
        """Block until the tensors have arrived and return them."""
        ...


class Transport(Protocol):
    """What the executor needs to exchange tensors with its neighbouring stages."""

    def send_activation(
        self, tensors: Sequence[Tensor], key: Hashable, requires_grad: Optional[Sequence[bool]] = None
    ) -> None: ...

    def recv_activation(self, key: Hashable) -> PendingRecv: ...

    def send_grad(self, tensors: Sequence[Tensor]) -> None: ...

    def recv_grad(self, metas: Sequence[TensorMeta]) -> PendingRecv: ...

    def wait_sends(self) -> None: ...

    @property
    def wait_seconds(self) -> float:
        """Total time spent blocked in ``wait()`` so far (transfer wait)."""
        ...


class _P2PRecv:
    """Receives posted now, or, if a header must arrive first, posted in order at ``wait()``."""

    def __init__(self, channel: "_Channel", metas: Optional[tuple[TensorMeta, ...]], key: Hashable) -> None:
        self._channel, self._key, self._metas = channel, key, metas
        self._works: list[Any] = []
        self._buffers: list[Tensor] = []
        self._posted = False
        self._done: Optional[tuple[Tensor, ...]] = None
        if metas is not None and not channel.lazy:
            self._post(metas)
        else:
            channel.lazy.append(self)

    def _post(self, metas: tuple[TensorMeta, ...]) -> None:
        ch = self._channel
        for m in metas:
            buf = torch.empty(m.shape, dtype=m.dtype, device=ch.device)
            self._buffers.append(buf)
            self._works.append(dist.irecv(buf, src=ch.peer, group=ch.group, tag=ch.next_tag()))
        self._metas, self._posted = metas, True

    def _post_lazy(self) -> None:
        ch = self._channel
        while ch.lazy and ch.lazy[0] is not self:
            ch.lazy[0]._post_lazy()
        if ch.lazy and ch.lazy[0] is self:
            ch.lazy.popleft()
        metas = self._metas if self._metas is not None else ch.cache.get(self._key)
        if metas is None:
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=ch.device)
            ch.wait(dist.irecv(header, src=ch.peer, group=ch.group, tag=ch.next_tag()))
            metas = _decode(header.cpu())
            ch.cache[self._key] = metas
        self._post(metas)

    def wait(self) -> tuple[Tensor, ...]:
        if self._done is None:
            if not self._posted:
                self._post_lazy()
            for w in self._works:
                self._channel.wait(w)
            assert self._metas is not None
            self._done = tuple(
                b.requires_grad_(True) if m.requires_grad and b.is_floating_point() else b
                for b, m in zip(self._buffers, self._metas)
            )
        return self._done


class _Channel:
    """One direction of traffic with one peer: its group, tag counter and shape cache."""

    def __init__(self, peer: int, group: Any, device: torch.device, timeout: Optional[timedelta], clock: "_Clock",
                 describe: Callable[[int], str]) -> None:  # fmt: skip
        self.peer, self.group, self.device, self.timeout, self.clock = peer, group, device, timeout, clock
        self.describe = describe
        self.cache: dict[Hashable, tuple[TensorMeta, ...]] = {}
        self.lazy: deque[_P2PRecv] = deque()
        self._tag = 0

    def next_tag(self) -> int:
        self._tag = (self._tag + 1) % (1 << 30)
        return self._tag

    def wait(self, work: Any) -> None:
        start = time.perf_counter()
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except RuntimeError as err:
            raise lost_peer(self.describe(self.peer), err) from err
        self.clock.waited += time.perf_counter() - start


def lost_peer(peer: str, err: BaseException) -> StageFailure:
    """The error of a stage whose transfer with ``peer`` failed (peer gone, or stuck past the timeout)."""
    return StageFailure(
        f"The transfer with {peer} failed: that process ended (failed or was killed: see its output) or did not "
        f"answer within the timeout. Stopping this stage. Cause: {err}"
    )


class _Clock:
    waited: float = 0.0


class TorchP2PTransport:
    """Non-blocking point-to-point transport over torch.distributed (gloo on CPU, NCCL on CUDA).

    Args:
        prev_rank: global rank of the previous stage (``None`` on stage 0).
        next_rank: global rank of the next stage (``None`` on the last stage).
        groups: process groups for the four channels ``"act_in"``, ``"act_out"``, ``"grad_in"``,
            ``"grad_out"`` (``None`` entries use the default group).
        device: where received tensors are allocated.
        timeout: how long one receive may wait before raising (``None``: the process group's).
        describe: names a peer rank in errors (default ``"rank R"``).
    """

    def __init__(
        self,
        prev_rank: Optional[int],
        next_rank: Optional[int],
        groups: dict[str, Any],
        device: torch.device,
        timeout: Optional[timedelta] = None,
        describe: Callable[[int], str] = lambda rank: f"rank {rank}",
    ) -> None:
        self._clock = _Clock()
        self._describe = describe

        def channel(peer: Optional[int], name: str) -> Optional[_Channel]:
            return None if peer is None else _Channel(peer, groups.get(name), device, timeout, self._clock, describe)

        self._act_in, self._act_out = channel(prev_rank, "act_in"), channel(next_rank, "act_out")
        self._grad_in, self._grad_out = channel(next_rank, "grad_in"), channel(prev_rank, "grad_out")
        self._sends: deque[tuple[Any, tuple[Tensor, ...], int]] = deque()

    @property
    def wait_seconds(self) -> float:
        return self._clock.waited

    def _isend(self, ch: Optional[_Channel], tensors: Sequence[Tensor]) -> None:
        assert ch is not None, "no neighbour in this direction"
        for t in tensors:
            t = t.detach().contiguous()
            self._sends.append((dist.isend(t, dst=ch.peer, group=ch.group, tag=ch.next_tag()), (t,), ch.peer))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    def send_activation(
        self, tensors: Sequence[Tensor], key: Hashable, requires_grad: Optional[Sequence[bool]] = None
    ) -> None:
        """Send a stage output; ``requires_grad`` overrides the tensors' own flags (a gradient is
        expected back for exactly the flagged tensors)."""
        ch = self._act_out
        assert ch is not None, "the last stage sends no activations"
        metas = metas_of(tensors, requires_grad)
        cached = ch.cache.get(key)
        if cached is None:
            ch.cache[key] = metas
            self._isend(ch, [_encode(metas).to(ch.device)])
        elif cached != metas:
            raise ShapeError(
                f"A stage output changed shape for micro-batches of the same input shapes {key}: negotiated "
                f"{[(m.shape, m.dtype, m.requires_grad) for m in cached]}, now "
                f"{[(m.shape, m.dtype, m.requires_grad) for m in metas]}. Outputs of a "
                "stage must be a function of its input shapes (no data-dependent shapes)."
            )
        self._isend(ch, tensors)

    def recv_activation(self, key: Hashable) -> PendingRecv:
        ch = self._act_in
        assert ch is not None, "stage 0 receives no activations"
        return _P2PRecv(ch, ch.cache.get(key), key)

    def send_grad(self, tensors: Sequence[Tensor]) -> None:
        self._isend(self._grad_out, tensors)

    def recv_grad(self, metas: Sequence[TensorMeta]) -> PendingRecv:
        ch = self._grad_in
        assert ch is not None, "the last stage receives no gradients"
        return _P2PRecv(ch, tuple(TensorMeta(m.shape, m.dtype, False) for m in metas), None)

    def wait_sends(self) -> None:
        """Block until every send has completed (before a drain ends or the process exits)."""
        while self._sends:
            work, _, peer = self._sends.popleft()
            try:
                work.wait()
            except RuntimeError as err:
                raise lost_peer(self._describe(peer), err) from err


class _Ready:
    def __init__(self, fetch: Callable[[], tuple[Tensor, ...]]) -> None:
        self._fetch = fetch
        self._value: Optional[tuple[Tensor, ...]] = None

    def wait(self) -> tuple[Tensor, ...]:
        if self._value is None:
            self._value = self._fetch()
        return self._value


class LocalHub:
    """In-process mailboxes connecting :class:`LocalTransport` instances of one pipeline."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[str, int], deque[tuple[tuple[Tensor, bool], ...]]] = {}

    def box(self, kind: str, dst_stage: int) -> deque[tuple[tuple[Tensor, bool], ...]]:
        return self.boxes.setdefault((kind, dst_stage), deque())


class LocalTransport:
    """A transport between stages living in one process, for tests and the single-process runner.

    Messages are copied (detached clones) as a wire would; a receive must be waited on only after
    the matching send happened, which any topological run order of a valid schedule guarantees.
    """

    def __init__(self, hub: LocalHub, stage: int) -> None:
        self._hub, self._stage = hub, stage

    @property
    def wait_seconds(self) -> float:
        return 0.0

    def _take(self, kind: str) -> tuple[Tensor, ...]:
        box = self._hub.box(kind, self._stage)
        if not box:
            raise RuntimeError(f"LocalTransport: stage {self._stage} waits for a {kind} message that was never sent.")
        return tuple(t.requires_grad_(True) if rg and t.is_floating_point() else t for t, rg in box.popleft())

    def _put(self, kind: str, dst: int, tensors: Sequence[Tensor], flags: Sequence[bool]) -> None:
        self._hub.box(kind, dst).append(tuple((t.detach().clone(), bool(f)) for t, f in zip(tensors, flags)))

    def send_activation(
        self, tensors: Sequence[Tensor], key: Hashable, requires_grad: Optional[Sequence[bool]] = None
    ) -> None:
        self._put("act", self._stage + 1, tensors, [t.requires_grad for t in tensors] if requires_grad is None else requires_grad)

    def recv_activation(self, key: Hashable) -> PendingRecv:
        return _Ready(lambda: self._take("act"))

    def send_grad(self, tensors: Sequence[Tensor]) -> None:
        self._put("grad", self._stage - 1, tensors, [False] * len(tensors))

    def recv_grad(self, metas: Sequence[TensorMeta]) -> PendingRecv:
        return _Ready(lambda: self._take("grad"))

    def wait_sends(self) -> None:
        return None


class PipelineGroups:
    """The process groups one rank takes part in; every rank creates every group, in one order.

    Attributes:
        pipeline: the ranks of this rank's pipeline replica (log hand-off, checkpoint gathering,
            the gradient norm of synchronous clipping).
        stage: the ranks holding this rank's stage in every replica (gradient averaging), or
            ``None`` with one replica.
        p2p: the four channels to the neighbouring stages, each its own group.
    """

    def __init__(self, topo: Topology, rank: int) -> None:
        stage, replica = topo.stage_of(rank), topo.replica_of(rank)
        self.topology, self.rank, self.replica = topo, rank, replica
        self.pipeline: Any = None
        self.stage: Any = None
        self.p2p: dict[str, Any] = {}
        for r in range(topo.n_replicas):
            group = dist.new_group(topo.pipeline_ranks(r))
            if r == replica:
                self.pipeline = group
        if topo.n_replicas > 1:
            for s in range(topo.n_stages):
                group = dist.new_group(topo.stage_ranks(s))
                if s == stage:
                    self.stage = group
        for r in range(topo.n_replicas):
            for s in range(topo.n_stages - 1):
                pair = sorted([topo.rank_of(s, r), topo.rank_of(s + 1, r)])
                forward, backward = dist.new_group(pair), dist.new_group(pair)
                if r == replica and s == stage:
                    self.p2p.update(act_out=forward, grad_in=backward)
                if r == replica and s + 1 == stage:
                    self.p2p.update(act_in=forward, grad_out=backward)

    def _by_stage(self, parts: list[Any]) -> list[Any]:
        """Order per-group-rank results of this replica's pipeline group by stage."""
        ranks = sorted(self.topology.pipeline_ranks(self.replica))
        return [part for _, part in sorted(zip(ranks, parts), key=lambda rp: self.topology.stage_of(rp[0]))]

    def gather_to_zero(self, local: Any) -> Optional[list[Any]]:
        """One object per stage of replica 0, by stage, on global rank 0 (``None`` elsewhere).

        Every rank calls it; ranks of other replicas return ``None`` at once (their stages hold
        the same weights as replica 0's).
        """
        if self.replica != 0:
            return None
        if self.topology.n_stages == 1:
            return [local]
        parts: Optional[list[Any]] = [None] * self.topology.n_stages if self.rank == 0 else None
        dist.gather_object(local, parts, dst=0, group=self.pipeline)
        return None if parts is None else self._by_stage(parts)

    def all_gather(self, local: Any) -> list[Any]:
        """One object per stage of this replica, by stage, on every rank of the replica."""
        if self.topology.n_stages == 1:
            return [local]
        parts: list[Any] = [None] * self.topology.n_stages
        dist.all_gather_object(parts, local, group=self.pipeline)
        return self._by_stage(parts)
