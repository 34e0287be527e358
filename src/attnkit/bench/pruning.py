"""``attnkit eval --pruning``: family-F token pruning on SmolLM2, measured on pass-key span QA.

A pass key hides in ``tokens`` tokens of shipped English text (the span), the question follows. The answer
is scored by teacher forcing in the same prefill: the prompt plus the key's tokens but the last, and the key
counts as found when every one of its tokens is the argmax at its position. Per pruner: accuracy, prefill
seconds (mean over prompts) and the key/value entries the prefill leaves, against dense. Tokens really leave
the sequence (:func:`attnkit.hf.pruned_forward`), so the time and the entries fall with them.
"""

from __future__ import annotations

import statistics

import torch


def configs():
    from ..hf import DyVTE, FastV, PSigmoid, PyramidDrop

    return {
        "dense": None,
        "FastV, after layer 2, keep 1/2": FastV(layer=2, keep=0.5),
        "FastV, after layer 2, keep 1/4": FastV(layer=2, keep=0.25),
        "FastV, after layer 8, keep 1/4": FastV(layer=8, keep=0.25),
        "PyramidDrop, layers 8/16/24, ratio 1/2": PyramidDrop(layers=(8, 16, 24), ratio=0.5),
        "P-Sigmoid, midpoint 12, k 0.5": PSigmoid(midpoint=12, k=0.5),
        "DyVTE, the span exits after layer 16": DyVTE(layer=16),
        "DyVTE, the span exits after layer 24": DyVTE(layer=24),
    }


def run(model, tok, *, tokens: int = 1024, prompts: int = 8, say=lambda s: None) -> dict:
    from ..analysis.prompts import PASSKEY_QUESTION, needles
    from ..hf import pruned_forward

    depths = tuple((i + 0.5) / prompts for i in range(prompts))
    items = needles(tok, tokens=tokens, depths=depths, seed=3)
    q_len = len(tok(PASSKEY_QUESTION, add_special_tokens=False).input_ids)
    rows = []
    dense_kv = None
    for name, pruner in configs().items():
        say(f"pruning: {name}")
        hits, secs, kv = 0, [], []
        for p in items:
            answer = tok(" " + p.answer, add_special_tokens=False).input_ids
            ids = torch.cat([p.ids, torch.tensor([answer[:-1]])], 1)
            span = (1, p.ids.shape[1] - q_len)
            res = pruned_forward(model, ids, span=span, pruner=pruner, tail=len(answer))
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
    return {"rows": rows, "tokens": tokens, "prompts": len(items)}


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
    return "\n".join(lines) + "\n"
