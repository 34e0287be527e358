"""``attnkit eval --emphasis``: PASTA on an instruction the model tends to ignore (SmolLM2, generated prompts).

Each prompt opens with a format instruction (answer in capital letters), then a paragraph of shipped English
text pushes it away, then a question whose answer is one known word (a capital city). The model *follows the
instruction* when the upper-case answer (" PARIS") has a higher total log-probability, teacher-forced, than the
usual spelling (" Paris"). Both continuations are scored in one right-padded batch.

Configurations, with the steered layers chosen on separate prompts (the paper's head profiling, per layer as in
``attnkit eval --interventions``): dense; PASTA on the instruction span in every head of the profiled layers;
PASTA on every layer (a control: steering everywhere).
"""

from __future__ import annotations

import random

import torch

_FACTS = (
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Japan", "Tokyo"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Norway", "Oslo"),
    ("Ireland", "Dublin"),
    ("Peru", "Lima"),
)
INSTRUCTION = "Instruction: write every answer in capital letters only, for example LONDON or BERLIN.\n"


def prompts(tok, *, n: int, seed: int, filler: int = 120) -> list[dict]:
    """``n`` prompts: ids, the instruction's span, and the two continuations (upper case, usual spelling)."""
    from ..models import english_text

    rng = random.Random(seed)
    text = english_text()
    out = []
    for _ in range(n):
        country, city = rng.choice(_FACTS)
        head = tok(INSTRUCTION, add_special_tokens=False).input_ids
        start = rng.randrange(0, len(text) - 20 * filler)
        para = tok(text[start : start + 8 * filler], add_special_tokens=False).input_ids[:filler]
        question = tok(f"\nQuestion: What is the capital of {country}?\nAnswer:", add_special_tokens=False).input_ids
        ids = head + para + question
        conts = [tok(" " + w, add_special_tokens=False).input_ids for w in (city.upper(), city)]
        out.append({"ids": ids, "span": (0, len(head)), "continuations": conts})
    return out


def _margin(model, item, policy) -> float:
    """log P(upper case) - log P(usual spelling), teacher-forced."""
    from .option_order import score_options

    tot = score_options(model, item, policy)
    return float(tot[0] - tot[1])


def run(model, tok, *, n: int = 24, profile: int = 8, top_layers: int = 3, alpha: float = 0.01, say=lambda s: None):
    from ..hf import PASTA, Steer

    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    held, scored = prompts(tok, n=profile, seed=21), prompts(tok, n=n, seed=22)

    def pasta(layers):
        return lambda it: Steer(
            (PASTA(span=it["span"], heads={(a, h) for a in layers for h in range(H)}, alpha=alpha),)
        )

    say("emphasis: PASTA per layer on the profiling prompts")
    base = sum(_margin(model, it, None) for it in held) / len(held)
    gains = [sum(_margin(model, it, pasta([lyr])(it)) for it in held) / len(held) - base for lyr in range(L)]
    layers = sorted(range(L), key=lambda i: -gains[i])[:top_layers]
    configs = {
        "dense": lambda it: None,
        f"PASTA on the instruction, profiled layers {layers}": pasta(layers),
        "PASTA on the instruction, every layer": pasta(range(L)),
    }
    rows = []
    for name, make in configs.items():
        say(f"emphasis: {name}")
        m = torch.tensor([_margin(model, it, make(it)) for it in scored])
        rows.append({"config": name, "follow": float((m > 0).double().mean()), "margin": float(m.mean())})
    return {"rows": rows, "layer_gains": gains, "layers": layers, "prompts": n, "profile": profile}


def markdown(res: dict) -> str:
    lines = [
        f"# Instruction emphasis: answer in capital letters (SmolLM2-135M, {res['prompts']} prompts, layers "
        f"profiled on {res['profile']} others)",
        "",
        "| configuration | follows the instruction | mean margin (log P upper - log P usual) |",
        "|---|---|---|",
    ]
    lines += [f"| {r['config']} | {r['follow']:.0%} | {r['margin']:+.2f} |" for r in res["rows"]]
    return "\n".join(lines) + "\n"
