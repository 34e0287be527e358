"""Context-parallel attention over ``torch.distributed`` (gloo on CPU, NCCL on GPU): a sequence split across
ranks, the pattern deciding which key/value rows travel.

* :func:`context_parallel_attention`: softmax attention with any static pattern (global positions), score mods,
  GQA, key padding, ``q_offset`` and block selectors; forward and backward; ``ring`` or ``allgather`` strategy,
  contiguous or ``zigzag`` (causal load-balanced) shards.
* :func:`context_parallel_linear_attention`: causal linear attention by a prefix scan of the ranks' states.
* :func:`explain_context_parallel`: the plan (rows each rank sends, work balance, predicted time per strategy)
  without a process group; :func:`record_traffic` counts the bytes a real call moves.
* :func:`shard`, :func:`unshard`, :func:`local_positions`: cut a sequence, put it back, the global positions.
* :func:`run_local`: run a function on ``W`` local processes in a gloo group (tests, benchmarks, trying it out).
"""

from ._comm import DistributedError, Traffic, record_traffic
from .attention import context_parallel_attention
from .launch import run_local
from .linear import context_parallel_linear_attention
from .plan import ContextParallelPlan, CostModel, explain_context_parallel
from .shard import local_positions, shard, unshard

__all__ = [
    "ContextParallelPlan",
    "CostModel",
    "DistributedError",
    "Traffic",
    "context_parallel_attention",
    "context_parallel_linear_attention",
    "explain_context_parallel",
    "local_positions",
    "record_traffic",
    "run_local",
    "shard",
    "unshard",
]
