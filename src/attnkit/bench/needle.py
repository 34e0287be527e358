"""Needle-in-a-haystack retrieval after RULER (Hsieh et al., 2024), under KV-cache policies.

RULER's *What's the Real Context Size of Your Long-Context Language Models?* replaces the single passkey in
repetitive filler with harder synthetic needles. Four of its NIAH variants are built here (templates written
for attnkit after RULER's, not copied):

- ``single`` (niah_single): one needle ``The special number for <key> is <value>.``, its value asked;
- ``multikey`` (niah_multikey): ``n_needles`` needles with distinct keys (the others are distractors), one asked;
- ``multivalue`` (niah_multivalue): one key inserted ``n_needles`` times with distinct values, all asked;
- ``multiquery`` (niah_multiquery): ``n_needles`` needles with distinct keys, all asked.

**Keys are words, values are 7-digit numbers** (RULER's default value type). The words come from
:data:`KEY_WORDS`: nouns of nature and colour that do not occur in Python's reference manual, so the natural
haystack never holds a key by accident. Values never start with 0 and are distinct within a prompt.

**Haystacks.** ``natural``: Python's reference manual (:func:`attnkit.models.english_text`, shipped with
Python), from a random paragraph start per prompt, so no two prompts share their text; ``filler``: the
repetitive ``The grass is green. ...`` of the passkey task (RULER's "noise" haystack). A needle at ``depth`` in
[0, 1] starts at that fraction of the haystack's tokens (the needles included), moved to the nearest
sentence boundary within 60 characters (else the next space). In the multi-needle variants the asked needle
(the first key, or the first value) is at ``depth`` and the others at depths drawn from a grid of 0.05..0.95,
at least 0.1 from ``depth`` and from each other.

**Scoring** is RULER's ``string_match_all``: the fraction of the expected values that occur (case-insensitive
substring) in the generated text; 1 or 0 for ``single`` and ``multikey``.

**Settings** (:data:`SETTINGS`; the first two are the default), one prompt text, split the same way into
``context`` and ``question`` (the question sentence followed by an answer prefix such as
``The special number for walrus is``):

- ``agnostic`` (kvpress's default, ``attnkit eval``'s passkey protocol): the context is fed in chunks of
  ``chunk`` tokens from its start, the cache compressed after each step; the question is its own step,
  fed after the context, so the policy never saw it when it chose what to keep; then greedy decoding.
- ``aware`` (chunked prefill, question last): context and question are one token sequence, fed in chunks
  aligned to its *end* (the first chunk takes the remainder), so the last chunk is full and ends with the
  question and answer prefix. That chunk is compressed like any other: SnapKV's 32-query observation window is
  the end of the question, and H2O's scores include the question's attention. But the earlier chunks were
  compressed before the question came, as in any chunked prefill.
- ``aware_one_step`` (SnapKV's own setting): context and question in one step, so the only compression is the
  one after the whole prompt, with the question in the observation window.

In the aware settings greedy decoding starts from the last step's logits.

Decoding is greedy for ``decode_tokens`` (the answers' tokens plus a separator each, plus 3), stopping early at
the end-of-sequence token or once every answer is in the text (the score cannot change after that).
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass

import torch

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
HAYSTACKS = ("natural", "filler")
SETTINGS = ("agnostic", "aware", "aware_one_step")
DEFAULT_SETTINGS = SETTINGS[:2]
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_WORDS = (
    "walrus", "apricot", "saffron", "lantern", "glacier", "falcon", "meadow", "harbor", "violet", "pebble",
    "thistle", "canyon", "otter", "marble", "juniper", "comet", "ember", "willow", "badger", "orchid",
    "quartz", "heron", "maple", "cobalt", "lilac", "tundra", "parsnip", "sparrow", "velvet", "acorn",
    "bramble", "coral", "dune", "fern", "garnet", "hazel", "jasper", "kelp", "lynx", "nectar",
)  # fmt: skip
HEAD = (
    "Some special numbers are hidden in the text below, each one tied to a word. "
    "Remember them: a question about them comes at the end.\n"
)


@dataclass(frozen=True)
class NeedlePrompt:
    """One generated prompt: ``context + question`` is the text; ``answers`` the values to return."""

    variant: str
    haystack: str
    depth: float
    context: str
    question: str
    answers: tuple
    keys: tuple  # the keys asked
    needles: tuple  # ((key, value, depth), ...) as inserted, in depth order
    decode_tokens: int

    @property
    def text(self) -> str:
        return self.context + self.question


@functools.lru_cache(maxsize=1)
def _manual() -> str:
    from ..models import english_text

    return english_text()


def _haystack_ids(tok, kind: str, n_tokens: int, rng: random.Random) -> list[int]:
    """``n_tokens`` token ids of haystack (natural: from a random paragraph start of the manual)."""
    if kind == "filler":
        per = len(tok(FILLER * 8, add_special_tokens=False).input_ids) / 8
        return tok(FILLER * (int(n_tokens / per) + 2), add_special_tokens=False).input_ids[:n_tokens]
    if kind != "natural":
        raise ValueError(f"haystack: expected one of {HAYSTACKS}, got {kind!r}")
    text = _manual()
    span = 8 * n_tokens + 2000  # characters; English runs ~4 per token
    start = rng.randrange(0, len(text) - span)
    para = text.find("\n\n", start)
    start = para + 2 if 0 <= para < start + 2000 else start
    return tok(text[start : start + span], add_special_tokens=False).input_ids[:n_tokens]


def _boundary(hay: str, pos: int, reach: int = 60) -> int:
    """The sentence boundary nearest ``pos`` (within ``reach`` characters), else the nearest space after it."""
    if pos <= 0 or pos >= len(hay):
        return max(0, min(pos, len(hay)))

    def ok(i):
        return 0 < i < len(hay) and (hay[i - 1] == "\n" or (hay[i - 1] == " " and hay[i - 2] in ".!?:"))

    for step in range(reach):
        for i in (pos + step, pos - step):
            if ok(i):
                return i
    sp = hay.find(" ", pos)
    return len(hay) if sp < 0 else sp + 1


def _other_depths(depth: float, n: int, rng: random.Random) -> list[float]:
    grid = [round(0.05 + 0.05 * i, 2) for i in range(19)]
    chosen = [depth]
    for d in rng.sample(grid, len(grid)):
        if len(chosen) == n + 1:
            break
        if all(abs(d - c) >= 0.1 - 1e-9 for c in chosen):
            chosen.append(d)
    return chosen[1:]


def _values(n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in out:
            out.append(v)
    return out


def _assemble(tok, variant, haystack, length, depth, needles, keys, answers, question, rng) -> NeedlePrompt:
    sentences = [f"The special number for {k} is {v}." for k, v, _ in needles]
    fixed = len(tok(HEAD + question).input_ids)
    sizes = [len(tok(" " + x + " ", add_special_tokens=False).input_ids) for x in sentences]
    m = max(16, length - fixed - sum(sizes))
    ids = _haystack_ids(tok, haystack, m, rng)
    # each needle starts at its depth of the final haystack (original tokens plus the needles before it)
    order = sorted(range(len(needles)), key=lambda i: needles[i][2])
    cuts, before = [], 0
    for i in order:
        j = min(len(ids), max(0, round(needles[i][2] * (len(ids) + sum(sizes))) - before))
        cuts.append((len(tok.decode(ids[:j])), sentences[i]))
        before += sizes[i]
    hay = tok.decode(ids)
    for at, sentence in reversed(cuts):  # deepest first, so earlier character positions stay valid
        at = _boundary(hay, at)
        pad = "" if at == 0 or hay[at - 1] in " \n" else " "
        hay = hay[:at] + pad + sentence + " " + hay[at:]
    per_answer = len(tok(" " + answers[0], add_special_tokens=False).input_ids) + 1  # the value and a comma
    return NeedlePrompt(
        variant=variant,
        haystack=haystack,
        depth=depth,
        context=HEAD + hay,
        question=question,
        answers=tuple(answers),
        keys=tuple(keys),
        needles=tuple(sorted(needles, key=lambda x: x[2])),
        decode_tokens=per_answer * len(answers) + 3,
    )


def _join(words) -> str:
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def niah_single(tok, length: int, depth: float, rng: random.Random, haystack: str = "natural") -> NeedlePrompt:
    """One needle at ``depth``; its value asked."""
    (key,), (value,) = rng.sample(KEY_WORDS, 1), _values(1, rng)
    q = f"\nWhat is the special number for {key}? The special number for {key} is"
    return _assemble(tok, "single", haystack, length, depth, [(key, value, depth)], [key], [value], q, rng)


def niah_multikey(
    tok, length: int, depth: float, rng: random.Random, haystack: str = "natural", n_needles: int = 4
) -> NeedlePrompt:
    """``n_needles`` needles with distinct keys and values; the one at ``depth`` is asked."""
    keys, values = rng.sample(KEY_WORDS, n_needles), _values(n_needles, rng)
    depths = [depth, *_other_depths(depth, n_needles - 1, rng)]
    q = f"\nWhat is the special number for {keys[0]}? The special number for {keys[0]} is"
    needles = list(zip(keys, values, depths, strict=True))
    return _assemble(tok, "multikey", haystack, length, depth, needles, keys[:1], values[:1], q, rng)


def niah_multivalue(
    tok, length: int, depth: float, rng: random.Random, haystack: str = "natural", n_needles: int = 4
) -> NeedlePrompt:
    """One key with ``n_needles`` distinct values (the first at ``depth``); all the values asked."""
    (key,), values = rng.sample(KEY_WORDS, 1), _values(n_needles, rng)
    depths = [depth, *_other_depths(depth, n_needles - 1, rng)]
    q = f"\nWhat are all the special numbers for {key}? The special numbers for {key} are"
    needles = [(key, v, d) for v, d in zip(values, depths, strict=True)]
    return _assemble(tok, "multivalue", haystack, length, depth, needles, [key], values, q, rng)


def niah_multiquery(
    tok, length: int, depth: float, rng: random.Random, haystack: str = "natural", n_needles: int = 4
) -> NeedlePrompt:
    """``n_needles`` needles with distinct keys (the first at ``depth``); every key asked, in the order inserted
    at random depths (not sorted by depth)."""
    keys, values = rng.sample(KEY_WORDS, n_needles), _values(n_needles, rng)
    depths = [depth, *_other_depths(depth, n_needles - 1, rng)]
    q = f"\nWhat are the special numbers for {_join(keys)}? The special numbers for {_join(keys)} are"
    needles = list(zip(keys, values, depths, strict=True))
    return _assemble(tok, "multiquery", haystack, length, depth, needles, keys, values, q, rng)


BUILDERS = {
    "single": niah_single,
    "multikey": niah_multikey,
    "multivalue": niah_multivalue,
    "multiquery": niah_multiquery,
}


def build(tok, variant: str, length: int, depth: float, rng: random.Random, haystack: str = "natural", **kw):
    """The prompt of ``variant`` (one of :data:`VARIANTS`) of about ``length`` tokens."""
    if variant not in BUILDERS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    return BUILDERS[variant](tok, length, depth, rng, haystack, **kw)


def score(generated: str, answers) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` found (case-insensitive) in ``generated``."""
    answers = list(answers)
    if not answers:
        raise ValueError("answers: expected at least one expected value, got none")
    said = generated.lower()
    return sum(a.lower() in said for a in answers) / len(answers)


def _chunks(n: int, chunk: int, setting: str) -> list[tuple[int, int]]:
    if setting == "agnostic":
        starts = list(range(0, n, chunk))
    elif setting == "aware_one_step":
        starts = [0]
    else:  # aligned to the end: the last chunk is full and ends with the question
        starts = sorted({0, *range(n - chunk, 0, -chunk)})
    return [(s, e) for s, e in zip(starts, starts[1:] + [n], strict=True)]


def answer(model, tok, policy, prompt: NeedlePrompt, setting: str = "agnostic", chunk: int = 512) -> dict:
    """Feed ``prompt`` under ``policy`` in ``setting`` (see the module docstring), decode greedily, score."""
    from .models import _Stream

    if setting not in SETTINGS:
        raise ValueError(f"setting: expected one of {SETTINGS}, got {setting!r}")
    ctx = tok(prompt.context, return_tensors="pt").input_ids
    q = tok(prompt.question, add_special_tokens=False, return_tensors="pt").input_ids
    st = _Stream(model, policy)
    try:
        t0 = time.perf_counter()
        if setting == "agnostic":
            for s, e in _chunks(ctx.shape[1], chunk, setting):
                st.feed(ctx[:, s:e])
            prefill = time.perf_counter() - t0
            nxt = st.feed(q)[0, -1].argmax()
        else:
            ids = torch.cat([ctx, q], 1)
            for s, e in _chunks(ids.shape[1], chunk, setting):
                logits = st.feed(ids[:, s:e])
            prefill = time.perf_counter() - t0
            nxt = logits[0, -1].argmax()
        out = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(prompt.decode_tokens - 1):
            if int(nxt) == tok.eos_token_id or score(tok.decode(out), prompt.answers) == 1.0:
                break  # nothing more can change the score
            nxt = st.feed(nxt.view(1, 1))[0, -1].argmax()
            out.append(int(nxt))
        decode = (time.perf_counter() - t0) / max(1, len(out) - 1)
    finally:
        st.close()
    said = tok.decode(out)
    return {
        "score": score(said, prompt.answers),
        "said": said,
        "tokens": int(ctx.shape[1] + q.shape[1]),
        "prefill_s": prefill,
        "decode_s": decode,
        "peak_kv": st.peak,
    }


def prompts(tok, length, depths, per_depth, variants=VARIANTS, haystacks=HAYSTACKS, seed=0) -> list[NeedlePrompt]:
    """``per_depth`` prompts per depth, variant and haystack; each from its own seeded generator."""
    out = []
    for h in haystacks:
        for v in variants:
            for d in depths:
                for i in range(per_depth):
                    rng = random.Random(f"{seed}/{h}/{v}/{d}/{i}")
                    out.append(build(tok, v, length, d, rng, h))
    return out


def run_needle(
    model,
    tok,
    policies,
    budgets,
    *,
    length=1024,
    depths=(0.1, 0.5, 0.9),
    per_depth=1,
    variants=VARIANTS,
    haystacks=HAYSTACKS,
    settings=DEFAULT_SETTINGS,
    chunk=512,
    seed=0,
    progress=None,
):
    """Every prompt under every policy (dense at full budget, the others at each of ``budgets``) and setting."""
    from .models import make_policy

    say = progress or (lambda s: None)
    rows = []
    batch = prompts(tok, length, depths, per_depth, variants, haystacks, seed)
    with torch.no_grad():
        for name in policies:
            for b in (1.0,) if name == "dense" else budgets:
                for setting in settings:
                    for p in batch:
                        n = len(tok(p.text).input_ids)
                        r = answer(model, tok, make_policy(name, b, n, model), p, setting, chunk)
                        rows.append(
                            {
                                "policy": name,
                                "budget": b,
                                "setting": setting,
                                "haystack": p.haystack,
                                "variant": p.variant,
                                "length": length,
                                "depth": p.depth,
                                "answers": list(p.answers),
                                **r,
                            }
                        )
                        say(
                            f"needle {name} b={b:.3f} {setting} {p.haystack} {p.variant} d={p.depth}: "
                            f"{r['score']:.2f} ({r['said']!r})"
                        )
    return rows


def markdown(rows: list[dict]) -> list[str]:
    """Mean score per policy, budget, haystack and setting, a column per variant (dense first)."""
    from .models import _frac

    if not rows:
        return []
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    cells: dict = {}
    for r in rows:
        k = (r["policy"], r["budget"], r["setting"], r["haystack"], r["variant"])
        cells[k] = cells.get(k, 0) + 1
    per = max(cells.values())
    out = [
        "",
        f"### Needle retrieval after RULER ({', '.join(map(str, lengths))} tokens; mean score, {per} prompts a cell)",
        "",
        "| policy | budget | haystack | setting | " + " | ".join(variants) + " | mean | prefill s | peak KV / dense |",
        "|---|---|---|---|" + "---|" * len(variants) + "---|---|---|",
    ]
    dense_kv = max((r["peak_kv"] for r in rows if r["policy"] == "dense"), default=0)
    keys = sorted(
        {(r["policy"], r["budget"], r["haystack"], r["setting"]) for r in rows},
        key=lambda k: (k[0] != "dense", k[0], k[1], HAYSTACKS.index(k[2]) if k[2] in HAYSTACKS else 9, k[3]),
    )
    for name, b, h, s in keys:
        cell = [r for r in rows if (r["policy"], r["budget"], r["haystack"], r["setting"]) == (name, b, h, s)]
        means = []
        for v in variants:
            sc = [r["score"] for r in cell if r["variant"] == v]
            means.append(sum(sc) / len(sc) if sc else float("nan"))
        mean = sum(r["score"] for r in cell) / len(cell)
        pre = sum(r["prefill_s"] for r in cell) / len(cell)
        mem = max(r["peak_kv"] for r in cell) / dense_kv if dense_kv else float("nan")
        out.append(
            f"| {name} | {_frac(b)} | {h} | {s} | "
            + " | ".join(f"{m:.2f}" for m in means)
            + f" | {mean:.2f} | {pre:.2f} | {mem:.3f} |"
        )
    return out
