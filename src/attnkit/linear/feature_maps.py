r"""Feature maps :math:`\phi` of kernelised attention: :math:`\exp(q \cdot k) \approx \phi(q) \cdot \phi(k)`.

A feature map takes ``x`` ``(B, H, N, D)`` (already in the compute dtype) and returns ``(B, H, N, F)``; it is
called once for the queries (``is_query=True``) and once for the keys. Every map here is causal: token ``t``'s
features depend on token ``t`` alone, so chunked, recurrent and piecewise evaluation agree.

* :class:`EluPlusOne`: ``elu(x) + 1`` ("Transformers are RNNs", Katharopoulos et al., 2020).
* :class:`ReLU`: ``max(x, 0)`` (used by TransNormer / EfficientViT-style linear attention).
* :class:`Identity`: ``x`` (RetNet's retention, Lightning attention without a kernel).
* :class:`FAVOR`: Performer's positive orthogonal random features (Choromanski et al., 2021).
* :class:`Hedgehog`: a learnable per-head map trained to mimic softmax (Zhang et al., 2024), with
  :func:`hedgehog_loss` (the attention-distillation loss) and :func:`fit_hedgehog` (convert a softmax layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import PatternError, ShapeError, bad
from ..layout import ceil_div


class FeatureMap(torch.nn.Module):
    """Base class: ``forward(x, is_query)`` maps ``(B, H, N, D)`` to non-negative ``(B, H, N, F)``."""

    #: features per input dim (``F = D * expansion``), for FLOP counts.
    expansion: int = 1

    def forward(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, heads: int, head_dim: int) -> None:
        """Raise when the map cannot take ``heads`` heads of ``head_dim`` dims."""


class EluPlusOne(FeatureMap):
    """``phi(x) = elu(x) + 1`` (> 0 everywhere): the map of "Transformers are RNNs" (Katharopoulos et al., 2020)."""

    def forward(self, x, is_query):
        return F.elu(x) + 1

    def extra_repr(self):
        return "elu(x) + 1"


class ReLU(FeatureMap):
    """``phi(x) = max(x, 0)``. A query whose features are all 0 sees no key: with ``normalize`` it gives 0."""

    def forward(self, x, is_query):
        return F.relu(x)


class Identity(FeatureMap):
    """``phi(x) = x``: retention (RetNet) and Lightning attention use the raw, scaled ``q k^T``. Not
    non-negative, so pair it with ``normalize=False`` or ``"rms"``, not the sum normaliser."""

    def forward(self, x, is_query):
        return x


class FAVOR(FeatureMap):
    r"""Performer's positive random features, FAVOR+ ("Rethinking Attention with Performers", Choromanski et al.,
    2021).

    .. math::
        \phi(x) = \frac{1}{\sqrt{m}} \exp\!\big(W x' - \tfrac{\|x'\|^2}{2} - c_x\big),\qquad x' = x D^{-1/4}

    so that :math:`\mathbb{E}[\phi(q)\cdot\phi(k)] = e^{-c_q} \exp(q \cdot k / \sqrt{D})`: the softmax kernel up
    to the query's stabiliser :math:`c_q` (keys: :math:`c_k = 0`), which the sum normaliser cancels.
    ``W`` ``(m, D)`` holds blocks of orthogonal rows with norms drawn
    from the chi distribution (the paper's orthogonal random features), fixed by ``seed``.

    The paper subtracts a data-dependent maximum for stability. Over the keys that maximum would look at future
    tokens and break causality, so keys get none (``c = 0``; the exponent is at most ``||W_r||^2 / 2``, far from
    float32's limit for head dims up to a few hundred). Each query subtracts its own maximum, which cancels under
    the sum normaliser (``normalize=True``) and keeps the products away from subnormal numbers; pass
    ``stabilize_queries=False`` with any other normaliser. Call :meth:`redraw` to draw new features (the paper
    redraws during training).
    """

    def __init__(self, head_dim: int, num_features: int | None = None, seed: int = 0, stabilize_queries: bool = True):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise PatternError(bad("head_dim", "an int >= 1", repr(head_dim)))
        m = num_features if num_features is not None else head_dim * 2
        if not isinstance(m, int) or m < 1:
            raise PatternError(bad("num_features", "an int >= 1", repr(num_features)))
        self.head_dim, self.num_features, self.stabilize_queries = head_dim, m, stabilize_queries
        self.register_buffer("weight", torch.empty(m, head_dim, dtype=torch.float64))
        self.redraw(seed)

    def redraw(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        D, m = self.head_dim, self.num_features
        blocks = []
        for _ in range(ceil_div(m, D)):
            qmat, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
            blocks.append(qmat.T)
        w = torch.cat(blocks)[:m]
        norms = torch.randn(m, D, generator=g, dtype=torch.float64).norm(dim=1)
        self.weight.copy_(w * norms[:, None])

    def check(self, heads, head_dim):
        if head_dim != self.head_dim:
            raise ShapeError(bad("feature_map", f"FAVOR built for head_dim {head_dim}", f"head_dim {self.head_dim}"))

    def forward(self, x, is_query):
        w = self.weight.to(x.dtype)
        xs = x * self.head_dim**-0.25
        proj = xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdim=True)
        if is_query and self.stabilize_queries:
            proj = proj - proj.amax(-1, keepdim=True).detach()
        return proj.exp() * self.num_features**-0.5

    def extra_repr(self):
        return f"head_dim={self.head_dim}, num_features={self.num_features}"


class Hedgehog(FeatureMap):
    r"""Hedgehog's learnable softmax-mimicking map ("The Hedgehog & the Porcupine", Zhang et al., ICLR 2024).

    Per head ``h`` a linear layer ``W_h x + b_h`` (``D -> F``, initialised to the identity) followed by

    .. math:: \phi_h(x) = [\mathrm{softmax}(W_h x + b_h),\; \mathrm{softmax}(-W_h x - b_h)]

    (``2F`` features). The paper's map is ``[exp(Wx), exp(-Wx)]``; like its released code we normalise each half
    with a softmax over the features, which keeps the map bounded in low precision. The map is trained with
    :func:`hedgehog_loss` so that linear attention's weights match a softmax layer's (:func:`fit_hedgehog`).
    """

    def __init__(self, heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()
        if not isinstance(heads, int) or heads < 1:
            raise PatternError(bad("heads", "an int >= 1", repr(heads)))
        if not isinstance(head_dim, int) or head_dim < 1:
            raise PatternError(bad("head_dim", "an int >= 1", repr(head_dim)))
        f = head_dim if feature_dim is None else feature_dim
        self.heads, self.head_dim, self.feature_dim = heads, head_dim, f
        self.expansion = max(1, 2 * f // head_dim)
        self.weight = torch.nn.Parameter(torch.eye(head_dim, f).repeat(heads, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(heads, 1, f))

    def check(self, heads, head_dim):
        if (heads, head_dim) != (self.heads, self.head_dim):
            raise ShapeError(
                bad(
                    "feature_map",
                    f"Hedgehog built for {self.heads} heads of dim {self.head_dim}",
                    f"{heads} heads of dim {head_dim}",
                )
            )

    def forward(self, x, is_query):
        z = torch.matmul(x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)

    def extra_repr(self):
        return f"heads={self.heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"


_BY_NAME = {"elu+1": EluPlusOne, "relu": ReLU, "identity": Identity}


def resolve(feature_map) -> FeatureMap:
    """A :class:`FeatureMap` from an instance or a name (``"elu+1"``, ``"relu"``, ``"identity"``)."""
    if isinstance(feature_map, FeatureMap):
        return feature_map
    if isinstance(feature_map, str) and feature_map in _BY_NAME:
        return _BY_NAME[feature_map]()
    raise PatternError(
        bad("feature_map", f"a FeatureMap or one of {sorted(_BY_NAME)}", repr(feature_map)),
    )


def hedgehog_loss(q, k, feature_map: FeatureMap, *, causal: bool = True, scale: float | None = None):
    r"""Hedgehog's attention-distillation loss: the soft cross-entropy between softmax attention and the
    linear attention of ``feature_map`` on the same ``q``, ``k`` ``(B, H, N, D)``:

    .. math:: \mathcal{L} = -\frac{1}{BHN}\sum_{b,h,i}\sum_j P_{ij}\,\log \hat{A}_{ij},\qquad
        P = \mathrm{softmax}(q k^T \cdot \mathrm{scale}),\quad
        \hat{A}_{ij} = \frac{\phi(q_i)\cdot\phi(k_j)}{\sum_{j'} \phi(q_i)\cdot\phi(k_{j'})}

    Quadratic in ``N``: distil on windows of a few hundred tokens, as the paper does.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    n = q.shape[2]
    keep = torch.ones(n, k.shape[2], dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.tril(keep)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
    a = feature_map(q, True) @ feature_map(k, False).transpose(-1, -2)
    a = a.masked_fill(~keep, 0)
    log_a = (a.clamp_min(1e-30) / a.sum(-1, keepdim=True).clamp_min(1e-30)).log()
    return -(p * log_a.masked_fill(~keep, 0)).sum(-1).mean()


def fit_hedgehog(
    q, k, *, causal: bool = True, feature_dim: int | None = None, steps: int = 200, lr: float = 1e-2, seed: int = 0
) -> Hedgehog:
    """Train a :class:`Hedgehog` map on captured queries and keys ``(B, H, N, D)`` of a softmax layer, so that
    linear attention with it mimics that layer (the paper's conversion of a pretrained model). Adam on
    :func:`hedgehog_loss`; returns the trained map in evaluation mode."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[1] != k.shape[1]:
        raise ShapeError(bad("q, k", "(B, H, N, D) tensors with equal heads", f"{tuple(q.shape)}, {tuple(k.shape)}"))
    torch.manual_seed(seed)
    fmap = Hedgehog(q.shape[1], q.shape[3], feature_dim)
    opt = torch.optim.Adam(fmap.parameters(), lr=lr)
    qf, kf = q.detach().float(), k.detach().float()
    for _ in range(steps):
        opt.zero_grad()
        loss = hedgehog_loss(qf, kf, fmap, causal=causal)
        loss.backward()
        opt.step()
    return fmap.eval()
