r"""Agent Attention ("Agent Attention: On the Integration of Softmax and Linear Attention", Han et al., ECCV 2024).

``n`` agent tokens ``A`` (``n << N``) first gather from the keys, then broadcast to the queries:

.. math::
    V_A = \mathrm{softmax}(A K^T s + B_A)\, V, \qquad
    O = \mathrm{softmax}(Q A^T s + B_Q)\, V_A \;(+\; \mathrm{DWC}(V))

Cost ``O(N n D)``; with ``n = N`` and ``A = K`` it is ordinary softmax attention applied twice, and the paper shows
the pair is a generalised linear attention. ``A`` is pooled from the queries (:func:`pool_agents`: adaptive
average pooling over the sequence, or over the grid for 2-D inputs). :class:`AgentAttention` adds the paper's
agent biases and its depthwise-convolution term on ``V``. Non-causal (agents pool over every position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as _ref
from ..errors import PatternError, ShapeError, bad
from ..records import register_function
from ._common import check_qkv


def pool_agents(q: torch.Tensor, num_agents, spatial: tuple[int, int] | None = None) -> torch.Tensor:
    """Agent tokens ``(B, H, n, D)`` by adaptive average pooling of ``q`` ``(B, H, N, D)``: over the sequence
    (``num_agents`` an int), or over the ``spatial = (h, w)`` grid (``num_agents`` = ``(ah, aw)`` or a square)."""
    B, H, N, D = q.shape
    x = q.reshape(B * H, N, D).transpose(1, 2)
    if spatial is None:
        if not isinstance(num_agents, int) or not 1 <= num_agents <= N:
            raise PatternError(bad("num_agents", f"an int in [1, {N}]", repr(num_agents)))
        return F.adaptive_avg_pool1d(x, num_agents).transpose(1, 2).reshape(B, H, num_agents, D)
    h, w = spatial
    if h * w != N:
        raise ShapeError(bad("spatial", f"a grid of {N} tokens", f"{spatial}"))
    if isinstance(num_agents, int):
        side = round(num_agents**0.5)
        if side * side != num_agents:
            raise PatternError(bad("num_agents", "a square number or an (ah, aw) pair for 2-D", repr(num_agents)))
        num_agents = (side, side)
    ah, aw = num_agents
    if not (1 <= ah <= h and 1 <= aw <= w):
        raise PatternError(bad("num_agents", f"a grid within {spatial}", repr(num_agents)))
    pooled = F.adaptive_avg_pool2d(x.reshape(B * H, D, h, w), (ah, aw))
    return pooled.reshape(B * H, D, ah * aw).transpose(1, 2).reshape(B, H, ah * aw, D)


def agent_attention(q, k, v, agents, *, agent_bias=None, query_bias=None, scale: float | None = None):
    """Agent Attention. ``q`` ``(B, Hq, N, D)``, ``k`` / ``v`` ``(B, Hkv, M, D / Dv)`` (GQA), ``agents``
    ``(B, Hq, n, D)``; optional additive biases ``agent_bias`` broadcastable to ``(B, Hq, n, M)`` and
    ``query_bias`` to ``(B, Hq, N, n)``. Returns ``(B, Hq, N, Dv)``."""
    dims = check_qkv(q, k, v, causal=False, scale=scale)
    if agents.dim() != 4 or agents.shape[:2] != q.shape[:2] or agents.shape[3] != q.shape[3]:
        raise ShapeError(
            bad(
                "agents",
                f"shape (B, Hq, n, D) = ({dims.batch}, {dims.q_heads}, n, {dims.head_dim})",
                tuple(agents.shape),
            )
        )
    g = dims.group
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    agents = agents.to(q.dtype)
    va = F.scaled_dot_product_attention(agents, k, v, attn_mask=_bias(agent_bias, q.dtype), scale=scale)
    return F.scaled_dot_product_attention(q, agents, va, attn_mask=_bias(query_bias, q.dtype), scale=scale)


def _bias(b, dtype):
    return None if b is None else b.to(dtype)


class AgentAttention(torch.nn.Module):
    """A multi-head Agent Attention layer for ``x`` ``(B, N, dim)``; 1-D, or 2-D with ``spatial = (h, w)``.

    Agents are pooled from the queries. For 2-D inputs the agent biases are learned and factorised per row and
    column of the grid (``B_A[h, a, (r, c)] = R_A[h, a, r] + C_A[h, a, c]``, likewise ``B_Q``); the paper builds
    them from interpolated position biases, the factorisation is our choice and keeps them resolution-sized. The
    depthwise convolution (kernel ``kernel_size``, 1-D or 2-D) on ``V`` restores the local diversity the paper
    adds; ``kernel_size=0`` removes it.
    """

    def __init__(self, dim: int, heads: int, num_agents, *, spatial=None, kernel_size: int = 3):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"an int >= 1 that divides dim={dim}", repr(heads)))
        self.dim, self.heads, self.num_agents, self.spatial = dim, heads, num_agents, spatial
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        conv = torch.nn.Conv1d if spatial is None else torch.nn.Conv2d
        self.dwc = conv(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim) if kernel_size else None
        if spatial is not None:
            h, w = spatial
            a = num_agents if isinstance(num_agents, int) else num_agents[0] * num_agents[1]
            self.agent_row = torch.nn.Parameter(torch.randn(heads, a, h, 1) * 0.02)
            self.agent_col = torch.nn.Parameter(torch.randn(heads, a, 1, w) * 0.02)
            self.query_row = torch.nn.Parameter(torch.randn(heads, h, 1, a) * 0.02)
            self.query_col = torch.nn.Parameter(torch.randn(heads, 1, w, a) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(bad("x", f"(B, N, {self.dim})", tuple(x.shape)))
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        agents = pool_agents(q, self.num_agents, self.spatial)
        ab = qb = None
        if self.spatial is not None:
            a = agents.shape[2]
            ab = (self.agent_row + self.agent_col).reshape(self.heads, a, N)
            qb = (self.query_row + self.query_col).reshape(self.heads, N, a)
        out = agent_attention(q, k, v, agents, agent_bias=ab, query_bias=qb).transpose(1, 2).reshape(B, N, C)
        if self.dwc is not None:
            vv = v.transpose(1, 2).reshape(B, N, C).transpose(1, 2)
            if self.spatial is not None:
                vv = vv.reshape(B, C, *self.spatial)
            out = out + self.dwc(vv).reshape(B, C, N).transpose(1, 2)
        return self.proj(out)


register_function(
    "agent_attention",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention (Han et al., ECCV 2024)",
    summary="n agents pooled from q: softmax(Q A^T) softmax(A K^T) V",
    supports={"gqa", "backward", "bf16", "cross"},
    fn=agent_attention,
    ref=_ref.agent_attention,
    extras=lambda q, k, v: {"agents": pool_agents(q, max(1, min(q.shape[2], 49) // 7))},
)
