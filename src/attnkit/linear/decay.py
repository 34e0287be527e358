r"""Per-head decays for :func:`~attnkit.linear.linear_attention` (``decay=``).

* :func:`retnet_decay`: RetNet's multi-scale retention, :math:`\gamma_h = 1 - 2^{-5-h}`
  ("Retentive Network", Sun et al., 2023).
* :func:`transnormer_decay`: TransNormerLLM / Lightning Attention's per-head, per-layer decay
  :math:`\lambda_h = \exp(-\frac{8h}{H}(1 - \frac{l}{L}))` ("TransNormerLLM", Qin et al., 2023): lower layers
  decay faster, the last layer does not decay, head 0 never decays.
"""

from __future__ import annotations

import torch

from ..errors import PatternError, bad


def _heads(heads):
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise PatternError(bad("heads", "an int >= 1", repr(heads)))


def retnet_decay(heads: int) -> torch.Tensor:
    """``(heads,)`` float64 decays ``1 - 2 ** (-5 - h)``."""
    _heads(heads)
    return 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))


def transnormer_decay(heads: int, layer: int = 0, num_layers: int = 1) -> torch.Tensor:
    """``(heads,)`` float64 decays ``exp(-(8 h / H) (1 - layer / num_layers))`` for a 0-based ``layer``."""
    _heads(heads)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise PatternError(bad("num_layers", "an int >= 1", repr(num_layers)))
    if not isinstance(layer, int) or not 0 <= layer < num_layers:
        raise PatternError(bad("layer", f"an int in [0, {num_layers})", repr(layer)))
    h = torch.arange(heads, dtype=torch.float64)
    return torch.exp(-(8 * h / heads) * (1 - layer / num_layers))
