"""Weight-version policies, one module each, looked up by name."""

from lightning_asyncpipe.policies.base import PolicyReport, WeightPolicy
from lightning_asyncpipe.policies.nesterov_async import NesterovAsyncPolicy
from lightning_asyncpipe.policies.pipedream import PipeDreamPolicy
from lightning_asyncpipe.policies.pipedream_2bw import PipeDream2BWPolicy
from lightning_asyncpipe.policies.pipelined_backprop import PipelinedBackpropPolicy
from lightning_asyncpipe.policies.pipemare import PipeMarePolicy
from lightning_asyncpipe.policies.pipeoptim import PipeOptimPolicy
from lightning_asyncpipe.policies.registry import available_policies, get_policy, policy_class, register_policy
from lightning_asyncpipe.policies.sync import GPipePolicy, PipeDreamFlushPolicy, ZeroBubblePolicy

__all__ = [
    "WeightPolicy",
    "PolicyReport",
    "register_policy",
    "get_policy",
    "policy_class",
    "available_policies",
    "GPipePolicy",
    "PipeDreamFlushPolicy",
    "ZeroBubblePolicy",
    "PipeDreamPolicy",
    "PipeDream2BWPolicy",
    "PipeMarePolicy",
    "PipelinedBackpropPolicy",
    "PipeOptimPolicy",
    "NesterovAsyncPolicy",
]
