r"""TPLA: tensor-parallel latent attention (Tang et al., 2025), simulated on one device.

*This is a single-device simulation*: the ``S`` tensor-parallel shards are a tensor dimension, the all-reduce is
a sum over it, and nothing is distributed. It reproduces TPLA's arithmetic (what a model computes when its MLA
layers decode under TPLA), not its speed-up, which needs ``S`` devices.

Under ordinary tensor parallelism every device needs the whole MLA latent ``c`` (``r`` values per token) for its
heads. TPLA splits the latent (and each head's latent-space input dimension) into ``S`` slices: device ``s`` caches
``c^{(s)}`` (``r/S`` values) and the RoPE key ``k^R`` (``d_R``), every head attends on every device with its own
softmax over its slice, and the outputs are summed (all-reduce):

.. math::
    c^{(s)}_j = \mathrm{RMSNorm}\big((R\,W_{DKV} x_j)^{(s)}\big),\qquad
    s^{(s)}_{h,ij} = \frac{(W^{(s)\top}_{UK,h} q^C_{h,i})\cdot c^{(s)}_j + \mathrm{rope}(q^R_{h,i})\cdot k^R_j}
    {\sqrt{d_C + d_R}},\\
    o_{h,i} = \sum_{s=1}^{S} W^{(s)}_{UV,h} \sum_j \mathrm{softmax}_j\big(s^{(s)}_{h,ij}\big)\, c^{(s)}_j

``R`` is an orthogonal ``r x r`` transform applied before slicing (:meth:`TensorParallelLatentAttention.from_mla`
folds it into the weights: ``W_DKV <- R W_DKV``, ``W_UK, W_UV <- W diag(gamma) R^T`` with the latent norm's gain
``gamma``; the transform alone changes nothing, since ``RMS(Rc) = RMS(c)``). The normalised Hadamard transform
spreads every direction's energy over all shards, so each shard's own RMS is close to the global one and each
shard's partial logit is a fair share of the full logit: that is the "cross-shard interference" the paper
reduces.

Where TPLA and MLA agree (tested): with ``S = 1`` TPLA is MLA exactly (any orthogonal ``R``); the prefill of a
TPLA-served model may run as MLA (the same weights), which is how the paper keeps MLA-style prefill. With
``S > 1`` it is an approximation of the MLA it came from.

Choices where the abstract is silent (ours): the RoPE key is replicated on every shard (it is small,
``d_R << r``) and enters every shard's logits whole; shard logits are not rescaled; the per-shard RMS norm has
no gain of its own (the gain is folded into the up-projections); ``R`` is Sylvester's normalised Hadamard
matrix (``kv_lora_rank`` must be a power of 2) or the identity (``transform="none"``); PCA is not offered.
"""

from __future__ import annotations

import math

import torch

from ..errors import ShapeError, bad, check_count
from ..records import register
from ..reference.mla import tpla_attention
from .mla import MultiheadLatentAttention

TRANSFORMS = ("hadamard", "none")


def hadamard(n: int, *, dtype=torch.float64) -> torch.Tensor:
    """Sylvester's ``n x n`` Hadamard matrix divided by ``sqrt(n)`` (orthogonal); ``n`` a power of 2."""
    check_count("n", n, 1)
    if n & (n - 1):
        raise ShapeError(bad("kv_lora_rank", "a power of 2 for the Hadamard transform", n))
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


class TensorParallelLatentAttention(MultiheadLatentAttention):
    """TPLA over ``shards`` latent slices, simulated on one device (see the module docstring).

    Same arguments as :class:`MultiheadLatentAttention` plus ``shards`` (a divisor of ``kv_lora_rank``); always
    computes in the absorbed (latent-space) form. Build one from a trained MLA with :meth:`from_mla`.
    ``shard_bytes_per_token``: what one device's cache holds per token (``(r/S + d_R) * element_size``).
    """

    def __init__(self, dim, heads, *, shards: int = 2, **kw):
        kw.pop("mode", None)
        super().__init__(dim, heads, mode="absorb", **kw)
        check_count("shards", shards, 1)
        if self.kv_lora_rank % shards:
            raise ShapeError(bad("shards", f"a divisor of kv_lora_rank={self.kv_lora_rank}", shards))
        self.shards = shards

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shards={self.shards}"

    @classmethod
    def from_mla(cls, mla: MultiheadLatentAttention, *, shards: int = 2, transform: str = "hadamard"):
        """TPLA with ``mla``'s weights, the orthogonal ``transform`` folded in (module docstring)."""
        if transform not in TRANSFORMS:
            raise ShapeError(bad("transform", f"one of {TRANSFORMS}", repr(transform)))
        r = mla.kv_lora_rank
        new = cls(
            mla.dim,
            mla.heads,
            shards=shards,
            kv_lora_rank=r,
            qk_nope_dim=mla.qk_nope_dim,
            qk_rope_dim=mla.qk_rope_dim,
            v_dim=mla.v_dim,
            q_lora_rank=mla.q_lora_rank,
            rope_base=mla.rotary.base if mla.rotary is not None else 10000.0,
            causal=mla.causal,
            kv_norm=mla.kv_norm,
            backend=mla.backend,
        )
        dt = mla.kv_b_proj.weight.dtype
        new = new.to(dtype=dt, device=mla.kv_b_proj.weight.device)
        new.load_state_dict(mla.state_dict())
        R = hadamard(r) if transform == "hadamard" else torch.eye(r, dtype=torch.float64)
        R = R.to(mla.kv_b_proj.weight.device)
        with torch.no_grad():
            a = mla.kv_a_proj_with_mqa.weight.double()
            new.kv_a_proj_with_mqa.weight.copy_(torch.cat((R @ a[:r], a[r:]), 0).to(dt))
            b = mla.kv_b_proj.weight.double()
            if mla.kv_a_layernorm is not None:
                b = b * mla.kv_a_layernorm.weight.double()
                new.kv_a_layernorm.weight.fill_(1.0)
            new.kv_b_proj.weight.copy_((b @ R.T).to(dt))
        return new

    @property
    def shard_bytes_per_token(self) -> int:
        return (self.kv_lora_rank // self.shards + self.qk_rope_dim) * self.kv_a_proj_with_mqa.weight.element_size()

    def latent(self, x, positions):
        kv = self.kv_a_proj_with_mqa(x)
        r, S = self.kv_lora_rank, self.shards
        c, kr = kv[..., :r], kv[..., r:]
        if self.kv_a_layernorm is not None:  # each shard normalises its own slice
            B, N, _ = c.shape
            cs = c.reshape(B, N, S, r // S)
            cs = cs * torch.rsqrt(cs.pow(2).mean(-1, keepdim=True) + self.eps)
            c = cs.reshape(B, N, r) * self.kv_a_layernorm.weight
        if self.rotary is not None:
            kr = self.rotary(kr[:, None], positions)[:, 0]
        return c, kr

    def _absorbed(self, q_nope, q_rope, c, kr, kv, kpm, start):
        w_uk, w_uv = self.up_weights()  # (H, d_C, r), (H, d_v, r)
        B, H, N, _ = q_nope.shape
        L, S = c.shape[1], self.shards
        n = self.kv_lora_rank // S
        q_lat = torch.einsum("bhnd,hdr->bhnr", q_nope, w_uk).reshape(B, H, N, S, n).permute(0, 3, 1, 2, 4)
        q = torch.cat((q_lat, q_rope[:, None].expand(B, S, H, N, self.qk_rope_dim)), -1)
        cs = c.reshape(B, L, S, n).permute(0, 2, 1, 3)  # (B, S, L, n)
        k = torch.cat((cs, kr[:, None].expand(B, S, L, self.qk_rope_dim)), -1)
        mask = None if kpm is None else kpm[:, None].expand(B, S, L).reshape(B * S, L)
        o = self.latent_attention(
            q.reshape(B * S, H, N, -1), k.reshape(B * S, 1, L, -1), cs.reshape(B * S, 1, L, n), mask, start
        ).reshape(B, S, H, N, n)
        return torch.einsum("bshnr,hdsr->bhnd", o, w_uv.reshape(H, -1, S, n))  # the all-reduce: sum over shards

    def reference(self, x, *, dtype=torch.float64, key_padding_mask=None, positions=None, **_ignored):
        """The naive TPLA oracle on this layer's weights cast to ``dtype`` (no cache)."""
        return tpla_attention(x, shards=self.shards, **self.oracle_kw(dtype, key_padding_mask, positions))


register(
    "tpla",
    family="D",
    kind="layer",
    paper="TPLA: Tensor Parallel Latent Attention for Efficient Disaggregated Prefill & Decode Inference (2025)",
    exact=False,
    supports={"causal", "decode", "backward", "bf16", "padding"},
    factory=lambda n, *, dim=64, heads=4, shards=2: TensorParallelLatentAttention.from_mla(
        MultiheadLatentAttention(dim, heads, kv_lora_rank=32, qk_nope_dim=16, qk_rope_dim=8, v_dim=16), shards=shards
    ),
    summary="MLA decode with the latent split over tensor-parallel shards after a Hadamard rotation (simulated)",
    source=TensorParallelLatentAttention,
)
