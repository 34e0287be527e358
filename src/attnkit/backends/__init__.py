"""Kernels: *how* attention is computed.

Every backend is a module with ``why_not(request) -> str | None`` (``None`` when it can run the
:class:`~attnkit.backends.request.Request`, else the reason, naming one that can) and
``run(request) -> (out, lse or None)``, and may offer ``describe(request) -> dict`` (what it computes:
``density``, ``block``) for :func:`attnkit.explain`. :func:`attnkit.attention` asks them in this order and knows
nothing else about them.

* ``decode``: up to 16 queries over a KV cache, the pattern's rows evaluated per step, two products over the keys
  they read (any device, inference);
* ``sdpa``: dense or masked ``scaled_dot_product_attention`` (any device);
* ``flex``: compiled FlexAttention from the pattern's ``mask_mod`` (CPU inference, GPU);
* ``tiled``: our block-sparse CPU kernel over a :class:`~attnkit.layout.BlockLayout`, forward and backward;
* ``gather``: token-index selections (CPU);
* ``reference``: the float64 oracle, for tests.
"""

from . import decode, flex, gather, reference, sdpa, tiled

BACKENDS = {
    "decode": decode,
    "sdpa": sdpa,
    "flex": flex,
    "tiled": tiled,
    "gather": gather,
    "reference": reference,
}
