r"""Causal tools: change what a head writes, or what a token group can see, and measure the effect (family H).

A head's output is the slice ``[h D, (h + 1) D)`` of the input of its layer's output projection (Llama's
``o_proj``, BERT's ``attention.output.dense``), since :math:`\mathrm{out} = \sum_h o_h W_O^h`. Every tool here
edits or reads that slice with a forward pre-hook, so it works on any model whose attention modules expose
the projection, through the public module tree (no forked modeling file):

- :func:`intervene`: head ablation (``"zero"``, ``"mean"``, ``"resample"``) and output scaling per (layer, head);
  with no edit, or a scale of exactly 1, nothing is touched (bit-identical to no intervention, tested);
- :func:`head_outputs`: every head's output at every position (for means, resampling and patching);
- :func:`patch_heads`: activation patching from a clean into a corrupted prompt, one head at a time, scored by
  the share of the logit difference it restores (Wang et al.'s IOI circuit analysis);
- :func:`direct_logit_attribution`: each head's direct contribution to the answer-minus-wrong logit through the
  unembedding, with the final norm's scale frozen from the clean run;
- :func:`knockout`: attention from one token group to another blocked in a window of layers (the cross-modal
  information-flow paper's attention knockout, on text groups);
- :func:`context_divergence`: how much each head's output changes with and without a context span (VHD);
- :func:`attention_influence`: documents scored by the loss increase when given heads are masked;
- :func:`finercut`: greedy removal of whole attention sublayers, each step removing the one whose removal
  moves the output distribution least (KL), as FinerCut does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import ShapeError, UnsupportedError, bad
from ..hf.policy import Policy
from ..hf.steer import GroupKnockout, Steer
from .scores import HeadScores, register_tool

ABLATIONS = ("zero", "mean", "resample")


def _layers(model) -> list:
    """Per layer, ``(attention module, output projection, heads, head_dim)``."""
    out = []
    for m in model.modules():
        if hasattr(m, "o_proj") and hasattr(m, "layer_idx"):
            cfg = m.config
            heads = cfg.num_attention_heads
            out.append((m, m.o_proj, heads, getattr(m, "head_dim", cfg.hidden_size // heads)))
        elif type(m).__name__.endswith("Attention") and hasattr(m, "self") and hasattr(m, "output"):
            sa = m.self
            out.append((sa, m.output.dense, sa.num_attention_heads, sa.attention_head_size))
    if not out:
        raise UnsupportedError(
            bad("model", "attention modules with an output projection (o_proj or output.dense)", type(model).__name__)
        )
    return out


def _check_heads(model, heads, name):
    layers = _layers(model)
    for key in heads:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ShapeError(bad(name, "keys (layer, head)", key))
        layer, head = key
        if not 0 <= layer < len(layers) or not 0 <= head < layers[layer][2]:
            raise ShapeError(bad(name, f"layer < {len(layers)} and head < {layers[0][2]}", key))
    return layers


@contextlib.contextmanager
def intervene(model, *, ablate: dict | None = None, scale: dict | None = None, means=None, source=None):
    """Edit head outputs inside the block: ``ablate={(layer, head): "zero" | "mean" | "resample"}``,
    ``scale={(layer, head): factor}``.

    ``"mean"`` replaces the head's output by ``means[layer][head]`` ``(D,)`` (its mean over a reference set,
    from :func:`head_outputs`); ``"resample"`` by its output on another input, ``source[layer]``
    ``(B, N, H, D)`` of the same shape. Scale is applied after ablation. Identity settings (no entries, scale
    1.0) install no hook: the model's output is bit-identical."""
    ablate, scale = dict(ablate or {}), {k: float(v) for k, v in (scale or {}).items() if float(v) != 1.0}
    layers = _check_heads(model, list(ablate) + list(scale), "ablate/scale")
    for key, how in ablate.items():
        if how not in ABLATIONS:
            raise ShapeError(bad(f"ablate[{key}]", f"one of {ABLATIONS}", how))
        if how == "mean" and means is None:
            raise ShapeError(bad("means", "head means from head_outputs(...).mean over batch and positions", None))
        if how == "resample" and source is None:
            raise ShapeError(bad("source", "head outputs of another input (head_outputs)", None))
    hooks = []
    by_layer: dict = {}
    for (layer, head), how in ablate.items():
        by_layer.setdefault(layer, []).append(("ablate", head, how))
    for (layer, head), f in scale.items():
        by_layer.setdefault(layer, []).append(("scale", head, f))
    for layer, edits in by_layer.items():
        _, proj, H, D = layers[layer]

        def hook(module, args, layer=layer, edits=edits, D=D, H=H):
            x = args[0]
            y = x.reshape(*x.shape[:-1], H, D).clone()
            for kind, head, how in sorted(edits, key=lambda e: e[0]):  # ablate before scale
                if kind == "scale":
                    y[..., head, :] *= how
                elif how == "zero":
                    y[..., head, :] = 0
                elif how == "mean":
                    y[..., head, :] = means[layer][head].to(y)
                else:
                    y[..., head, :] = source[layer][..., head, :].to(y)
            return (y.view_as(x),) + tuple(args[1:])

        hooks.append(proj.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def head_outputs(model, ids, attention_mask=None) -> list[torch.Tensor]:
    """Every head's output: ``L`` tensors ``(B, N, H, D)`` (the output projection's input, split by head)."""
    layers = _layers(model)
    got: dict = {}
    hooks = [
        proj.register_forward_pre_hook(
            lambda mod, args, i=i, H=H, D=D: got.__setitem__(
                i, args[0].detach().reshape(*args[0].shape[:-1], H, D).clone()
            )
        )
        for i, (_, proj, H, D) in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return [got[i] for i in range(len(layers))]


def _logit_diff(model, ids, answer, wrong, attention_mask=None) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention_mask).logits[:, -1]
    r = torch.arange(len(answer))
    return (logits[r, answer] - logits[r, wrong]).double()


def patch_heads(model, clean, corrupt, answer, wrong, *, heads=None) -> HeadScores:
    r"""Activation patching: for each head, run the corrupted prompt with that head's output replaced by its
    output on the clean prompt (every position), and score the share of the logit difference restored,

    .. math:: \frac{LD_{patched} - LD_{corrupt}}{LD_{clean} - LD_{corrupt}},\qquad LD = \mathrm{logit}_{answer}
        - \mathrm{logit}_{wrong} \text{ at the last position, averaged over the batch.}

    ``clean``, ``corrupt`` ``(B, N)`` of equal shape; ``answer``, ``wrong`` ``(B,)`` token ids. ``heads``: the
    (layer, head) pairs to patch (None: all; one forward each)."""
    if clean.shape != corrupt.shape:
        raise ShapeError(bad("corrupt", f"the clean prompt's shape {tuple(clean.shape)}", tuple(corrupt.shape)))
    layers = _layers(model)
    src = head_outputs(model, clean)
    ld_clean = _logit_diff(model, clean, answer, wrong).mean()
    ld_corrupt = _logit_diff(model, corrupt, answer, wrong).mean()
    denom = ld_clean - ld_corrupt
    L, H = len(layers), layers[0][2]
    values = torch.full((L, H), float("nan"), dtype=torch.float64)
    todo = [(l_, h) for l_ in range(L) for h in range(H)] if heads is None else list(heads)
    for layer, head in todo:
        with intervene(model, ablate={(layer, head): "resample"}, source=src):
            ld = _logit_diff(model, corrupt, answer, wrong).mean()
        values[layer, head] = (ld - ld_corrupt) / denom
    return HeadScores(
        "patching",
        values,
        paper="Interpretability in the Wild: a Circuit for Indirect Object Identification (Wang et al., 2023)",
        meaning="share of the clean-corrupt logit difference a head restores when patched",
        extra={"logit_diff_clean": round(float(ld_clean), 4), "logit_diff_corrupt": round(float(ld_corrupt), 4)},
    )


def direct_logit_attribution(model, ids, answer, wrong) -> HeadScores:
    r"""Each head's direct effect on :math:`\mathrm{logit}_{answer} - \mathrm{logit}_{wrong}` at the last
    position: :math:`(o_h W_O^h) \cdot \frac{g}{\sigma} \odot (W_U[a] - W_U[w])` with the final RMSNorm's gain
    :math:`g` and the scale :math:`\sigma` of the clean final residual frozen (the linearisation every DLA uses),
    averaged over the batch. Causal LMs with a final RMSNorm (``model.model.norm``) and ``lm_head``."""
    layers = _layers(model)
    norm, head = getattr(getattr(model, "model", None), "norm", None), getattr(model, "lm_head", None)
    if norm is None or head is None:
        raise UnsupportedError(bad("model", "a causal LM with model.norm and lm_head", type(model).__name__))
    outs = head_outputs(model, ids)
    with torch.no_grad():
        seen = []
        hook = norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0][:, -1].detach()))
        try:
            model(input_ids=ids)
        finally:
            hook.remove()
        resid = seen[-1]  # the residual stream entering the final norm
        eps = getattr(norm, "variance_epsilon", 1e-6)
        sigma = resid.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
        direction = (head.weight[answer] - head.weight[wrong]) * norm.weight / sigma  # (B, dim)
        values = []
        for layer, (_, proj, H, D) in enumerate(layers):
            o = outs[layer][:, -1]  # (B, H, D)
            W = proj.weight.view(proj.weight.shape[0], H, D)  # (dim, H, D)
            contrib = torch.einsum("bhd,ehd,be->bh", o, W, direction)
            values.append(contrib.mean(0).double())
    return HeadScores(
        "direct_logit",
        torch.stack(values),
        paper="Interpretability in the Wild: a Circuit for Indirect Object Identification (Wang et al., 2023)",
        meaning="direct contribution to logit(answer) - logit(wrong) at the last position",
    )


class Knockout(Policy):
    """Attention with the pairs from ``dst`` queries to ``src`` keys removed in ``layers`` (dense elsewhere).

    ``src``, ``dst``: ``(N,)`` bool masks over the prompt's token indices (the same for every batch row). The
    explicit softmax is :class:`attnkit.hf.Steer`'s, with a :class:`~attnkit.hf.steer.GroupKnockout`."""

    name = "knockout"

    def __init__(self, src, dst, layers):
        self._steer = Steer((GroupKnockout(src.to(torch.bool), dst.to(torch.bool), tuple(layers)),))

    def attend(self, layer, q, k, v, key_padding_mask, q_offset, scale, causal):
        return self._steer.attend(layer, q, k, v, key_padding_mask, q_offset, scale, causal)


@contextlib.contextmanager
def knockout(model, *, src, dst, layers):
    """``with knockout(model, src=mask, dst=mask, layers=range(a, b)):`` the ``dst`` tokens cannot attend to the
    ``src`` tokens in those layers (Zhang et al.'s attention knockout between token groups, on text groups)."""
    from ..hf import applied

    with applied(model, Knockout(src, dst, layers)):
        yield


def knockout_sweep(model, ids, *, src, dst, answer, window: int = 4) -> dict:
    """The answer's probability at the last position with ``src -> dst`` attention knocked out in each window
    of ``window`` consecutive layers: ``{"start": [...], "change": [...]}`` (relative change against intact)."""
    L = len(_layers(model))
    with torch.no_grad():
        base = model(input_ids=ids).logits[:, -1].softmax(-1)[torch.arange(len(answer)), answer]
    starts, change = [], []
    for a in range(0, max(1, L - window + 1)):
        with knockout(model, src=src, dst=dst, layers=range(a, a + window)), torch.no_grad():
            p = model(input_ids=ids).logits[:, -1].softmax(-1)[torch.arange(len(answer)), answer]
        starts.append(a)
        change.append(float(((p - base) / base).mean()))
    return {"start": starts, "change": change, "window": window}


def context_divergence(model, with_context, without_context) -> HeadScores:
    """VHD's head divergence on text: each head's output at the last position with the context and without it,
    ``||o_h(with) - o_h(without)|| / ||o_h(with)||``, averaged over the batch. The two prompts end with the same
    question tokens.

    Substitute: VHD (the VHR paper) compares a vision-language model's heads with and without the image; here
    the context is a text passage, which is said so in every report."""
    a, b = head_outputs(model, with_context), head_outputs(model, without_context)
    vals = [
        ((x[:, -1] - y[:, -1]).norm(dim=-1) / x[:, -1].norm(dim=-1).clamp_min(1e-12)).mean(0)
        for x, y in zip(a, b, strict=True)
    ]
    return HeadScores(
        "context_divergence",
        torch.stack(vals),
        paper="Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence (VHD/VHR, 2024) [text]",
        meaning="relative change of the head's last-position output without the context",
    )


def _nll(model, ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(-1).double()


@dataclass
class Influence:
    """Per document: the loss with all heads, with the given heads masked, and the increase."""

    loss: torch.Tensor
    masked: torch.Tensor

    @property
    def influence(self) -> torch.Tensor:
        return self.masked - self.loss


def attention_influence(model, docs, heads) -> Influence:
    """AttentionInfluence (Hua et al., 2025): mask ``heads`` (the retrieval heads; zero ablation), and score each
    document of ``docs`` ``(D, N)`` by the increase of its mean next-token loss; high influence marks documents
    that need those heads (reasoning-heavy, retrieval-heavy text)."""
    base = _nll(model, docs)
    with intervene(model, ablate={h: "zero" for h in heads}):
        masked = _nll(model, docs)
    return Influence(base, masked)


def finercut(model, ids, *, steps: int = 4) -> list[dict]:
    """FinerCut (Zhang et al., 2024), attention sublayers only: ``steps`` times, remove (zero every head of) the
    attention sublayer whose removal gives the smallest KL divergence between the full model's and the pruned
    model's next-token distributions on ``ids``. Returns the removal order with the KL after each step."""
    L, H = len(_layers(model)), _layers(model)[0][2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits.log_softmax(-1)
    removed: list[int] = []
    out = []
    for _ in range(steps):
        best = None
        for layer in range(L):
            if layer in removed:
                continue
            heads = {(r, h): "zero" for r in removed + [layer] for h in range(H)}
            with intervene(model, ablate=heads), torch.no_grad():
                lp = model(input_ids=ids).logits.log_softmax(-1)
            kl = float(torch.nn.functional.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).mean())
            if best is None or kl < best[1]:
                best = (layer, kl)
        removed.append(best[0])
        out.append({"removed": best[0], "kl": best[1]})
    return out


_IOI = "Interpretability in the Wild: a Circuit for Indirect Object Identification (Wang et al., 2023)"
for _name, _fn, _paper, _summary, _supports in (
    (
        "head_intervention",
        intervene,
        "Circuit Component Reuse Across Tasks in Transformer Language Models (2023)",
        "head ablation (zero, mean, resample) and output scaling per (layer, head)",
        ("causal", "gqa", "padding"),
    ),
    (
        "activation_patching",
        patch_heads,
        _IOI,
        "clean-to-corrupt patching per head, logit difference restored",
        ("causal", "gqa"),
    ),
    (
        "direct_logit_attribution",
        direct_logit_attribution,
        _IOI,
        "each head's direct effect on a logit difference",
        ("causal", "gqa"),
    ),
    (
        "attention_knockout",
        knockout,
        "Cross-modal Information Flow in Multimodal Large Language Models (2024) [text]",
        "attention between token groups blocked over a window of layers",
        ("causal", "gqa", "padding"),
    ),
    (
        "context_divergence",
        context_divergence,
        "Vision-aware Head Divergence (VHD/VHR, 2024) [text context]",
        "how a head's output changes with and without the context",
        ("causal", "gqa"),
    ),
    (
        "attention_influence",
        attention_influence,
        "AttentionInfluence: Adopting Attention Head Influence for Weak-to-Strong Pretraining Data Selection (2025)",
        "documents scored by the loss increase when the retrieval heads are masked",
        ("causal", "gqa"),
    ),
    (
        "finercut",
        finercut,
        "FinerCut: Finer-grained Interpretable Layer Pruning for Large Language Models (2024)",
        "greedy removal of attention sublayers by KL (attention sublayers only)",
        ("causal", "gqa"),
    ),
):
    register_tool(_name, _fn, paper=_paper, summary=_summary, supports=_supports)
