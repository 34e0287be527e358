"""A layers x heads table of one score: what every detector and causal tool of :mod:`attnkit.analysis` returns."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class HeadScores:
    """One score per (layer, query head).

    Attributes:
        name: what the score is (``"sink"``, ``"induction"``, ``"patching"``...).
        values: ``(layers, heads)`` float64 (NaN where a head was not scored).
        paper: the paper whose definition it follows.
        meaning: what a high value means, in a sentence (the heatmap's caption).
        extra: numbers that go with the table (the sink rate, the prompt's length...).
    """

    name: str
    values: torch.Tensor
    paper: str = ""
    meaning: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = self.values.detach().to(torch.float64).cpu()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def top(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, value)``, best first (NaN never)."""
        flat = torch.nan_to_num(self.values, nan=float("-inf")).flatten()
        k = min(k, int(torch.isfinite(flat).sum()))
        vals, idx = flat.topk(k)
        H = self.values.shape[1]
        return [(int(i) // H, int(i) % H, float(v)) for v, i in zip(vals, idx, strict=True)]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "paper": self.paper,
            "meaning": self.meaning,
            "values": [[None if v != v else round(v, 6) for v in row] for row in self.values.tolist()],
            "top": self.top(),
            "extra": self.extra,
        }

    def save(self, folder) -> list[Path]:
        """``<name>.json`` and ``<name>.png`` (the heatmap) in ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.json"
        path.write_text(json.dumps(self.to_json(), indent=1))
        pic = self.heatmap(folder / f"{self.name}.png")
        return [path] + ([pic] if pic else [])

    def heatmap(self, path) -> Path | None:
        """A layers x heads heatmap (layers down, heads across); None without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        L, H = self.values.shape
        fig, ax = plt.subplots(figsize=(1.6 + 0.35 * H, 1.2 + 0.18 * L))
        im = ax.imshow(self.values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title("\n".join(textwrap.wrap(f"{self.name}: {self.meaning}", 28 + 4 * H)), fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)

    def markdown(self, k: int = 5) -> list[str]:
        top = ", ".join(f"L{layer}.H{head} {v:.3f}" for layer, head, v in self.top(k))
        extra = "; ".join(f"{key} {val}" for key, val in self.extra.items() if not isinstance(val, (list, dict)))
        return [
            f"- **{self.name}** ({self.paper}): {self.meaning}. Top heads: {top}." + (f" {extra}." if extra else "")
        ]


def register_tool(name: str, obj, *, paper: str, summary: str, supports=("causal", "gqa")) -> None:
    """Register a family-H record whose factory hands back ``obj`` (a function, or a detector's class made with
    its defaults): the registry lists it, the gallery documents it from ``obj``'s docstring."""
    from ..records import register

    make = obj if isinstance(obj, type) else None
    register(
        name,
        family="H",
        kind="analysis",
        paper=paper,
        exact=True,
        supports=supports,
        factory=(lambda n, *, model=None: make()) if make else (lambda n, *, model=None: obj),
        summary=summary,
        source=obj,
    )
