"""``attnkit eval --classify``: ACT's attention calibration on a generated classification task (SmolLM2).

Sentiment of generated one-sentence reviews, asked few-shot (two fixed examples), answered by comparing the
first tokens of `` positive`` and `` negative`` at the answer position. ACT (Yu et al., 2024) calibrates hidden
attention sinks in heads it **searches on held-out prompts**; here the search is per layer (all nine heads of a
layer at once, the layers whose calibration raises the mean correct-answer margin on the search prompts, at most
``top_layers`` of them) and the accuracy is then measured on disjoint test prompts. Also reported: the
:class:`attnkit.hf.HeadPerturbation` of the same layers (the "weak model" of perturbation guidance: how much the
task depends on their attention).
"""

from __future__ import annotations

import random

import torch

_POS = ("wonderful", "great", "delightful", "excellent", "lovely", "superb", "charming", "brilliant", "pleasant")
_NEG = ("awful", "terrible", "dreadful", "horrible", "boring", "disappointing", "dull", "poor", "unpleasant")
_NOUNS = ("film", "meal", "concert", "hotel", "book", "service", "game", "show", "trip", "lecture", "album", "play")
_SHOTS = (
    "Review: The coffee was bitter and cold.\nSentiment: negative\n"
    "Review: The staff were kind and helpful.\nSentiment: positive\n"
)


def prompts(tok, *, n: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """``n`` (ids (1, N), label) with label 1 = positive; balanced, seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        adj = rng.choice(_POS if label else _NEG)
        extra = rng.choice(("", " I would not change a thing.", " It lasted two hours.", " We went on a Sunday."))
        text = f"{_SHOTS}Review: The {rng.choice(_NOUNS)} was {adj}.{extra}\nSentiment:"
        out.append((torch.tensor([tok(text, add_special_tokens=False).input_ids]), label))
    return out


def _margins(model, tok, items, policy) -> torch.Tensor:
    from ..hf import applied

    pos, neg = (tok(w, add_special_tokens=False).input_ids[0] for w in (" positive", " negative"))
    out = []
    with applied(model, policy), torch.no_grad():
        for ids, label in items:
            z = model(input_ids=ids).logits[0, -1].float()
            m = float(z[pos] - z[neg])
            out.append(m if label else -m)
    return torch.tensor(out)


def run(model, tok, *, n: int = 48, search: int = 16, top_layers: int = 3, beta: float = 0.4, say=lambda s: None):
    from ..hf import ACT, HeadPerturbation, Steer

    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    held, test = prompts(tok, n=search, seed=5), prompts(tok, n=n, seed=6)
    say(f"classify: ACT layer search on {search} prompts")
    base = _margins(model, tok, held, None).mean()
    gains = []
    for layer in range(L):
        act = Steer((ACT(heads={(layer, h) for h in range(H)}, beta=beta),))
        gains.append(float(_margins(model, tok, held, act).mean() - base))
    layers = [i for i in sorted(range(L), key=lambda i: -gains[i])[:top_layers] if gains[i] > 0]
    heads = {(lyr, h) for lyr in layers for h in range(H)}
    configs = {"dense": None}
    if heads:
        configs[f"ACT (beta {beta}), searched layers {layers}"] = Steer((ACT(heads=heads, beta=beta),))
        configs[f"HeadPerturbation (alpha 0.5), the same layers {layers}"] = Steer(
            (HeadPerturbation(heads=heads, alpha=0.5),)
        )
    rows = []
    for name, pol in configs.items():
        say(f"classify: {name}")
        m = _margins(model, tok, test, pol)
        rows.append({"config": name, "accuracy": float((m > 0).double().mean()), "margin": float(m.mean())})
    return {"rows": rows, "layer_gains": gains, "layers": layers, "prompts": n, "search": search}


def markdown(res: dict) -> str:
    lines = [
        f"# ACT on generated sentiment classification (SmolLM2-135M, {res['prompts']} test prompts, "
        f"layers searched on {res['search']} others)",
        "",
        "| configuration | accuracy | mean margin (right - wrong label) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['config']} | {r['accuracy']:.0%} | {r['margin']:+.2f} |" for r in res["rows"]]
    if not res["layers"]:
        lines.append("\nNo layer's calibration raised the search prompts' margin; ACT was not applied.")
    return "\n".join(lines) + "\n"
