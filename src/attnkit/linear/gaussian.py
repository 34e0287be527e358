r"""Gaussian Adaptive Attention ("Gaussian Adaptive Attention is All You Need: Robust Contextual Representations
Across Multiple Modalities", Ioannides et al., 2024).

Each head owns a group of ``dim / heads`` channels and a learnable Gaussian over them: a mean offset
:math:`\delta_h` and a variance scale :math:`\xi_h = e^{\rho_h}`. With the statistics taken over the sequence
(the axis the paper normalises),

.. math::
    \mu = \mathbb{E}_t[x] + \delta_h, \qquad \sigma^2 = \mathrm{Var}_t[x], \qquad
    \mathrm{out} = x \odot \exp\!\Big(-\frac{(x - \mu)^2}{2\,\xi_h\,\sigma^2 + \epsilon}\Big)

so every feature is re-weighted by its density under the head's adapted Gaussian; heads together model a mixture.
The abstract does not give the density's form: we follow the paper's released module (offset on the mean,
multiplicative scale on the variance, unnormalised density used as the weight) and learn :math:`\rho` in log
space so the scale stays positive. Not causal (statistics over the whole sequence).
"""

from __future__ import annotations

import torch

from ..errors import ShapeError, bad
from ..records import register


class GaussianAdaptiveAttention(torch.nn.Module):
    """GAAM over ``x`` ``(B, N, dim)``; ``heads`` Gaussians, one per group of ``dim / heads`` channels."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-8):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ShapeError(bad("heads", f"an int >= 1 that divides dim={dim}", repr(heads)))
        self.dim, self.heads, self.eps = dim, heads, eps
        self.mean_offset = torch.nn.Parameter(torch.zeros(heads))
        self.log_scale = torch.nn.Parameter(torch.zeros(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ShapeError(bad("x", f"(B, N, {self.dim})", tuple(x.shape)))
        B, N, C = x.shape
        xh = x.view(B, N, self.heads, C // self.heads)
        mean = xh.mean(1, keepdim=True)
        var = (xh - mean).pow(2).mean(1, keepdim=True)
        mu = mean + self.mean_offset.view(1, 1, -1, 1).to(x.dtype)
        scale = self.log_scale.exp().view(1, 1, -1, 1).to(x.dtype)
        dens = torch.exp(-(xh - mu).pow(2) / (2 * scale * var + self.eps))
        return (xh * dens).view(B, N, C)


register(
    "gaussian_adaptive",
    family="C",
    kind="module",
    paper="Gaussian Adaptive Attention is All You Need (GAAM, Ioannides et al., 2024)",
    exact=True,
    supports={"backward", "bf16"},
    factory=lambda n: GaussianAdaptiveAttention(32, 4),
    summary="per-head learnable Gaussian (mean offset, variance scale) re-weighting features over the sequence",
    source=GaussianAdaptiveAttention,
)
