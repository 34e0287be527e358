"""PNG pictures of every registered pattern's mask (``attnkit pictures``)."""

from __future__ import annotations

from pathlib import Path

from .. import registry
from ..patterns.base import InOrder


def draw_all(folder: Path, n: int = 64) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for rec in registry.records(kind="pattern"):
        pat = rec.make(n)
        heads = pat.num_heads
        masks = pat.dense_mask(pat.fixed_length or n, pat.fixed_length or n, heads=heads)
        shown = list(masks[: min(len(masks), 4)])
        titles = [f"head {i}" if heads else rec.name for i in range(len(shown))]
        if heads is None and pat.token_order() is not None:
            # what the tiled kernel runs: the same pairs renumbered tile by tile, so they gather near the diagonal
            shown.append(InOrder(pat).dense_mask(pat.fixed_length, pat.fixed_length)[0])
            titles = ["row-major order", "tile order (the tiled kernel's)"]
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
        for i, m in enumerate(shown):
            ax = axes[0][i]
            ax.imshow(m.numpy(), cmap="Greys", interpolation="nearest")
            ax.set_title(titles[i], fontsize=8)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
            ax.tick_params(labelsize=6)
        fig.suptitle(f"{rec.name}: {rec.summary}\n{repr(pat)[:90]}", fontsize=7)
        fig.tight_layout()
        path = folder / f"{rec.name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        out.append(path)
    index = [
        "# Pattern pictures",
        "",
        "Drawn by `attnkit pictures` from each registry record's `factory(64)`: black = "
        "the query (row) attends to the key (column). A 2-D or 3-D pattern is drawn twice: its tokens in row-major "
        "order, and renumbered tile by tile (`Pattern.token_order`), the order the tiled kernel runs it in when "
        "that touches fewer tiles.",
        "",
    ]
    for rec in registry.records(kind="pattern"):
        index += [f"## {rec.name}", "", f"{rec.summary}. {rec.paper}.", "", f"![{rec.name}]({rec.name}.png)", ""]
    (folder / "README.md").write_text("\n".join(index))
    return out
