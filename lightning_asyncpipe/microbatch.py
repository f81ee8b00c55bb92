"""Splitting batches into micro-batches and merging per-micro-batch outputs back.

A batch is any nesting of tuples, lists and dicts whose tensor leaves share their first dimension
(the batch dimension). Tensors are split along dim 0 with ``torch.tensor_split`` (so an uneven last
chunk is fine: 10 samples in 4 chunks give 3, 3, 2, 2). A list or tuple of per-sample values that
are not tensors (the file names, ids or texts that the default collate gathers into a list of the
batch's length) is split at the same row boundaries; any other leaf (a string, an int, ``None``,
a list of another length) is handed unchanged to every micro-batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_asyncpipe.errors import PipelineConfigError

__all__ = ["batch_size", "split", "merge", "microbatch_weights", "signature"]


def _leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _leaves(v)]
    return []


def batch_size(batch: Any) -> int:
    """The size of the batch dimension shared by every tensor of ``batch``.

    Raises:
        PipelineConfigError: if the batch holds no tensor, a 0-d tensor, or tensors whose first
            dimensions differ.
    """
    leaves = _leaves(batch)
    if not leaves:
        raise PipelineConfigError(
            f"AsyncPipeStrategy cannot split a batch of type {type(batch).__name__} into micro-batches: it contains "
            "no tensor. Return tensors (or tuples, lists or dicts of tensors) from your DataLoader."
        )
    sizes = {t.shape[0] if t.dim() > 0 else None for t in leaves}
    if None in sizes:
        raise PipelineConfigError(
            "AsyncPipeStrategy cannot split a batch that holds a 0-d tensor: every tensor needs a batch dimension "
            "to be split into micro-batches."
        )
    if len(sizes) != 1:
        raise PipelineConfigError(
            f"AsyncPipeStrategy splits batches along dim 0, but the batch's tensors have different first dimensions "
            f"{sorted(s for s in sizes if s is not None)}. Make every tensor of a batch share its batch dimension."
        )
    return int(next(iter(sizes)))  # type: ignore[arg-type]


def split(batch: Any, chunks: int) -> list[Any]:
    """Split ``batch`` into ``chunks`` micro-batches along dim 0.

    Args:
        batch: a tensor, or a tuple, list or dict (nested) of tensors and other values.
        chunks: the number of micro-batches.

    Returns:
        A list of ``chunks`` batches of the same structure.

    Raises:
        PipelineConfigError: if ``chunks < 1``, the batch cannot be split, or it holds fewer
            samples than ``chunks``.

    Example::

        >>> [t.tolist() for t, _ in split((torch.arange(5), "tag"), 2)]
        [[0, 1, 2], [3, 4]]
    """
    if chunks < 1:
        raise PipelineConfigError(f"microbatches must be >= 1, got {chunks}.")
    n = batch_size(batch)
    if n < chunks:
        raise PipelineConfigError(
            f"AsyncPipeStrategy got a batch of {n} samples, fewer than microbatches={chunks}: every micro-batch "
            f"needs at least one sample. Use a batch size >= {chunks} (and drop_last=True if the last batch of an "
            "epoch is smaller), or lower `microbatches`."
        )
    bounds = [int(r[0]) for r in torch.tensor_split(torch.arange(n), chunks) if len(r)] + [n]
    return _parts(batch, chunks, bounds)


def _per_sample(obj: Any, n: int) -> bool:
    """A list or tuple of ``n`` values, none of them a tensor or a container: one per sample."""
    return (isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields") and len(obj) == n
            and not any(isinstance(v, (Tensor, Mapping, list, tuple)) for v in obj))  # fmt: skip


def _parts(obj: Any, chunks: int, bounds: list[int]) -> list[Any]:
    """``obj`` cut into ``chunks`` parts at the rows ``bounds`` (each tensor split once, the
    structure rebuilt per part)."""
    if isinstance(obj, Tensor):
        return list(torch.tensor_split(obj, chunks, dim=0))
    if _per_sample(obj, bounds[-1]):
        return [type(obj)(obj[bounds[i] : bounds[i + 1]]) for i in range(chunks)]
    if isinstance(obj, Mapping):
        columns = {k: _parts(v, chunks, bounds) for k, v in obj.items()}
        dicts = [{k: c[i] for k, c in columns.items()} for i in range(chunks)]
        return dicts if type(obj) is dict else [type(obj)(d) for d in dicts]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        columns = [_parts(v, chunks, bounds) for v in obj]
        return [type(obj)(*(c[i] for c in columns)) for i in range(chunks)]
    if isinstance(obj, (tuple, list)):
        columns = [_parts(v, chunks, bounds) for v in obj]
        return [type(obj)(c[i] for c in columns) for i in range(chunks)]
    return [obj] * chunks


def merge(outputs: Sequence[Any]) -> Any:
    """Merge per-micro-batch outputs back into one batch output (the inverse of :func:`split`).

    Tensors with a batch dimension are concatenated along dim 0, 0-d tensors are stacked,
    containers are merged element by element, ``None`` stays ``None`` and any other leaf becomes
    the list of its per-micro-batch values.
    """
    if not outputs:
        raise ValueError("merge() needs at least one output.")
    first = outputs[0]
    if first is None and all(o is None for o in outputs):
        return None
    if isinstance(first, Tensor):
        return torch.stack(list(outputs)) if first.dim() == 0 else torch.cat(list(outputs), dim=0)
    if isinstance(first, Mapping):
        return {k: merge([o[k] for o in outputs]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(merge([o[i] for o in outputs]) for i in range(len(first))))
    if isinstance(first, (tuple, list)):
        return type(first)(merge([o[i] for o in outputs]) for i in range(len(first)))
    return list(outputs)


def microbatch_weights(microbatches: Sequence[Any]) -> list[float]:
    """Each micro-batch's share of the batch's samples (``n_i / N``).

    Scaling each micro-batch loss by its share makes the accumulated gradient equal the gradient of
    the whole batch's mean loss, also when the last chunk is smaller.
    """
    sizes = [batch_size(mb) for mb in microbatches]
    total = float(sum(sizes))
    return [s / total for s in sizes]


def signature(obj: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of a micro-batch's tensors: a cache key for the shapes that cross stage boundaries."""
    return tuple(tuple(t.shape) for t in _leaves(obj))
