r"""Local Linear Attention ("Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention for
Test-Time Regression", Zuo et al., 2025).

In the test-time-regression view, softmax attention is the Nadaraya–Watson (local *constant*) estimator of the
value at the query from the (key, value) pairs, and linear attention a global linear regression. LLA fits a local
*linear* model around each query with the softmax kernel as weights:

.. math::
    w_{ij} = \mathrm{softmax}_j(s\, q_i\cdot k_j), \quad
    \bar k_i = \textstyle\sum_j w_{ij} k_j, \quad \bar v_i = \sum_j w_{ij} v_j,

    \Sigma^{kk}_i = \textstyle\sum_j w_{ij} (k_j - \bar k_i)(k_j - \bar k_i)^T, \quad
    \Sigma^{kv}_i = \sum_j w_{ij} (k_j - \bar k_i)(v_j - \bar v_i)^T,

    \mathrm{out}_i = \bar v_i + (q_i - \bar k_i)^T (\Sigma^{kk}_i + \lambda I)^{-1} \Sigma^{kv}_i

the intercept of the weighted least-squares fit of ``v`` on ``k - q_i``. The ridge ``lambda`` (``ridge``) is our
choice where the abstract is silent: it makes the solve well-posed when fewer keys than dimensions are visible,
and ``ridge -> inf`` recovers softmax attention exactly. This is the exact quadratic form (``O(N^2 D^2)`` work,
queries processed in blocks); the paper's FlashLLA kernel is not reproduced.
"""

from __future__ import annotations

import torch

from .. import reference as _ref
from ..errors import PatternError, bad
from ..records import register_function
from ._common import check_qkv

_BLOCK = 128  # queries per block: the (block, D, D) covariances stay small


def local_linear_attention(q, k, v, *, causal: bool = True, ridge: float = 1.0, scale: float | None = None):
    """``q`` ``(B, Hq, N, D)``, ``k`` / ``v`` ``(B, Hkv, M, D / Dv)`` (GQA; causal needs ``N == M``).
    Returns ``(B, Hq, N, Dv)`` in the dtype of ``q``."""
    dims = check_qkv(q, k, v, causal=causal, scale=scale)
    if not isinstance(ridge, (int, float)) or not ridge > 0:
        raise PatternError(bad("ridge", "a float > 0", repr(ridge)))
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    D, N, M = dims.head_dim, q.shape[2], dims.kv_len
    s = D**-0.5 if scale is None else scale
    kx, vx = (t.to(cd).repeat_interleave(dims.group, 1) for t in (k, v))
    qx = q.to(cd)
    kk = (kx[..., :, None] * kx[..., None, :]).flatten(-2)  # (B, H, M, D*D)
    kv = (kx[..., :, None] * vx[..., None, :]).flatten(-2)  # (B, H, M, D*Dv)
    eye = torch.eye(D, dtype=cd, device=q.device)
    outs = []
    for a in range(0, N, _BLOCK):
        b = min(N, a + _BLOCK)
        logits = qx[:, :, a:b] @ kx.transpose(-1, -2) * s
        if causal:
            fut = torch.arange(M, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None]
            logits = logits.masked_fill(fut, float("-inf"))
        w = torch.softmax(logits, -1)
        kbar, vbar = w @ kx, w @ vx
        skk = (w @ kk).unflatten(-1, (D, D)) - kbar[..., :, None] * kbar[..., None, :]
        skv = (w @ kv).unflatten(-1, (D, -1)) - kbar[..., :, None] * vbar[..., None, :]
        beta = torch.linalg.solve(skk + ridge * eye, skv)
        outs.append(vbar + ((qx[:, :, a:b] - kbar)[..., None, :] @ beta)[..., 0, :])
    return torch.cat(outs, 2).to(q.dtype)


register_function(
    "local_linear",
    paper="Local Linear Attention: An Optimal Interpolation of Linear and Softmax Attention (Zuo et al., 2025)",
    summary="softmax-weighted local linear regression per query (ridge 1); quadratic",
    supports={"gqa", "backward", "bf16", "causal"},
    fn=local_linear_attention,
    ref=_ref.local_linear_attention,
    kwargs={"causal": True, "ridge": 1.0},
)
