"""``attnkit eval``: KV-cache and long-context policies on a real model (SmolLM2-135M), against dense.

One protocol for every policy: the text is fed in chunks of ``chunk`` tokens through ``model(...)`` with the
policy's cache (:func:`attnkit.hf.apply`), so each chunk attends to what the policy kept plus itself, and the
cache is cut back after every step. Measured in one run, per policy and KV budget (a fraction of the length):

- perplexity of English text (Python's reference manual, shipped with Python) at each length;
- KL divergence of the next-token distributions from dense, per token, averaged;
- passkey retrieval: a generated prompt hides a 5-digit key at a depth; the context is fed, then the question
  (its own chunk, so it is never evicted before it is read), then greedy decoding; exact-match accuracy;
- prefill time (the context), decode time per token, and the peak KV bytes the cache held after a step;
- with ``needle=True``, RULER's needle variants on natural and filler haystacks, query-agnostic and
  query-aware (:mod:`attnkit.bench.needle`).

MiniLM (an encoder, no cache) gets the policies that apply to it: a bidirectional sparse prefill (sinks plus
a window of the same budget), judged by the cosine similarity of its sentence embeddings to dense ones.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import registry
from . import needle as _needle

# Every registered KV policy (family E), after the dense baseline.
POLICIES = ("dense",) + registry.names(kind="policy")
BUDGETS = (1 / 8, 1 / 4, 1 / 2)


@dataclass(frozen=True)
class EvalConfig:
    lengths: tuple = (1024, 2048, 4096)
    budgets: tuple = BUDGETS
    policies: tuple = POLICIES
    passkey_lengths: tuple = (1024, 4096)
    passkey_budgets: tuple | None = None  # default: ``budgets``
    depths: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    keys_per_depth: int = 1
    chunk: int = 512
    decode_tokens: int = 6
    minilm: bool = True
    seed: int = 0
    passkey: bool = True
    # RULER needles (attnkit.bench.needle), at the passkey budgets; off by default
    needle: bool = False
    needle_length: int = 1024
    needle_depths: tuple = (0.1, 0.5, 0.9)
    needle_per_depth: int = 1
    needle_variants: tuple = _needle.VARIANTS
    needle_haystacks: tuple = _needle.HAYSTACKS
    needle_settings: tuple = _needle.DEFAULT_SETTINGS


QUICK = EvalConfig(lengths=(256,), budgets=(1 / 4,), passkey_lengths=(256,), depths=(0.2, 0.8), chunk=128)


def make_policy(name: str, budget: float, length: int, model):
    """The policy ``name`` holding ``budget * length`` KV entries per head (on average) at ``length`` tokens:
    the registry's family-E factory (``dense`` is :class:`attnkit.hf.Dense`)."""
    from .. import hf

    if name == "dense":
        return hf.Dense()
    if name not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {name!r}")
    return registry.get(name).make(length, model=model, budget=budget)


def _kv_bytes(cache) -> int:
    from ..hf import HeadwiseCache

    if isinstance(cache, HeadwiseCache):
        return cache.memory()["kv_reserved"]  # as allocated, spare entries included
    return sum(
        x.numel() * x.element_size()
        for layer in cache.layers
        for x in (layer.keys, layer.values)
        if isinstance(x, torch.Tensor)
    )


class _Stream:
    """Feeds token chunks through the model under a policy; tracks time and peak KV bytes."""

    def __init__(self, model, policy):
        from transformers import DynamicCache

        from ..hf import apply

        self.model = model
        self.handle = apply(model, policy)
        self.cache = self.handle.new_cache() if policy.compresses else DynamicCache(config=model.config)
        self.peak = 0

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.peak = max(self.peak, _kv_bytes(self.cache))
        return out.logits

    def close(self):
        self.handle.remove()


def _score_text(model, ids, policy, chunk, dense_logp=None):
    """Per-token NLL (and KL to dense) of ``ids (1, N)`` fed in chunks under ``policy``."""
    st = _Stream(model, policy)
    nll, kl, logps = [], [], []
    try:
        for s in range(0, ids.shape[1], chunk):
            logits = st.feed(ids[:, s : s + chunk])[0].float()
            logp = F.log_softmax(logits, -1)
            tgt = ids[0, s + 1 : s + 1 + logits.shape[0]]
            nll.append(-logp[: tgt.numel()].gather(1, tgt[:, None])[:, 0])
            if dense_logp is None:
                logps.append(logp.to(torch.bfloat16))
            else:
                ref = dense_logp[s : s + logp.shape[0]].float()
                kl.append((ref.exp() * (ref - logp)).sum(-1))
    finally:
        st.close()
    nll = torch.cat(nll)
    res = {"ppl": float(nll.mean().exp()), "peak_kv": st.peak}
    if dense_logp is None:
        res["logp"] = torch.cat(logps)
    else:
        res["kl"] = float(torch.cat(kl).mean())
    return res


def _passkey(model, tok, policy, length, depth, key, chunk, decode_tokens):
    from ..hf.duo import passkey_prompt

    text, answer = passkey_prompt(tok, length, depth, key)
    cut = text.rindex("\nWhat is the pass key?")
    ctx = tok(text[:cut], return_tensors="pt").input_ids
    question = tok(text[cut:], add_special_tokens=False, return_tensors="pt").input_ids
    st = _Stream(model, policy)
    try:
        t0 = time.perf_counter()
        for s in range(0, ctx.shape[1], chunk):
            st.feed(ctx[:, s : s + chunk])
        prefill = time.perf_counter() - t0
        nxt = st.feed(question)[0, -1].argmax()
        out = [int(nxt)]
        t0 = time.perf_counter()
        for _ in range(decode_tokens - 1):
            nxt = st.feed(nxt.view(1, 1))[0, -1].argmax()
            out.append(int(nxt))
        decode = (time.perf_counter() - t0) / max(1, decode_tokens - 1)
    finally:
        st.close()
    said = tok.decode(out)
    return {
        "ok": said.strip().startswith(answer.strip()),
        "said": said,
        "prefill_s": prefill,
        "decode_s": decode,
        "peak_kv": st.peak,
    }


def run_eval(cfg: EvalConfig = EvalConfig(), progress=None) -> dict:
    """Every table of the report, as plain data (see the module docstring)."""
    from ..models import english_text, load_smollm2

    say = progress or (lambda s: None)
    torch.manual_seed(cfg.seed)
    model, tok = load_smollm2()
    text_ids = tok(english_text(), return_tensors="pt").input_ids
    res = {"config": cfg.__dict__, "ppl": [], "passkey": [], "needle": [], "minilm": []}
    with torch.no_grad():
        for n in cfg.lengths:
            ids = text_ids[:, :n]
            dense = _score_text(model, ids, make_policy("dense", 1.0, n, model), cfg.chunk)
            res["ppl"].append(
                {
                    "policy": "dense",
                    "budget": 1.0,
                    "length": n,
                    "ppl": dense["ppl"],
                    "kl": 0.0,
                    "peak_kv": dense["peak_kv"],
                }
            )
            say(f"ppl dense n={n}: {dense['ppl']:.3f}")
            for name in cfg.policies:
                if name == "dense":
                    continue
                for b in cfg.budgets:
                    r = _score_text(model, ids, make_policy(name, b, n, model), cfg.chunk, dense["logp"])
                    res["ppl"].append(
                        {
                            "policy": name,
                            "budget": b,
                            "length": n,
                            "ppl": r["ppl"],
                            "kl": r["kl"],
                            "peak_kv": r["peak_kv"],
                        }
                    )
                    say(f"ppl {name} b={b:.3f} n={n}: {r['ppl']:.3f} kl {r['kl']:.4f}")
        rng = random.Random(cfg.seed)
        trials = [
            (n, d, rng.randint(10000, 99999))
            for n in cfg.passkey_lengths
            for d in cfg.depths
            for _ in range(cfg.keys_per_depth)
        ]
        for name in cfg.policies if cfg.passkey else ():
            for b in (1.0,) if name == "dense" else cfg.passkey_budgets or cfg.budgets:
                for n, d, key in trials:
                    r = _passkey(model, tok, make_policy(name, b, n, model), n, d, key, cfg.chunk, cfg.decode_tokens)
                    res["passkey"].append({"policy": name, "budget": b, "length": n, "depth": d, **r})
                    say(f"passkey {name} b={b:.3f} n={n} depth={d}: {r['ok']} ({r['said']!r})")
    if cfg.needle:
        res["needle"] = _needle.run_needle(
            model,
            tok,
            cfg.policies,
            cfg.passkey_budgets or cfg.budgets,
            length=cfg.needle_length,
            depths=cfg.needle_depths,
            per_depth=cfg.needle_per_depth,
            variants=cfg.needle_variants,
            haystacks=cfg.needle_haystacks,
            settings=cfg.needle_settings,
            chunk=cfg.chunk,
            seed=cfg.seed,
            progress=say,
        )
    if cfg.minilm:
        res["minilm"] = minilm_similarity(cfg.budgets, say)
    return res


def minilm_similarity(budgets, say=lambda s: None, n_texts: int = 16, length: int = 256) -> list[dict]:
    """Cosine similarity of MiniLM sentence embeddings under a bidirectional sinks+window prefill vs dense."""
    from .. import hf
    from ..models import english_text, load_minilm
    from ..models.minilm import embed
    from ..patterns import Sinks, SlidingWindow

    model, tok = load_minilm()
    paras = [p for p in english_text().split("\n\n") if len(p) > 1500][:n_texts]
    enc = tok(paras, return_tensors="pt", truncation=True, max_length=length, padding=True)
    rows = []
    with torch.no_grad():
        ref = embed(model, enc)
        for b in budgets:
            w = max(1, int(b * length) // 2)
            pol = hf.SparsePrefill(SlidingWindow(left=w, right=w) | Sinks(4))
            with hf.applied(model, pol):
                got = embed(model, enc)
            cos = (ref * got).sum(-1)
            rows.append(
                {
                    "policy": "sinks+window",
                    "budget": b,
                    "length": length,
                    "cos_mean": float(cos.mean()),
                    "cos_min": float(cos.min()),
                }
            )
            say(f"minilm b={b:.3f}: cos {float(cos.mean()):.4f}")
    return rows


# -- report ----------------------------------------------------------------------------------------------
def _frac(b: float) -> str:
    return "full" if b >= 1.0 else f"1/{round(1 / b)}"


def _ppl_table(res: dict) -> list[str]:
    """Perplexity per policy, budget and length (with the change against dense), KL and peak KV at the longest."""
    out = []
    lengths = sorted({r["length"] for r in res["ppl"]})
    if not lengths:
        return ["(no perplexity run)"]
    dense = {r["length"]: r for r in res["ppl"] if r["policy"] == "dense"}
    out.append("| policy | budget | " + " | ".join(f"ppl @{n}" for n in lengths) + " | KL @max | peak KV / dense |")
    out.append("|---|---|" + "---|" * len(lengths) + "---|---|")
    keys = sorted({(r["policy"], r["budget"]) for r in res["ppl"]}, key=lambda x: (x[0] != "dense", x[0], x[1]))
    top = max(lengths, default=0)
    for name, b in keys:
        cells = {r["length"]: r for r in res["ppl"] if r["policy"] == name and r["budget"] == b}
        ppl = " | ".join(
            f"{cells[n]['ppl']:.3f} ({100 * (cells[n]['ppl'] / dense[n]['ppl'] - 1):+.1f}%)" if n in cells else "-"
            for n in lengths
        )
        last = cells.get(top)
        mem = f"{last['peak_kv'] / dense[top]['peak_kv']:.3f}" if last else "-"
        out.append(
            f"| {name} | {_frac(b)} | {ppl} | {last['kl']:.4f} | {mem} |"
            if last
            else f"| {name} | {_frac(b)} | {ppl} | - | - |"
        )
    return out


def markdown(res: dict) -> str:
    out = ["## Real model: SmolLM2-135M under KV-cache policies (`attnkit eval`)", ""]
    cfg = res["config"]
    out.append(
        f"Chunked feeding ({cfg['chunk']} tokens per step), budgets are KV entries per head as a fraction "
        "of the length. Perplexity on Python's reference manual; KL is mean per-token KL(dense || policy)."
    )
    out.append("")
    out += _ppl_table(res)
    if res["passkey"]:
        out += ["", "### Passkey retrieval (accuracy per depth)", ""]
        depths = sorted({r["depth"] for r in res["passkey"]})
        plens = sorted({r["length"] for r in res["passkey"]})
        out.append(
            "| policy | budget | length | "
            + " | ".join(f"d={d}" for d in depths)
            + " | prefill s | decode ms/token | peak KV / dense |"
        )
        out.append("|---|---|---|" + "---|" * len(depths) + "---|---|---|")
        dmem = {
            n: max(r["peak_kv"] for r in res["passkey"] if r["policy"] == "dense" and r["length"] == n)
            for n in plens
            if any(r["policy"] == "dense" and r["length"] == n for r in res["passkey"])
        }
        pk = sorted(
            {(r["policy"], r["budget"], r["length"]) for r in res["passkey"]},
            key=lambda x: (x[2], x[0] != "dense", x[0], x[1]),
        )
        for name, b, n in pk:
            rows = [r for r in res["passkey"] if (r["policy"], r["budget"], r["length"]) == (name, b, n)]
            acc = " | ".join(
                f"{sum(r['ok'] for r in rows if r['depth'] == d) / max(1, sum(r['depth'] == d for r in rows)):.2f}"
                for d in depths
            )
            pre = sum(r["prefill_s"] for r in rows) / len(rows)
            dec = 1000 * sum(r["decode_s"] for r in rows) / len(rows)
            mem = max(r["peak_kv"] for r in rows) / dmem[n] if n in dmem else float("nan")
            out.append(f"| {name} | {_frac(b)} | {n} | {acc} | {pre:.2f} | {dec:.0f} | {mem:.3f} |")
    out += _needle.markdown(res.get("needle", []))
    if res.get("minilm"):
        out += [
            "",
            "### all-MiniLM-L6-v2 (encoder): bidirectional sinks + window prefill",
            "",
            "| budget | length | cosine to dense (mean) | min |",
            "|---|---|---|---|",
        ]
        for r in res["minilm"]:
            out.append(f"| {_frac(r['budget'])} | {r['length']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} |")
    return "\n".join(out) + "\n"


def _curve(ax, rows, x, y, name):
    rows = sorted(rows, key=lambda r: r[x])
    ax.plot(
        [r[x] for r in rows], [r[y] for r in rows], marker="o", label=name, color="black" if name == "dense" else None
    )


def plots(res: dict, folder) -> list:
    """``eval_ppl.png`` (perplexity against length, one panel per budget) and ``eval_passkey.png`` (accuracy
    against depth, one panel per length and budget)."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("ppl", "passkey"):
        rows_all = res[kind]
        budgets = sorted({r["budget"] for r in rows_all if r["policy"] != "dense"})
        if not budgets:
            continue
        names = ["dense"] + sorted({r["policy"] for r in rows_all if r["policy"] != "dense"})
        lengths = sorted({r["length"] for r in rows_all}) if kind == "passkey" else [None]
        fig, axes = plt.subplots(
            len(lengths), len(budgets), figsize=(5 * len(budgets), 3.8 * len(lengths)), squeeze=False
        )
        for i, n in enumerate(lengths):
            for ax, b in zip(axes[i], budgets, strict=True):
                for name in names:
                    rows = [
                        r
                        for r in rows_all
                        if r["policy"] == name
                        and (name == "dense" or r["budget"] == b)
                        and (n is None or r["length"] == n)
                    ]
                    if kind == "ppl":
                        _curve(ax, rows, "length", "ppl", name)
                    else:
                        depths = sorted({r["depth"] for r in rows})
                        acc = [
                            {
                                "depth": d,
                                "acc": sum(r["ok"] for r in rows if r["depth"] == d)
                                / sum(r["depth"] == d for r in rows),
                            }
                            for d in depths
                        ]
                        _curve(ax, acc, "depth", "acc", name)
                if kind == "ppl":
                    ax.set(title=f"KV budget {_frac(b)}", xlabel="context length", ylabel="perplexity")
                    ax.set_xscale("log", base=2)
                else:
                    ax.set(title=f"passkey, {n} tokens, budget {_frac(b)}", xlabel="depth", ylabel="accuracy")
                    ax.set_ylim(-0.05, 1.05)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / f"eval_{kind}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write(res: dict, out) -> dict:
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "eval.md").write_text(markdown(res))
    return {"json": out / "eval.json", "markdown": out / "eval.md", "plots": plots(res, out / "plots")}


class ModelsSuite:
    """``attnkit eval``'s suite: KV policies on SmolLM2 (and MiniLM), through the same protocol. The ``eval``
    command writes its own ``eval.json`` / ``eval.md`` (:func:`write`); a run of this suite through
    :func:`attnkit.bench.suite.run_suites` puts the same section under ``results["suites"]["models"]``."""

    name = "models"
    title = "real models: KV-cache policies (E)"

    def __init__(self, config: EvalConfig | None = None):
        self.config = config or EvalConfig()

    def cells(self) -> int:
        cfg = self.config
        others = [p for p in cfg.policies if p != "dense"]
        ppl = len(cfg.lengths) * (1 + len(others) * len(cfg.budgets))
        trials = len(cfg.passkey_lengths) * len(cfg.depths) * cfg.keys_per_depth
        budgets = len(cfg.passkey_budgets or cfg.budgets)
        runs = sum(1 if p == "dense" else budgets for p in cfg.policies)
        passkey = trials * runs if cfg.passkey else 0
        needle = 0
        if cfg.needle:
            prompts = len(cfg.needle_haystacks) * len(cfg.needle_variants) * len(cfg.needle_depths)
            needle = prompts * cfg.needle_per_depth * len(cfg.needle_settings) * runs
        return ppl + passkey + needle

    def run(self, context, progress) -> dict:
        return run_eval(self.config, progress=progress)

    def targets(self, section: dict) -> list[dict]:
        return []

    def markdown(self, section: dict) -> list[str]:
        return ["", *markdown(section).splitlines(), ""]

    def table(self, section: dict, console) -> None:
        console.print(markdown(section))

    def plots(self, section: dict, folder) -> list:
        return plots(section, folder)
