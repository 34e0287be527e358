"""Re-rotation of rotary (RoPE) keys and queries by a position shift.

RoPE rotates each pair of channels ``(x_i, x_{i + D/2})`` by the angle ``p * theta_i`` (``p`` the position,
``theta_i = base^{-2i/D}``; transformers' ``rotate_half`` layout). Rotations compose, ``R(a) R(b) = R(a + b)``,
so a key stored at position ``p`` is moved to position ``p'`` by rotating it by ``p' - p`` without knowing the
un-rotated key. This is what StreamingLLM's "positions within the cache" needs after eviction.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., T, D)`` by ``delta (..., T)`` positions (broadcast over leading dims); 0 is exact."""
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(device=x.device, dtype=torch.float32)
    angle = torch.cat((angle, angle), dim=-1)
    xf = x.to(torch.float32)
    return (xf * angle.cos() + _rotate_half(xf) * angle.sin()).to(x.dtype)


def find_inv_freq(model) -> torch.Tensor | None:
    """The ``inv_freq`` buffer of the model's rotary embedding (None if it has none, or a scaled variant)."""
    for name, module in model.named_modules():
        freq = getattr(module, "inv_freq", None)
        if isinstance(freq, torch.Tensor) and name.endswith("rotary_emb"):
            if float(getattr(module, "attention_scaling", 1.0)) != 1.0:
                return None  # the cos/sin carry a magnitude factor: a second rotation would apply it twice
            return freq.detach().clone()
    return None
