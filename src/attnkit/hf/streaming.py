"""StreamingLLM: attention sinks plus a recent window, as a prefill pattern and as a KV cache.

Xiao et al., *Efficient Streaming Language Models with Attention Sinks* (ICLR 2024). Softmax attention dumps
mass on the first tokens whatever their content; keeping those "sinks" next to a sliding window of recent
tokens keeps a model stable far beyond its window, where a plain window collapses.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_count
from ..patterns.global_tokens import AShape
from ..patterns.sliding_window import SlidingWindow
from ..records import register
from .policy import POLICY_SUPPORTS, Policy, keep_recent, kv_tokens


@dataclass(frozen=True)
class StreamingLLM(Policy):
    r"""Each KV head keeps the first ``sinks`` real tokens and the last ``budget - sinks`` ones.

    - **Cache**: after every step the cache is cut back to ``budget`` entries per head: the evicted keys and
      values are freed (measured by :meth:`HeadwiseCache.memory`), not masked.
    - **Positions** (``rerotate=True``, the paper's choice): positions are those *within the cache*. Kept keys
      are re-rotated to slots ``0 .. budget-1`` and every new query and key to the slot it takes, so the model
      never sees a relative distance larger than its cache. ``rerotate=False`` keeps the original positions.
    - **Prefill** (``prefill_pattern=True``): a prefill step computes only what the cache could hold,
      ``AShape(sinks, budget - sinks)`` on real-token positions: query ``i`` sees keys ``j < sinks`` and
      ``i - window < j <= i``. With ``False`` the prefill is dense and only the cache is cut afterwards.
      A decode step computes the same pattern, so each query sees exactly ``budget`` keys.
    - ``sinks=0`` is plain window attention, the baseline the paper shows collapsing.

    ``budget`` is in tokens (an ``int``). The paper uses 4 sinks.
    """

    budget: int = 1024
    sinks: int = 4
    rerotate: bool = True
    prefill_pattern: bool = True
    name = "streaming_llm"

    def __post_init__(self):
        check_count("sinks", self.sinks, 0)
        check_count("budget", self.budget, self.sinks + 1)

    @property
    def window(self) -> int:
        return self.budget - self.sinks

    @property
    def compresses(self) -> bool:
        return True

    def pattern(self, layer, q_heads, kv_heads, seen, q_len):
        if q_len > 1 and not self.prefill_pattern:
            return None
        return sinks_and_window(self.sinks, self.window)

    def keep(self, layer, view, q_len):
        return keep_recent(view, self.sinks, self.budget)

    def describe(self):
        return f"streaming_llm(sinks={self.sinks}, window={self.window})"


def sinks_and_window(sinks: int, window: int):
    """Causal ``sinks`` first keys plus the last ``window`` (query included); a plain window when ``sinks == 0``."""
    return AShape(sinks, window) if sinks else SlidingWindow(left=window - 1, right=0)


register(
    "streaming_llm",
    family="E",
    kind="policy",
    paper="Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)",
    exact=False,
    supports=POLICY_SUPPORTS,
    factory=lambda n, *, model=None, budget=0.25: StreamingLLM(budget=kv_tokens(n, budget), sinks=4),
    summary="sinks + recent window, as a prefill pattern and an evicting cache with RoPE re-rotation",
    source=StreamingLLM,
)
