r"""Gradient-based views beside attention: gradient x input, gradient-weighted attention, and how much the
attention-based and gradient-based attributions agree (family H).

- :func:`gradient_x_input`: for a target logit :math:`y`, token ``j``'s attribution
  :math:`\sum_d \frac{\partial y}{\partial e_{j,d}} e_{j,d}` over its input embedding :math:`e_j`.
- :func:`gradient_weighted_rollout` (Chefer et al., *Transformer Interpretability Beyond Attention
  Visualization*, 2021): each layer's map weighted by its gradient, :math:`\bar A_l =
  \mathbb{E}_h[(\nabla_{A_l} y \odot A_l)^+]`, accumulated as :math:`R \leftarrow R + \bar A_l R` from
  :math:`R = I`; the target position's row is the attribution.
- :func:`attribution_agreement`: the Spearman rank correlation, over the context tokens, between an
  attention-based attribution (the last layer's head-mean attention, rollout, gradient-weighted rollout) and
  gradient x input, the measurement of *Cross-Attention is Half Explanation* (there on speech-to-text
  cross-attention; here on the self-attention of SmolLM2 or MiniLM, which is said so in the report).

Gradients need the maps inside autograd, so these run the model's eager path with ``output_attentions`` on
short inputs, the one place in :mod:`attnkit.analysis` that does; the capture never does.
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad
from .flow import rollout
from .scores import register_tool


def _eager(model, ids, attention_mask=None, embeds=None):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        if embeds is None:
            return model(input_ids=ids, attention_mask=attention_mask, output_attentions=True)
        return model(inputs_embeds=embeds, attention_mask=attention_mask, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)


def _target(out, target, position):
    if hasattr(out, "logits"):
        return out.logits[0, position, target]
    h = out.last_hidden_state[0, position]  # an encoder: the target is a hidden unit (or its norm with -1)
    return h.norm() if target < 0 else h[target]


def gradient_x_input(model, ids, *, target: int, position: int = -1) -> torch.Tensor:
    """``(N,)``: gradient x input of the target (a logit id for an LM, a hidden unit or ``-1`` for the norm of
    the final hidden state of an encoder) at ``position`` with respect to each token's input embedding."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ShapeError(bad("ids", "(1, N) token ids", tuple(ids.shape)))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with torch.enable_grad():
        y = _target(_eager(model, ids, embeds=emb), target, position)
        (g,) = torch.autograd.grad(y, emb)
    return (g * emb).sum(-1)[0].detach().double()


def gradient_weighted_rollout(model, ids, *, target: int, position: int = -1) -> torch.Tensor:
    """``(N,)``: the target position's row of Chefer et al.'s gradient-weighted rollout."""
    with torch.enable_grad():
        out = _eager(model, ids)
        maps = out.attentions
        y = _target(out, target, position)
        grads = torch.autograd.grad(y, maps)
    N = ids.shape[1]
    R = torch.eye(N, dtype=torch.float64)
    for A, g in zip(maps, grads, strict=True):
        a = (g[0] * A[0]).clamp_min(0).mean(0).detach().double()
        R = R + a @ R
    return R[position]


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def attribution_agreement(model, ids, *, target: int, position: int = -1) -> dict:
    """Spearman correlations with gradient x input over the tokens before ``position`` (the first token, the
    sink, left out: every attention attribution puts its mass there)."""
    gxi = gradient_x_input(model, ids, target=target, position=position).abs()
    with torch.no_grad():
        maps = _eager(model, ids).attentions
    last = maps[-1][0].double().mean(0)[position]
    roll = rollout([m.detach() for m in maps])[0][position]
    gw = gradient_weighted_rollout(model, ids, target=target, position=position)
    N = ids.shape[1]
    end = N + position if position < 0 else position
    span = slice(1, end)
    return {
        "last_layer_attention": _spearman(last[span], gxi[span]),
        "rollout": _spearman(roll[span], gxi[span]),
        "gradient_weighted_rollout": _spearman(gw[span], gxi[span]),
        "tokens": end - 1,
    }


register_tool(
    "gradient_weighted_rollout",
    gradient_weighted_rollout,
    paper="Transformer Interpretability Beyond Attention Visualization (Chefer et al., 2021)",
    summary="rollout of gradient-weighted attention maps for one target",
    supports=("causal",),
)
register_tool(
    "attribution_agreement",
    attribution_agreement,
    paper="Cross-Attention is Half Explanation in Speech-to-Text Models (2025) [self-attention here]",
    summary="rank agreement of attention-based attributions with gradient x input",
    supports=("causal",),
)
