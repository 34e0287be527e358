"""The float64 oracle: naive implementations of every mechanism, the truth every test compares with.

Written for clarity, not speed: they build the full ``(B, H, Nq, Nk)`` weight matrix. The same function run in
the input dtype (``dtype=q.dtype``) is the *naive implementation* of the 2x-naive-error rule: an implementation's
error against the float64 result must be at most twice the naive one's (plus a tiny absolute floor).

* :func:`attention`: softmax attention over any pattern, score mod and normaliser (sigmoid, softplus).
* :func:`linear_attention`, :func:`flow_attention`, :func:`agent_attention`, :func:`rat_attention`,
  :func:`local_linear_attention`, :func:`gaussian_adaptive`: the linear / re-normalised family (C).
* :func:`attention_layer`, :func:`rope`: the attention layer of :mod:`attnkit.layers` (projections, QK-norm,
  rotary embedding).
* :mod:`~attnkit.reference.heads`, :mod:`~attnkit.reference.differential`, :mod:`~attnkit.reference.probe`,
  :mod:`~attnkit.reference.mla`: the family-D layers (MoH, SQA, BAM, Minimal, RCMHA; Diff Transformer; the
  attentive probes; MLA and TPLA), on explicit weights.
* :func:`selected_attention`: dense attention over a dynamic selector's pairs (family B).
"""

from .linear import (
    agent_attention,
    flow_attention,
    gaussian_adaptive,
    linear_attention,
    local_linear_attention,
    rat_attention,
)
from . import differential, heads, kv_policies, mla, probe, vision
from .layers import attention_layer, rope
from .softmax import attention
from .sparse import selected_attention

__all__ = [
    "agent_attention",
    "attention",
    "attention_layer",
    "differential",
    "flow_attention",
    "gaussian_adaptive",
    "heads",
    "kv_policies",
    "linear_attention",
    "local_linear_attention",
    "mla",
    "probe",
    "rat_attention",
    "vision",
    "rope",
    "selected_attention",
]
