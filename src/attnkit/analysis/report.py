"""``attnkit analyze``: one command from a real model to report.md, JSON and pictures.

Sections, per task:

- ``text`` (``--text FILE``, or shipped English text): the capture at ``tokens`` tokens over every layer and
  head with its time and peak memory beside a plain forward and beside what the full maps would take; entropy,
  sink, local and previous-token heatmaps; the sink rate; sink mass per layer; distance profiles; pooled maps;
  massive activations (SmolLM2) and hidden sinks; rollout on a short prefix.
- ``induction``: induction and previous-token scores; the loss on the second copy with the top induction
  heads ablated against as many random heads.
- ``needle``: retrieval scores; needle accuracy with the top retrieval heads masked against random heads (the
  Retrieval Head paper's test).
- ``ioi``: activation patching and direct logit attribution per head; attention knockout from the names to
  the last token over windows of layers.
"""

from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path

import torch

from ..errors import ShapeError, bad
from .causal import direct_logit_attribution, intervene, knockout_sweep, patch_heads
from .flow import attention_flow, attention_maps, rollout
from .heads import HiddenSinks, InductionHeads, PreviousTokenHeads, RetrievalHeads
from .massive import massive_activations
from .observer import Statistics, capture, full_map_bytes
from .prompts import ioi, needles, repeated_tokens, text_ids
from .scores import HeadScores

TASKS = ("text", "induction", "needle", "ioi")


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(name: str):
    """``(model, tokenizer, causal)`` for ``smollm2`` or ``minilm`` (offline packages)."""
    if name == "smollm2":
        from ..models import load_smollm2

        model, tok = load_smollm2()
        return model, tok, True
    if name == "minilm":
        from ..models import load_minilm

        model, tok = load_minilm()
        return model, tok, False
    raise ShapeError(bad("model", "'smollm2' or 'minilm'", repr(name)))


def text_section(model, tok, text, *, tokens, out, say) -> tuple[list[str], dict]:
    """The capture over every layer and head, its cost, and the head maps of one text."""
    ids = text_ids(tok, text, tokens)
    N = ids.shape[1]
    say(f"plain forward, {N} tokens")
    with torch.no_grad():
        base_peak = _peak_mib()
        t0 = time.perf_counter()
        model(input_ids=ids)
        plain_s = time.perf_counter() - t0
        plain_peak = _peak_mib()
    say("capture over every layer and head")
    st = Statistics(first=1, window=16, offsets=(1,), pooled=32, columns=True)
    with capture(model, st) as cap, torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=ids)
        cap_s = time.perf_counter() - t0
    cap_peak = _peak_mib()
    full = full_map_bytes(model, N) / 2**30
    extra = max(0.0, cap_peak - max(plain_peak, base_peak))
    res = {
        "tokens": N,
        "plain_s": round(plain_s, 2),
        "capture_s": round(cap_s, 2),
        "time_ratio": round(cap_s / plain_s, 2),
        "peak_rss_extra_mib": round(extra, 1),
        "full_maps_gib": round(full, 2),
    }
    entropy = HeadScores("entropy", cap.entropy.mean(0), paper="-", meaning="mean attention entropy (nats)")
    sink = HeadScores(
        "sink",
        cap.first_mass.mean(0),
        paper="When Attention Sink Emerges in Language Models (Gu et al., 2025)",
        meaning="mean attention to the first token",
    )
    rate = float((sink.values > 0.3).double().mean())
    sink.extra["sink_rate"] = round(rate, 4)
    local = HeadScores(
        "local",
        cap.local_mass.mean(0),
        paper="DuoAttention (streaming heads)",
        meaning="mass on the 16 most recent keys",
    )
    prev = HeadScores(
        "previous_token", cap.offset_mass(1).mean(0), paper="TransformerLens", meaning="attention to the previous token"
    )
    scores = [entropy, sink, local, prev]
    for s in scores:
        s.save(out)
    res["sink_rate"] = round(rate, 4)
    lines = [
        f"## Capture on {N} tokens of text",
        "",
        f"Every layer and head, statistics computed block by block from q, k and the log-sum-exp: "
        f"{cap_s:.1f} s against {plain_s:.1f} s for a plain forward (**{cap_s / plain_s:.2f}x**); peak resident "
        f"memory rose by {extra:.0f} MiB over the plain forward's, where the full float32 maps of every layer and "
        f"head would take {full:.2f} GiB. Sink rate (share of heads with mean first-token attention > 0.3): "
        f"**{rate:.1%}**.",
        "",
    ]
    lines += [x for s in scores for x in s.markdown()]
    plt = _plt()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        axes[0].plot(cap.first_mass.mean(0).mean(-1).numpy(), marker="o", label="mean over heads")
        axes[0].plot(cap.first_mass.mean(0).amax(-1).numpy(), marker=".", label="max over heads")
        axes[0].set_xlabel("layer")
        axes[0].set_ylabel("attention on the first token")
        axes[0].legend(fontsize=7)
        dist = cap.distance.mean(0).mean(-2)  # (L, bins)
        edges = cap.distance_edges
        for layer in range(0, dist.shape[0], max(1, dist.shape[0] // 6)):
            axes[1].plot([max(e, 0.5) for e in edges], dist[layer].numpy(), marker=".", label=f"layer {layer}")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("query-key distance (log-2 bins)")
        axes[1].set_ylabel("mass")
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "sinks_and_distance.png", dpi=110)
        plt.close(fig)
        pooled = cap.pooled.mean(0)
        pick = [
            (layer, int(entropy.values[layer].argmin())) for layer in (0, pooled.shape[0] // 2, pooled.shape[0] - 1)
        ]
        pick += [
            (layer, int(entropy.values[layer].argmax())) for layer in (0, pooled.shape[0] // 2, pooled.shape[0] - 1)
        ]
        fig, axes = plt.subplots(2, 3, figsize=(9, 6))
        for ax, (layer, h) in zip(axes.flat, pick, strict=True):
            ax.imshow(pooled[layer, h].numpy() ** 0.5, cmap="magma", interpolation="nearest")
            ax.set_title(f"L{layer}.H{h} (entropy {entropy.values[layer, h]:.2f})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("block-pooled maps (32 x 32, sqrt scale): lowest- and highest-entropy head", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "pooled_maps.png", dpi=110)
        plt.close(fig)
        lines += ["", "![sinks and distance](sinks_and_distance.png)", "", "![pooled maps](pooled_maps.png)", ""]
    return lines, res


def _hidden_and_massive(model, tok, text, *, out, say, causal) -> list[str]:
    lines = []
    ids = text_ids(tok, text, 256)
    say("hidden sinks (ACT)")
    hs = HiddenSinks().run(model, tok, ids=ids)
    hs.save(out)
    lines += hs.markdown()
    if causal:
        say("massive activations")
        m = massive_activations(model, ids)
        (out / "massive_activations.json").write_text(json.dumps(m.to_json(), indent=1))
        lines += m.markdown(tok, ids)
    return lines + [""]


ROLLOUT_TEXT = "When Mary and John went to the store, John gave a drink to Mary because she was thirsty."


def _rollout_section(model, tok, *, out, say) -> list[str]:
    ids = text_ids(tok, ROLLOUT_TEXT, 64)
    say(f"rollout and flow on {ids.shape[1]} tokens")
    maps = attention_maps(model, ids)
    R = rollout(maps)[0]
    t0 = time.perf_counter()
    F = attention_flow(maps)[0]
    flow_s = time.perf_counter() - t0
    plt = _plt()
    lines = [
        f"## Rollout and flow ({ids.shape[1]} tokens)",
        "",
        f"Exact attention flow (Dinic per pair on the pair's own subgraph) took {flow_s:.1f} s for "
        f"{ids.shape[1] ** 2} pairs over {len(maps)} layers.",
        "",
    ]
    if plt is not None:
        labels = [tok.decode([int(t)]).strip()[:8] or "·" for t in ids[0]]
        fig, axes = plt.subplots(1, 2, figsize=(11, 5))
        for ax, M, title in ((axes[0], R, "rollout"), (axes[1], F, "flow")):
            ax.imshow(M.numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(title)
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "rollout_flow.png", dpi=110)
        plt.close(fig)
        lines += ["![rollout and flow](rollout_flow.png)", ""]
    (out / "rollout.json").write_text(json.dumps({"rollout": R.tolist(), "flow": F.tolist()}))
    return lines


def induction_section(model, tok, *, out, say, top=5, seed=0) -> tuple[list[str], dict]:
    say("induction and previous-token heads")
    ind = InductionHeads(seed=seed).run(model, tok)
    prev_ids, start = repeated_tokens(tok, length=32, batch=4, seed=seed)
    prev = PreviousTokenHeads().run(model, tok, ids=prev_ids)
    ind.save(out)
    prev.save(out)

    def loss_second_copy(ablate=None):
        with intervene(model, ablate=ablate or {}), torch.no_grad():
            logits = model(input_ids=prev_ids).logits[:, start - 1 : -1]
        return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), prev_ids[:, start:]))

    tops = [(layer, h) for layer, h, _ in ind.top(top)]
    L, H = ind.shape
    rng = random.Random(seed)
    rand = rng.sample([(a, b) for a in range(L) for b in range(H) if (a, b) not in tops], top)
    res = {
        "loss_intact": loss_second_copy(),
        "loss_top_ablated": loss_second_copy({k: "zero" for k in tops}),
        "loss_random_ablated": loss_second_copy({k: "zero" for k in rand}),
    }
    lines = ["## Induction", ""] + ind.markdown() + prev.markdown()
    lines += [
        "",
        f"Loss on the repeated half: {res['loss_intact']:.3f} intact, {res['loss_top_ablated']:.3f} with the top "
        f"{top} induction heads zero-ablated, {res['loss_random_ablated']:.3f} with {top} random heads.",
        "",
        "![induction](induction.png) ![previous token](previous_token.png)",
        "",
    ]
    return lines, {"induction": ind.to_json(), "ablation": res}


def needle_section(model, tok, *, out, say, tokens=384, top=10, seed=0) -> tuple[list[str], dict]:
    say("retrieval heads on needle prompts")
    det = RetrievalHeads(tokens=tokens, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed=seed)
    ret = det.run(model, tok)
    ret.save(out)
    depths = (0.2, 0.4, 0.6, 0.8)
    prompts = needles(tok, tokens=tokens, depths=depths, seed=seed + 1) + needles(
        tok, tokens=tokens, depths=depths, seed=seed + 2
    )
    tops = [(layer, h) for layer, h, _ in ret.top(top)]
    L, H = ret.shape
    rand = random.Random(seed).sample([(a, b) for a in range(L) for b in range(H) if (a, b) not in tops], top)

    def accuracy(ablate):
        hit = 0
        for p in prompts:
            with intervene(model, ablate=ablate), torch.no_grad():
                g = model.generate(p.ids, max_new_tokens=8, do_sample=False)
            hit += int(tok.decode(g[0, p.ids.shape[1] :]).strip().startswith(p.answer))
        return hit / max(1, len(prompts))

    say("needle accuracy with heads masked")
    res = {
        "intact": accuracy({}),
        "top_masked": accuracy({k: "zero" for k in tops}),
        "random_masked": accuracy({k: "zero" for k in rand}),
        "held_out_prompts": len(prompts),
    }
    lines = ["## Retrieval heads (needle prompts)", ""] + ret.markdown(top)
    lines += [
        "",
        f"Needle accuracy on {len(prompts)} held-out prompts: {res['intact']:.0%} intact, {res['top_masked']:.0%} "
        f"with the top {top} retrieval heads masked, {res['random_masked']:.0%} with {top} random heads masked.",
        "",
        "![retrieval](retrieval.png)",
        "",
    ]
    return lines, {"retrieval": ret.to_json(), "masking": res}


def ioi_section(model, tok, *, out, say, seed=0) -> tuple[list[str], dict]:
    data = ioi(tok, batch=8, seed=seed)
    say(f"IOI: patching {len(data.answer)} prompts, one forward per head")
    patch = patch_heads(model, data.clean, data.corrupt, data.answer, data.wrong)
    dla = direct_logit_attribution(model, data.clean, data.answer, data.wrong)
    patch.save(out)
    dla.save(out)
    say("IOI: knockout from the names to the last token")
    N = data.clean.shape[1]
    names = torch.zeros(N, dtype=torch.bool)
    names[1:4] = True  # "When A and B": the first clause's names
    last = torch.zeros(N, dtype=torch.bool)
    last[-1] = True
    sweep = knockout_sweep(model, data.clean, src=names, dst=last, answer=data.answer, window=4)
    lines = [
        "## Indirect object identification",
        "",
        f"Prompt: {data.texts[0]!r} -> answer token id {int(data.answer[0])}",
        "",
    ]
    lines += patch.markdown() + dla.markdown()
    worst = min(range(len(sweep["change"])), key=lambda i: sweep["change"][i])
    lines += [
        "",
        f"Knockout of the first clause's tokens from the last token, windows of 4 layers: the answer's probability "
        f"falls most ({sweep['change'][worst]:+.1%}) with layers {sweep['start'][worst]}-{sweep['start'][worst] + 3}.",
        "",
        "![patching](patching.png) ![direct logit](direct_logit.png)",
        "",
    ]
    return lines, {"patching": patch.to_json(), "direct_logit": dla.to_json(), "knockout": sweep}


def analyze(
    model_name: str, *, task: str = "text", text: str | None = None, tokens: int = 1024, out, say=print
) -> dict:
    """Run the ``task`` analysis on ``model_name`` and write ``report.md``, ``analysis.json`` and pictures."""
    if task not in TASKS:
        raise ShapeError(bad("task", f"one of {TASKS}", repr(task)))
    model, tok, causal = load(model_name)
    if task in ("induction", "needle", "ioi") and not causal:
        raise ShapeError(bad("task", "'text' for an encoder (induction, needle and ioi need a causal LM)", task))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if text is None:
        from ..models import english_text

        text = english_text()
    t0 = time.perf_counter()
    lines = [f"# attnkit analyze: {model_name}, task {task}", ""]
    data: dict = {"model": model_name, "task": task}
    torch.set_grad_enabled(False)
    try:
        if task == "text":
            sec, res = text_section(model, tok, text, tokens=tokens, out=out, say=say)
            lines += sec
            data["capture"] = res
            lines += _hidden_and_massive(model, tok, text, out=out, say=say, causal=causal)
            lines += _rollout_section(model, tok, out=out, say=say)
        elif task == "induction":
            sec, res = induction_section(model, tok, out=out, say=say)
            lines += sec
            data.update(res)
        elif task == "needle":
            sec, res = needle_section(model, tok, out=out, say=say)
            lines += sec
            data.update(res)
        else:
            sec, res = ioi_section(model, tok, out=out, say=say)
            lines += sec
            data.update(res)
    finally:
        torch.set_grad_enabled(True)
    data["wall_s"] = round(time.perf_counter() - t0, 1)
    lines += [f"Wall time {data['wall_s']} s on {torch.get_num_threads()} threads."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "analysis.json").write_text(json.dumps(data, indent=1, default=str))
    return data
