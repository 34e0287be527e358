"""``attnkit eval --length``: perplexity past SmolLM2's training length, dense against the length scalings.

SmolLM2-135M was trained to 8,192 positions (``max_position_embeddings``). One prompt of ``tokens`` tokens of
shipped English text (Python's reference manual) is scored in a single prefill; the next-token loss is reported
inside the training length (the 4,097-8,192 positions) and past it (8,193 onwards), for dense attention and for
the temperature interventions that claim to help there: :class:`attnkit.hf.LogNScaling` (sqrt and Qwen's
linear form) and :class:`attnkit.hf.SSMax` (post hoc), all with ``train_length = 8192``, so that inside the
training length they change nothing (LogN) or little (SSMax softens below it). The logits are computed in
chunks of positions (a 12k x 49k float32 logit matrix would take 2.4 GB).
"""

from __future__ import annotations

import math
import time

import torch

TRAIN = 8192


def configs(train: int = TRAIN) -> dict:
    from ..hf import LogNScaling, SSMax, Steer

    return {
        "dense": None,
        f"log-n scaling, sqrt (train {train})": Steer((LogNScaling(train_length=train),)),
        "log-n scaling, linear (Qwen's logn_attn)": Steer((LogNScaling(train_length=train, sqrt=False),)),
        f"SSMax, s = 1 / log {train}": Steer((SSMax(train_length=train),)),
    }


def _losses(model, ids, policy) -> torch.Tensor:
    from ..hf import applied

    with applied(model, policy), torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0]
        out = []
        for a in range(0, h.shape[0] - 1, 1024):
            e = min(h.shape[0] - 1, a + 1024)
            logits = model.lm_head(h[a:e]).float()
            out.append(torch.nn.functional.cross_entropy(logits, ids[0, a + 1 : e + 1], reduction="none"))
    return torch.cat(out).double()


def run(model, tok, *, tokens: int = 12288, offset: int = 0, train: int = TRAIN, say=lambda s: None) -> dict:
    """Perplexity inside (``train / 2`` to ``train``) and past the training length; ``train`` is SmolLM2's."""
    from ..models import english_text

    text = english_text()
    ids = tok(text[offset : offset + 8 * tokens], return_tensors="pt", add_special_tokens=False).input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"the shipped text has only {ids.shape[1]} tokens from offset {offset}")
    rows = []
    for name, pol in configs(train).items():
        say(f"length: {name} ({tokens} tokens)")
        t0 = time.perf_counter()
        loss = _losses(model, ids, pol)  # loss[i] predicts token i + 1
        inside = loss[train // 2 - 1 : train - 1]
        past = loss[train - 1 :]
        rows.append(
            {
                "config": name,
                "ppl_inside": math.exp(float(inside.mean())),
                "ppl_past": math.exp(float(past.mean())),
                "seconds": time.perf_counter() - t0,
            }
        )
    return {"rows": rows, "tokens": tokens, "train": train}


def markdown(res: dict) -> str:
    t = res["train"]
    lines = [
        f"# Length extrapolation: perplexity of SmolLM2-135M on {res['tokens']:,} tokens (trained to {t:,})",
        "",
        f"| configuration | PPL, positions {t // 2 + 1:,}-{t:,} | PPL, positions {t + 1:,}-{res['tokens']:,} | s |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['ppl_inside']:.2f} | {r['ppl_past']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
