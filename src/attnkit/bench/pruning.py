"""``attnkit eval --pruning``: family-F token pruning on SmolLM2, measured on pass-key span QA.

A pass key hides in ``tokens`` tokens of shipped English text (the span), the question follows. The answer
is scored by teacher forcing in the same prefill: the prompt plus the key's tokens but the last, and the key
counts as found when every one of its tokens is the argmax at its position. Per pruner: accuracy, prefill
seconds (mean over prompts) and the key/value entries the prefill leaves, against dense. Tokens really leave
the sequence (:func:`attnkit.hf.pruned_forward`), so the time and the entries fall with them.
"""

from __future__ import annotations

import statistics
import time

import torch


def configs():
    from ..hf import DyVTE, FastV, PSigmoid, PyramidDrop

    return {
        "dense": None,
        "PyramidDrop, ranked by the 11 question tokens": (PyramidDrop(layers=(8, 16, 24), ratio=0.5), "question"),
        "FastV, after layer 2, keep 1/2": FastV(layer=2, keep=0.5),
        "FastV, after layer 2, keep 1/4": FastV(layer=2, keep=0.25),
        "FastV, after layer 8, keep 1/4": FastV(layer=8, keep=0.25),
        "PyramidDrop, layers 8/16/24, ratio 1/2": PyramidDrop(layers=(8, 16, 24), ratio=0.5),
        "P-Sigmoid, midpoint 12, k 0.5": PSigmoid(midpoint=12, k=0.5),
        "DyVTE, the span exits after layer 16": DyVTE(layer=16),
        "DyVTE, the span exits after layer 24": DyVTE(layer=24),
    }


def _items(tok, tokens, n, seed):
    """(ids, span, answer ids) per pass-key prompt: the prompt plus the answer's tokens but the last."""
    from ..analysis.prompts import PASSKEY_QUESTION, needles

    q_len = len(tok(PASSKEY_QUESTION, add_special_tokens=False).input_ids)
    out = []
    for p in needles(tok, tokens=tokens, depths=tuple((i + 0.5) / n for i in range(n)), seed=seed):
        answer = tok(" " + p.answer, add_special_tokens=False).input_ids
        out.append((torch.cat([p.ids, torch.tensor([answer[:-1]])], 1), (1, p.ids.shape[1] - q_len), answer))
    return out, q_len


def run(model, tok, *, tokens: int = 1024, prompts: int = 8, search: int = 4, say=lambda s: None) -> dict:
    from ..hf import g_search, pruned_forward

    items, q_len = _items(tok, tokens, prompts, seed=3)
    todo = configs()
    search_s = None
    if search:
        say(f"pruning: G-Search on {search} validation prompts (seed 11, disjoint from the test prompts)")
        t0 = time.perf_counter()
        found = g_search(model, _items(tok, tokens, search, seed=11)[0], layers=(2, 8, 14, 20, 26))
        search_s = time.perf_counter() - t0
        todo["G-Search schedule " + _describe(found.keeps)] = found
    rows = []
    dense_kv = None
    for name, pruner in todo.items():
        say(f"pruning: {name}")
        pruner, window = pruner if isinstance(pruner, tuple) else (pruner, 1)
        window = q_len if window == "question" else window
        hits, secs, kv = 0, [], []
        for ids, span, answer in items:
            res = pruned_forward(model, ids, span=span, pruner=pruner, tail=len(answer), window=window)
            hits += int(res.logits[0].argmax(-1).tolist() == answer)
            secs.append(res.seconds)
            kv.append(res.kv_tokens)
        if dense_kv is None:
            dense_kv = statistics.mean(kv)
        rows.append(
            {
                "config": name,
                "accuracy": hits / len(items),
                "prefill_s": statistics.mean(secs),
                "kv_share": statistics.mean(kv) / dense_kv,
            }
        )
    return {"rows": rows, "tokens": tokens, "prompts": len(items), "search_s": search_s}


def _describe(keeps: dict) -> str:
    return (
        "(" + ", ".join(f"after {lyr}: keep {f:.2g}" for lyr, f in sorted(keeps.items())) + ")" if keeps else "(none)"
    )


def markdown(res: dict) -> str:
    dense_s = res["rows"][0]["prefill_s"]
    lines = [
        f"# Token pruning: pass-key span QA (SmolLM2-135M, {res['tokens']} tokens, {res['prompts']} prompts)",
        "",
        "| pruner | key found | prefill s | vs dense | KV entries vs dense |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['accuracy']:.0%} | {r['prefill_s']:.2f} | {r['prefill_s'] / dense_s:.2f}x | "
            f"{r['kv_share']:.2f} |"
        )
    if res.get("search_s") is not None:
        lines.append(f"\nThe G-Search fit took {res['search_s']:.0f} s.")
    return "\n".join(lines) + "\n"
