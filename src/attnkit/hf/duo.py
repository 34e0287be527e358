"""DuoAttention: retrieval heads keep the full cache, streaming heads keep sinks plus a recent window.

Xiao et al., *DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads* (2024).
Which heads are which comes from a short optimisation with the model's weights frozen: every (layer, KV head)
gets a gate ``alpha`` in [0, 1] that mixes full and streaming attention,
``out = alpha * full + (1 - alpha) * streaming``, trained to keep the model's last hidden states on synthetic
passkey data (a distillation loss) while an L1 penalty pushes the gates to 0. Heads with the largest gates
are retrieval heads. :func:`calibrate` runs it (``attnkit calibrate --method duo``) and saves the gates.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..api import attention as _attention
from ..errors import ShapeError, bad, check_count
from ..patterns.base import PerHead
from ..patterns.causal import Causal
from ..records import register
from . import artifacts
from .policy import POLICY_SUPPORTS, Policy, keep_recent, kv_tokens
from .streaming import sinks_and_window

METHOD = "duo_attention"


@dataclass(frozen=True)
class DuoAttention(Policy):
    """Per KV head: full cache (retrieval) or ``sinks + recent`` entries (streaming).

    Args:
        gates: ``(layers, kv_heads)`` nested tuples of calibrated gate values (see :func:`calibrate`).
        retrieval: fraction of the KV heads, those with the largest gates, that keep everything.
        sinks, recent: what a streaming head keeps. The prefill of a streaming head computes the same
            pattern (sinks plus window), as in the paper; retrieval heads are dense.

    :meth:`for_budget` picks ``retrieval`` so that the cache holds ``budget * length`` entries per head on
    average at ``length`` tokens.
    """

    gates: tuple
    retrieval: float = 0.25
    sinks: int = 16
    recent: int = 240
    name = "duo_attention"

    def __post_init__(self):
        check_count("sinks", self.sinks, 0)
        check_count("recent", self.recent, 1)
        if not 0.0 <= self.retrieval <= 1.0:
            raise ShapeError(bad("retrieval", "a fraction in [0, 1]", self.retrieval))
        object.__setattr__(self, "gates", tuple(tuple(float(x) for x in row) for row in self.gates))
        g = torch.tensor(self.gates)
        n = int(round(self.retrieval * g.numel()))
        full = torch.zeros(g.numel(), dtype=torch.bool)
        if n:
            full[g.flatten().topk(n).indices] = True
        object.__setattr__(self, "_full", full.view(g.shape))

    @classmethod
    def for_budget(cls, gates, budget: float, length: int, sinks: int = 16, recent: int = 240) -> DuoAttention:
        stream = sinks + recent
        frac = 1.0 if length <= stream else (budget * length - stream) / (length - stream)
        g = torch.tensor(gates)
        # round down to whole heads so the budget is never exceeded
        frac = max(0.0, min(1.0, math.floor(frac * g.numel()) / g.numel()))
        return cls(gates=gates, retrieval=frac, sinks=sinks, recent=recent)

    @classmethod
    def load(cls, model, path=None, **kwargs) -> DuoAttention:
        """From a calibration file (default: the one attnkit ships for ``model``); ``kwargs`` as the class."""
        doc = artifacts.load(path or artifacts.shipped(model, METHOD), model, METHOD)
        return cls(gates=doc["values"], **kwargs)

    @property
    def retrieval_heads(self) -> torch.Tensor:
        """Bool ``(layers, kv_heads)``: True where a head keeps its full cache."""
        return self._full

    @property
    def compresses(self):
        return True

    def pattern(self, layer, q_heads, kv_heads, seen, q_len):
        full = self._full[layer]
        if bool(full.all()):
            return None
        g = q_heads // kv_heads
        stream = sinks_and_window(self.sinks, self.recent)
        return PerHead([Causal() if full[h // g] else stream for h in range(q_heads)])

    def keep(self, layer, view, q_len):
        full = self._full[layer]
        n = self.sinks + self.recent
        return keep_recent(view, self.sinks, [None if full[h] else n for h in range(view.kv_heads)])

    def describe(self):
        return f"duo_attention(retrieval={self.retrieval:.3f}, sinks={self.sinks}, recent={self.recent})"


class _GateTraining(Policy):
    """The calibration forward: per KV head ``alpha * full + (1 - alpha) * streaming`` attention."""

    name = "duo_training"

    def __init__(self, gates: torch.nn.Parameter, sinks: int, recent: int):
        self.gates = gates
        self.stream = sinks_and_window(sinks, recent)

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        full = _attention(q, k, v, pattern=Causal(), q_offset=q_offset, scale=scale, key_padding_mask=key_padding_mask)
        part = _attention(
            q,
            k,
            v,
            pattern=self.stream,
            q_offset=q_offset,
            scale=scale,
            key_padding_mask=key_padding_mask,
            backend="tiled",
        )
        g = q.shape[1] // k.shape[1]
        a = self.gates[layer].clamp(0, 1).repeat_interleave(g)[None, :, None, None].to(q.dtype)
        return a * full + (1 - a) * part


def passkey_prompt(tok, length: int, depth: float, key: int, filler: str | None = None) -> tuple[str, str]:
    """A passkey prompt of about ``length`` tokens, the key at ``depth`` in [0, 1] of the filler; and the answer."""
    filler = filler or "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    head = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n"
    )
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    fixed = len(tok(head + needle + question).input_ids)
    per = len(tok(filler * 8).input_ids) / 8
    reps = max(1, int((length - fixed) / per))
    before = int(round(reps * depth))
    return head + filler * before + needle + filler * (reps - before) + question, f" {key}"


def calibrate(
    model,
    tok,
    *,
    length: int = 1024,
    samples: int = 8,
    steps: int = 40,
    lr: float = 0.02,
    reg: float = 0.05,
    sinks: int = 16,
    recent: int = 240,
    seed: int = 0,
    progress=None,
) -> dict:
    """Train DuoAttention's gates on generated passkey data; returns ``{"values", "settings", "loss"}``.

    Each sample is a passkey prompt with its answer; the loss is the mean squared error between the last
    hidden states (over the question and answer tokens) of the gated model and of the dense model, divided by
    their mean square, plus ``reg`` times the mean gate (L1). Gates start at 1 and are clamped to [0, 1] after
    every Adam step (lr ``lr``), as in the paper's code; weights are frozen.
    """
    from ._integration import applied

    rng = random.Random(seed)
    data = []
    for _ in range(samples):
        text, answer = passkey_prompt(tok, length, rng.random(), rng.randint(10000, 99999))
        data.append(tok(text + answer, return_tensors="pt").input_ids)
    tail = 24
    with torch.no_grad():
        targets = [model.model(ids).last_hidden_state[:, -tail:] for ids in data]
    cfg = model.config.get_text_config()
    gates = torch.nn.Parameter(torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads))
    opt = torch.optim.Adam([gates], lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    losses = []
    try:
        with applied(model, _GateTraining(gates, sinks, recent)):
            for step in range(steps):
                i = step % samples
                hid = model.model(data[i]).last_hidden_state[:, -tail:]
                t = targets[i]
                distill = ((hid - t) ** 2).mean() / (t**2).mean()
                loss = distill + reg * gates.clamp(0, 1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    gates.clamp_(0, 1)
                losses.append(float(distill.detach()))
                if progress:
                    mean = float(gates.detach().mean())
                    progress(f"duo step {step + 1}/{steps}: distill {losses[-1]:.4f} mean gate {mean:.3f}")
    finally:
        for p in params:
            p.requires_grad_(True)
    settings = dict(length=length, samples=samples, steps=steps, lr=lr, reg=reg, sinks=sinks, recent=recent, seed=seed)
    return {"values": gates.detach().tolist(), "settings": settings, "loss": losses}


def _for_context(n, *, model=None, budget=0.25):
    # Streaming heads keep 16 sinks + 368 recent at 4k (a 16 + 240 window missed needles ~400 tokens back,
    # probed with other keys than the evaluation's); never more than half the per-head budget.
    stream = min(384, kv_tokens(n, budget) // 2)
    sinks = min(16, stream // 4)
    return DuoAttention.for_budget(DuoAttention.load(model).gates, budget, n, sinks=sinks, recent=stream - sinks)


register(
    "duo_attention",
    family="E",
    kind="policy",
    paper="DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads (Xiao et al., 2024)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=_for_context,
    summary="retrieval heads keep the full cache, streaming heads sinks + window; gates calibrated offline",
    source=DuoAttention,
)
