"""See what attention does inside real models (family H), without N x N maps.

>>> from attnkit.analysis import capture, SinkHeads
>>> with capture(model, first=1, window=16) as cap:
...     model(ids)
>>> cap.first_mass                      # (batch, layers, heads): mass on the first token
>>> SinkHeads().run(model, tokenizer)   # a HeadScores table, with the sink rate

- capture: :func:`capture`, :class:`Statistics`, :class:`Capture` (block by block from q, k and the lse);
- detectors: :class:`SinkHeads`, :class:`PreviousTokenHeads`, :class:`InductionHeads`, :class:`LocalHeads`,
  :class:`SpanHeads`, :class:`HiddenSinks`, :class:`RetrievalHeads`, :func:`massive_activations`;
- causal tools: :func:`intervene`, :func:`head_outputs`, :func:`patch_heads`, :func:`direct_logit_attribution`,
  :func:`knockout`, :func:`knockout_sweep`, :func:`context_divergence`, :func:`attention_influence`,
  :func:`finercut`;
- rollout and flow: :func:`attention_maps`, :func:`rollout`, :func:`attention_flow`;
- gradients: :func:`gradient_x_input`, :func:`gradient_weighted_rollout`, :func:`attribution_agreement`;
- :func:`analyze`: what ``attnkit analyze`` runs.
"""

from .attribution import attribution_agreement, gradient_weighted_rollout, gradient_x_input
from .causal import (
    Knockout,
    attention_influence,
    context_divergence,
    direct_logit_attribution,
    finercut,
    head_outputs,
    intervene,
    knockout,
    knockout_sweep,
    patch_heads,
)
from .flow import attention_flow, attention_maps, rollout
from .heads import (
    HiddenSinks,
    InductionHeads,
    LocalHeads,
    PreviousTokenHeads,
    RetrievalHeads,
    SinkHeads,
    SpanHeads,
)
from .massive import MassiveActivations, massive_activations
from .observer import Capture, Statistics, capture, eager_maps, full_map_bytes
from .prompts import ioi, needles, repeated_tokens
from .report import analyze
from .scores import HeadScores

__all__ = [
    "Capture",
    "HeadScores",
    "HiddenSinks",
    "InductionHeads",
    "Knockout",
    "LocalHeads",
    "MassiveActivations",
    "PreviousTokenHeads",
    "RetrievalHeads",
    "SinkHeads",
    "SpanHeads",
    "Statistics",
    "analyze",
    "attention_flow",
    "attention_influence",
    "attribution_agreement",
    "attention_maps",
    "capture",
    "context_divergence",
    "direct_logit_attribution",
    "eager_maps",
    "finercut",
    "full_map_bytes",
    "gradient_weighted_rollout",
    "gradient_x_input",
    "head_outputs",
    "intervene",
    "ioi",
    "knockout",
    "knockout_sweep",
    "massive_activations",
    "needles",
    "patch_heads",
    "repeated_tokens",
    "rollout",
]
