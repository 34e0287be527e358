"""``reference``: the float64 oracle (:mod:`attnkit.reference`) as a backend, for tests; ``auto`` never picks it.
The result is cast back to the dtype of ``q``."""

from __future__ import annotations

from .. import reference as _oracle
from ..errors import memory_budget
from .request import Request


def carries_nonfinite(req: Request) -> bool:
    """No: with a score mod or a normaliser the oracle, like the kernels, treats a non-finite logit as masked;
    attnkit.api checks the inputs before it (the oracle is slow anyway)."""
    return False


def why_not(req: Request) -> str | None:
    d = req.dims
    # The oracle holds float64 scores, weights and a mask per (batch, head, query, key).
    need = 17 * d.batch * d.q_heads * d.q_len * d.kv_len
    if need > memory_budget():
        return (
            f"the float64 oracle needs {need / 2**20:.1f} MiB for its N x N scores, over the memory budget of "
            f"{memory_budget() / 2**20:.1f} MiB (ATTNKIT_MEMORY_BUDGET); use backend='auto'"
        )
    return None


def run(req: Request):
    if req.selection is not None:
        res = _oracle.selected_attention(
            req.q,
            req.k,
            req.v,
            req.selection,
            causal=req.causal,
            key_padding_mask=req.key_padding_mask,
            return_lse=req.return_lse,
            scale=req.scale,
        )
        out, lse = res if req.return_lse else (res, None)
        return out.to(req.q.dtype), lse
    res = _oracle.attention(
        req.q,
        req.k,
        req.v,
        pattern=req.pattern,
        score=req.score,
        scale=req.scale,
        key_padding_mask=req.key_padding_mask,
        q_offset=req.q_offset,
        return_lse=req.return_lse,
        normalizer=req.normalizer,
    )
    if req.return_lse:
        return res[0].to(req.q.dtype), res[1]
    return res.to(req.q.dtype), None
