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
    """Rotate ``x (..., T, D)`` by ``delta (..., T)`` positions (broadcast over leading dims); 0 is exact.

    An integer ``delta`` with few distinct values (an eviction moves every kept key by the same few slots, a
    decode step's keys by one shift) takes the cosines and sines from a table of those values, not one per
    element: on SmolLM2's StreamingLLM cache, cos and sin over every kept key were a tenth of a decode step.
    """
    freq = inv_freq.to(device=x.device, dtype=torch.float32)
    cos = sin = None
    if not delta.is_floating_point() and delta.numel() >= 64:
        lo, hi = int(delta.min()), int(delta.max())
        if lo == hi == 0:
            return x
        if hi - lo < delta.numel() // 8:
            angle = torch.arange(lo, hi + 1, device=x.device, dtype=torch.float32)[:, None] * freq
            at = (delta - lo).long()
            cos, sin = angle.cos()[at], angle.sin()[at]
    if cos is None:
        angle = delta.to(torch.float32)[..., None] * freq
        cos, sin = angle.cos(), angle.sin()
    xf = x.to(torch.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]  # transformers' rotate_half pairs channel i with i + D/2
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def find_inv_freq(model) -> torch.Tensor | None:
    """The ``inv_freq`` buffer of the model's rotary embedding (None if it has none, or a scaled variant)."""
    for name, module in model.named_modules():
        freq = getattr(module, "inv_freq", None)
        if isinstance(freq, torch.Tensor) and name.endswith("rotary_emb"):
            if float(getattr(module, "attention_scaling", 1.0)) != 1.0:
                return None  # the cos/sin carry a magnitude factor: a second rotation would apply it twice
            return freq.detach().clone()
    return None
