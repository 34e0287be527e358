r"""MoH: Mixture-of-Head attention ("MoH: Multi-Head Attention as Mixture-of-Head Attention", Jin, Zhu, Yan and
Yuan, 2024).

Multi-head attention is a sum over heads, :math:`\mathrm{MHA}(x)_t = \sum_h H^h_t W_O^h`; MoH makes it a
weighted sum in which each token activates only some heads:

.. math::
    \mathrm{MoH}(x)_t = \sum_{h=1}^{H} g_h(x_t)\, H^h_t W_O^h,\qquad
    g_h = \begin{cases}
        \alpha_1\, \mathrm{softmax}(W_s x_t)_h & h \le h_s \text{ (shared heads, always on)}\\
        \alpha_2\, \mathrm{softmax}(W_r x_t)_h & h > h_s \text{ and } h \in \mathrm{top}_k(W_r x_t)\\
        0 & \text{otherwise}
    \end{cases},\qquad
    (\alpha_1, \alpha_2) = \mathrm{softmax}(W_h x_t)

(the paper's two-stage routing: ``W_h`` balances the shared group against the routed group; a softmax inside
each group weighs its heads). The routed heads get the load-balance loss

.. math:: L_b = \sum_{i = h_s + 1}^{H} f_i P_i,\qquad
    f_i = \tfrac{1}{T} \textstyle\sum_t [x_t \text{ selects head } i],\qquad
    P_i = \tfrac{1}{T} \textstyle\sum_t \mathrm{softmax}(W_r x_t)_i

over the ``T`` real tokens of the call, exposed as ``layer.aux_loss`` after each forward (the paper trains with
``loss + beta * L_b``, ``beta = 0.01``). A perfectly balanced router has ``L_b = k / (H - h_s)``.

Choices where the paper and its code differ (SkyworkAI/MoH, ``MoH-ViT/attention_native.py``, read for this):

* the released code rescales the gates (shared gates times ``h_s``, the stage weights times 2, routed gates
  renormalised over the top-k and times ``k``) and, in the LLaMA3 release, fixes the gates at 1 on the shared
  75% of the heads; this layer follows the paper's equations above, unscaled;
* the code's auxiliary loss is ``R * sum_i f_i P_i`` (``R`` routed heads, with ``f_i`` counting one selection in
  ``k``); this layer reports the paper's ``sum_i f_i P_i``;
* the top-k choice is not differentiable (the gates are, through the softmax values), as in both;
* every head is computed and the unselected ones are multiplied by 0: the speed-up of skipping heads needs a
  kernel that gathers per-token heads, which :func:`attnkit.attention` does not have. The result is exact.

Keys and values are ordinary causal (or bidirectional) attention per head, so a KV cache decodes exactly: the
gates of a token depend on that token alone. Grouped-query attention (``kv_heads``) works as in
:class:`~attnkit.layers.Attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeError, bad, check_count
from ..records import register
from ..reference import heads as ref
from ._headutil import check_input, check_padding, linear_weights, require_plain_attention
from .attention import Attention


class MoHAttention(Attention):
    """Mixture-of-Head attention over ``(B, N, dim)``; see the module docstring.

    Args:
        dim, heads, kv_heads, head_dim, bias, dropout, causal, backend: as :class:`~attnkit.layers.Attention`.
        shared: always-on heads ``h_s`` (the first ``shared`` heads; default ``max(1, heads // 4)``).
        top_k: routed heads each token activates among the other ``heads - shared`` (default half of them,
            rounded up).
        **kw: further :class:`~attnkit.layers.Attention` options (``rope``, ``qk_norm``, ``mechanism``...); the
            float64 :meth:`reference` covers dense attention without them.

    After a forward, ``aux_loss`` holds the load-balance loss (a scalar tensor with gradients; 0 without routed
    heads) and ``last_selected`` the bool ``(B, N, heads)`` map of the heads each token used.
    """

    def __init__(self, dim: int, heads: int, *, shared: int | None = None, top_k: int | None = None, **kw):
        super().__init__(dim, heads, **kw)
        shared = max(1, heads // 4) if shared is None else shared
        check_count("shared", shared, 0)
        if shared > heads:
            raise ShapeError(bad("shared", f"at most heads={heads}", shared))
        routed = heads - shared
        if routed == 0:
            if top_k not in (None, 0):
                raise ShapeError(bad("top_k", "0 or None when every head is shared", top_k))
            top_k = 0
        else:
            top_k = (routed + 1) // 2 if top_k is None else top_k
            check_count("top_k", top_k, 1)
            if top_k > routed:
                raise ShapeError(bad("top_k", f"at most the {routed} routed heads (heads - shared)", top_k))
        self.shared, self.routed, self.top_k = shared, routed, top_k
        self.router_shared = nn.Linear(dim, shared, bias=False) if shared else None
        self.router_routed = nn.Linear(dim, routed, bias=False) if routed else None
        self.router_stage = nn.Linear(dim, 2, bias=False) if shared and routed else None
        self.aux_loss = torch.zeros(())
        self.last_selected = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shared={self.shared}, routed={self.routed}, top_k={self.top_k}"

    @property
    def active_heads(self) -> int:
        """Heads each token uses: ``shared + top_k``."""
        return self.shared + self.top_k

    def gates(self, x: torch.Tensor):
        """``(gates (B, N, heads), routed softmax (B, N, routed), selected (B, N, routed) bool)``."""
        B, N, _ = x.shape
        parts, pr, sel = [], x.new_zeros(B, N, 0), torch.zeros(B, N, 0, dtype=torch.bool, device=x.device)
        if self.routed:
            pr = torch.softmax(self.router_routed(x), -1)
            idx = pr.topk(self.top_k, dim=-1).indices
            sel = torch.zeros_like(pr, dtype=torch.bool).scatter(-1, idx, True)
            gr = pr * sel
        if self.shared:
            gs = torch.softmax(self.router_shared(x), -1)
            if self.routed:
                a = torch.softmax(self.router_stage(x), -1)
                gs, gr = a[..., :1] * gs, a[..., 1:] * gr
            parts.append(gs)
        if self.routed:
            parts.append(gr)
        return torch.cat(parts, -1), pr, sel

    def forward(self, x, *, key_padding_mask=None, cache=None, positions=None):
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``; arguments as :meth:`Attention.forward` (self-attention only)."""
        check_input(x, self.dim)
        check_padding(key_padding_mask, x)
        start = 0 if cache is None else cache.length
        if positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        q, k, v = self.project(x, None, positions)
        out = self._attend(q, k, v, key_padding_mask, cache)
        g, pr, sel = self.gates(x)
        self.aux_loss = self._balance(pr, sel, key_padding_mask)
        self.last_selected = torch.cat([sel.new_ones(*sel.shape[:2], self.shared), sel], -1)
        out = out * g.transpose(1, 2)[..., None].to(out.dtype)
        B, _, N, _ = out.shape
        return self.dropout(self.o_proj(out.transpose(1, 2).reshape(B, N, -1)))

    def _balance(self, pr, sel, mask):
        if not self.routed:
            return pr.new_zeros(())
        if mask is not None:
            pr, sel = pr[mask], sel[mask]
        else:
            pr, sel = pr.reshape(-1, self.routed), sel.reshape(-1, self.routed)
        if pr.shape[0] == 0:
            return pr.new_zeros(())
        return ref.moh_balance_loss(pr, sel)

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, **forward_kw):
        """The float64 oracle (:func:`attnkit.reference.heads.moh`) on this layer's weights cast to ``dtype``."""
        require_plain_attention(self)
        if forward_kw:
            raise ShapeError(bad("forward_kw", "only key_padding_mask for the reference", sorted(forward_kw)))

        def c(m):
            return None if m is None else m.weight.to(dtype)

        return ref.moh(
            x.to(dtype),
            **linear_weights(self, dtype),
            ws=c(self.router_shared),
            wr=c(self.router_routed),
            wh=c(self.router_stage),
            heads=self.heads,
            kv_heads=self.kv_heads,
            shared=self.shared,
            top_k=self.top_k,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dtype=dtype,
        )


register(
    "moh",
    family="D",
    kind="layer",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yan, Yuan, 2024)",
    exact=True,
    supports={"causal", "decode", "backward", "padding", "gqa"},
    factory=lambda n, *, dim=64, heads=4, shared=None, top_k=None, kv_heads=None: MoHAttention(
        dim, heads, shared=shared, top_k=top_k, kv_heads=kv_heads, max_seq_len=n
    ),
    summary="shared heads always on plus top-k routed heads per token, a two-stage gated weighted sum of heads, "
    "with the load-balance loss",
    source=MoHAttention,
)
