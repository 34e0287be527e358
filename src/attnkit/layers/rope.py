r"""Rotary position embedding (RoPE, Su et al., 2021) with partial rotation and the usual context scalings.

A pair of channels ``(x_i, x_{i + R/2})`` of the first ``R`` channels (``R = round(fraction * head_dim)``,
even; the rest pass unchanged, as in GPT-NeoX / Phi's partial rotary) is rotated by the angle
:math:`p\,\theta_i` at position ``p``:

.. math::
    \theta_i = \mathrm{base}^{-2i/R}, \qquad
    \mathrm{rope}(x)_{[i,\,i+R/2]} = m \begin{pmatrix}\cos p\theta_i & -\sin p\theta_i\\
    \sin p\theta_i & \cos p\theta_i\end{pmatrix} \begin{pmatrix}x_i\\ x_{i+R/2}\end{pmatrix}

This is the ``rotate_half`` channel layout of Llama and transformers, so weights converted from a Hugging Face
checkpoint (SmolLM2) rotate the same way. ``m`` is 1 except under YaRN.

Scalings (``scaling=``; each changes :math:`\theta_i`, computed as transformers' ``ROPE_INIT_FUNCTIONS`` do,
and tested against them):

* ``RopeScaling("linear", factor)``: position interpolation (Chen et al., 2023), :math:`\theta_i / s`.
* ``RopeScaling("ntk", factor)``: NTK-aware base scaling, ``base * s^(R / (R - 2))`` (static; the dynamic
  variant changes the angles with the sequence length, which would make a cached decode differ from the
  uncached forward, so it is not offered).
* ``RopeScaling("llama3", factor, original_max_len, low_freq_factor, high_freq_factor)``: Llama 3.1's
  wavelength-banded interpolation.
* ``RopeScaling("yarn", factor, original_max_len, beta_fast, beta_slow)``: YaRN (Peng et al., 2023): a ramp
  between interpolated and extrapolated frequencies and the magnitude ``m = 0.1 ln s + 1``.

Angles are computed in float32 (float64 for float64 input) from integer positions, so position ``p`` gets the
same rotation whether it is reached in one forward or token by token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShapeError, bad, check_count

SCALINGS = ("linear", "ntk", "llama3", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """A context-extension scaling of the rotary frequencies; see :mod:`attnkit.layers.rope`."""

    kind: str
    factor: float
    original_max_len: int = 8192
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.kind not in SCALINGS:
            raise ShapeError(bad("RopeScaling.kind", f"one of {SCALINGS}", repr(self.kind)))
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor >= 1):
            raise ShapeError(bad("RopeScaling.factor", "a finite number >= 1", repr(self.factor)))
        check_count("RopeScaling.original_max_len", self.original_max_len, 1)


class Rotary(nn.Module):
    """Rotary embedding for ``(B, H, N, head_dim)`` queries and keys; see the module docstring for the math.

    Args:
        head_dim: channels per head.
        base: the frequency base (10,000 in RoFormer and Llama 2; 100,000 in SmolLM2).
        fraction: share of the channels rotated (partial rotary); the rotated count is rounded to even.
        scaling: a :class:`RopeScaling` or None.

    ``rotary(x, positions)``: ``positions`` is ``(N,)`` or ``(B, N)`` integer absolute positions.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0, fraction: float = 1.0, scaling=None):
        super().__init__()
        check_count("head_dim", head_dim, 2)
        if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1):
            raise ShapeError(bad("base", "a finite number > 1", repr(base)))
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ShapeError(bad("fraction", "a number in (0, 1]", repr(fraction)))
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise ShapeError(bad("scaling", "a RopeScaling or None", type(scaling).__name__))
        rot = int(head_dim * fraction) // 2 * 2
        if rot < 2:
            raise ShapeError(bad("fraction", f"at least 2 rotated channels of head_dim={head_dim}", fraction))
        self.head_dim, self.rotated, self.base, self.scaling = head_dim, rot, float(base), scaling
        inv_freq, self.magnitude = _frequencies(rot, float(base), scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotated={self.rotated}, base={self.base:g}, scaling={self.scaling}"

    def angles(self, positions: torch.Tensor, dtype: torch.dtype):
        """``(cos, sin)`` of shape ``positions.shape + (rotated,)``, times the YaRN magnitude."""
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        ang = positions.to(cd)[..., None] * self.inv_freq.to(device=positions.device, dtype=cd)
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos() * self.magnitude, ang.sin() * self.magnitude

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ShapeError(bad("x", f"(B, H, N, {self.head_dim})", tuple(x.shape)))
        if positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise ShapeError(bad("positions", "an integer tensor", positions.dtype))
        if positions.shape not in ((x.shape[2],), (x.shape[0], x.shape[2])):
            raise ShapeError(
                bad("positions", f"({x.shape[2]},) or ({x.shape[0]}, {x.shape[2]})", tuple(positions.shape))
            )
        cos, sin = self.angles(positions, x.dtype)
        if cos.dim() == 3:  # (B, N, R): broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        r = self.rotated
        xr = x[..., :r].to(cos.dtype)
        half = r // 2
        rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
        out = (xr * cos + rot * sin).to(x.dtype)
        return out if r == self.head_dim else torch.cat((out, x[..., r:]), dim=-1)


def _frequencies(dim: int, base: float, s: RopeScaling | None):
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    if s is None:
        return inv, 1.0
    if s.kind == "linear":
        return inv / s.factor, 1.0
    if s.kind == "ntk":
        b = base * s.factor ** (dim / (dim - 2)) if dim > 2 else base
        return 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)), 1.0
    if s.kind == "llama3":
        lo_wave, hi_wave = s.original_max_len / s.low_freq_factor, s.original_max_len / s.high_freq_factor
        wave = 2 * math.pi / inv
        scaled = torch.where(wave > lo_wave, inv / s.factor, inv)
        smooth = (s.original_max_len / wave - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wave < hi_wave) & ~(wave > lo_wave)
        return torch.where(medium, smoothed, scaled), 1.0

    # yarn
    def corr(rot):
        return (dim * math.log(s.original_max_len / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = max(math.floor(corr(s.beta_fast)), 0), min(math.ceil(corr(s.beta_slow)), dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrap = 1 - ramp
    inv = (inv / s.factor) * (1 - extrap) + inv * extrap
    return inv, (0.1 * math.log(s.factor) + 1.0) if s.factor > 1 else 1.0
