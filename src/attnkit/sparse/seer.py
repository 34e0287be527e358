"""SeerAttention: a learnable block gate on pooled q and k, trained by self-distillation."""

from __future__ import annotations

import torch

from ..errors import PatternError, ShapeError, bad
from ._core import Selection, Selector, block_visibility, check_block, check_budget, check_count, expand_kv, pool
from .block_topk import _check_qk, select_blocks


class SeerGate(torch.nn.Module):
    r"""SeerAttention's AttnGate: block scores from pooled queries and keys.

    ``Q_I = W_q avg(q_I)``, ``K_J = W_k [max(k_J); min(k_J); avg(k_J)]`` (per head), and the gate is
    ``softmax_J(Q_I K_J^T / sqrt(d))``. ``W_q`` starts as the identity and ``W_k`` as ``[0; 0; I]``, so an untrained
    gate equals mean pooling (the training-free mode).
    """

    def __init__(self, heads: int, head_dim: int, gate_dim: int | None = None):
        super().__init__()
        d = gate_dim or head_dim
        self.heads, self.head_dim, self.gate_dim = heads, head_dim, d
        eye = torch.eye(head_dim, d)
        self.wq = torch.nn.Parameter(eye.expand(heads, head_dim, d).clone())
        wk = torch.zeros(heads, 3 * head_dim, d)
        wk[:, 2 * head_dim :] = eye
        self.wk = torch.nn.Parameter(wk)

    def forward(self, q, k, block: int, key_padding_mask=None) -> torch.Tensor:
        """Block logits ``(B, heads, nqb, nkb)`` (before the softmax)."""
        B, H, _, D = q.shape
        if (H, D) != (self.heads, self.head_dim):
            raise ShapeError(bad("q", f"{self.heads} heads of dim {self.head_dim}", f"{H} heads of dim {D}"))
        kx = expand_kv(k, H).float()
        qp = pool(q.float(), block)
        kp = torch.cat([pool(kx, block, h, key_padding_mask) for h in ("max", "min", "mean")], -1)
        qg = torch.einsum("bhid,hde->bhie", qp, self.wq)
        kg = torch.einsum("bhjd,hde->bhje", kp, self.wk)
        return qg @ kg.transpose(-1, -2) / self.gate_dim**0.5


class SeerAttention(Selector):
    r"""SeerAttention's block-sparse selection: the gate's top-k key blocks per query block.

    ``gate=None`` is the training-free mode (mean pooling, no parameters). With ``causal`` the diagonal block is
    always kept (our choice, so no query is left without keys; it counts toward ``budget``), and so are the first
    ``keep_first`` blocks (attention sinks) and the ``keep_local`` blocks before the diagonal (a local window).
    """

    paper = "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs"

    def __init__(
        self,
        gate: SeerGate | None = None,
        *,
        block_size: int = 64,
        budget: float | int = 0.125,
        keep_first: int = 0,
        keep_local: int = 0,
    ):
        check_block(block_size)
        check_budget(budget)
        if gate is not None and not isinstance(gate, SeerGate):
            raise PatternError(bad("gate", "a SeerGate or None", type(gate).__name__))
        check_count(keep_local, "keep_local")
        self.gate, self.block_size, self.budget, self.keep_first = gate, block_size, budget, keep_first
        self.keep_local = keep_local

    def __repr__(self):
        return f"SeerAttention(gate={'trained' if self.gate is not None else None}, block_size={self.block_size}, budget={self.budget})"  # noqa: E501

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        _check_qk(q, k)
        b = self.block_size
        if self.gate is None:
            s = pool(q.float(), b) @ expand_kv(pool(k.float(), b, valid=key_padding_mask), q.shape[1]).transpose(-1, -2)
        else:
            s = self.gate(q, k, b, key_padding_mask)
        return select_blocks(
            s, q.shape[2], k.shape[2], b, self.budget, causal, key_padding_mask, self.keep_first, self.keep_local
        )


def block_attention_target(q, k, block: int, causal: bool = True) -> torch.Tensor:
    """SeerAttention's ground truth: the dense attention map max-pooled over ``block x block`` tiles and
    renormalised over key blocks, ``(B, Hq, nqb, nkb)``; computed one query block at a time (O(N x block) memory)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    kx = expand_kv(k, H).float()
    nkb = -(-Nk // block)
    off = Nk - Nq
    rows = []
    for i0 in range(0, Nq, block):
        i1 = min(Nq, i0 + block)
        s = q[:, :, i0:i1].float() @ kx.transpose(-1, -2) * D**-0.5
        if causal:
            qi = off + torch.arange(i0, i1)[:, None]
            s = s.masked_fill(torch.arange(Nk)[None, :] > qi, float("-inf"))
        p = s.softmax(-1)
        pp = torch.zeros(B, H, i1 - i0, nkb * block)
        pp[..., :Nk] = p
        m = pp.view(B, H, i1 - i0, nkb, block).amax(-1).amax(2)
        rows.append(m / m.sum(-1, keepdim=True))
    return torch.stack(rows, 2)


def fit_gate(
    gate: SeerGate, samples, *, block_size: int = 64, steps: int = 200, lr: float = 1e-2, causal: bool = True
) -> list[float]:
    r"""Train ``gate`` by self-distillation: minimise ``KL(target || softmax(gate))`` per query block, where the
    target is the block max-pooled dense attention (:func:`block_attention_target`) of each ``(q, k)`` in
    ``samples``. The base model is untouched. Returns the loss per step (Adam)."""
    if not samples:
        raise PatternError(bad("samples", "a non-empty list of (q, k) pairs", samples))
    with torch.no_grad():
        targets = [block_attention_target(q, k, block_size, causal) for q, k in samples]
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        q, k = samples[step % len(samples)]
        t = targets[step % len(samples)]
        logits = gate(q, k, block_size)
        if causal:
            nqb, nkb = logits.shape[-2:]
            seen = block_visibility(nqb, nkb, block_size, q.shape[2], k.shape[2], True)
            logits = logits.masked_fill(~seen, float("-inf"))
        logp = logits.log_softmax(-1)
        loss = -(t * logp.masked_fill(t == 0, 0.0)).sum(-1).mean() + (t * t.clamp(min=1e-30).log()).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
