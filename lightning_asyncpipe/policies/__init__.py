"""Weight-version policies, one module each, looked up by name."""

from lightning_asyncpipe.policies.base import PolicyReport, WeightPolicy
from lightning_asyncpipe.policies.registry import available_policies, get_policy, policy_class, register_policy
from lightning_asyncpipe.policies.sync import GPipePolicy, PipeDreamFlushPolicy

__all__ = [
    "WeightPolicy",
    "PolicyReport",
    "register_policy",
    "get_policy",
    "policy_class",
    "available_policies",
    "GPipePolicy",
    "PipeDreamFlushPolicy",
]
