r"""Flow-Attention ("Flowformer: Linearizing Transformers with Conservation Flows", Wu et al., ICML 2022).

Attention as a flow network: values are sources, outputs are sinks, :math:`\phi(q_i)\cdot\phi(k_j)` is the capacity
of the edge from source ``j`` to sink ``i`` (:math:`\phi` = sigmoid, as in the paper). With ``n`` sinks and ``m``
sources (non-causal):

.. math::
    I_i = \phi(q_i)\cdot\textstyle\sum_j \phi(k_j), \qquad O_j = \phi(k_j)\cdot\sum_i \phi(q_i)
    \qquad\text{(incoming, outgoing flow)}

    \hat I_i = \phi(q_i)\cdot\textstyle\sum_j \phi(k_j) / O_j, \qquad
    \hat O_j = \phi(k_j)\cdot\sum_i \phi(q_i) / I_i \qquad\text{(flow with the other side conserved)}

    \mathrm{out}_i = \sigma\!\big(\hat I_i\, n / m\big)\;
        \frac{\phi(q_i)\cdot\sum_j \phi(k_j)\, \big(v_j\, m\, \mathrm{softmax}_j(\hat O)\big)^T}{I_i}

the softmax over sources is the *competition*, the sigmoid gate on sinks the *allocation*. The causal variant
(the paper's language-model form) uses sums over ``j <= i`` and normalises by the position ``p = i + 1``:
:math:`\hat I_i = \phi(q_i)\cdot\sum_{j\le i}\phi(k_j)\,p_j/O_j\,/\,p_i` with
:math:`O_j = \phi(k_j)\cdot\sum_{i\le j}\phi(q_i)`, :math:`\hat O_j` likewise, the competition
:math:`p_j \exp(\hat O_j)/\sum_{j'\le j}\exp(\hat O_{j'})` and the allocation :math:`\sigma(\hat I_i)`.
Everything is a (cumulative) sum, so the cost is linear; the final weighted sum runs on
:func:`~attnkit.linear.linear_attention`'s chunked form. ``eps = 1e-6`` guards the flows as in the paper's code.
"""

from __future__ import annotations

import torch

from .. import reference as _ref
from ..errors import UnsupportedError, bad
from ..records import register_function
from ._common import check_qkv
from .engine import linear_attention
from .feature_maps import FeatureMap


def flow_attention(q, k, v, *, causal: bool = False, key_padding_mask=None, eps: float = 1e-6, chunk_size: int = 64):
    """Flowformer's Flow-Attention. ``q`` ``(B, Hq, N, D)``, ``k`` / ``v`` ``(B, Hkv, M, D / Dv)`` (GQA allowed;
    causal needs ``N == M``). ``key_padding_mask`` ``(B, M)`` is supported for the non-causal form (padded
    sources carry no flow and do not compete). Returns ``(B, Hq, N, Dv)`` in the dtype of ``q``."""
    check_qkv(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    if causal and key_padding_mask is not None:
        raise UnsupportedError(bad("key_padding_mask", "None for causal flow attention (trim the padding)", "a mask"))
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.shape[1] // k.shape[1]
    pq = torch.sigmoid(q.to(cd))
    pk = torch.sigmoid(k.to(cd)).repeat_interleave(g, 1)
    vv = v.to(cd).repeat_interleave(g, 1)
    n, m = q.shape[2], k.shape[2]
    if causal:
        pos = torch.arange(1, n + 1, dtype=cd, device=q.device)[:, None]
        incoming = (pq * pk.cumsum(2)).sum(-1, keepdim=True) + eps
        outgoing = (pk * pq.cumsum(2)).sum(-1, keepdim=True) + eps
        c_sink = (pq * (pk * pos / outgoing).cumsum(2)).sum(-1, keepdim=True) / pos
        c_source = (pk * (pq * pos / incoming).cumsum(2)).sum(-1, keepdim=True) / pos
        # softmax over the sources seen so far, in the log domain so that no exp overflows
        comp = torch.exp(c_source - torch.logcumsumexp(c_source, 2)) * pos
        alloc = torch.sigmoid(c_sink)
    else:
        kmask = None
        if key_padding_mask is not None:
            kmask = key_padding_mask[:, None, :, None].to(cd)
            pk = pk * kmask
        incoming = (pq * pk.sum(2, keepdim=True)).sum(-1, keepdim=True) + eps
        outgoing = (pk * pq.sum(2, keepdim=True)).sum(-1, keepdim=True) + eps
        c_sink = (pq * (pk / outgoing).sum(2, keepdim=True)).sum(-1, keepdim=True)
        c_source = (pk * (pq / incoming).sum(2, keepdim=True)).sum(-1, keepdim=True)
        mm = torch.full_like(c_source[:, :, :1], float(m)) if kmask is None else kmask.sum(2, keepdim=True)
        if kmask is not None:
            c_source = c_source.masked_fill(kmask == 0, float("-inf"))
        comp = torch.softmax(c_source, 2) * mm
        alloc = torch.sigmoid(c_sink * n / mm)
    # sum_j phi(q_i).phi(k_j) (v_j comp_j): unnormalised linear attention on the given features
    agg = linear_attention(
        pq, pk, vv * comp, feature_map=_Given(), normalize=False, causal=causal, mode="chunk", chunk_size=chunk_size
    )
    return (agg / incoming * alloc).to(q.dtype)


class _Given(FeatureMap):
    """The inputs already are the features."""

    def forward(self, x, is_query):
        return x


_FLOW = "Flowformer: Linearizing Transformers with Conservation Flows (Wu et al., ICML 2022)"
register_function(
    "flowformer",
    paper=_FLOW,
    summary="flow conservation: competition (softmax over sources), allocation (sigmoid gate on sinks)",
    supports={"gqa", "backward", "bf16", "padding", "cross"},
    fn=flow_attention,
    ref=_ref.flow_attention,
    kwargs={"causal": False},
)
register_function(
    "flowformer_causal",
    paper=_FLOW,
    summary="causal flow attention (cumulative flows normalised by position)",
    supports={"gqa", "backward", "bf16", "causal"},
    fn=flow_attention,
    ref=_ref.flow_attention,
    kwargs={"causal": True},
)
