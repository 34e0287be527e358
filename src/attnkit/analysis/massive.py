"""Massive activations (Sun et al., *Massive Activations in Large Language Models*, 2024).

A few hidden-state entries, at fixed dimensions and at the first token and the first strong delimiter, are
orders of magnitude larger than the rest; they act as biases and are what makes the first token an attention
sink. The paper's operational definition: magnitude above 100 and about 1000x the median magnitude of the
layer's hidden state. Here an entry is massive when ``|h| > floor`` and ``|h| > ratio * median(|h|)`` of its
layer's output (the residual stream after the layer), with the paper's values as defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedError, bad
from .scores import register_tool


@dataclass
class MassiveActivations:
    """Per layer: the top-3 magnitudes and the median; every massive entry as ``(layer, batch, token, dim, value)``."""

    top3: torch.Tensor  # (L, 3)
    median: torch.Tensor  # (L,)
    hits: list
    floor: float
    ratio: float

    def dims(self) -> list[int]:
        """The hidden dimensions that carry massive activations, most frequent first."""
        count: dict = {}
        for _, _, _, d, _ in self.hits:
            count[d] = count.get(d, 0) + 1
        return sorted(count, key=lambda d: -count[d])

    def to_json(self) -> dict:
        return {
            "paper": "Massive Activations in Large Language Models (Sun et al., 2024)",
            "floor": self.floor,
            "ratio": self.ratio,
            "top3": [[round(v, 2) for v in row] for row in self.top3.tolist()],
            "median": [round(v, 4) for v in self.median.tolist()],
            "dims": self.dims(),
            "hits": [list(h) for h in self.hits[:200]],
        }

    def markdown(self, tok=None, ids=None) -> list[str]:
        layers = sorted({h[0] for h in self.hits})
        tokens = sorted({h[2] for h in self.hits})
        names = ""
        if tok is not None and ids is not None and tokens:
            names = " (" + ", ".join(repr(tok.decode([int(ids[0, t])])) for t in tokens[:5]) + ")"
        if not self.hits:
            return [
                f"- **massive activations** (Sun et al., 2024): none above {self.floor} and {self.ratio}x the median."
            ]
        peak = int(self.top3[:, 0].argmax())
        return [
            f"- **massive activations** (Sun et al., 2024): {len(self.hits)} entries above {self.floor:g} and "
            f"{self.ratio:g}x the layer median, in layers {layers[0]}-{layers[-1]}, dimensions {self.dims()[:4]}, "
            f"tokens {tokens[:5]}{names}; the largest |h| = {float(self.top3[peak, 0]):.0f} at layer {peak} "
            f"(median {float(self.median[peak]):.2f})."
        ]


def _decoder_layers(model) -> list:
    """The blocks whose outputs are the residual stream (Llama's ``model.layers``, BERT's ``encoder.layer``)."""
    inner = getattr(model, "model", model)
    for path in ("layers", "encoder.layer"):
        obj = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return list(obj)
    raise UnsupportedError(bad("model", "decoder blocks at model.layers or encoder.layer", type(model).__name__))


def massive_activations(model, ids, *, floor: float = 100.0, ratio: float = 1000.0) -> MassiveActivations:
    """Find the massive activations of ``model`` on ``ids`` ``(B, N)`` (one forward, ``output_hidden_states``)."""
    blocks = _decoder_layers(model)
    hidden: list = [None] * len(blocks)

    def keep(i):
        return lambda mod, args, out: hidden.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach())

    hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    top3, med, hits = [], [], []
    for layer, h in enumerate(hidden):
        a = h.abs().float()
        m = a.median()
        top3.append(a.flatten().topk(3).values)
        med.append(m)
        big = (a > floor) & (a > ratio * m)
        for b, t, d in big.nonzero().tolist():
            hits.append((layer, b, t, d, round(float(a[b, t, d]), 2)))
    return MassiveActivations(torch.stack(top3), torch.stack(med), hits, floor, ratio)


@dataclass(frozen=True)
class MassiveDetector:
    """Registry form of :func:`massive_activations`: ``run(model, tokenizer, ids)``."""

    floor: float = 100.0
    ratio: float = 1000.0

    def run(self, model, tok, ids=None, attention_mask=None) -> MassiveActivations:
        if ids is None:
            from .heads import _text_ids

            ids = _text_ids(tok, 256)
        return massive_activations(model, ids, floor=self.floor, ratio=self.ratio)


register_tool(
    "massive_activations",
    MassiveDetector,
    paper="Massive Activations in Large Language Models (Sun et al., 2024)",
    summary="hidden-state entries above 100 and 1000x the layer median (the cause of the first-token sink)",
    supports=("causal",),
)
