r"""GQA-to-MLA conversion of a Llama-family transformers model (X-EcoMLA's SVD initialisation, training-free).

X-EcoMLA (Li et al., 2025, "Upcycling Pre-Trained Attention into MLA for Efficient and Extreme KV Compression")
initialises an MLA layer from a pretrained attention layer by a joint SVD of the (GQA-expanded) key and value
projections, then distils. :func:`convert_to_mla` replaces every chosen layer's ``self_attn`` by a
:class:`~attnkit.layers.mla.MultiheadLatentAttention` (``kv_norm=False``, ``q_lora_rank=None``) whose weights
come from the original ones:

.. math::
    T = \begin{bmatrix} W_K^{\mathrm{nope}} \\ W_V \end{bmatrix}, \qquad
    T\,C\,T^\top = U \Lambda U^\top,\qquad W_{DKV} = U_r^\top T,\qquad
    \begin{bmatrix} W_{UK} \\ W_{UV} \end{bmatrix} = U_r

so the latent ``c = W_DKV x`` is the projection of ``[k^nope; v]`` onto its ``r`` leading principal directions
and ``[k^nope; v] ~ U_r c``. ``C = I`` (``method="weights"``) is X-EcoMLA's weight SVD; ``method="activations"``
(default) uses ``C = E[x x^T]`` of the layer's input on calibration text (the covariance-aware form of CARE,
2026, and of SVD-LLM), which minimises the expected output error rather than the weight error. With ``r`` at the
rank of ``T`` the conversion is exact.

GQA. The MLA has one head per query head; query head ``h`` gets the up-projection rows of its KV group. The
expanded ``T`` (each group's rows repeated ``heads / kv_heads`` times) has the same left singular subspace as the
unexpanded one, every singular value scaled by ``sqrt(heads / kv_heads)``, so the SVD runs on the unexpanded
``T``, as X-EcoMLA's ``repeat_interleave`` would give.

RoPE (our choice, documented because it differs from X-EcoMLA's code). X-EcoMLA keeps the *last*
``qk_rope_dim`` channels of each head as the RoPE part, averages the key's over the KV heads into the shared
``W_KR``, and lets distillation repair the rest; under Llama's ``rotate_half`` layout the last channels are the
second halves of rotation pairs, so that initialisation is far from the original function and is unusable
without training. Training-free, we keep RoPE on the ``P`` highest-frequency pairs ``(i, i + head_dim/2)``,
``i < P``, of every KV head (MHA2MLA's "S_high" partial RoPE) and put all ``kv_heads`` of them, still rotated by
their own frequencies, side by side in the shared decoupled key: ``qk_rope_dim = kv_heads * 2P`` and query head
``h`` carries its own rotated channels in its group's slots and zeros elsewhere, so the RoPE part is exact. The
remaining ``head_dim - 2P`` channels lose RoPE (become NoPE) and join the latent; their frequencies are the
lowest (SmolLM2: ``theta_i = 100000^{-2i/64}``, so a pair at ``i >= 24`` turns less than 0.1 rad over 512
tokens), which is what makes dropping their rotation cheap. The logit scale ``1/sqrt(d_C + d_R)`` of MLA is
turned back into the original ``1/sqrt(head_dim)`` by scaling ``W_Q``. The MLA cache holds
``kv_lora_rank + qk_rope_dim`` values per token per layer against GQA's ``2 * kv_heads * head_dim``.

The converted attention ignores transformers' attention mask and KV cache: it is causal over an unpadded batch
(``model(ids, use_cache=False)``); for decoding, :func:`latent_caches` gives every converted layer a
:class:`~attnkit.layers.mla.LatentCache` for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from ..errors import ShapeError, bad, check_count
from ..layers.mla import MultiheadLatentAttention

METHODS = ("activations", "weights")


class MLASelfAttention(nn.Module):
    """A transformers ``self_attn`` replacement running :class:`MultiheadLatentAttention` (see the module doc)."""

    def __init__(self, mla: MultiheadLatentAttention, layer_idx: int):
        super().__init__()
        self.mla, self.layer_idx = mla, layer_idx
        self.cache = None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        positions = None
        if self.cache is None:
            pid = kwargs.get("position_ids")
            positions = pid if isinstance(pid, torch.Tensor) else None
            if positions is not None and positions.dim() == 2 and positions.shape[0] == 1:
                positions = positions[0]
        return self.mla(hidden_states, cache=self.cache, positions=positions), None


def _attn_config(model):
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.hidden_size, heads, kv_heads, head_dim


def rope_channels(head_dim: int, pairs: int):
    """``(rope, nope)`` channel indices of one head: the first ``pairs`` rotation pairs ``(i, i + head_dim/2)``."""
    half = head_dim // 2
    rope = list(range(pairs)) + list(range(half, half + pairs))
    nope = [c for c in range(head_dim) if c not in set(rope)]
    return rope, nope


def _forward_rows(model, ids: torch.Tensor, hooks) -> None:
    """Run ``model`` over each row of ``ids`` without a cache (the ``hooks`` record), then remove the hooks."""
    try:
        with torch.no_grad():
            for row in ids:
                model(row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def input_covariances(model, ids: torch.Tensor, layers) -> dict:
    """``{layer: E[x x^T]}`` (float64) of every chosen layer's attention input on ``ids`` ``(1, N)``."""
    acc, hooks = {}, []
    mod_dim = model.config.hidden_size
    for i in layers:

        def hook(mod, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None).detach().double().reshape(-1, mod_dim)
            acc[i] = acc.get(i, 0) + x.T @ x / x.shape[0]

        hooks.append(model.model.layers[i].self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    _forward_rows(model, ids, hooks)
    return {i: c / len(ids) for i, c in acc.items()}


def mla_from_gqa(
    q_w, k_w, v_w, o_w, *, heads, kv_heads, head_dim, kv_lora_rank, qk_rope_dim, inv_freq, cov=None, mode="auto"
) -> MultiheadLatentAttention:
    """One :class:`MultiheadLatentAttention` from one GQA layer's ``q, k, v, o`` weights (module docstring)."""
    dim = q_w.shape[1]
    if qk_rope_dim % (2 * kv_heads) or qk_rope_dim > kv_heads * head_dim:
        raise ShapeError(
            bad(
                "qk_rope_dim",
                f"a multiple of 2 * kv_heads = {2 * kv_heads}, at most {kv_heads * head_dim}",
                qk_rope_dim,
            )
        )
    P = qk_rope_dim // (2 * kv_heads)
    rope, nope = rope_channels(head_dim, P)
    dn, dr, g = len(nope), qk_rope_dim, heads // kv_heads
    qw, kw, vw = (t.detach().double() for t in (q_w, k_w, v_w))
    kh = kw.view(kv_heads, head_dim, dim)
    T = torch.cat((kh[:, nope].reshape(-1, dim), vw), 0)  # (kv_heads * (dn + head_dim), dim)
    if not 1 <= kv_lora_rank <= T.shape[0]:
        raise ShapeError(
            bad("kv_lora_rank", f"an int in [1, {T.shape[0]}] (the rank of [W_K nope; W_V])", kv_lora_rank)
        )
    M = (
        T
        if cov is None
        else T @ torch.linalg.cholesky(cov + 1e-8 * cov.diagonal().mean() * torch.eye(dim, dtype=cov.dtype))
    )
    U = torch.linalg.svd(M, full_matrices=False).U[:, :kv_lora_rank]  # (rows, r)
    down = U.T @ T  # (r, dim)
    Uk = U[: kv_heads * dn].reshape(kv_heads, dn, kv_lora_rank)
    Uv = U[kv_heads * dn :].reshape(kv_heads, head_dim, kv_lora_rank)
    half_r = dr // 2
    # The shared RoPE key: first halves of every KV head's kept pairs, then their second halves (rotate_half).
    kr_rows = [gi * head_dim + i for gi in range(kv_heads) for i in range(P)]
    kr_rows += [gi * head_dim + head_dim // 2 + i for gi in range(kv_heads) for i in range(P)]
    w_kr = kw[kr_rows]  # (dr, dim)
    scale = ((dn + dr) / head_dim) ** 0.5
    qh = qw.view(heads, head_dim, dim)
    q_new = torch.zeros(heads, dn + dr, dim, dtype=torch.float64)
    up = torch.zeros(heads, dn + head_dim, kv_lora_rank, dtype=torch.float64)
    for h in range(heads):
        gi = h // g
        q_new[h, :dn] = qh[h, nope]
        if P:
            q_new[h, dn + gi * P : dn + (gi + 1) * P] = qh[h, :P]
            q_new[h, dn + half_r + gi * P : dn + half_r + (gi + 1) * P] = qh[h, head_dim // 2 : head_dim // 2 + P]
        up[h, :dn], up[h, dn:] = Uk[gi], Uv[gi]
    layer = MultiheadLatentAttention(
        dim,
        heads,
        kv_lora_rank=kv_lora_rank,
        qk_nope_dim=dn,
        qk_rope_dim=dr,
        v_dim=head_dim,
        mode=mode,
        kv_norm=False,
    )
    dt = q_w.dtype
    with torch.no_grad():
        layer.q_proj.weight.copy_((q_new * scale).reshape(-1, dim).to(dt))
        layer.kv_a_proj_with_mqa.weight.copy_(torch.cat((down, w_kr), 0).to(dt))
        layer.kv_b_proj.weight.copy_(up.reshape(-1, kv_lora_rank).to(dt))
        layer.o_proj.weight.copy_(o_w.detach().to(dt))
        if P:
            f = inv_freq.detach().to(layer.rotary.inv_freq.dtype)[:P]
            layer.rotary.inv_freq.copy_(f.repeat(kv_heads))
    return layer.to(device=q_w.device, dtype=dt)


def convert_to_mla(
    model,
    *,
    kv_lora_rank: int,
    qk_rope_dim: int,
    layers=None,
    method: str = "activations",
    calibration_ids: torch.Tensor | None = None,
    mode: str = "auto",
    inplace: bool = False,
):
    """A copy of a Llama-family ``model`` (``inplace=False``) whose attention layers are MLA (module docstring).

    Args:
        kv_lora_rank: the latent width ``r`` of every converted layer.
        qk_rope_dim: the decoupled RoPE width, ``kv_heads * 2P`` for ``P`` kept rotation pairs per KV head
            (``kv_heads * head_dim``: RoPE everywhere, exact with ``r = kv_heads * head_dim``).
        layers: indices to convert (default all).
        method: ``"activations"`` (covariance-aware SVD on ``calibration_ids``) or ``"weights"`` (X-EcoMLA's).
        calibration_ids: ``(S, N)`` token ids for ``method="activations"``.
        mode: the MLA layers' mode: ``"auto"`` (default: the naive form for a prefill, the absorbed one for a
            decode step), ``"absorb"`` or ``"naive"``.
    """
    if method not in METHODS:
        raise ShapeError(bad("method", f"one of {METHODS}", repr(method)))
    check_count("kv_lora_rank", kv_lora_rank, 1)
    check_count("qk_rope_dim", qk_rope_dim, 0)
    dim, heads, kv_heads, head_dim = _attn_config(model)
    n_layers = len(model.model.layers)
    layers = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if any(not 0 <= i < n_layers for i in layers):
        raise ShapeError(bad("layers", f"indices in [0, {n_layers})", layers))
    covs = {}
    if method == "activations":
        if not isinstance(calibration_ids, torch.Tensor) or calibration_ids.dim() != 2:
            raise ShapeError(
                bad(
                    "calibration_ids",
                    "a (S, N) tensor of token ids for method='activations'",
                    type(calibration_ids).__name__,
                )
            )
        covs = input_covariances(model, calibration_ids, layers)
    out = model if inplace else copy.deepcopy(model)
    inv_freq = model.model.rotary_emb.inv_freq
    for i in layers:
        a = out.model.layers[i].self_attn
        if isinstance(a, MLASelfAttention):
            raise ShapeError(bad("model", f"layer {i} not yet converted", "an MLA layer"))
        mla = mla_from_gqa(
            a.q_proj.weight,
            a.k_proj.weight,
            a.v_proj.weight,
            a.o_proj.weight,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            kv_lora_rank=kv_lora_rank,
            qk_rope_dim=qk_rope_dim,
            inv_freq=inv_freq,
            cov=covs.get(i),
            mode=mode,
        )
        out.model.layers[i].self_attn = MLASelfAttention(mla, i)
    return out


def gqa_values_per_token(model) -> int:
    """Values one token costs per layer in the original GQA cache: ``2 * kv_heads * head_dim``."""
    _, _, kv_heads, head_dim = _attn_config(model)
    return 2 * kv_heads * head_dim


def mla_layers(model) -> list[MLASelfAttention]:
    return [m for m in model.modules() if isinstance(m, MLASelfAttention)]


@contextlib.contextmanager
def latent_caches(model, batch: int, max_len: int):
    """Every converted layer decodes with its own :class:`~attnkit.layers.mla.LatentCache` inside the block;
    yields the list of caches (run ``model(ids, use_cache=False)`` on the next tokens)."""
    layers = mla_layers(model)
    try:
        for m in layers:
            m.cache = m.mla.make_cache(batch, max_len)
        yield [m.cache for m in layers]
    finally:
        for m in layers:
            m.cache = None


def attention_io(model, ids: torch.Tensor, layers) -> dict:
    """``{layer: (x, y)}``: the input hidden states and the output (after ``o_proj``) of every chosen layer's
    ``self_attn`` in forwards of ``model`` over the rows of ``ids`` ``(S, N)``; float32 ``(S, N, dim)`` each."""
    xs, ys, hooks = {i: [] for i in layers}, {i: [] for i in layers}, []
    for i in layers:

        def hook(mod, args, kwargs, out, i=i):
            xs[i].append(kwargs.get("hidden_states", args[0] if args else None).detach().float().clone())
            ys[i].append((out[0] if isinstance(out, tuple) else out).detach().float().clone())

        hooks.append(model.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    _forward_rows(model, ids, hooks)
    return {i: (torch.cat(xs[i]), torch.cat(ys[i])) for i in layers}


def _relative_mse(pred, target):
    return (pred - target).pow(2).sum() / target.pow(2).sum()


def layer_error(mla: MultiheadLatentAttention, x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative squared error ``sum ||mla(x) - y||^2 / sum ||y||^2`` over the rows of ``x``, ``y`` ``(S, N, dim)``."""
    with torch.no_grad():
        num = sum((mla(x[s : s + 1]) - y[s : s + 1]).pow(2).sum() for s in range(len(x)))
    return float(num / y.pow(2).sum())


def distill_mla(
    converted,
    original,
    ids: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 1e-4,
    batch: int = 1,
    layers=None,
    seed: int = 0,
    progress=None,
) -> dict:
    r"""Layer-local distillation of the MLA layers of ``converted`` towards the attention of ``original``, in place.

    A CPU-budget substitute for X-EcoMLA's distillation (which trains the whole upcycled model end to end against
    the original's output distribution on billions of tokens: 1.7B to 7B tokens and tens of MI300 GPU hours):
    here every converted layer is trained on its own, a few hundred Adam steps on a few thousand tokens, to
    reproduce the *original* layer's attention output given the *original* model's hidden states. With
    ``x_\ell`` the input of layer ``\ell``'s attention and ``y_\ell = \mathrm{Attn}_\ell(x_\ell)`` its output after
    ``o_proj`` in the original model, captured once on the rows of ``ids`` (forward hooks), layer ``\ell``'s MLA
    parameters ``\theta_\ell`` (``q_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``) minimise the
    relative error

    .. math::
        L_\ell(\theta_\ell) = \frac{\sum \| \mathrm{MLA}_{\theta_\ell}(x_\ell) - y_\ell \|^2}{\sum \| y_\ell \|^2}

    over minibatches of ``batch`` rows, starting from the SVD initialisation; the rest of the model (embeddings,
    MLPs, norms, other layers) is untouched. The layers are independent (their inputs come from the original
    model), so errors that compound through depth are not trained against, and nothing here matches the
    next-token distribution: the distilled model is better than the training-free one but far from what
    X-EcoMLA's recipe reaches. ``ids`` should be disjoint from any evaluation text.

    Args:
        converted: a model from :func:`convert_to_mla` (its MLA layers are trained in place).
        original: the unconverted model (frozen; only run forward once).
        ids: ``(S, N)`` token ids of the distillation text.
        steps: Adam steps per layer; ``lr`` its learning rate (cosine-decayed to zero).
        batch: rows per step.
        layers: which converted layers to train (default every one).

    Returns ``{"layers": {layer: {"before": L, "after": L}}, "seconds": s, "steps": steps, "threads": t}`` with
    ``L`` the relative error over all of ``ids`` before and after training.
    """
    import time

    check_count("steps", steps, 0)
    check_count("batch", batch, 1)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ShapeError(bad("ids", "a (S, N) tensor of token ids", type(ids).__name__))
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    mods = {m.layer_idx: m for m in mla_layers(converted)}
    layers = sorted(mods) if layers is None else [int(i) for i in layers]
    if any(i not in mods for i in layers):
        raise ShapeError(bad("layers", f"converted layers ({sorted(mods)})", layers))
    io = attention_io(original, ids, layers)
    gen = torch.Generator().manual_seed(seed)
    res = {}
    for i in layers:
        mla = mods[i].mla
        x, y = io.pop(i)
        dt = next(mla.parameters()).dtype
        x, y = x.to(dt), y.to(dt)
        before = layer_error(mla, x, y)
        params = [p for p in mla.parameters() if p.requires_grad]
        flags = [p.requires_grad for p in converted.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * k / max(1, steps))).item())
        )
        mla.train()
        for _ in range(steps):
            pick = torch.randint(len(x), (batch,), generator=gen)
            loss = _relative_mse(mla(x[pick]), y[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        mla.eval()
        for p, f in zip(converted.parameters(), flags, strict=True):
            p.requires_grad_(f)
            p.grad = None
        res[i] = {"before": before, "after": layer_error(mla, x, y)}
        say(f"distill layer {i}: relative error {before:.4f} -> {res[i]['after']:.4f}")
    return {"layers": res, "seconds": time.perf_counter() - t0, "steps": steps, "threads": torch.get_num_threads()}
