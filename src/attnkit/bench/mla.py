"""MLA benchmarks: the GQA-to-MLA rank curve on SmolLM2-135M, and absorbed vs naive MLA decode at long context.

:func:`run_mla_eval` converts the real SmolLM2-135M (:func:`attnkit.hf.mla.convert_to_mla`) at several cache
budgets and reports, per budget, perplexity and KL to the original model on English text that ships with Python
(:func:`attnkit.models.english_text`, the windows from its start; the calibration text for the activation-aware
SVD comes from far later in it, so it is disjoint), KV values and bytes per token per layer, prefill time of one
window and decode time per token with the latent caches. :func:`decode_speed` times one MLA layer's decode step
(one query over an ``n``-token latent cache) in both modes.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

#: cache budgets as fractions of GQA's 384 values/token/layer, and the RoPE width used at each: ``kv_heads * 2P``
#: for ``P`` kept rotation pairs per KV head (chosen by the sweep recorded in the report; see attnkit.hf.mla).
BUDGETS = (0.25, 0.5, 0.75, 1.0)
ROPE_DIMS = {0.25: 72, 0.5: 96, 0.75: 144, 1.0: 192}


def _windows(tok, n_windows, window, start_token=0):
    from ..models import english_text

    ids = tok(english_text(), return_tensors="pt").input_ids
    need = start_token + n_windows * window
    if ids.shape[1] < need:
        raise ValueError(f"windows: expected at most {ids.shape[1]} tokens of text, got {need}")
    return ids, ids[0, start_token:need].view(n_windows, window)


def _logp(model, rows):
    with torch.no_grad():
        return torch.stack([F.log_softmax(model(r[None], use_cache=False).logits[0].float(), -1) for r in rows])


def _score(logp, rows, ref_logp=None):
    nll = -logp[:, :-1].gather(-1, rows[:, 1:, None])[..., 0]
    res = {"ppl": float(nll.mean().exp())}
    if ref_logp is not None:
        res["kl"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    return res


def _time_prefill(model, row, repeats=1):
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(row[None], use_cache=False)
            best = min(best, time.perf_counter() - t)
    return best


def _time_decode_mla(model, row, steps):
    from ..hf.mla import latent_caches

    n = row.numel()
    with torch.no_grad(), latent_caches(model, 1, n + steps):
        model(row[None], use_cache=False)
        tok = row[-1:][None]
        t = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, use_cache=False).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / steps


def _time_decode_gqa(model, row, steps):
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(row[None], past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / steps


def run_mla_eval(
    budgets=BUDGETS,
    *,
    rope_dims=None,
    n_windows: int = 4,
    window: int = 512,
    method: str = "activations",
    calibration_windows: int = 4,
    calibration_start: int = 40000,
    decode_steps: int = 16,
    timing: bool = True,
    distill_steps: int = 0,
    distill_lr: float = 1e-3,
    distill_windows: int = 16,
    distill_start: int = 50000,
    progress=None,
) -> dict:
    """The rank curve of SmolLM2-135M converted to MLA (module docstring).

    Args:
        budgets: MLA cache sizes as fractions of the GQA cache (``2 * kv_heads * head_dim`` values/token/layer).
        rope_dims: ``{budget: qk_rope_dim}`` (default :data:`ROPE_DIMS`, else ``kv_heads * 2 * 4``); the latent
            rank is the rest of the budget.
        n_windows, window: evaluation windows of ``window`` tokens from the start of the text.
        method: ``"activations"`` or ``"weights"`` (:func:`attnkit.hf.mla.convert_to_mla`).
        calibration_windows, calibration_start: calibration rows of ``window`` tokens from token
            ``calibration_start`` on (disjoint from the evaluation windows).
        decode_steps: greedy decode steps timed after a ``window``-token prefill.
        distill_steps: when positive, every budget also gets a distilled row: the converted model after
            :func:`attnkit.hf.mla.distill_mla` (layer-local, ``distill_steps`` Adam steps per layer at
            ``distill_lr``, one ``window``-token row per step) on ``distill_windows`` rows from token
            ``distill_start`` on (disjoint from the evaluation and calibration text); ``distill_s`` is its wall
            time (hidden-state capture included) and ``threads`` torch's thread count.

    Returns ``{"original": {...}, "rows": [{budget, kv_lora_rank, qk_rope_dim, values_per_token,
    bytes_per_token, ppl, kl, prefill_s, decode_s_per_token, distilled}, ...]}`` (a distilled row follows each
    training-free one when ``distill_steps > 0``).
    """
    from ..hf.mla import convert_to_mla, distill_mla, gqa_values_per_token, mla_layers
    from ..models import load_smollm2

    say = progress or (lambda s: None)
    model, tok = load_smollm2()
    ids, rows = _windows(tok, n_windows, window)
    calib = ids[0, calibration_start : calibration_start + calibration_windows * window].view(
        calibration_windows, window
    )
    dist = None
    if distill_steps:
        dist = ids[0, distill_start : distill_start + distill_windows * window]
        if dist.numel() < distill_windows * window:
            raise ValueError(f"distill: expected {distill_windows * window} tokens from {distill_start}")
        dist = dist.view(distill_windows, window)
    gqa = gqa_values_per_token(model)
    es = next(model.parameters()).element_size()
    ref = _logp(model, rows)
    orig = {"values_per_token": gqa, "bytes_per_token": gqa * es, **_score(ref, rows)}
    if timing:
        orig["prefill_s"] = _time_prefill(model, rows[0])
        orig["decode_s_per_token"] = _time_decode_gqa(model, rows[0], decode_steps)
    say(f"original: {orig}")
    rope_dims = dict(ROPE_DIMS if rope_dims is None else rope_dims)
    kv_heads = model.config.num_key_value_heads
    out = []
    for b in budgets:
        values = int(round(b * gqa))
        dr = rope_dims.get(b, kv_heads * 8)
        r = values - dr
        t = time.perf_counter()
        conv = convert_to_mla(model, kv_lora_rank=r, qk_rope_dim=dr, method=method, calibration_ids=calib)
        conv_s = time.perf_counter() - t
        layer = mla_layers(conv)[0].mla
        row = {
            "budget": b,
            "kv_lora_rank": r,
            "qk_rope_dim": dr,
            "values_per_token": r + dr,
            "bytes_per_token": layer.make_cache(1, 1).bytes_per_token,
            "convert_s": conv_s,
            "distilled": False,
            **_score(_logp(conv, rows), rows, ref),
        }
        if timing:
            row["prefill_s"] = _time_prefill(conv, rows[0])
            row["decode_s_per_token"] = _time_decode_mla(conv, rows[0], decode_steps)
        row["ppl_ratio"] = row["ppl"] / orig["ppl"]
        say(f"budget {b}: {row}")
        out.append(row)
        if distill_steps:
            d = distill_mla(conv, model, dist, steps=distill_steps, lr=distill_lr, progress=say)
            drow = {**{k: row[k] for k in ("budget", "kv_lora_rank", "qk_rope_dim", "values_per_token")}}
            drow.update(bytes_per_token=row["bytes_per_token"], distilled=True, distill_s=d["seconds"])
            drow.update(distill_steps=distill_steps, threads=d["threads"], **_score(_logp(conv, rows), rows, ref))
            drow["layer_error"] = {str(k): v for k, v in d["layers"].items()}
            for k in ("prefill_s", "decode_s_per_token"):
                if k in row:
                    drow[k] = row[k]  # the same shapes: the timing does not change with the weights
            drow["ppl_ratio"] = drow["ppl"] / orig["ppl"]
            say(f"budget {b} distilled: { {k: v for k, v in drow.items() if k != 'layer_error'} }")
            out.append(drow)
        del conv
        gc.collect()
    return {"original": orig, "rows": out, "method": method, "n_windows": n_windows, "window": window}


def markdown(res: dict) -> str:
    o = res["original"]
    lines = [
        f"SmolLM2-135M, {res['n_windows']} x {res['window']} tokens of Python's reference manual, "
        f"SVD method {res['method']!r}",
        "",
        "| cache | r | d_R | values/token/layer | bytes/token/layer | ppl | ppl / original | KL | prefill s "
        "| decode s/token | distill s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| GQA (original) | - | - | {o['values_per_token']} | {o['bytes_per_token']} | {o['ppl']:.3f} | 1.000 | 0 | "
        f"{o.get('prefill_s', float('nan')):.3f} | {o.get('decode_s_per_token', float('nan')):.4f} | - |",
    ]
    for r in res["rows"]:
        name = f"MLA {r['budget']:g}" + (f" + distill {r['distill_steps']}" if r.get("distilled") else "")
        dist = f"{r['distill_s']:.0f} ({r['threads']} thr)" if r.get("distilled") else "-"
        lines.append(
            f"| {name} | {r['kv_lora_rank']} | {r['qk_rope_dim']} | {r['values_per_token']} | "
            f"{r['bytes_per_token']} | {r['ppl']:.3f} | {r['ppl_ratio']:.3f} | {r['kl']:.4f} | "
            f"{r.get('prefill_s', float('nan')):.3f} | {r.get('decode_s_per_token', float('nan')):.4f} | {dist} |"
        )
    return "\n".join(lines)


def decode_speed(
    n: int = 16384,
    *,
    dim: int = 2048,
    heads: int = 16,
    kv_lora_rank: int = 512,
    qk_nope_dim: int = 128,
    qk_rope_dim: int = 64,
    v_dim: int = 128,
    steps: int = 5,
    dtype=torch.float32,
) -> dict:
    """Seconds per decode token of one MLA layer over an ``n``-token latent cache, naive vs absorbed (DeepSeek-V2's
    head shapes by default, fewer heads). The cache is filled with a random latent (no prefill is timed)."""
    from ..layers.mla import MultiheadLatentAttention

    torch.manual_seed(0)
    layer = MultiheadLatentAttention(
        dim, heads, kv_lora_rank=kv_lora_rank, qk_nope_dim=qk_nope_dim, qk_rope_dim=qk_rope_dim, v_dim=v_dim
    ).to(dtype)
    res = {"n": n, "dim": dim, "heads": heads, "kv_lora_rank": kv_lora_rank, "threads": torch.get_num_threads()}
    x = torch.randn(1, 1, dim, dtype=dtype)
    with torch.no_grad():
        cache = layer.make_cache(1, n + steps + 1)
        cache.kv[:, :n] = torch.randn(1, n, kv_lora_rank + qk_rope_dim, dtype=dtype)
        for mode in ("naive", "absorb"):
            layer.mode = mode
            cache.length = n
            layer(x, cache=cache)  # warm-up
            times = []
            for _ in range(steps):
                cache.length = n
                t = time.perf_counter()
                layer(x, cache=cache)
                times.append(time.perf_counter() - t)
            res[f"{mode}_s"] = min(times)
    res["speedup"] = res["naive_s"] / res["absorb_s"]
    return res
