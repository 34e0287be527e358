"""``attnkit eval --option-order``: option-order sensitivity of multiple-choice answers on SmolLM2, and PINE.

Questions are generated here (seeded, offline) from small fact tables: capitals, one-digit sums, odd one out of a
category, antonyms. Each has four options listed one per line, ``- <option>``, between the question and
``Answer:``; the model's answer is the option whose continuation ``" <option>"`` has the highest total
log-probability. Every question is asked in the four cyclic orders of its options (each option once in each
place). Reported per method:

- **flip rate**: the fraction of questions whose chosen option (its text, not its place) is not the same in all
  four orders;
- **pairwise flips**: the fraction of (order, order) pairs that disagree;
- **accuracy** over all orders, and the share of answers that pick each place (position bias).

The option lines are the PINE segments. They are tokenised on their own and concatenated, so that each option
has the same tokens in every order (PINE's own tokeniser does the same).
"""

from __future__ import annotations

import random
import time

import torch

_CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Russia", "Moscow"),
    ("England", "London"),
    ("Egypt", "Cairo"),
    ("China", "Beijing"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"),
)
_CATEGORIES = {
    "a fruit": ("apple", "banana", "orange", "pear", "grape", "cherry"),
    "an animal": ("dog", "cat", "horse", "lion", "mouse", "rabbit"),
    "a colour": ("red", "blue", "green", "yellow", "purple", "black"),
    "a vehicle": ("car", "bus", "train", "bicycle", "truck", "boat"),
}
_ANTONYMS = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("up", "down"),
    ("light", "dark"),
    ("early", "late"),
    ("open", "closed"),
    ("old", "new"),
    ("full", "empty"),
)


def questions(n: int, *, seed: int = 0) -> list[tuple[str, list[str], int]]:
    """``n`` generated questions ``(question, options, index of the right option)``, four kinds in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            country, right = _CAPITALS[rng.randrange(len(_CAPITALS))]
            wrong = rng.sample([c for _, c in _CAPITALS if c != right], 3)
            q = f"What is the capital of {country}?"
        elif kind == 1:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            right = str(a + b)
            wrong = [str(a + b + d) for d in rng.sample([-3, -2, -1, 1, 2, 3], 3)]
            q = f"What is {a} + {b}?"
        elif kind == 2:
            cat = rng.choice(sorted(_CATEGORIES))
            right = rng.choice(_CATEGORIES[cat])
            wrong = rng.sample([w for c, ws in _CATEGORIES.items() if c != cat for w in ws], 3)
            q = f"Which of these is {cat}?"
        else:
            word, right = _ANTONYMS[rng.randrange(len(_ANTONYMS))]
            wrong = rng.sample([b for a, b in _ANTONYMS if b != right], 3)
            q = f"What is the opposite of {word}?"
        opts = [right] + wrong
        rng.shuffle(opts)
        out.append((q, opts, opts.index(right)))
    return out


def encode(tok, question: str, options: list[str]) -> dict:
    """Token ids of the prompt and of each continuation, with the option lines' spans (the PINE segments)."""
    ids = tok(f"Question: {question}\nOptions:\n", add_special_tokens=False).input_ids
    spans = []
    for o in options:
        line = tok(f"- {o}\n", add_special_tokens=False).input_ids
        spans.append((len(ids), len(ids) + len(line)))
        ids = ids + line
    ids = ids + tok("Answer:", add_special_tokens=False).input_ids
    conts = [tok(f" {o}", add_special_tokens=False).input_ids for o in options]
    return {"ids": ids, "spans": tuple(spans), "continuations": conts}


def score_options(model, enc: dict, policy=None) -> torch.Tensor:
    """Total log-probability of each option's continuation, one right-padded batch (one row per option)."""
    from ..hf import applied

    P = len(enc["ids"])
    rows = [enc["ids"] + c for c in enc["continuations"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad(), applied(model, policy):
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    out = []
    for b, c in enumerate(enc["continuations"]):
        pos = torch.arange(P - 1, P - 1 + len(c))
        out.append(logp[b, pos, torch.tensor(c)].sum())
    return torch.stack(out)


def methods(model) -> dict:
    """Method name -> a function from an encoded prompt to the policy to run it under (None: dense)."""
    from ..hf.pine import PINE

    return {
        "dense": lambda enc: None,
        "PINE (option lines as segments)": lambda enc: PINE(segments=enc["spans"], model=model),
    }


def run(model, tok, *, n: int = 24, seed: int = 0, say=lambda s: None) -> dict:
    items = questions(n, seed=seed)
    rows = []
    for name, make in methods(model).items():
        say(f"option order: {name}")
        flips = pair_flips = pairs = correct = answers = 0
        places = [0, 0, 0, 0]
        t0 = time.perf_counter()
        for q, opts, right in items:
            chosen = []
            for r in range(len(opts)):
                order = opts[r:] + opts[:r]
                enc = encode(tok, q, order)
                pick = int(score_options(model, enc, make(enc)).argmax())
                places[pick] += 1
                chosen.append(order[pick])
                correct += int(order[pick] == opts[right])
                answers += 1
            flips += int(len(set(chosen)) > 1)
            for i in range(len(chosen)):
                for j in range(i + 1, len(chosen)):
                    pair_flips += int(chosen[i] != chosen[j])
                    pairs += 1
        rows.append(
            {
                "method": name,
                "flip_rate": flips / len(items),
                "pairwise_flips": pair_flips / pairs,
                "accuracy": correct / answers,
                "places": [p / answers for p in places],
                "seconds_per_question": (time.perf_counter() - t0) / len(items),
            }
        )
    return {"rows": rows, "questions": len(items), "seed": seed}


def markdown(res: dict) -> str:
    lines = [
        f"# Option-order sensitivity (SmolLM2-135M, {res['questions']} generated questions x 4 cyclic orders)",
        "",
        "| method | flip rate | pairwise flips | accuracy | answer at place 1/2/3/4 | s per question |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        places = " / ".join(f"{p:.0%}" for p in r["places"])
        lines.append(
            f"| {r['method']} | {r['flip_rate']:.0%} | {r['pairwise_flips']:.0%} | {r['accuracy']:.0%} | {places} | "
            f"{r['seconds_per_question']:.2f} |"
        )
    dense = res["rows"][0]["flip_rate"]
    for r in res["rows"][1:]:
        ratio = "no flips in dense" if dense == 0 else f"{r['flip_rate'] / dense:.2f}x dense's flip rate"
        lines.append(f"\n{r['method']}: {ratio} (target: at most 0.5x).")
    return "\n".join(lines) + "\n"
