"""Routing Transformer: online k-means over queries and keys, attention inside each cluster."""

from __future__ import annotations

import torch

from ..errors import PatternError, ShapeError, bad, check_memory
from ..layout import BlockLayout, TokenSelect, ceil_div
from ..records import register
from ._core import Selection, Selector, check_budget, expand_kv


class KMeansRouting(Selector, torch.nn.Module):
    r"""Routing Transformer's content-based sparse attention.

    Queries and keys are unit-normalised and assigned to the nearest of ``num_clusters`` centroids shared by
    queries and keys (per head); query ``i`` attends to the keys of its own cluster, and with ``causal`` only to
    those at or before it:

    .. math:: S(i) = \{ j : c(k_j) = c(q_i),\ j \le i \}, \qquad c(x) = \arg\max_\mu\ \hat x \cdot \mu

    The centroids are a buffer ``(heads, num_clusters, head_dim)``, initialised from ``seed``. In training mode
    (``.train()``) each call updates them by mini-batch k-means: ``mu <- decay * mu + (1 - decay) * mean of the
    unit vectors assigned to mu``, renormalised (the paper's exponential moving average). With one cluster
    every key is selected (exact). Tokens are sorted by (cluster, position) so each cluster is a contiguous run
    the tiled kernel computes; a query whose cluster has no visible key gets 0 (the paper adds local heads for
    that; compose with a window pattern in the model).

    Args:
        heads, head_dim: shape of the query heads the centroids serve.
        num_clusters: ``C``; the expected density is about ``1 / C``.
        block_size: tile of the kernel over the sorted tokens.
    """

    granularity = "token"
    paper = "Efficient Content-Based Sparse Attention with Routing Transformers"

    def __init__(
        self,
        heads: int,
        head_dim: int,
        num_clusters: int = 8,
        *,
        decay: float = 0.999,
        block_size: int = 64,
        seed: int = 0,
    ):
        torch.nn.Module.__init__(self)
        for name, val in (
            ("heads", heads),
            ("head_dim", head_dim),
            ("num_clusters", num_clusters),
            ("block_size", block_size),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise PatternError(bad(name, "an int >= 1", repr(val)))
        if not 0.0 <= decay < 1.0:
            raise PatternError(bad("decay", "a float in [0, 1)", decay))
        check_memory("KMeansRouting centroids", 4 * heads * num_clusters * head_dim, "use fewer heads or clusters")
        g = torch.Generator().manual_seed(seed)
        mu = torch.nn.functional.normalize(torch.randn(heads, num_clusters, head_dim, generator=g), dim=-1)
        self.register_buffer("centroids", mu)
        self.heads, self.head_dim, self.num_clusters = heads, head_dim, num_clusters
        self.decay, self.block_size = decay, block_size

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, num_clusters={self.num_clusters}, decay={self.decay}"

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Cluster of each token of ``x`` ``(B, heads, N, head_dim)`` -> ``(B, heads, N)`` long."""
        xn = torch.nn.functional.normalize(x.float(), dim=-1)
        return torch.einsum("bhnd,hcd->bhnc", xn, self.centroids).argmax(-1)

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """One mini-batch k-means step on the unit queries and keys (both assigned to the current centroids)."""
        x = torch.nn.functional.normalize(torch.cat([q, k], 2).float(), dim=-1)
        c = self.assign(x)
        onehot = torch.nn.functional.one_hot(c, self.num_clusters).float()  # (B, H, N, C)
        sums = torch.einsum("bhnc,bhnd->hcd", onehot, x)
        counts = onehot.sum((0, 2))[..., None]
        seen = counts > 0
        mean = sums / counts.clamp(min=1)
        new = torch.where(seen, self.decay * self.centroids + (1 - self.decay) * mean, self.centroids)
        self.centroids.copy_(torch.nn.functional.normalize(new, dim=-1))

    def select(self, q, k, v=None, *, causal=True, key_padding_mask=None) -> Selection:
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        if (H, D) != (self.heads, self.head_dim):
            raise ShapeError(bad("q", f"{self.heads} heads of dim {self.head_dim}", f"{H} heads of dim {D}"))
        kx = expand_kv(k, H)
        if self.training:
            self.update(q, kx)
        cq, ck = self.assign(q), self.assign(kx)
        if key_padding_mask is not None:
            ck = torch.where(key_padding_mask[:, None, :], ck, self.num_clusters)  # padding joins no cluster
        off = Nk - Nq if causal else 0
        qpos = (off + torch.arange(Nq)).expand(B, H, Nq)
        kpos = torch.arange(Nk).expand(B, H, Nk)
        # Sort by cluster, then position: keys are stable-sorted by cluster from position order.
        q_order = torch.argsort(cq, dim=-1, stable=True)
        k_order = torch.argsort(ck, dim=-1, stable=True)
        cqs, cks = cq.gather(-1, q_order), ck.gather(-1, k_order)
        qps, kps = qpos.gather(-1, q_order), kpos.gather(-1, k_order)
        b = self.block_size
        nqb, nkb = ceil_div(Nq, b), ceil_div(Nk, b)

        def ranges(lab, pos, n, nb, fill_lo, fill_hi):
            pad = torch.full((B, H, nb * b), fill_lo, dtype=torch.long)
            pad[..., :n] = lab
            lo = pad.view(B, H, nb, b).amin(-1)
            pad[..., n:] = fill_hi
            hi = pad.view(B, H, nb, b).amax(-1)
            pp = torch.full((B, H, nb * b), fill_lo, dtype=torch.long)
            pp[..., :n] = pos
            return lo, hi, pp.view(B, H, nb, b)

        C = self.num_clusters
        qlo, qhi, qpp = ranges(cqs, qps, Nq, nqb, C + 1, -1)
        klo, khi, kpp = ranges(cks, kps, Nk, nkb, C + 1, -1)
        # A tile can hold a pair when the cluster ranges of its query and key blocks overlap (sorted labels),
        # and, causal, when some key position precedes some query position.
        qlo = torch.minimum(qlo, qhi)
        blocks = (qlo[..., :, None] <= khi[..., None, :]) & (klo[..., None, :] <= qhi[..., :, None])
        if causal:
            kmin = kpp.masked_fill(kpp > Nk, Nk).amin(-1)
            qmax = qpp.masked_fill(qpp > Nk + Nq, -1).amax(-1)
            blocks &= kmin[..., None, :] <= qmax[..., :, None]
        select = TokenSelect(
            labels=(cqs.reshape(B * H, Nq), cks.reshape(B * H, Nk)),
            positions=(qps.reshape(B * H, Nq), kps.reshape(B * H, Nk)) if causal else None,
        )
        layout = BlockLayout.from_blocks(blocks, Nq, Nk, b, causal=False, select=select)
        sizes = torch.nn.functional.one_hot(ck.clamp(max=C - 1), C).sum(2).float()
        return Selection(
            layout=layout,
            q_order=q_order,
            k_order=k_order,
            q_len=Nq,
            kv_len=Nk,
            padding_applied=True,
            stats={"cluster_size_max": int(sizes.max()), "cluster_size_mean": float(sizes.mean())},
        )


register(
    "routing_kmeans",
    family="B",
    kind="selector",
    paper=KMeansRouting.paper,
    exact=False,
    supports={"gqa", "backward", "bf16", "padding", "causal", "trainable"},
    factory=lambda n, *, budget=0.125, heads=4, kv_heads=2, head_dim=16, block=64: KMeansRouting(
        heads, head_dim, max(1, round(1 / check_budget(budget))), block_size=block
    ),
    summary="online k-means over unit q and k, attention inside each cluster (1/budget clusters)",
    source=KMeansRouting,
)
