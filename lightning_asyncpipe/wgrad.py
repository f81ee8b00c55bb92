"""Deferred weight gradients: one large GEMM per batch instead of one small GEMM per micro-batch.

The backward of ``y = x W^T + b`` computes ``dx = g W`` (needed at once: it goes to the previous
stage) and ``dW = g^T x``. For a micro-batch of ``n`` rows, ``dW`` is a GEMM with inner dimension
``n`` whose ``out x in`` result must then be added to ``W.grad``: with small micro-batches it is
bound by writing that result, once per micro-batch. ``dW`` depends only on ``g`` and ``x``, not on
the weights, so it can wait: the backward keeps ``(x, g)`` and the update computes
``dW = G^T X`` once over all micro-batches of the batch (what a single-device step does), right
before the optimizer runs. Exact for every policy (a weight version changes ``g`` and ``x``,
which are already computed, not ``dW = g^T x``); only the order of the floating-point sum differs.

Applied to layers of type exactly ``nn.Linear`` whose weight is a parameter (live or a stashed
version), or a computed weight marked by :func:`grad_into_live` (``W - c`` with ``c`` not
depending on ``W``, e.g. PipeMare's corrected weights: its Jacobian with respect to the live
weight is the identity, so ``dW`` is the same), outside autocast; other computed weights and
layers under autocast take the usual path.
Cost: ``x`` and ``g`` of every micro-batch of the batch stay alive until the update (``x`` is
kept for the backward anyway).

Zero-bubble schedules (:func:`lightning_asyncpipe.schedule.zero_bubble_h1`) instead flush one
micro-batch at its ``W`` action (``flush(microbatch=j)``): the backward tags what it keeps with
the micro-batch the executor set in :attr:`DeferredWeightGrad.microbatch`, so the weight gradient
of micro-batch ``j`` is computed when the schedule says, in the pipeline's bubbles. Layers this
module cannot defer compute their weight gradients in ``B``, as usual.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DeferredWeightGrad", "grad_into_live"]

_LIVE = "_asyncpipe_grad_into_live"


def grad_into_live(computed: Tensor, live: nn.Parameter) -> Tensor:
    """Mark ``computed`` (``live`` minus a term that does not depend on ``live``) as a weight whose
    gradient may be deferred into ``live``: the weight gradient of a layer run on it is then
    computed at the update and added to the live weight's ``grad``, as for a parameter."""
    setattr(computed, _LIVE, live)
    return computed


class _LinearKeepingWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor], store: "DeferredWeightGrad",
                layer: nn.Linear) -> Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.layer, ctx.has_bias = store, layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        x, weight = ctx.saved_tensors
        ctx.store.keep(ctx.layer, x, grad)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None, None


class DeferredWeightGrad:
    """Defers the weight gradients of a stage's ``nn.Linear`` layers to :meth:`flush`.

    Args:
        module: the stage's layers.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m for m in module.modules() if type(m) is nn.Linear]
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self._kept: dict[nn.Linear, list[tuple[Optional[int], Tensor, Tensor]]] = {}
        self._buffers: dict[tuple[Any, ...], dict[tuple[int, ...], Tensor]] = {}
        self.active = False
        self.microbatch: Optional[int] = None
        """The micro-batch whose backward runs now: what :meth:`keep` tags its ``(x, g)`` with."""
        for layer in self.layers:
            layer.forward = self._forward_of(layer)  # type: ignore[method-assign]

    def _forward_of(self, layer: nn.Linear) -> Any:
        def forward(x: Tensor) -> Tensor:
            w = layer.weight
            owner = w if isinstance(w, nn.Parameter) else getattr(w, _LIVE, None)
            if (self.active and torch.is_grad_enabled() and isinstance(owner, nn.Parameter) and owner.requires_grad
                    and not torch.is_autocast_enabled(x.device.type)):  # fmt: skip
                return _LinearKeepingWeightGrad.apply(x, w, layer.bias, self, layer)
            return F.linear(x, w, layer.bias)

        return forward

    def keep(self, layer: nn.Linear, x: Tensor, grad: Tensor) -> None:
        self._kept.setdefault(layer, []).append((self.microbatch, x.detach(), grad.detach()))

    def repeat_kept(self, times: int) -> None:
        """Keep everything kept so far ``times`` times (profiling a whole batch's flush)."""
        for layer, items in self._kept.items():
            self._kept[layer] = items * times

    @property
    def pending(self) -> bool:
        return bool(self._kept)

    def _buffer(self, key: tuple[Any, ...], like: Tensor, shape: tuple[int, ...]) -> Tensor:
        """A work buffer reused across steps (fresh large allocations cost page faults every step).

        Two shapes are kept per key: a schedule that flushes one micro-batch at a ``W`` and the rest
        at the update (``zero_bubble`` with merged weight gradients) alternates two sizes every step;
        more (inputs of varying length) replace the least recently used."""
        kept = self._buffers.setdefault(key, {})
        buf = kept.pop(shape, None)
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        kept[shape] = buf  # most recently used last
        while len(kept) > 2:
            del kept[next(iter(kept))]
        return buf

    def flush(self, microbatch: Optional[int] = None) -> None:
        """Add ``G^T X`` of everything kept (or only of ``microbatch``'s backward) to each layer's
        live ``weight.grad``."""
        for layer in list(self._kept):
            items = self._kept[layer]
            now = items if microbatch is None else [it for it in items if it[0] == microbatch]
            if not now:
                continue
            later = [] if microbatch is None else [it for it in items if it[0] != microbatch]
            if later:
                self._kept[layer] = later
            else:
                del self._kept[layer]
            i = self._index[layer]  # buffers by layer: a flush may cover only some layers
            xs_list = [x.reshape(-1, x.shape[-1]) for _, x, _ in now]
            gs_list = [g.reshape(-1, g.shape[-1]) for _, _, g in now]
            rows = sum(x.shape[0] for x in xs_list)
            xs = torch.cat(xs_list, out=self._buffer(("x", i), xs_list[0], (rows, xs_list[0].shape[1])))
            gs = torch.cat(gs_list, out=self._buffer(("g", i), gs_list[0], (rows, gs_list[0].shape[1])))
            weight = layer.weight
            if weight.grad is None:
                weight.grad = torch.mm(gs.t(), xs, out=self._buffer(("w", i), weight, tuple(weight.shape)))
            else:
                weight.grad.addmm_(gs.t(), xs)

    def remove(self) -> None:
        """Give the layers their own ``forward`` back."""
        for layer in self.layers:
            if "forward" in vars(layer):
                del layer.forward
        self._kept.clear()
        self._buffers.clear()
