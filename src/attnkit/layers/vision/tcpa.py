"""TCPA: token coordinated prompt attention (CLS prompts and image prompts matched to each token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import reference
from ...errors import ShapeError, bad
from ...records import register
from ._base import VisionMixer, grid_for

__all__ = ["TokenCoordinatedPromptAttention"]


class TokenCoordinatedPromptAttention(VisionMixer):
    r"""TCPA: self-attention over ``[cls, x_1..x_N]`` in which each token also attends to prompts chosen for it:
    the class token to CLS prompts, each image token to image prompts, matched by cosine similarity.

    Two pools of learned prompts, each prompt ``p`` with a learned key ``\kappa_p``: ``P_c`` CLS prompts and
    ``P_i`` image prompts. Each token picks the prompts whose keys are most similar to it,

    .. math::

        \mathcal{M}(\text{cls}) = \operatorname{top}_{k_c}\ \cos(t_{\text{cls}}, \kappa^c_p),\qquad
        \mathcal{M}(i) = \operatorname{top}_{k_i}\ \cos(x_i, \kappa^i_p)

    and attends, in one softmax, to every token and to its own prompts (prompts enter as keys and values only,
    through the layer's ``k, v`` projections, as VPT-deep prompts do):

    .. math::

        y_n = W_o \sum_{j \in \text{tokens} \cup \mathcal{M}(n)}
            \operatorname{softmax}_j\Big(\frac{q_n\cdot k_j}{\sqrt d}\Big) v_j

    so CLS prompts interact only with the class token and image prompts only with image tokens, the
    disentanglement the paper names. After a forward, :meth:`aux_loss` is the matching loss ``mean(1 - cos)``
    of the CLS choices plus that of the image-token choices (differentiable in the keys, which get their
    gradient from it alone: the choice itself is discrete); a trainer adds it to its loss.

    **The class token and "class-bound" prompts.** In TCPA the CLS prompts are bound to the ``[CLS]`` *token*,
    not to class labels: they are matched by the class token's own features, so no label is used, in training
    or at inference. A token mixer over ``(B, H, W, C)`` has no ``[CLS]`` token, so this module carries a
    learned one, as iLLaMA's layer does (:class:`CausalClassTokenAttention`); ``forward`` returns the ``N``
    image tokens and :meth:`pool` the class token's output ``(B, C)``.

    Paper: "Token Coordinated Prompt Attention is Needed for Visual Prompting" (Zhou et al., ICML 2025). As in
    the authors' public code: per-token top-k choice from a pool by cosine similarity of the token with the
    prompt keys, keys and prompts initialised uniformly in [-1, 1], and the matching loss ``1 - cos``. A
    substitute in two ways: the paper tunes prompts on a frozen pretrained ViT (here every weight trains), and
    its code can draw the prompts at random during training (not built). Defaults: ``P_c = 4, k_c = 2``,
    ``P_i = 8, k_i = 2`` (the paper's pools are larger, for 197-token ViT-B layers).
    """

    aux_only = ("keys_c", "keys_i")

    def __init__(self, dim, heads=4, *, cls_prompts=4, cls_topk=2, image_prompts=8, image_topk=2, grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        for name, pool, k in (("cls", cls_prompts, cls_topk), ("image", image_prompts, image_topk)):
            if not isinstance(pool, int) or pool < 1:
                raise ShapeError(bad(f"{name}_prompts", "a positive int", pool))
            if not isinstance(k, int) or not 1 <= k <= pool:
                raise ShapeError(bad(f"{name}_topk", f"an int in [1, {name}_prompts = {pool}]", k))
        self.heads, self.cls_topk, self.image_topk = heads, cls_topk, image_topk
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.keys_c = nn.Parameter(torch.empty(cls_prompts, dim).uniform_(-1, 1))
        self.prompts_c = nn.Parameter(torch.empty(cls_prompts, dim).uniform_(-1, 1))
        self.keys_i = nn.Parameter(torch.empty(image_prompts, dim).uniform_(-1, 1))
        self.prompts_i = nn.Parameter(torch.empty(image_prompts, dim).uniform_(-1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self._loss = None

    def _tokens(self, x):
        B, H, W, C = x.shape
        h, d, N = self.heads, C // self.heads, H * W
        Pc, Pi = self.prompts_c.shape[0], self.prompts_i.shape[0]
        t = torch.cat([self.cls.expand(B, 1, C), x.reshape(B, N, C)], 1)  # (B, N + 1, C)
        q, k, v = self.qkv(t).reshape(B, N + 1, 3, h, d).permute(2, 0, 3, 1, 4)
        _, kp, vp = self.qkv(torch.cat([self.prompts_c, self.prompts_i])).reshape(Pc + Pi, 3, h, d).permute(1, 2, 0, 3)
        sim_c = F.normalize(t[:, 0], dim=-1) @ F.normalize(self.keys_c, dim=-1).t()  # (B, Pc)
        sim_i = F.normalize(t[:, 1:], dim=-1) @ F.normalize(self.keys_i, dim=-1).t()  # (B, N, Pi)
        top_c, top_i = sim_c.topk(self.cls_topk, -1), sim_i.topk(self.image_topk, -1)
        chosen = torch.zeros(B, N + 1, Pc + Pi, dtype=torch.bool, device=x.device)
        chosen[:, 0, :Pc].scatter_(-1, top_c.indices, True)
        chosen[:, 1:, Pc:].scatter_(-1, top_i.indices, True)
        s = torch.cat(
            [q @ k.transpose(-1, -2), (q @ kp.transpose(-1, -2)).masked_fill(~chosen[:, None], float("-inf"))], -1
        )
        p = (s * d**-0.5).softmax(-1)
        out = p[..., : N + 1] @ v + p[..., N + 1 :] @ vp
        self._loss = (1 - top_c.values).mean() + (1 - top_i.values).mean()
        return self.proj(out.transpose(1, 2).reshape(B, N + 1, C))

    def _forward(self, x):
        return self._tokens(x)[:, 1:].reshape(x.shape)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's output, ``(B, C)``."""
        return self._tokens(self._image(x))[:, 0]

    def aux_loss(self) -> torch.Tensor:
        """The matching loss of the last forward (raises before any forward)."""
        if self._loss is None:
            raise ShapeError(bad("aux_loss", "a forward first", "no matching recorded"))
        return self._loss

    def _reference(self, x, dtype):
        return self.reference_tokens(x, dtype=dtype)[0]

    def reference_tokens(self, x, *, dtype=torch.float64):
        """The float64 oracle's ``(image tokens (B, H, W, C), class token (B, C), matching loss)``."""
        w = (self.cls, self.keys_c, self.prompts_c, self.keys_i, self.prompts_i)
        w += (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias)
        opts = dict(heads=self.heads, topk_c=self.cls_topk, topk_i=self.image_topk)
        return reference.vision.tcpa_attention(self._image(x), *w, **opts, dtype=dtype)


register(
    "tcpa_prompts",
    family="I",
    kind="layer",
    paper="Token Coordinated Prompt Attention is Needed for Visual Prompting (Zhou et al., 2025)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: TokenCoordinatedPromptAttention(dim, heads, grid=grid_for(n)),
    summary=(
        "attention to all tokens plus, per token, its top-2 prompts by cosine match: CLS prompts for the class "
        "token, image prompts for the rest"
    ),
    source=TokenCoordinatedPromptAttention,
)
