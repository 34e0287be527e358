"""The linear / kernelised / re-normalised family (C).

* :func:`linear_attention`: one engine, three forms (parallel, chunked, recurrent), feature maps, decays and
  the sum / RMS / InLine / MALA normalisers, with a carried :class:`LinearState`.
* Mechanisms built on it or beside it: :func:`flow_attention` (Flowformer), :func:`agent_attention` and
  :class:`AgentAttention`, :func:`rat_attention` (RAT), :func:`local_linear_attention` (LLA),
  :class:`GaussianAdaptiveAttention` (GAAM).
* Sigmoid and softplus attention are normalisers of the softmax kernels: :class:`attnkit.scores.Sigmoid`,
  :class:`attnkit.scores.Softplus` with :func:`attnkit.attention`.
"""

from .agent import AgentAttention, agent_attention, pool_agents
from .decay import retnet_decay, transnormer_decay
from .engine import LinearState, linear_attention, linear_state
from .feature_maps import FAVOR, EluPlusOne, FeatureMap, Hedgehog, Identity, ReLU, fit_hedgehog, hedgehog_loss
from .flow import flow_attention
from .gaussian import GaussianAdaptiveAttention
from .local_linear import local_linear_attention
from .rat import rat_attention

__all__ = [
    "FAVOR",
    "AgentAttention",
    "EluPlusOne",
    "FeatureMap",
    "GaussianAdaptiveAttention",
    "Hedgehog",
    "Identity",
    "LinearState",
    "ReLU",
    "agent_attention",
    "fit_hedgehog",
    "flow_attention",
    "hedgehog_loss",
    "linear_attention",
    "linear_state",
    "local_linear_attention",
    "pool_agents",
    "rat_attention",
    "retnet_decay",
    "transnormer_decay",
]
