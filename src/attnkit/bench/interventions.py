"""``attnkit eval --interventions``: family-G interventions measured on a task generated here.

**Counterfactual-context QA** (the text analogue of "the model ignores the image"): a short passage states a
fact that contradicts common knowledge ("France's capital city is Lima."), then the question asks for it. The
model *follows the context* when, at the answer position, the passage's answer outscores the common-knowledge
one (first tokens, single-token city names). Reported per configuration: the follow rate and the mean logit
margin (context answer minus common answer), on held-out prompts.

Configurations, with heads chosen on separate prompts (never on the scored ones):

- dense;
- PASTA on the heads that put the most mass on the passage (:class:`attnkit.analysis.SpanHeads`), and PASTA
  on the layers whose steering raises the margin most on the held-out prompts (a layer-level version of the
  paper's per-head profiling, which at 270 heads x prompts is too slow here);
- VAR's sink-to-span redistribution on the same span heads (a text passage standing in for VAR's image);
- imbalanced-attention amplification: every head's span logits raised by ``log(1 + gamma s_h)``, ``s_h`` its span
  score;
- CausalMM's counterfactual contrast: ``2 z - z_cf`` with ``z_cf`` the logits when no query outside the passage
  can attend to it (the text analogue of the image's attention knocked out);
- VHR: the heads whose last-position output diverges most without the passage (VHD,
  :func:`attnkit.analysis.context_divergence` on the profiling prompts), their outputs scaled by 2;
- CARVE: per prompt, the attention of the task question to the passage contrasted with that of a general
  question ("What is this passage about?"); the half of the passage with the lower contrast is masked.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Egypt": "Cairo",
    "Russia": "Moscow",
    "England": "London",
    "Greece": "Athens",
    "Austria": "Vienna",
    "Peru": "Lima",
    "China": "Beijing",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Cuba": "Havana",
    "Kenya": "Nairobi",
}


@dataclass(frozen=True)
class Prompt:
    ids: torch.Tensor  # (1, N)
    span: tuple  # the passage's token span
    context: int  # first token of the passage's answer
    common: int  # first token of the common-knowledge answer


def _first(tok, word) -> int:
    return tok(" " + word, add_special_tokens=False).input_ids[0]


def counterfactual_prompts(tok, *, n: int = 16, seed: int = 0) -> list[Prompt]:
    """``n`` prompts whose passage names a wrong capital (a city of another country)."""
    rng = random.Random(seed)
    countries = list(CAPITALS)
    out = []
    while len(out) < n:
        country = rng.choice(countries)
        fake = CAPITALS[rng.choice([c for c in countries if c != country])]
        if _first(tok, fake) == _first(tok, CAPITALS[country]):
            continue  # the two answers would share their first token (Berlin, Beijing)
        head = tok("Read the passage and answer from it.\nPassage:", add_special_tokens=False).input_ids
        passage = tok(
            f" {country}'s capital city is {fake}. Its government sits in {fake}.", add_special_tokens=False
        ).input_ids
        question = tok(
            f"\nQuestion: What is the capital of {country}?\nAnswer: The capital of {country} is",
            add_special_tokens=False,
        ).input_ids
        ids = head + passage + question
        out.append(
            Prompt(
                torch.tensor([ids]),
                (len(head), len(head) + len(passage)),
                _first(tok, fake),
                _first(tok, CAPITALS[country]),
            )
        )
    return out


def _without_passage(p: Prompt) -> torch.Tensor:
    a, b = p.span
    return torch.cat([p.ids[:, :a], p.ids[:, b:]], 1)


def _general(tok, p: Prompt) -> torch.Tensor:
    """The prompt up to the passage's end, then a question that any passage answers."""
    general = tok("\nQuestion: What is this passage about?\nAnswer:", add_special_tokens=False).input_ids
    return torch.cat([p.ids[:, : p.span[1]], torch.tensor([general])], 1)


def _margins(model, prompts, policy=None) -> torch.Tensor:
    from ..hf import applied

    vals = []
    for p in prompts:
        if policy is None:
            with torch.no_grad():
                logits = model(input_ids=p.ids).logits[0, -1]
        else:
            with applied(model, policy), torch.no_grad():
                logits = model(input_ids=p.ids).logits[0, -1]
        vals.append(float(logits[p.context] - logits[p.common]))
    return torch.tensor(vals, dtype=torch.float64)


def _span_scores(model, tok, prompts) -> torch.Tensor:
    """``(layers, heads)``: the mean mass the queries after the passage put on it (SpanHeads), over ``prompts``."""
    from ..analysis import SpanHeads

    total = sum(SpanHeads(span=p.span).run(model, tok, ids=p.ids).values for p in prompts)
    return total / len(prompts)


def _top(scores: torch.Tensor, k: int) -> set:
    H = scores.shape[1]
    return {(int(i) // H, int(i) % H) for i in scores.flatten().topk(k).indices}


def run(
    model,
    tok,
    *,
    n: int = 24,
    profile: int = 8,
    top_heads: int = 16,
    top_layers: int = 3,
    alpha: float = 0.01,
    say=lambda s: None,
) -> dict:
    """Every configuration's follow rate and margin on ``n`` scored prompts (heads chosen on ``profile`` others)."""
    from ..analysis import context_divergence
    from ..hf import PASTA, VAR, VHR, SpanAmplification, SpanKnockout, Steer, carve, contrastive_logits

    scored = counterfactual_prompts(tok, n=n, seed=1)
    held = counterfactual_prompts(tok, n=profile, seed=2)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    say("span heads on the profiling prompts")
    span_scores = _span_scores(model, tok, held)
    heads = _top(span_scores, top_heads)
    sensitivity = {(a, b): float(span_scores[a, b]) for a in range(L) for b in range(H)}
    say("PASTA per layer on the profiling prompts")
    base_held = _margins(model, held).mean()
    gains = []
    for layer in range(L):
        pol = [Steer((PASTA(span=p.span, heads={(layer, h) for h in range(H)}, alpha=alpha),)) for p in held]
        m = torch.tensor([float(_margins(model, [p], pol[i])[0]) for i, p in enumerate(held)]).mean()
        gains.append(float(m - base_held))
    layers = sorted(range(L), key=lambda i: -gains[i])[:top_layers]
    say("VHD divergence on the profiling prompts")
    div = sum(context_divergence(model, p.ids, _without_passage(p)).values for p in held) / len(held)
    vhr = VHR({h: 2.0 for h in _top(div, top_heads)})
    configs = {
        "dense": lambda p: None,
        f"PASTA, top {top_heads} span heads": lambda p: Steer((PASTA(span=p.span, heads=heads, alpha=alpha),)),
        f"PASTA, profiled layers {layers}": lambda p: Steer(
            (PASTA(span=p.span, heads={(lyr, h) for lyr in layers for h in range(H)}, alpha=alpha),)
        ),
        f"VAR, top {top_heads} span heads": lambda p: Steer((VAR(span=p.span, heads=heads, rho=0.8),)),
        "span amplification, every head by its span score (gamma 4)": lambda p: Steer(
            (SpanAmplification(span=p.span, sensitivity=sensitivity, gamma=4.0),)
        ),
        f"VHR, top {top_heads} VHD heads, outputs x2": lambda p: Steer((vhr,)),
        "CARVE, task vs general question, half the passage kept": lambda p: Steer(
            (carve(model, p.ids, _general(tok, p), span=p.span, keep=0.5),)
        ),
    }
    rows = []
    for name, make in configs.items():
        say(f"scoring {name}")
        m = torch.tensor([float(_margins(model, [p], make(p))[0]) for p in scored])
        rows.append({"config": name, "follow": float((m > 0).double().mean()), "margin": float(m.mean())})
    say("scoring the counterfactual contrast")
    m = []
    for p in scored:
        cf = Steer((SpanKnockout(span=p.span, layers_=tuple(range(L))),))
        z = contrastive_logits(model, p.ids, cf, beta=1.0)[0, -1]
        m.append(float(z[p.context] - z[p.common]))
    m = torch.tensor(m)
    rows.append(
        {
            "config": "CausalMM-style contrast: 2 z - z(passage knocked out)",
            "follow": float((m > 0).double().mean()),
            "margin": float(m.mean()),
        }
    )
    return {
        "rows": rows,
        "layer_gains": gains,
        "span_heads": sorted(heads),
        "vhd_heads": sorted(vhr.factors),
        "prompts": n,
        "profile": profile,
    }


def markdown(res: dict) -> str:
    lines = [
        "# Interventions: counterfactual-context QA (SmolLM2-135M)",
        "",
        f"{res['prompts']} scored prompts; heads and layers chosen on {res['profile']} others. Follow: the passage's "
        "answer outscores the common-knowledge one at the answer position.",
        "",
        "| configuration | follows the passage | mean logit margin (passage - common) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['config']} | {r['follow']:.0%} | {r['margin']:+.2f} |" for r in res["rows"]]
    return "\n".join(lines) + "\n"
