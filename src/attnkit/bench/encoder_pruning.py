"""Encoder token pruning and merging (family F) on all-MiniLM-L6-v2: sentence-embedding fidelity vs speed.

Passages of shipped English text (``attnkit.models.english_text()``, cut into ``passages`` consecutive windows
of exactly ``tokens`` tokens, [CLS] and [SEP] included, so no padding) are encoded densely and with each
method at each keep fraction. Per configuration: the mean cosine similarity between the pruned and the dense
sentence embedding, the encode seconds (mean over batches of ``batch`` passages, the same layer-by-layer
driver for dense, so the ratio is the pruning's own effect), and the tokens left. A random-keep baseline at
the same layer and budgets says what the [CLS] ranking buys; a sweep of VTC-CLS over the pruning layer shows
where the issue's target (cosine >= 0.95 at keep 0.5) is met.
"""

from __future__ import annotations

import statistics

import torch

KEEPS = (0.25, 0.5, 0.75)


def configs(layer: int = 3):
    from ..hf.encoder_prune import VMTC, FlowCut, HiRED, MustDrop, RandomKeep, VFlowOpt, VTCCLS

    return {
        f"random keep (after layer {layer})": lambda k: RandomKeep(layer=layer, keep=k),
        f"VTC-CLS (after layer {layer})": lambda k: VTCCLS(layer=layer, keep=k),
        f"VTC-CLS, layers 1..{layer} summed": lambda k: VTCCLS(layer=layer, start=1, keep=k),
        f"HiRED, 4 chunks (alloc layer 0, after layer {layer})": lambda k: HiRED(layer=layer, keep=k),
        f"FlowCut (prunes after layers 1, {layer})": lambda k: FlowCut(layer=layer, keep=k),
        f"VMTC, size bias (after layer {layer})": lambda k: VMTC(layer=layer, keep=k),
        f"VMTC, no size bias (after layer {layer})": lambda k: VMTC(layer=layer, keep=k, size_bias=False),
        f"MustDrop (windows of 3 after layer 0, filter after {layer})": lambda k: MustDrop(layer=layer, keep=k),
        f"VFlowOpt (stages after layers 1, {layer})": lambda k: VFlowOpt(layers=(1, layer), keep=k),
    }


def passages(tok, *, tokens: int = 256, count: int = 32, text: str | None = None):
    """``count`` (count, tokens) id rows of consecutive text, each [CLS] + tokens-2 ids + [SEP]."""
    from ..models import english_text

    text = english_text() if text is None else text
    n = tokens - 2
    ids = tok(text[: 8 * n * count + 1000], add_special_tokens=False).input_ids
    if len(ids) < n * count:
        raise ValueError(f"text: expected at least {n * count} tokens, got {len(ids)}")
    cls, sep = tok.cls_token_id, tok.sep_token_id
    return torch.tensor([[cls] + ids[i * n : (i + 1) * n] + [sep] for i in range(count)])


def _measure(model, rows, pruner, batch, dense):
    """Per batch, the dense layer-by-layer encode and the pruned one back to back (so that a machine shared
    with other work slows both alike); the speed ratio is the median over batches of pruned / dense."""
    from ..hf.encoder_prune import pruned_encode

    cos, secs, ratios, kept, tpl = [], [], [], [], None
    for i in range(0, len(rows), batch):
        ids = rows[i : i + batch]
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        ref = pruned_encode(model, enc).seconds
        out = pruned_encode(model, enc, pruner=pruner)
        cos += (out.embedding * dense[i : i + batch]).sum(-1).tolist()
        secs.append(out.seconds)
        ratios.append(out.seconds / ref)
        kept += out.kept.tolist()
        tpl = out.tokens_per_layer
    return {
        "cosine": statistics.mean(cos),
        "min_cosine": min(cos),
        "seconds": statistics.mean(secs),
        "vs_dense": statistics.median(ratios),
        "kept": statistics.mean(kept),
        "tokens_per_layer": tpl,
    }


def run(
    model,
    tok,
    *,
    texts=None,
    tokens: int = 256,
    count: int = 32,
    batch: int = 8,
    layer: int = 3,
    keeps=KEEPS,
    sweep: bool = True,
    say=lambda s: None,
) -> dict:
    """The table (rows per method and keep) and, with ``sweep``, VTC-CLS / random at keep 0.5 per layer."""
    from ..hf.encoder_prune import RandomKeep, VTCCLS, pruned_encode

    rows = passages(tok, tokens=tokens, count=count, text=texts)
    dense = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            ids = rows[i : i + batch]
            dense.append(pruned_encode(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).embedding)
    dense = torch.cat(dense)
    pruned_encode(model, {"input_ids": rows[:batch]})  # warm-up
    say("encoder pruning: dense")
    base = _measure(model, rows, None, batch, dense)
    out = [{"config": "dense", "keep": 1.0, **base}]
    for name, make in configs(layer).items():
        for k in keeps:
            say(f"encoder pruning: {name}, keep {k}")
            out.append({"config": name, "keep": k, **_measure(model, rows, make(k), batch, dense)})
    per_layer = []
    if sweep:
        L = len(model.encoder.layer)
        for lyr in range(L):
            say(f"encoder pruning: layer sweep {lyr}")
            v = _measure(model, rows, VTCCLS(layer=lyr, keep=0.5), batch, dense)
            r = _measure(model, rows, RandomKeep(layer=lyr, keep=0.5), batch, dense)
            per_layer.append(
                {
                    "layer": lyr,
                    "vtc_cls": v["cosine"],
                    "vtc_min": v["min_cosine"],
                    "random": r["cosine"],
                    "seconds": v["seconds"],
                    "vs_dense": v["vs_dense"],
                }
            )
    return {
        "rows": out,
        "per_layer": per_layer,
        "dense_s": base["seconds"],
        "tokens": tokens,
        "count": count,
        "batch": batch,
        "layer": layer,
        "threads": torch.get_num_threads(),
    }


def markdown(res: dict) -> str:
    lines = [
        f"# Encoder token pruning: all-MiniLM-L6-v2, {res['count']} passages x {res['tokens']} tokens "
        f"(batches of {res['batch']}, {res['threads']} threads)",
        "",
        "| method | keep | embedding cosine (mean) | min | encode s / batch | vs dense (paired median) | tokens left "
        "| tokens per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['keep']:.2f} | {r['cosine']:.4f} | {r['min_cosine']:.4f} | {r['seconds']:.3f} | "
            f"{r['vs_dense']:.2f}x | {r['kept']:.0f} | {'/'.join(str(x) for x in r['tokens_per_layer'])} |"
        )
    if res["per_layer"]:
        lines += [
            "",
            "VTC-CLS at keep 0.5, by the layer after which tokens leave (target: cosine >= 0.95):",
            "",
            "| pruning layer | VTC-CLS cosine | VTC-CLS min | random-keep cosine | encode s / batch | vs dense "
            "| target |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in res["per_layer"]:
            lines.append(
                f"| {p['layer']} | {p['vtc_cls']:.4f} | {p['vtc_min']:.4f} | {p['random']:.4f} | "
                f"{p['seconds']:.3f} | {p['vs_dense']:.2f}x | {'met' if p['vtc_cls'] >= 0.95 else 'missed'} |"
            )
    return "\n".join(lines) + "\n"
