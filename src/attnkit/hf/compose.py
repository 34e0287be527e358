r"""Interventions on top of a KV-cache policy: :class:`Steered` composes a :class:`~attnkit.hf.Steer` with any
policy, evicting ones included (H2O, SnapKV, TOVA, StreamingLLM, ...).

.. code-block:: python

    policy = Steered(KVCompress(H2O(), budget=256), Steer((PASTA(span=(40, 80), heads=heads),)))
    with attnkit.hf.applied(model, policy):
        out = model.generate(ids, max_new_tokens=32)

The KV policy decides what stays in the cache (and what its scorer observes); the interventions change the
attention over what stays. Spans and query positions keep their meaning, token indices of the padded batch:
each cached entry carries its real-token position :math:`t`, and its index is :math:`t + \text{pad}_b` (the
row's left padding). An intervention sees the attention row over every index seen so far, with evicted entries
at probability 0, so a bias on a span or a probability edit acts on the entries of the span still cached:

- temperatures multiply the logits of their heads (:class:`~attnkit.hf.LogNScaling` and
  :class:`~attnkit.hf.SSMax` count :math:`n` as the tokens seen, padding included, not the entries kept);
- biases are read at each entry's index;
- edits (ACT, VAR, the head perturbation, knockouts) run on the scattered row and are gathered back; "the
  first real token" and "the number of tokens" are those of the cache (a sink evicted is no sink).

What the scorer observes is the attention after the interventions (the model attends that way). Every step runs
the explicit softmax per KV head, chunked over queries, so a steered prefill costs the explicit path's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DTypeError, UnsupportedError, bad
from ._rope import rerotate
from .policy import Policy
from .steer import Steer

_CHUNK = 1 << 23  # logits per chunk


@dataclass(frozen=True)
class Steered(Policy):
    """``policy`` (what the cache keeps) with ``steer``'s interventions applied to the attention."""

    policy: Policy
    steer: Steer

    def __post_init__(self):
        if not isinstance(self.policy, Policy) or isinstance(self.policy, Steer):
            raise DTypeError(bad("policy", "an attnkit.hf KV policy (not a Steer)", type(self.policy).__name__))
        if not isinstance(self.steer, Steer):
            raise DTypeError(bad("steer", "an attnkit.hf.Steer", type(self.steer).__name__))

    @property
    def name(self):
        return f"steered_{self.policy.name}"

    @property
    def rerotate(self):
        return self.policy.rerotate

    @property
    def compresses(self):
        return self.policy.compresses

    def describe(self):
        return f"{self.policy.describe()} + {self.steer.describe()}"

    def pattern(self, layer, q_heads, kv_heads, seen, q_len):
        return self.policy.pattern(layer, q_heads, kv_heads, seen, q_len)

    def observes(self, q_len):
        return self.policy.observes(q_len)

    def observes_at(self, layer, q_len):
        return self.policy.observes_at(layer, q_len)

    def scorer_at(self, layer):
        return self.policy.scorer_at(layer)

    def keep(self, layer, view, q_len):
        return self.policy.keep(layer, view, q_len)

    def merge_at(self, layer):
        return self.policy.merge_at(layer)

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        """Without a cache of attnkit's (``use_cache=False``, or a policy that keeps everything): the Steer."""
        if self.policy.pattern(layer, q.shape[1], k.shape[1], k.shape[2], q.shape[2]) is not None:
            raise UnsupportedError(
                bad(
                    "policy", "a KV policy without a prefill pattern when composed with a Steer", self.policy.describe()
                )
            )
        return self.steer.attend(layer, q, k, v, key_padding_mask, q_offset, scale, causal)

    def attend_cached(self, layer, q, lay, scale, causal, pat, observe, inv_freq):
        """One step over a :class:`~attnkit.hf.HeadwiseCache` layer ``lay`` (after its update): ``(out, masses)``."""
        B, Hq, Q, D = q.shape
        Hkv = lay.kv_heads
        G = Hq // Hkv
        scale = D**-0.5 if scale is None else scale
        width = lay.seen  # indices seen so far, padding included
        pad = width - lay.real  # (B,) left padding of each row
        q_idx = width - Q + torch.arange(Q, device=q.device)
        temps, biases, edits = self.steer.combined(layer, Hq, width, Q, q.device)
        out = torch.empty(B, Hq, Q, lay.v[0].shape[-1], dtype=q.dtype, device=q.device)
        masses = []
        for h in range(Hkv):
            heads = torch.arange(h * G, (h + 1) * G, device=q.device)
            qh = q[:, heads]
            if lay.q_delta and lay.q_delta[h] is not None:
                qh = rerotate(qh, lay.q_delta[h][:, None, :], inv_freq)
            if temps is not None:
                qh = qh * temps[heads].to(qh.dtype).view(1, G, Q, 1)
            kpos, ok = lay.pos[h].long(), lay.valid[h]
            col = torch.where(ok, kpos + pad[:, None], torch.zeros_like(kpos))  # (B, T) index of each entry
            kt, vh = lay.k[h].float().transpose(-1, -2)[:, None], lay.v[h].float()[:, None]
            T = kpos.shape[1]
            mass = torch.zeros(B, T, dtype=torch.float32, device=q.device) if observe else None
            step = max(1, _CHUNK // max(1, B * G * max(T, width)))
            present = torch.zeros(B, width, dtype=torch.bool, device=q.device).scatter_(1, col, ok)
            for a in range(0, Q, step):
                e = min(Q, a + step)
                s = torch.matmul(qh[:, :, a:e].float(), kt) * scale  # (B, G, c, T)
                if biases is not None:
                    s = s + biases[heads].float()[:, col].permute(1, 0, 2)[:, :, None, :]
                allowed = ok[:, None, None, :]
                qp = lay.q_pos[:, None, a:e, None].long()
                if causal:
                    allowed = allowed & (kpos[:, None, None, :] <= qp)
                if pat is not None:
                    hh = heads[None, :, None, None]
                    allowed = allowed & pat.mask_mod(torch.zeros((), dtype=torch.long), hh, qp, kpos[:, None, None, :])
                s = s.masked_fill(~allowed, float("-inf"))
                top = s.amax(-1, keepdim=True)
                p = torch.exp(s - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
                p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                if edits:
                    idx = col[:, None, None, :].expand_as(p)
                    full = torch.zeros(*p.shape[:-1], width, dtype=p.dtype, device=p.device).scatter_add_(-1, idx, p)
                    for x in edits:
                        got = x.edit(layer, full, heads, q_idx[a:e], present)
                        if got is not None:
                            full = got
                    p = full.gather(-1, idx) * ok[:, None, None, :]
                out[:, heads, a:e] = torch.matmul(p, vh).to(q.dtype)
                if observe and e > Q - observe:
                    mass += p[:, :, max(a, Q - observe) - a :].sum(dim=(1, 2))
            masses.append(mass)
        return out, masses
