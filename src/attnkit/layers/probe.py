r"""Attentive probes: classifiers over frozen token features ``(B, N, dim)`` -> logits ``(B, classes)``.

* :class:`EfficientProbe`: efficient probing (EP) of *Attention, Please! Revisiting Attentive Probing for
  Masked Image Modeling* (Psomas et al., 2025). ``M`` learned queries ``u_m`` attend to the frozen tokens
  themselves (no key projection, no query projection), and one value projection ``W_v`` (``dim -> dim / d_out``)
  is split into ``M`` slices, query ``m`` pooling slice ``m``; no output projection:

  .. math::
      a_m = \mathrm{softmax}_j(u_m \cdot x_j / \sqrt{\mathrm{dim}}),\qquad
      z = \mathrm{concat}_m \textstyle\sum_j a_{mj} (x_j W_v)_m,\qquad
      \mathrm{logits} = \mathrm{LN}(z) W_c + b_c

  Trainable: ``M dim + dim^2 / d_out`` in the pooling (vs ``4 dim^2 + M dim`` for the full probe), plus the
  classifier.
* :class:`AttentiveProbe`: the baseline the paper compares with, multi-head cross attention of ``queries``
  learned tokens with full ``W_q, W_k, W_v, W_o``, averaged over the queries, then the classifier.
* :class:`MeanProbe`: linear probing of the mean of the real tokens.

Every attention runs through :func:`attnkit.attention` (non-causal, with ``key_padding_mask``: a padded token
never changes the logits). ``reference(x, dtype=...)`` runs :mod:`attnkit.reference.probe` on the probe's weights.

Choices where the paper is silent or its code does something batch-dependent: the paper's code puts a
``BatchNorm1d(affine=False)`` before the classifier; here it is a per-example layer normalisation without gain
or bias (``LN``; ``norm=False`` removes it), the same for the three probes, so an example's logits never depend
on the rest of its batch (padding invariance holds example by example, and train and eval mode agree).
EP's queries are initialised ``N(0, 0.02^2)`` as in the paper's code; projections use PyTorch's default.
"""

from __future__ import annotations

import torch
from torch import nn

from ..api import attention
from ..errors import ShapeError, bad, check_count
from ..records import register
from ..reference import probe as _ref


def _check_input(x, dim, key_padding_mask):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(bad("x", f"(B, N, {dim})", got))
    if key_padding_mask is not None and (
        not isinstance(key_padding_mask, torch.Tensor)
        or key_padding_mask.dtype != torch.bool
        or tuple(key_padding_mask.shape) != tuple(x.shape[:2])
    ):
        got = (
            (tuple(key_padding_mask.shape), key_padding_mask.dtype)
            if isinstance(key_padding_mask, torch.Tensor)
            else key_padding_mask
        )
        raise ShapeError(bad("key_padding_mask", f"a bool tensor {tuple(x.shape[:2])}", got))


class _Probe(nn.Module):
    def __init__(self, dim: int, classes: int, width: int, norm: bool):
        super().__init__()
        check_count("dim", dim, 1)
        check_count("classes", classes, 1)
        self.dim, self.classes = dim, classes
        self.norm = nn.LayerNorm(width, elementwise_affine=False) if norm else None
        self.classifier = nn.Linear(width, classes)

    def _logits(self, z):
        return self.classifier(z if self.norm is None else self.norm(z))

    def _cls(self):
        return {"wc": self.classifier.weight, "bc": self.classifier.bias, "norm": self.norm is not None}

    def pooling_parameters(self) -> int:
        """Trainable parameters of the pooling (everything but the classifier)."""
        skip = {id(p) for p in self.classifier.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)


class EfficientProbe(_Probe):
    """Efficient probing (EP); see the module docstring.

    Args:
        dim: token feature width.
        classes: number of classes.
        queries: learned queries ``M``; must divide ``dim // d_out``.
        d_out: value compression: the pooled vector has ``dim // d_out`` channels.
        bias: a bias in the value projection (the paper's ``qkv_bias``, default False).
        norm: the layer normalisation before the classifier.
        backend: the :func:`attnkit.attention` backend.
    """

    def __init__(
        self,
        dim: int,
        classes: int,
        *,
        queries: int = 8,
        d_out: int = 1,
        bias: bool = False,
        norm: bool = True,
        backend: str = "auto",
    ):
        check_count("queries", queries, 1)
        check_count("d_out", d_out, 1)
        if dim % d_out:
            raise ShapeError(bad("d_out", f"a divisor of dim={dim}", d_out))
        width = dim // d_out
        if width % queries:
            raise ShapeError(bad("queries", f"a divisor of dim // d_out = {width}", queries))
        super().__init__(dim, classes, width, norm)
        self.queries, self.d_out, self.backend = queries, d_out, backend
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.v_proj = nn.Linear(dim, width, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, classes={self.classes}, queries={self.queries}, d_out={self.d_out}"

    def attention_weights(self, x, *, key_padding_mask=None) -> torch.Tensor:
        """``(B, queries, N)``: each query's softmax over the tokens (the paper's interpretable maps)."""
        _check_input(x, self.dim, key_padding_mask)
        s = torch.einsum("mc,bnc->bmn", self.query.to(x.dtype), x) * self.dim**-0.5
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None], float("-inf"))
        return torch.softmax(s, -1).nan_to_num(0.0)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, N, dim)`` (``key_padding_mask`` ``(B, N)``, True where real) -> logits ``(B, classes)``."""
        _check_input(x, self.dim, key_padding_mask)
        B, N, _ = x.shape
        M = self.queries
        q = self.query.to(x.dtype)[None, :, None, :].expand(B, M, 1, self.dim)  # M heads of one query each
        k = x[:, None].expand(B, M, N, self.dim)  # the raw tokens are every head's keys (a view, no copy)
        v = self.v_proj(x).view(B, N, M, -1).transpose(1, 2)  # head m: the m-th slice of the values
        z = attention(q, k, v, key_padding_mask=key_padding_mask, causal=False, backend=self.backend)
        return self._logits(z.reshape(B, -1))

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None):
        """:func:`attnkit.reference.probe.efficient_probe` on this probe's weights in ``dtype``."""
        _check_input(x, self.dim, key_padding_mask)
        return _ref.efficient_probe(
            x,
            query=self.query,
            wv=self.v_proj.weight,
            bv=self.v_proj.bias,
            key_padding_mask=key_padding_mask,
            dtype=dtype,
            **self._cls(),
        )


class AttentiveProbe(_Probe):
    """The full attentive probe: learned queries, ``W_q, W_k, W_v, W_o`` with ``heads`` heads; see the module
    docstring.

    Args:
        dim: token feature width.
        classes: number of classes.
        heads: attention heads; must divide ``dim``.
        queries: learned queries, their outputs averaged (1: one class token).
        bias: biases in the projections.
        norm: the layer normalisation before the classifier.
        backend: the :func:`attnkit.attention` backend.
    """

    def __init__(
        self,
        dim: int,
        classes: int,
        *,
        heads: int = 8,
        queries: int = 1,
        bias: bool = True,
        norm: bool = True,
        backend: str = "auto",
    ):
        check_count("heads", heads, 1)
        check_count("queries", queries, 1)
        if dim % heads:
            raise ShapeError(bad("heads", f"a divisor of dim={dim}", heads))
        super().__init__(dim, classes, dim, norm)
        self.heads, self.queries, self.backend = heads, queries, backend
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, classes={self.classes}, heads={self.heads}, queries={self.queries}"

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, N, dim)`` (``key_padding_mask`` ``(B, N)``, True where real) -> logits ``(B, classes)``."""
        _check_input(x, self.dim, key_padding_mask)
        B, N, _ = x.shape
        H, M, d = self.heads, self.queries, self.dim // self.heads
        q = self.q_proj(self.query.to(x.dtype)).view(M, H, d).transpose(0, 1)[None].expand(B, H, M, d)
        k = self.k_proj(x).view(B, N, H, d).transpose(1, 2)
        v = self.v_proj(x).view(B, N, H, d).transpose(1, 2)
        o = attention(q, k, v, key_padding_mask=key_padding_mask, causal=False, backend=self.backend)
        o = self.o_proj(o.transpose(1, 2).reshape(B, M, self.dim))
        return self._logits(o.mean(1))

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None):
        """:func:`attnkit.reference.probe.attentive_probe` on this probe's weights in ``dtype``."""
        _check_input(x, self.dim, key_padding_mask)
        lin = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        return _ref.attentive_probe(
            x,
            query=self.query,
            wq=self.q_proj.weight,
            wk=self.k_proj.weight,
            wv=self.v_proj.weight,
            wo=self.o_proj.weight,
            heads=self.heads,
            biases=None if self.q_proj.bias is None else tuple(m.bias for m in lin),
            key_padding_mask=key_padding_mask,
            dtype=dtype,
            **self._cls(),
        )


class MeanProbe(_Probe):
    """Linear probing of the mean of the real tokens (the baseline without attention)."""

    def __init__(self, dim: int, classes: int, *, norm: bool = True):
        super().__init__(dim, classes, dim, norm)

    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_input(x, self.dim, key_padding_mask)
        if key_padding_mask is None:
            z = x.mean(1)
        else:
            m = key_padding_mask[..., None].to(x.dtype)
            z = (x * m).sum(1) / m.sum(1).clamp_min(1)
        return self._logits(z)

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None):
        _check_input(x, self.dim, key_padding_mask)
        return _ref.mean_probe(x, key_padding_mask=key_padding_mask, dtype=dtype, **self._cls())


_PROBE = frozenset({"backward", "bf16", "padding"})

register(
    "efficient_probe",
    family="D",
    kind="layer",
    paper="Attention, Please! Revisiting Attentive Probing for Masked Image Modeling (Psomas et al., 2025)",
    exact=True,
    supports=_PROBE,
    factory=lambda n, *, dim=64, heads=4, classes=4, d_out=1: EfficientProbe(dim, classes, queries=heads, d_out=d_out),
    summary="attentive probe: learned queries over unprojected tokens, one sliced value projection, no Q/K/O",
    source=EfficientProbe,
)

register(
    "attentive_probe",
    family="D",
    kind="layer",
    paper="Attention, Please! Revisiting Attentive Probing for Masked Image Modeling (Psomas et al., 2025)",
    exact=True,
    supports=_PROBE,
    factory=lambda n, *, dim=64, heads=4, classes=4, queries=1: AttentiveProbe(
        dim, classes, heads=heads, queries=queries
    ),
    summary="the full attentive probe (learned query, W_q W_k W_v W_o multi-head cross attention) EP is compared with",
    source=AttentiveProbe,
)
