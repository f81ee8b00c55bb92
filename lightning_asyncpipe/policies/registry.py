"""Looking weight-version policies up by name."""

from __future__ import annotations

from typing import Any, TypeVar

from lightning_asyncpipe.errors import PipelineConfigError
from lightning_asyncpipe.policies.base import WeightPolicy

__all__ = ["register_policy", "get_policy", "policy_class", "available_policies"]

_REGISTRY: dict[str, type[WeightPolicy]] = {}
P = TypeVar("P", bound=type[WeightPolicy])


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A policy named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[WeightPolicy]:
    """The policy class registered as ``name``.

    Raises:
        PipelineConfigError: for an unknown name, listing the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PipelineConfigError(
            f"Unknown pipeline policy {name!r}. Available policies: {', '.join(available_policies())}."
        ) from None


def get_policy(name: str, **options: Any) -> WeightPolicy:
    """Instantiate the policy registered as ``name`` with ``options``."""
    cls = policy_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise PipelineConfigError(f"Policy {name!r} does not accept options {sorted(options)}: {err}") from None
