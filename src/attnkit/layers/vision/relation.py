"""Relation-DETR's pairwise position-relation bias, as a score modification of self-attention over a grid."""

from __future__ import annotations

import torch
from torch import nn

from ... import reference
from ...api import attention
from ...errors import DTypeError, ShapeError, bad
from ...records import register
from ...scores import TensorBias
from ._base import VisionMixer, grid_for

__all__ = ["RelationGeometryAttention", "box_relations", "cell_boxes"]


def cell_boxes(H: int, W: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The boxes ``(cx, cy, w, h)`` of the cells of an ``H x W`` grid on the unit square, ``(H W, 4)`` in raster
    order: cell ``(r, c)`` is centred at ``((c + 1/2) / W, (r + 1/2) / H)`` with size ``(1/W, 1/H)``."""
    r, c = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    cx, cy = (c.flatten().to(dtype) + 0.5) / W, (r.flatten().to(dtype) + 0.5) / H
    return torch.stack([cx, cy, torch.full_like(cx, 1.0 / W), torch.full_like(cy, 1.0 / H)], -1)


def box_relations(boxes_q: torch.Tensor, boxes_k: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""Relation-DETR's log-scaled pairwise relations of boxes ``(cx, cy, w, h)``: ``(Nq, Nk, 4)`` with

    .. math::

        e_{ij} = \Big[\log\big(\tfrac{|x_i - x_j|}{w_i} + 1\big),\ \log\big(\tfrac{|y_i - y_j|}{h_i} + 1\big),\
        \log\tfrac{w_i}{w_j},\ \log\tfrac{h_i}{h_j}\Big]

    (``eps`` added to every size): the distance in units of the query box's size, and the size ratio."""
    xy1, wh1 = boxes_q[:, None, :2], boxes_q[:, None, 2:] + eps
    xy2, wh2 = boxes_k[None, :, :2], boxes_k[None, :, 2:] + eps
    return torch.cat([torch.log((xy1 - xy2).abs() / wh1 + 1.0), torch.log(wh1 / wh2)], -1)


class RelationGeometryAttention(VisionMixer):
    r"""Self-attention with Relation-DETR's position relation bias: a learned per-head bias from the pairwise
    geometry of the tokens' boxes, added to the logits.

    .. math::

        \operatorname{PE}(e)_{2k} = \sin\frac{s\,e}{T^{2k/D}},\quad
        \operatorname{PE}(e)_{2k+1} = \cos\frac{s\,e}{T^{2k/D}},
        \qquad b_{h,ij} = \operatorname{ReLU}\Big(w_h^\top\,
        [\operatorname{PE}(e_{ij,1}); \dots; \operatorname{PE}(e_{ij,4})] + \beta_h\Big)

        y = W_o\,\operatorname{softmax}\Big(\frac{Q K^\top}{\sqrt d} + b_h\Big) V

    with ``e_{ij}`` the four log-scaled relations of :func:`box_relations`, ``D = embed_dim`` sinusoids per
    relation (``T = 10^4``, ``s = 100``), and the per-head projection a ReLU'd 1x1 convolution, as in the authors'
    public code (``embed_dim = 16`` there). The bias runs through :func:`attnkit.attention` as a score
    modification (:class:`attnkit.scores.TensorBias`, an additive bias, on the ``sdpa`` backend so that the
    bias's gradient flows); :meth:`bias` returns it, ``(heads, N, N)``, for use with other attention calls.

    Paper: "Relation DETR: Exploring Explicit Position Relation Prior for Object Detection" (Hou et al., ECCV
    2024). Substitute: there the boxes are a DETR decoder's predicted object boxes and the bias is refined
    from layer to layer (from the previous layer's boxes); here the tokens are image cells, and the boxes are
    the cells of the grid (:func:`cell_boxes`) unless ``boxes`` ``(N, 4)`` (``cx, cy, w, h``, positive sizes,
    shared by the batch) are passed to ``forward``. On the uniform grid the two size relations are 0, so the
    bias depends on the relative position only, in units of a cell, log-scaled. Not built: the contrastive
    relation pipeline (a detector's training scheme, not the attention).
    """

    def __init__(self, dim: int, heads: int = 4, *, embed_dim: int = 16, grid=None):
        super().__init__(dim, grid)
        if heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim = {dim}", heads))
        if not isinstance(embed_dim, int) or embed_dim < 2 or embed_dim % 2:
            raise ShapeError(bad("embed_dim", "an even int >= 2", embed_dim))
        self.heads, self.embed_dim = heads, embed_dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(4 * embed_dim, heads)

    def _boxes(self, boxes, H, W, like):
        if boxes is None:
            return cell_boxes(H, W, dtype=like.dtype, device=like.device)
        if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
            raise DTypeError(bad("boxes", "a floating-point tensor (N, 4)", type(boxes).__name__))
        if boxes.shape != (H * W, 4):
            raise ShapeError(bad("boxes", f"(N, 4) = ({H * W}, 4) boxes (cx, cy, w, h)", tuple(boxes.shape)))
        if not bool((boxes[:, 2:] > 0).all()) or not bool(boxes.isfinite().all()):
            raise ShapeError(bad("boxes", "finite boxes with positive w and h", "a size <= 0 or a non-finite entry"))
        return boxes.to(device=like.device, dtype=like.dtype)

    def bias(self, H: int, W: int, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """The position relation bias ``(heads, N, N)`` for an ``H x W`` grid (or the given boxes)."""
        w = self.pos_proj.weight
        b = self._boxes(boxes, H, W, w)
        e = box_relations(b, b)  # (N, N, 4)
        D = self.embed_dim
        k = torch.arange(D, device=w.device)
        freq = 10000.0 ** ((2 * (k // 2)).to(w.dtype) / D)
        arg = e[..., None] * 100.0 / freq  # (N, N, 4, D)
        pe = torch.where(k % 2 == 0, arg.sin(), arg.cos()).flatten(-2)
        return torch.relu(self.pos_proj(pe)).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        x4 = self._image(x)
        if x4.dtype != self.qkv.weight.dtype:
            raise DTypeError(bad("x", f"dtype {self.qkv.weight.dtype} (the module's parameters)", x4.dtype))
        return self._forward(x4, boxes).reshape(x.shape)

    def _forward(self, x, boxes=None):
        B, H, W, C = x.shape
        h, d = self.heads, C // self.heads
        q, k, v = self.qkv(x.reshape(B, H * W, C)).reshape(B, H * W, 3, h, d).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, score=TensorBias(self.bias(H, W, boxes)), backend="sdpa")
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))

    def reference(self, x: torch.Tensor, *, dtype: torch.dtype = torch.float64, boxes=None) -> torch.Tensor:
        """The float64 oracle (:func:`attnkit.reference.vision.relation_attention`) on this module's weights."""
        x4 = self._image(x)
        if boxes is not None:
            boxes = self._boxes(boxes, x4.shape[1], x4.shape[2], x4)
        return self._reference(x4, dtype, boxes).reshape(x.shape)

    def _reference(self, x, dtype, boxes=None):
        w = (self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias, self.pos_proj.weight, self.pos_proj.bias)
        return reference.vision.relation_attention(
            x, *w, heads=self.heads, embed_dim=self.embed_dim, boxes=boxes, dtype=dtype
        )


register(
    "relation_detr_bias",
    family="I",
    kind="layer",
    paper="Relation DETR: Exploring Explicit Position Relation Prior for Object Detection (Hou et al., 2024)",
    exact=True,
    supports={"spatial", "backward", "trainable"},
    factory=lambda n, *, dim=64, heads=4: RelationGeometryAttention(dim, heads, grid=grid_for(n)),
    summary="attention logits plus a learned per-head bias from the log-scaled pairwise geometry of the cell boxes",
    source=RelationGeometryAttention,
)
