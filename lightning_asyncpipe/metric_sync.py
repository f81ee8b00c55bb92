"""torchmetrics ``Metric`` objects of a LightningModule under a pipeline: one logical metric per
replica, whatever the stage.

The user's steps run on the last stage, so only the last stage's metric objects see updates.
Every stage must nevertheless agree on what they compute (a callback monitoring ``val/acc`` runs
on every rank; ``on_validation_epoch_end`` may call ``self.val_acc.compute()`` on every rank):

- a ``self.log(name, metric)`` record crosses to the other stages as a :class:`MetricRef` (the
  metric's name in the module) and is replayed there with that stage's own object of that name;
- before the epoch-end hooks (where Lightning and the user compute metrics), the last stage's
  metric states are broadcast to the other stages of its replica (:func:`sync_states`);
- a metric's own synchronisation (``compute()`` gathering over processes) runs over the replicas of
  the stage (:func:`use_group`), never the world: the other stages never enter it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["MetricRef", "metric_ref", "resolve", "use_group", "sync_states"]


def _metrics(module: nn.Module) -> list[tuple[str, Any]]:
    from torchmetrics import Metric

    return [(name, m) for name, m in module.named_modules() if isinstance(m, Metric)]


@dataclass(frozen=True)
class MetricRef:
    """A logged metric object, by its name in the LightningModule."""

    path: str


def metric_ref(module: nn.Module, value: Any) -> Optional[MetricRef]:
    """``value``'s :class:`MetricRef` if it is one of ``module``'s metric objects."""
    return next((MetricRef(name) for name, m in _metrics(module) if m is value), None)


def resolve(module: nn.Module, ref: MetricRef) -> Any:
    """This stage's metric object for ``ref``."""
    return module.get_submodule(ref.path)


def _single_replica() -> bool:
    return False


def use_group(module: nn.Module, group: Any) -> None:
    """Make every metric of ``module`` synchronise over ``group`` (the replicas of this stage), or
    not at all when ``group`` is ``None`` (one replica: nothing to gather)."""
    for _, m in _metrics(module):
        if group is None:
            m.distributed_available_fn = _single_replica
        else:
            m.process_group = group


def _cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, list):
        return [_cpu(v) for v in value]
    return value


def _to(value: Any, like: Any) -> Any:
    if isinstance(value, Tensor):
        device = like.device if isinstance(like, Tensor) else (like[0].device if like else torch.device("cpu"))
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, like) for v in value]
    return value


def sync_states(module: nn.Module, src: int, group: Any, rank: int) -> None:
    """Give every metric of ``module`` on every rank of ``group`` the state it has on ``src``
    (collective over ``group``)."""
    metrics = _metrics(module)
    if not metrics or not dist.is_initialized() or dist.get_world_size(group) < 2:
        return
    payload: list[Any] = [None]
    if rank == src:
        payload[0] = {name: ({k: _cpu(getattr(m, k)) for k in m._defaults}, m._update_count)
                      for name, m in metrics}  # fmt: skip
    dist.broadcast_object_list(payload, src=src, group=group)
    if rank == src:
        return
    for name, m in metrics:
        if name not in payload[0]:
            continue
        states, count = payload[0][name]
        for k, v in states.items():
            setattr(m, k, _to(v, getattr(m, k)))
        m._update_count = count
        m._computed = None
