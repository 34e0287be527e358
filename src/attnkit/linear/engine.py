r"""The linear-attention engine: one function, three forms (parallel, chunked, recurrent) of the same result.

For query ``i`` and the keys ``j`` it sees (``j <= i`` when causal), with features :math:`\phi`, an optional
per-head decay :math:`\gamma_h \in (0, 1]` and ``scale`` :math:`c`:

.. math::
    A_i = \sum_j \gamma^{i-j}\, c\,\phi(q_i)\cdot\phi(k_j)\; v_j, \qquad
    z_i = \sum_j \gamma^{i-j}\, c\,\phi(q_i)\cdot\phi(k_j), \qquad
    U_i = \sum_j \gamma^{i-j} v_j, \qquad n_i = \sum_j \gamma^{i-j}

and the normaliser turns them into the output:

=============  ============================================  ==================================================
``normalize``  output                                        paper
=============  ============================================  ==================================================
``True``       :math:`A_i / z_i`                             Transformers are RNNs (Katharopoulos et al., 2020)
``False``      :math:`A_i`                                   RetNet retention, Lightning attention
``"rms"``      :math:`A_i / \mathrm{rms}(A_i)`               TransNormer's NormAttention (SRMSNorm, no weight)
``"inline"``   :math:`A_i - z_i U_i / n_i + U_i / n_i`       InLine ("Bridging the Divide", Han et al., 2024)
``"mala"``     :math:`(1 + 1/z_i) A_i - (z_i / n_i) U_i`     MALA ("Rectifying Magnitude Neglect", Fan et al., 2025)
=============  ============================================  ==================================================

InLine's weights :math:`w_{ij} = \phi_i\cdot\phi_j - \frac{1}{n}\sum_s \phi_i\cdot\phi_s + \frac{1}{n}` sum to one
and are injective in the query; MALA's :math:`w_{ij} = \beta_i\,\phi_i\cdot\phi_j - \gamma_i` with
:math:`\beta_i = 1 + 1/z_i`, :math:`\gamma_i = z_i / n_i` also sum to one but grow sharper as
:math:`\|\phi(q_i)\|` grows, like softmax. With a decay, every sum (``n`` too) is decayed alike.

The three forms (the layout of flash-linear-attention: a naive reference beside the fast forms):

* ``parallel``: the ``N x N`` weight matrix, masked and decayed, times ``V``. Exact, quadratic.
* ``chunk``: Lightning Attention's split (Qin et al., 2024): inside a chunk of ``C`` tokens the masked
  ``Q K^T V`` (intra), across chunks the running state ``S = sum gamma^(..) phi(k) [v, 1]^T`` (inter), so
  the cost is ``O(N C F + N F Dv)`` and there is no cumulative sum over tokens.
* ``recurrent``: one token at a time, ``S_t = gamma S_{t-1} + phi(k_t) [v_t, 1]^T``, ``y_t = phi(q_t) S_t``.
  The KV-cache equivalent of decoding.

State and precision: features, state and sums are computed in float32 whatever the input dtype (float64 stays
float64); the output is cast back once. ``initial_state`` / ``return_state`` carry a :class:`LinearState`
between calls, so a sequence processed in pieces (or decoded token by token) equals one call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference as _ref
from ..errors import DTypeError, PatternError, ShapeError, bad, check_memory
from ..layout import ceil_div
from ..records import register_function
from ._common import check_qkv
from .decay import retnet_decay, transnormer_decay
from .feature_maps import FAVOR, Hedgehog, Identity, resolve

MODES = ("auto", "parallel", "chunk", "recurrent")
_SLAB = 2048  # tokens per slab of the chunked form (temporaries of a few MiB: cache-resident, no page faults)
NORMALIZERS = (True, False, "rms", "inline", "mala")


@dataclass
class LinearState:
    """The recurrent state after ``position`` tokens: ``kv`` ``(B, Hq, F, Dv + 1)`` holds
    :math:`\\sum_j \\gamma^{t-j} \\phi(k_j) [v_j, 1]^T`; ``totals`` ``(B, Hq, 1, Dv + 1)`` holds
    :math:`\\sum_j \\gamma^{t-j} [v_j, 1]` (only for the ``inline`` and ``mala`` normalisers). float32 (or float64)."""

    kv: torch.Tensor
    totals: torch.Tensor | None
    position: int


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map="elu+1",
    decay=None,
    normalize=True,
    causal: bool = True,
    mode: str = "auto",
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
):
    """Kernelised (linear) attention; see the module docstring for the math.

    Args:
        q: ``(B, Hq, N, D)``; k: ``(B, Hkv, Nk, D)``; v: ``(B, Hkv, Nk, Dv)``, ``Hq % Hkv == 0``. Causal
            attention needs ``N == Nk``; non-causal allows cross attention.
        feature_map: a :class:`~attnkit.linear.FeatureMap` or ``"elu+1"``, ``"relu"``, ``"identity"``.
        decay: None, a float in ``(0, 1]``, or a ``(Hq,)`` tensor of per-head decays (RetNet / Lightning /
            TransNormerLLM; see :func:`~attnkit.linear.retnet_decay`). Causal only.
        normalize: ``True`` (sum), ``False``, ``"rms"``, ``"inline"`` or ``"mala"``.
        causal: query ``i`` sees keys ``j <= i``.
        mode: ``"auto"`` (``parallel`` up to ``chunk_size`` tokens, else ``chunk``), ``"parallel"``, ``"chunk"``,
            ``"recurrent"``. All give the same result.
        chunk_size: ``C`` of the chunked form.
        initial_state: a :class:`LinearState` from a previous call (causal only).
        return_state: also return the :class:`LinearState` after the last token.
        key_padding_mask: bool ``(B, Nk)``, True where the key is real; padded keys contribute nothing.
        scale: multiplies ``phi(q)``; default 1 (it cancels in the sum normaliser; retention uses ``D**-0.5``).

    Returns:
        ``out`` ``(B, Hq, N, Dv)`` in the dtype of ``q`` (and the state). A query that sees no key gives 0.
    """
    fmap = resolve(feature_map)
    dims = _check(q, k, v, fmap, decay, normalize, causal, mode, chunk_size, initial_state, key_padding_mask, scale)
    B, Hq, N, Dv = dims.batch, dims.q_heads, dims.q_len, dims.v_dim
    # A chunk longer than the sequence is the sequence: the forms compute the same function at any C, and a
    # huge C would only pad (chunk_size=2**30 used to ask for 137 GB).
    chunk_size = min(chunk_size, max(N, dims.kv_len, 1))
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    logd = _log_decay(decay, Hq, cd, q.device)
    form = _choose(mode, causal, N, chunk_size)
    if form == "parallel":
        _check_budget(B, Hq, N, dims.kv_len, cd)
    s, t = (None, None) if initial_state is None else _state_in(initial_state, B, Hq, Dv, normalize, cd)
    totals = normalize in ("inline", "mala")

    # The chunked form runs slab by slab (Lightning attention's tiling): the features and every temporary
    # exist for one slab only, so memory stays O(slab) beyond the output and the running state. The inputs
    # are split once (not sliced per slab): the backward of a split is one concatenation, while each slice's
    # backward would write a full-length zero tensor.
    step = max(chunk_size, _SLAB // chunk_size * chunk_size) if form == "chunk" and causal else max(N, 1)
    q_sl = q.split(step, 2)
    if causal:
        k_sl, v_sl = k.split(step, 2), v.split(step, 2)
        m_sl = key_padding_mask.split(step, 1) if key_padding_mask is not None else [None] * len(q_sl)
    else:
        k_sl, v_sl, m_sl = [k] * len(q_sl), [v] * len(q_sl), [key_padding_mask] * len(q_sl)
    # Without autograd the slabs are written straight into the output (no list, no concatenation pass).
    direct = len(q_sl) > 1 and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    out = q.new_empty(B, Hq, N, Dv) if direct else None
    outs, a = [], 0
    for qs, ks, vs, ms in zip(q_sl, k_sl, v_sl, m_sl, strict=True):
        qf, kf, va = _features(fmap, qs, ks, vs, ms, scale, dims.group, cd)
        if s is not None and s.shape[-2] != qf.shape[-1]:
            raise ShapeError(bad("initial_state.kv", f"{qf.shape[-1]} features in dim -2", tuple(s.shape)))
        y, s = _run(form, qf, kf, va, logd, causal, s, chunk_size)
        tot = None
        if totals:
            # The totals are the same recurrence with phi = 1: a query-length and a key-length column of ones.
            ones_q, ones_k = qf.new_ones(*qf.shape[:-1], 1), kf.new_ones(*kf.shape[:-1], 1)
            tot, t = _run(form, ones_q, ones_k, va, logd, causal, t, chunk_size)
        o = _normalise(y, tot, normalize, Dv)
        if direct:
            out[:, :, a : a + o.shape[2]] = o
            a += o.shape[2]
        else:
            outs.append(o)
    if not direct:
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, 2)).to(q.dtype)
    if not return_state:
        return out
    pos = (initial_state.position if initial_state is not None else 0) + dims.kv_len
    return out, LinearState(s, t if totals else None, pos)


def linear_state(
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    heads: int | None = None,
    feature_map="elu+1",
    decay=None,
    normalize=True,
    key_padding_mask: torch.Tensor | None = None,
) -> LinearState:
    r"""The :class:`LinearState` that causal :func:`linear_attention` reaches after the keys ``k``, ``v``
    ``(B, Hkv, N, D / Dv)``, without computing any output: :math:`S = \sum_j \gamma^{N-1-j} \phi(k_j) [v_j, 1]^T`
    in ``O(N F Dv)``. ``heads``: query heads (GQA; default ``Hkv``). Differentiable. Context parallelism passes
    it between ranks (:func:`attnkit.distributed.context_parallel_linear_attention`)."""
    fmap = resolve(feature_map)
    heads = k.shape[1] if heads is None else heads
    q = k[:, :1].expand(k.shape[0], heads, *k.shape[2:])  # the checks' stand-in for queries: no copy
    dims = _check(q, k, v, fmap, decay, normalize, True, "auto", 1, None, key_padding_mask, None)
    cd = torch.float64 if k.dtype == torch.float64 else torch.float32
    _, kf, va = _features(fmap, q, k, v, key_padding_mask, None, dims.group, cd)
    logd = _log_decay(decay, heads, cd, k.device)
    totals = None
    if normalize in ("inline", "mala"):
        totals = _final_state(kf.new_ones(*kf.shape[:-1], 1), va, logd, None)
    return LinearState(_final_state(kf, va, logd, None), totals, k.shape[2])


def _features(fmap, q, k, v, kpm, scale, group, cd):
    """Features of the queries (scaled) and keys, and the values with their ones column; GQA expanded."""
    qf = fmap(q.to(cd), True)
    if scale is not None:
        qf = qf * scale
    kx = k.to(cd)
    va = torch.nn.functional.pad(v.to(cd), (0, 1), value=1.0)
    if kpm is not None:
        # A padded key's contents never matter: select zeros (a product with 0 would keep a NaN or inf there).
        real = kpm[:, None, :, None]
        kx, va = torch.where(real, kx, 0.0), torch.where(real, va, 0.0)
    if group > 1:
        kx, va = kx.repeat_interleave(group, 1), va.repeat_interleave(group, 1)
    return qf, fmap(kx, False), va


def _check(q, k, v, fmap, decay, normalize, causal, mode, chunk_size, initial_state, kpm, scale):
    dims = check_qkv(q, k, v, causal=causal, key_padding_mask=kpm, scale=scale)
    if mode not in MODES:
        raise ShapeError(bad("mode", f"one of {MODES}", repr(mode)))
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ShapeError(bad("chunk_size", "an int >= 1", repr(chunk_size)))
    if not (normalize is True or normalize is False or (isinstance(normalize, str) and normalize in NORMALIZERS)):
        raise PatternError(bad("normalize", f"one of {NORMALIZERS}", repr(normalize)))
    if normalize is True and isinstance(fmap, Identity):
        raise PatternError(
            bad("normalize", "False or 'rms' with the identity map (its features can be negative)", "True")
        )
    fmap.check(dims.q_heads, dims.head_dim)
    if decay is not None and not causal:
        raise PatternError(bad("decay", "None for non-causal attention (a decay orders the tokens)", repr(decay)))
    if initial_state is not None:
        if not causal:
            raise PatternError(bad("initial_state", "None for non-causal attention", type(initial_state).__name__))
        if not isinstance(initial_state, LinearState):
            raise DTypeError(bad("initial_state", "a LinearState or None", type(initial_state).__name__))
    return dims


def _log_decay(decay, heads, cd, device):
    if decay is None:
        return None
    try:
        d = torch.as_tensor(decay, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise PatternError(bad("decay", f"a float or ({heads},) values in (0, 1]", f"{decay!r}")) from None
    if d.dim() == 0:
        d = d.expand(heads)
    if d.shape != (heads,) or not bool(((d > 0) & (d <= 1)).all()):
        raise PatternError(bad("decay", f"a float or ({heads},) values in (0, 1]", f"{decay!r}"))
    return d.log().to(cd).to(device)


def _choose(mode, causal, n, chunk_size):
    if mode != "auto":
        return mode
    if not causal:
        return "chunk"
    return "parallel" if n <= chunk_size else "chunk"


def _check_budget(B, H, N, Nk, cd):
    need = B * H * N * Nk * torch.finfo(cd).bits // 8
    check_memory(f"mode='parallel' (the {N} x {Nk} weights)", need, "use mode='chunk', which is O(N)")


def _state_in(state, B, H, Dv, normalize, cd):
    want = (B, H, Dv + 1)
    got = tuple(state.kv.shape)
    if len(got) != 4 or (got[0], got[1], got[3]) != want:
        raise ShapeError(bad("initial_state.kv", f"shape ({B}, {H}, features, {Dv + 1})", got))
    if normalize in ("inline", "mala"):
        if state.totals is None or tuple(state.totals.shape) != (B, H, 1, Dv + 1):
            got = None if state.totals is None else tuple(state.totals.shape)
            raise ShapeError(bad("initial_state.totals", f"shape {(B, H, 1, Dv + 1)} for normalize={normalize!r}", got))
        return state.kv.to(cd), state.totals.to(cd)
    return state.kv.to(cd), None


def _run(form, qf, kf, va, logd, causal, s0, chunk_size):
    if not causal:
        s = _final_state(kf, va, None, s0)
        if form == "parallel":
            return (qf @ kf.transpose(-1, -2)) @ va, s
        return qf @ s, s
    if form == "parallel":
        return _parallel(qf, kf, va, logd, s0), _final_state(kf, va, logd, s0)
    if form == "recurrent":
        return _recurrent(qf, kf, va, logd, s0)
    return _chunk(qf, kf, va, logd, s0, chunk_size)


def _powers(logd, exps: torch.Tensor) -> torch.Tensor:
    """``gamma_h ** exps`` as ``(H, *exps.shape)``; exponents < 0 give 0 (the causal mask).

    In float32, powers below 1e-30 are set to 0: they are below the precision of any sum they enter (the
    diagonal term has power 1), and as subnormal numbers they would slow every product that reads them tenfold.
    """
    p = torch.exp(logd.view(-1, *([1] * exps.dim())) * exps.clamp(min=0).to(logd.dtype))
    keep = exps >= 0
    if p.dtype == torch.float32:
        keep = keep & (p >= 1e-30)
    return p * keep.to(p.dtype)


def _parallel(qf, kf, va, logd, s0):
    n = qf.shape[2]
    idx = torch.arange(n, device=qf.device)
    w = qf @ kf.transpose(-1, -2)
    if logd is None:
        w = w.tril()
    else:
        w = w * _powers(logd, idx[:, None] - idx[None, :])
    y = w @ va
    if s0 is not None:
        qd = qf if logd is None else qf * _powers(logd, idx + 1)[..., None]
        y = y + qd @ s0
    return y


def _final_state(kf, va, logd, s0):
    n = kf.shape[2]
    kw = kf if logd is None else kf * _powers(logd, n - 1 - torch.arange(n, device=kf.device))[..., None]
    s = kw.transpose(-1, -2) @ va
    if s0 is not None:
        s = s + (s0 if logd is None else s0 * torch.exp(logd * n).view(1, -1, 1, 1))
    return s


def _recurrent(qf, kf, va, logd, s0):
    B, H, N, F = qf.shape
    s = qf.new_zeros(B, H, F, va.shape[-1]) if s0 is None else s0
    g = None if logd is None else torch.exp(logd).view(1, H, 1, 1)
    ys = []
    for t in range(N):
        kv = kf[:, :, t, :, None] * va[:, :, t, None, :]
        s = kv + (s if g is None else s * g)
        ys.append((qf[:, :, t, None, :] @ s)[:, :, 0])
    return torch.stack(ys, 2), s


def _chunk(qf, kf, va, logd, s0, C):
    B, H, N, F = qf.shape
    E = va.shape[-1]
    n = ceil_div(N, C)
    pad = n * C - N
    if pad:
        qf, kf, va = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qf, kf, va))
    qc, kc, vc = qf.view(B, H, n, C, F), kf.view(B, H, n, C, F), va.view(B, H, n, C, E)
    loc = torch.arange(C, device=qf.device)
    a = qc @ kc.transpose(-1, -2)
    if logd is None:
        a = a.tril_()
        kw, qw = kc, qc
    else:
        a = a * _powers(logd, loc[:, None] - loc[None, :])[:, None]
        kw = kc * _powers(logd, C - 1 - loc)[None, :, None, :, None]
        qw = qc * _powers(logd, loc + 1)[None, :, None, :, None]
    y = a @ vc  # intra-chunk
    kv = kw.transpose(-1, -2) @ vc  # (B, H, n, F, E): each chunk's contribution at its last token
    if logd is None:
        # exclusive prefix sum over chunks: the state before chunk c
        prev = kv.cumsum(2)
        s_end = prev[:, :, -1] if s0 is None else prev[:, :, -1] + s0
        prev = prev.roll(1, 2)
        prev[:, :, 0] = 0
        if s0 is not None:
            prev = prev + s0[:, :, None]
    else:
        g = _powers(logd, torch.tensor(C)).view(1, H, 1, 1)
        s = qf.new_zeros(B, H, F, E) if s0 is None else s0
        states = []
        for c in range(n):
            states.append(s)
            s = s * g + kv[:, :, c]
        prev = torch.stack(states, 2)
        # padded tokens would add decay steps to the state: recompute it over the real tokens
        s_end = s if not pad else _final_state(kf[:, :, :N], va[:, :, :N], logd, s0)
    # inter-chunk, accumulated into the intra result without another temporary
    y = y.view(-1, C, E).baddbmm_(qw.reshape(-1, C, F), prev.view(-1, F, E)).view(B, H, n * C, E)
    return y[:, :, :N], s_end


def _normalise(y, totals, normalize, Dv):
    a, z = y[..., :Dv], y[..., Dv:]
    tiny = torch.finfo(y.dtype).tiny
    if normalize is True:
        return a / z.clamp_min(tiny)
    if normalize is False:
        return a
    if normalize == "rms":
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)
    u, n = totals[..., :Dv], totals[..., Dv:].clamp_min(tiny)
    if normalize == "inline":
        return a + (1 - z) * u / n
    return a * (1 + 1 / z.clamp_min(tiny)) - (z / n) * u


# -- records: the engine under each paper's feature map, normaliser and decay ---------------------------------
_LINEAR = frozenset({"gqa", "backward", "bf16", "padding"})
_KATHAROPOULOS = (
    "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (Katharopoulos et al., 2020)"
)


def _register(name, paper, summary, *, exact=True, causal=True, setup=None, source=None, **kwargs):
    register_function(
        name,
        paper=paper,
        summary=summary,
        supports=_LINEAR | ({"causal", "decode"} if causal else {"cross"}),
        fn=linear_attention,
        ref=_ref.linear_attention,
        kwargs={"causal": causal, **kwargs},
        exact=exact,
        setup=setup,
        source=source,
    )


def _hedgehog(heads, head_dim):
    fmap = Hedgehog(heads, head_dim)
    with torch.no_grad():  # a trained-looking map: the identity initialisation would hide per-head mistakes
        g = torch.Generator().manual_seed(0)
        fmap.weight.add_(0.3 * torch.randn(fmap.weight.shape, generator=g))
    return {"feature_map": fmap}


_register("linear_elu", _KATHAROPOULOS, "causal linear attention, phi = elu + 1, sum-normalised", feature_map="elu+1")
_register(
    "linear_elu_bidirectional",
    _KATHAROPOULOS,
    "non-causal linear attention, phi = elu + 1 (cross attention allowed)",
    causal=False,
    feature_map="elu+1",
)
_register("linear_relu", _KATHAROPOULOS, "causal linear attention, phi = relu", feature_map="relu")
_register(
    "performer_favor",
    "Rethinking Attention with Performers (Choromanski et al., 2021)",
    "FAVOR+ positive orthogonal random features (2D of them): an unbiased estimate of softmax",
    exact=False,
    setup=lambda h, d: {"feature_map": FAVOR(d, 2 * d)},
    source=FAVOR,
)
_register(
    "hedgehog",
    "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry (Zhang et al., 2024)",
    "learnable per-head softmax-mimicking map [softmax(Wx), softmax(-Wx)]; fit with fit_hedgehog",
    setup=_hedgehog,
    source=Hedgehog,
)
_register(
    "mala",
    "Rectifying Magnitude Neglect in Linear Attention (MALA, Fan et al., 2025)",
    "magnitude-aware weights (1 + 1/z) phi.phi - z/n, phi = elu + 1",
    feature_map="elu+1",
    normalize="mala",
)
_register(
    "inline",
    "Bridging the Divide: Reconsidering Softmax and Linear Attention (InLine, Han et al., 2024)",
    "injective weights phi.phi - mean + 1/n, phi = relu",
    feature_map="relu",
    normalize="inline",
)
_register(
    "retnet",
    "Retentive Network: A Successor to Transformer for Large Language Models (Sun et al., 2023)",
    "retention: q.k / sqrt(D) with per-head decay 1 - 2^(-5-h), unnormalised",
    feature_map="identity",
    normalize=False,
    setup=lambda h, d: {"decay": retnet_decay(h), "scale": d**-0.5},
    source=retnet_decay,
)
_register(
    "lightning_transnormer",
    "Lightning Attention-2 (Qin et al., 2024); TransNormerLLM (Qin et al., 2023)",
    "TransNormerLLM: per-head decay exp(-8h/H (1 - l/L)) (layer 0 of 2), RMS-normalised output",
    feature_map="identity",
    normalize="rms",
    setup=lambda h, d: {"decay": transnormer_decay(h, 0, 2), "scale": d**-0.5},
    source=transnormer_decay,
)
