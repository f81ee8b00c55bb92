"""The training data position in checkpoints: resuming mid-epoch continues with the next batch.

Lightning restores a data loader's position only when the loader itself is stateful; with a
plain ``DataLoader`` a resumed run starts the epoch's data over. :class:`ResumableLoader` wraps
the training loader (Lightning saves and restores it as a stateful loader) and remembers how
many batches of the current epoch were trained and the state of the sampler's generator when
the epoch's order was drawn. On resume it restores the generator (the same order is drawn again)
and skips the batches already trained, by reading them: exact for any loader whose order
depends only on its sampler's generator or epoch (``shuffle=False``, a ``RandomSampler``, which
the strategy seeds identically on every stage, ``DistributedSampler``), at the cost of loading
the skipped batches once.

Lightning restores a loader's state only when it counts the resume as a restart: not when the
checkpoint was saved at the end of an epoch in epoch-based training (no ``max_steps``). Then the
generator would keep its fresh seed and the next epochs would draw the first epochs' orders
again; ``unrestored`` lets the strategy hand such a state over when the loader is first iterated.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch

__all__ = ["ResumableLoader"]

_END = object()

Position = Callable[[], tuple[int, bool]]
"""Returns ``(batches of this epoch trained, whether the epoch is complete)``."""


class ResumableLoader:
    """A training loader that keeps its position in checkpoints; otherwise the wrapped loader.

    Args:
        loader: the training ``DataLoader`` (or any sized iterable).
        position: tells how far the current epoch got (from the trainer's progress counters,
            which count batches trained, not the ones prefetched).
        unrestored: returns, once, a state saved for this loader that Lightning did not load
            (``None`` otherwise); asked each time the loader is iterated.
    """

    def __init__(self, loader: Any, position: Position,
                 unrestored: Optional[Callable[["ResumableLoader"], Optional[Mapping[str, Any]]]] = None) -> None:  # fmt: skip
        self.loader = loader
        self._position = position
        self._unrestored = unrestored
        self._skip = 0
        self._epoch_start: Optional[torch.Tensor] = None

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def _generator(self) -> Optional[torch.Generator]:
        generator = getattr(getattr(self.loader, "sampler", None), "generator", None)
        return generator if isinstance(generator, torch.Generator) else None

    def __iter__(self) -> Iterator[Any]:
        state = self._unrestored(self) if self._unrestored is not None else None
        if state is not None:
            self.load_state_dict(state)
        generator = self._generator()
        self._epoch_start = generator.get_state() if generator is not None else None
        iterator = iter(self.loader)
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            if next(iterator, _END) is _END:
                break
        return iterator

    def state_dict(self) -> dict[str, Any]:
        trained, complete = self._position()
        generator = self._generator()
        state: dict[str, Any] = {"batches": 0 if complete else trained}
        if generator is not None:
            # a finished epoch continues with the next epoch's order: the generator as it is now
            state["generator"] = generator.get_state() if complete or self._epoch_start is None else self._epoch_start
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._skip = int(state.get("batches", 0))
        generator = self._generator()
        if generator is not None and state.get("generator") is not None:
            generator.set_state(state["generator"])
