"""Layouts and validation of the core call's arguments.

The kernel layout is ``(batch, heads, seq, dim)`` as in
:func:`torch.nn.functional.scaled_dot_product_attention`. Adapters for ``(batch, seq, heads, dim)`` live
here, at the edge, and never inside a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DeviceError, DTypeError, NonFiniteError, ShapeError, bad

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Dims:
    """Sizes of one attention call, after validation."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int
    q_offset: int

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.q_heads // self.kv_heads


def _desc(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, {t.dtype}, on {t.device}"


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    q_offset: int = 0,
    scale: float | None = None,
) -> Dims:
    """Check the core call's tensors and return their sizes.

    Raises :class:`~attnkit.errors.ShapeError`, :class:`~attnkit.errors.DTypeError` or
    :class:`~attnkit.errors.DeviceError`; each message names the argument.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(bad(name, "a torch.Tensor", type(t).__name__))
        if t.dim() != 4:
            raise ShapeError(bad(name, "a 4-D tensor (batch, heads, seq, dim)", _desc(t)))
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(bad(name, "a floating dtype (float32, bfloat16, float16, float64)", _desc(t)))
        if any(s == 0 for s in t.shape):
            raise ShapeError(bad(name, "every size >= 1", _desc(t)))
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise DeviceError(bad(name, f"the device of q ({q.device})", _desc(t)))
        if t.dtype != q.dtype:
            raise DTypeError(bad(name, f"the dtype of q ({q.dtype})", _desc(t)))
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ShapeError(bad("k, v", f"batch size {B} (that of q)", f"k {tuple(k.shape)}, v {tuple(v.shape)}"))
    if k.shape[1] != v.shape[1]:
        raise ShapeError(bad("v", f"{k.shape[1]} heads (those of k)", _desc(v)))
    if k.shape[2] != v.shape[2]:
        raise ShapeError(bad("v", f"sequence length {k.shape[2]} (that of k)", _desc(v)))
    if k.shape[3] != D:
        raise ShapeError(bad("k", f"head dim {D} (that of q)", _desc(k)))
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ShapeError(bad("k", f"a number of heads that divides q's {Hq} heads (grouped-query attention)", _desc(k)))
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ShapeError(bad("q_offset", "an int >= 0", repr(q_offset)))
    Nk = k.shape[2]
    if q_offset == 0 and Nq > Nk:
        raise ShapeError(bad("q", f"at most kv_len = {Nk} queries (queries are positions among the keys)", _desc(q)))
    if q_offset + Nq > Nk:
        raise ShapeError(
            bad(
                "q_offset",
                f"q_offset + q_len <= kv_len ({Nk}), i.e. queries are the last ones of the keys",
                f"q_offset={q_offset} with q_len={Nq}",
            )
        )
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or not scale > 0
    ):
        raise ShapeError(bad("scale", "a positive finite float or None", repr(scale)))
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
            raise DTypeError(
                bad("key_padding_mask", "a bool tensor (True = key is real)", getattr(kpm, "dtype", type(kpm)))
            )
        if tuple(kpm.shape) != (B, Nk):
            raise ShapeError(bad("key_padding_mask", f"shape (batch, kv_len) = ({B}, {Nk})", tuple(kpm.shape)))
        if kpm.device != q.device:
            raise DeviceError(bad("key_padding_mask", f"the device of q ({q.device})", kpm.device))
    return Dims(B, Hq, Hkv, Nq, Nk, D, v.shape[3], q_offset)


def bnhd_to_bhnd(x: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, heads, dim)`` -> ``(batch, heads, seq, dim)`` (a view)."""
    if x.dim() != 4:
        raise ShapeError(bad("x", "a 4-D tensor (batch, seq, heads, dim)", tuple(x.shape)))
    return x.transpose(1, 2)


def spatial_to_bhnd(x: torch.Tensor) -> torch.Tensor:
    """``(batch, *spatial, heads, dim)`` (NATTEN's heads-last layout) -> ``(batch, heads, prod(spatial), dim)``."""
    if x.dim() < 4:
        raise ShapeError(bad("x", "(batch, *spatial, heads, dim) with 1 to 3 spatial dims", tuple(x.shape)))
    B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(B, -1, H, D).transpose(1, 2)


def bhnd_to_spatial(x: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`spatial_to_bhnd`."""
    B, H, _, D = x.shape
    return x.transpose(1, 2).reshape(B, *spatial, H, D)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf. One sum in the common case (a sum is finite only if every term is;
    in its own dtype it is 10-20x cheaper than in float32 for bf16/fp16). Large finite values can overflow it
    (fp16 saturates at 65504), so then the row sums (one pass, a small result), and the exact test last."""
    if t.device.type == "meta":
        return True
    with torch.no_grad():
        return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t.sum(-1)).all()) or bool(torch.isfinite(t).all())


def _first_bad(t: torch.Tensor, where: torch.Tensor | None = None) -> tuple | None:
    """The index (a tuple) of the first NaN or inf of ``t`` where ``where`` is True, or None."""
    bad_at = ~torch.isfinite(t.detach())
    if where is not None:
        bad_at &= where
    hit = bad_at.flatten().nonzero()
    if not len(hit):
        return None
    return tuple(int(i) for i in torch.unravel_index(hit[0, 0], t.shape))


def _nonfinite(name: str, t: torch.Tensor, at: tuple, what: str) -> NonFiniteError:
    return NonFiniteError(
        bad(
            name,
            f"finite values{what} (attention is undefined with NaN or inf)",
            f"{float(t.detach()[at])} at index {at}",
        )
    )


def check_finite(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one non-finite rule of every entry point: NaN or inf in ``q``, or in ``k`` or ``v`` at a key that is
    not padding, raises :class:`~attnkit.errors.NonFiniteError` naming the tensor and the first bad index.

    A padded key's contents never matter: where a padded key holds NaN or inf, ``k`` and ``v`` come back with
    those entries zeroed (copies; no kernel multiplies 0 by NaN), else unchanged. ``k`` and ``v`` are
    ``(B, H, N, D)`` and ``key_padding_mask`` is ``(B, N)`` (True = real). Cost: one sum per tensor on finite
    input, nothing on ``meta`` tensors. That was 5-12% of a 16k sliding-window forward (``BENCHMARKS.md``), so
    :func:`attnkit.attention` runs it on the output's failure instead where the kernel carries every NaN that
    reaches a row into the row's output (``carries_nonfinite`` of each backend).
    """
    if q.device.type == "meta":
        return k, v
    if not all_finite(q):
        raise _nonfinite("q", q, _first_bad(q), "")
    real = None if key_padding_mask is None else key_padding_mask[:, None, :, None]
    out = []
    for name, t in (("k", k), ("v", v)):
        if not all_finite(t):
            at = _first_bad(t, real)
            if at is not None:
                raise _nonfinite(name, t, at, " at every key that is not padding")
            t = torch.where(real, t, torch.zeros((), dtype=t.dtype, device=t.device))
        out.append(t)
    return out[0], out[1]
