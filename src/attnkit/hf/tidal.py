r"""TidalDecode (Yang et al., *TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse
Attention*, 2024): a few *token selection* layers choose the positions every other layer attends at decode.

At a decode step (one query) of a model with layers :math:`0..L-1`:

- layers below ``start`` attend densely;
- a selection layer :math:`s` (``start``, and ``reselect`` when given) attends densely and, per query head
  :math:`h`, keeps the indices of its ``budget - 1`` largest logits over the previous keys plus the current
  token, :math:`S_h = \operatorname{top}_{b-1}\{q_h^\top k_{h,j} : j < t\} \cup \{t\}`;
- every other layer from ``start`` on attends only the keys of the latest selection,
  :math:`o_h = \operatorname{softmax}_{j \in S_h}(q_h^\top k_j / \sqrt d)\, V_{S_h}`: the same positions (not
  the same keys: each layer gathers its own keys and values at them), so the selection is paid in two layers
  and the others read ``budget`` entries instead of the whole cache.

Prefill (more than one query) is dense, as in the paper. Nothing is evicted: the whole cache stays, so
TidalDecode saves reads (decode time), not memory. Choices learned from the authors' code (never copied): the
current token is always selected, the selection is per query head (GQA groups gather their KV head's entries at
their own positions), the re-selection layer of their Llama-3-8B runs is layer 13 of 32, which
:func:`for_model` scales to the model's depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ShapeError, UnsupportedError, bad, check_count
from ..records import register
from .policy import POLICY_SUPPORTS, Policy, kv_tokens, resolve_budget


@dataclass(frozen=True)
class TidalDecode(Policy):
    """Position-persistent sparse decoding: see :mod:`attnkit.hf.tidal`.

    Args:
        budget: positions each head attends in the sparse layers (``int`` tokens, or a ``float`` fraction of the
            tokens seen); the current token is one of them.
        start: first layer that is not dense; it selects.
        reselect: a second selection layer (None: only ``start`` selects).
    """

    budget: int | float = 256
    start: int = 2
    reselect: int | None = None
    _selection: dict = field(default_factory=dict, compare=False, repr=False)
    name = "tidal_decode"

    def __post_init__(self):
        resolve_budget(self.budget, 1)
        check_count("start", self.start, 0)
        if self.reselect is not None and (check_count("reselect", self.reselect, 0) <= self.start):
            raise ShapeError(bad("reselect", f"a layer after start={self.start}", self.reselect))

    @classmethod
    def for_model(cls, model, budget: int | float = 256) -> TidalDecode:
        """Selection at layer 2 and at 13/32 of the depth (the paper's Llama-3-8B setting, scaled)."""
        layers = model.config.get_text_config().num_hidden_layers
        return cls(budget=budget, start=min(2, layers - 1), reselect=max(3, round(13 * layers / 32)))

    def selects(self, layer: int) -> bool:
        return layer == self.start or layer == self.reselect

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        B, Hq, Q, D = q.shape
        if Q != 1 or layer < self.start:
            return None
        Hkv, K = k.shape[1], k.shape[2]
        G = Hq // Hkv
        scale = D**-0.5 if scale is None else scale
        valid = (
            torch.ones(B, K, dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask.to(torch.bool)
        )
        kv_of = torch.arange(Hq, device=q.device) // G
        if self.selects(layer):
            logits = torch.einsum("bhd,bhkd->bhk", q[:, :, 0].float(), k[:, kv_of].float()) * scale
            logits = logits.masked_fill(~valid[:, None], float("-inf"))
            seen = int(valid.sum(1).max())
            n = min(resolve_budget(self.budget, seen), K)
            prev = logits[..., :-1].topk(n - 1, dim=-1).indices if n > 1 else logits[..., :0].long()
            idx = torch.cat([prev, torch.full((B, Hq, 1), K - 1, device=q.device, dtype=prev.dtype)], -1)
            self._selection["step"] = (K, B, idx, logits.gather(-1, idx).isfinite())
            p = torch.softmax(logits, -1)
            return torch.einsum("bhk,bhkd->bhd", p, v[:, kv_of].float())[:, :, None].to(q.dtype)
        got = self._selection.get("step")
        if got is None or got[0] != K or got[1] != B:
            raise UnsupportedError(
                bad("layer", f"a selection layer ({self.start}) run earlier in the same decode step", layer)
            )
        _, _, idx, ok = got
        bi = torch.arange(B, device=q.device)[:, None, None]
        ks, vs = k[bi, kv_of[None, :, None], idx].float(), v[bi, kv_of[None, :, None], idx].float()
        logits = torch.einsum("bhd,bhkd->bhk", q[:, :, 0].float(), ks) * scale
        p = torch.softmax(logits.masked_fill(~ok, float("-inf")), -1)
        return torch.einsum("bhk,bhkd->bhd", p, vs)[:, :, None].to(q.dtype)

    def describe(self):
        return f"tidal_decode(budget={self.budget}, start={self.start}, reselect={self.reselect})"


def _for_context(n, *, model=None, budget=0.25):
    if model is None:
        return TidalDecode(budget=kv_tokens(n, budget))
    return TidalDecode.for_model(model, budget=kv_tokens(n, budget))


register(
    "tidal_decode",
    family="E",
    kind="policy",
    paper="TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention (Yang et al., 2024)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=_for_context,
    summary="two selection layers choose top-k positions at decode; the other layers attend only those",
    source=TidalDecode,
)
