"""Prompts the detectors run on, generated here from a seed (never downloaded).

- :func:`repeated_tokens`: random token sequences repeated twice (induction and previous-token heads, as
  TransformerLens's ``detect_head`` and the induction-head papers use them);
- :func:`needles`: a passage of shipped English text (the Python reference manual) with a pass-key needle
  inside and a question after it (the Retrieval Head paper's needle-in-a-haystack, at one length);
- :func:`ioi`: indirect-object-identification prompts with a clean and a corrupted version of equal length
  ("When Mary and John went to the store, John gave a drink to" -> " Mary"), for patching and attribution.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NAMES = (
    "Mary John Alice Bob Sarah James Emma David Anna Paul Lisa Mark Laura Peter Kate Tom Jane Mike Susan Daniel "
    "Rachel Chris Amy Steve Linda Kevin Helen Eric Grace Adam"
).split()
PLACES = "store park school office station market library museum beach garden".split()
OBJECTS = "drink book ball letter key bag ring pen cup gift".split()


def text_ids(tok, text: str, tokens: int) -> torch.Tensor:
    """``(1, <= tokens + 1)``: the first ``tokens`` tokens of ``text`` after the model's first token (BOS, or an
    encoder's [CLS])."""
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :tokens]
    first = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    if first is not None:
        ids = torch.cat([torch.tensor([[first]]), ids], 1)
    return ids


def _single_token_names(tok) -> list[str]:
    return [n for n in NAMES if len(tok(" " + n, add_special_tokens=False).input_ids) == 1]


def repeated_tokens(tok, *, length: int = 32, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, int]:
    """``(ids (batch, 1 + 2 * length), start)``: a BOS-like first token, then ``length`` random ordinary tokens
    twice. Queries from ``start`` on (the second copy) are the ones an induction head serves."""
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    lo = 200 if tok.vocab_size > 1000 else 0  # skip the byte-level and control tokens at the vocabulary's start
    pool = torch.tensor([i for i in range(lo, tok.vocab_size) if i not in special])
    r = pool[torch.randint(len(pool), (batch, length), generator=g)]
    first = tok.bos_token_id if tok.bos_token_id is not None else (tok.cls_token_id or 0)
    ids = torch.cat([torch.full((batch, 1), first), r, r], 1)
    return ids, 1 + length


PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Needle:
    """One needle prompt: ``ids`` ``(1, N)``, the needle's token span ``[start, end)`` and its tokens."""

    ids: torch.Tensor
    start: int
    end: int
    answer: str


def needles(tok, *, tokens: int = 512, depths=(0.1, 0.5, 0.9), seed: int = 0) -> list[Needle]:
    """A haystack of about ``tokens`` tokens of shipped English text with a pass-key needle at each depth, then
    the question (the passkey format SmolLM2-135M answers; a free-text needle it does not). The prompt's
    parts are tokenised apart and joined, so the needle's span is exact."""
    from ..models import english_text

    rng = random.Random(seed)
    text = english_text()
    out = []
    for depth in depths:
        key = str(rng.randrange(10_000, 100_000))
        offset = rng.randrange(0, 50_000)
        hay = tok(text[offset : offset + 8 * tokens], add_special_tokens=False).input_ids[:tokens]
        cut = int(len(hay) * depth)
        needle = tok(
            f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False
        ).input_ids
        question = tok(PASSKEY_QUESTION, add_special_tokens=False).input_ids
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        ids = head + hay[:cut] + needle + hay[cut:] + question
        start = len(head) + cut
        out.append(Needle(torch.tensor([ids]), start, start + len(needle), key))
    return out


@dataclass(frozen=True)
class IOI:
    """Clean and corrupted prompts ``(B, N)`` of equal length, the answer (indirect object) and the wrong name
    (the subject) as token ids ``(B,)``."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    texts: list


def ioi(tok, *, batch: int = 8, seed: int = 0) -> IOI:
    """Indirect-object prompts (Wang et al.'s IOI template) with single-token names; the corrupted prompt
    replaces the names of the first clause by two other names (the "ABC" baseline), so no name in it points
    to the answer."""
    rng = random.Random(seed)
    names = _single_token_names(tok)
    clean, corrupt, answer, wrong, texts = [], [], [], [], []
    for _ in range(batch):
        a, b, c, d = rng.sample(names, 4)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        t = f"When {a} and {b} went to the {place}, {b} gave a {obj} to"
        u = f"When {c} and {d} went to the {place}, {b} gave a {obj} to"
        clean.append(tok(t, add_special_tokens=False).input_ids)
        corrupt.append(tok(u, add_special_tokens=False).input_ids)
        answer.append(tok(" " + a, add_special_tokens=False).input_ids[0])
        wrong.append(tok(" " + b, add_special_tokens=False).input_ids[0])
        texts.append(t)
    n = min(len(x) for x in clean + corrupt)
    keep = [i for i in range(batch) if len(clean[i]) == len(corrupt[i]) == n]
    return IOI(
        torch.tensor([clean[i] for i in keep]),
        torch.tensor([corrupt[i] for i in keep]),
        torch.tensor([answer[i] for i in keep]),
        torch.tensor([wrong[i] for i in keep]),
        [texts[i] for i in keep],
    )
