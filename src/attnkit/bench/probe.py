"""Attentive probing on frozen all-MiniLM-L6-v2 token features: mean pooling vs the full attentive probe vs
efficient probing (EP), on a generated role-classification task.

**The task** (:func:`make_task`). Every sentence names two entities of different categories (animal, vehicle,
person, tool; eight words each) in one of six templates: active (``The fox pushed the tractor near the old
bridge.``), passive (``The tractor was pushed by the fox ...``), fronted adjunct, cleft (``It was the fox that
pushed the tractor.``), and two with the patient first (``The tractor that the fox pushed stood ...``, a fronted
passive). The label is the category of the **agent**, the one doing the action (4 classes, chance 25%). Both
categories occur in every sentence and the agent comes first in half of the templates, so neither the words
present nor the position of the first entity gives the label: a classifier that knew exactly which two
categories occur, and nothing else, gets 50%. It has to read the role from MiniLM's contextual features.
Examples are drawn with a fixed seed (``data_seed``), split at random into train and test (``test_frac``).

**The features** (:func:`features`): MiniLM's last hidden states for every token (``[CLS]`` and ``[SEP]``
included, padding masked), computed once per process (and saved under ``cache_dir`` when given).

**The probes** (:mod:`attnkit.layers.probe`): :class:`MeanProbe` (linear probing of the masked mean),
:class:`AttentiveProbe` (full W_q, W_k, W_v, W_o) and :class:`EfficientProbe`, all with the same
normalisation and linear classifier, trained with AdamW and cross-entropy, the same epochs, batch and learning
rate grid, each method's learning rate chosen on a validation part of the training split (``lrs``; the
test split is never looked at), for each of ``seeds`` (initialisation and batch order). Rows report test
accuracy (mean, spread), trainable parameters and training time.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import torch

CATEGORIES = {
    "animal": ("dog", "cat", "horse", "goat", "fox", "bear", "rabbit", "deer"),
    "vehicle": ("truck", "bus", "tractor", "van", "train", "bicycle", "car", "boat"),
    "person": ("teacher", "farmer", "doctor", "child", "soldier", "baker", "nurse", "pilot"),
    "tool": ("hammer", "shovel", "ladder", "rake", "drill", "broom", "wrench", "axe"),
}
VERBS = ("pushed", "pulled", "followed", "chased", "passed", "blocked", "hit", "dragged", "struck")
PLACES = (
    "near the old bridge",
    "in the morning",
    "on the wet road",
    "behind the barn",
    "at the station",
    "after the storm",
    "in the city",
    "along the river",
)
# {a}: agent, {p}: patient, {v}: verb, {l}: place, {L}: place capitalised
TEMPLATES = (
    "The {a} {v} the {p} {l}.",
    "The {p} was {v} by the {a} {l}.",
    "{L}, the {a} {v} the {p}.",
    "It was the {a} that {v} the {p} {l}.",
    "The {p} that the {a} {v} stood {l}.",
    "{L}, the {p} was {v} by the {a}.",
)
LABELS = tuple(CATEGORIES)


def make_task(n: int, *, seed: int = 0, templates=TEMPLATES) -> tuple[list[str], list[int]]:
    """``n`` sentences and their labels (the agent's category index in :data:`LABELS`); see the module doc.
    ``templates``: a subset of :data:`TEMPLATES` (``TEMPLATES[:1]``, agent always first, is an easy split)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        ca, cp = rng.sample(range(len(LABELS)), 2)
        a, p = rng.choice(CATEGORIES[LABELS[ca]]), rng.choice(CATEGORIES[LABELS[cp]])
        place = rng.choice(PLACES)
        t = rng.choice(templates)
        texts.append(t.format(a=a, p=p, v=rng.choice(VERBS), l=place, L=place[0].upper() + place[1:]))
        labels.append(ca)
    return texts, labels


_FEATURES: dict = {}


def features(texts: list[str], *, batch: int = 128, cache_dir=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM's last hidden states ``(n, L, 384)`` float32 and the real-token mask ``(n, L)``; once per process
    (and per ``cache_dir``, where they are saved keyed by the texts' hash)."""
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    if key in _FEATURES:
        return _FEATURES[key]
    path = None if cache_dir is None else Path(cache_dir) / f"minilm-{key}.pt"
    if path is not None and path.is_file():
        feats, mask = torch.load(path)
        _FEATURES[key] = (feats, mask)
        return feats, mask
    from ..models import load_minilm

    model, tok = load_minilm()
    enc = tok(texts, return_tensors="pt", padding=True)
    outs = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            sl = slice(i, i + batch)
            outs.append(
                model(input_ids=enc["input_ids"][sl], attention_mask=enc["attention_mask"][sl]).last_hidden_state
            )
    feats, mask = torch.cat(outs), enc["attention_mask"].bool()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((feats, mask), path)
    _FEATURES[key] = (feats, mask)
    return feats, mask


def make_probe(method: str, dim: int, classes: int, *, queries: int = 8, heads: int = 8):
    from ..layers.probe import AttentiveProbe, EfficientProbe, MeanProbe

    if method == "mean":
        return MeanProbe(dim, classes)
    if method == "attentive":
        return AttentiveProbe(dim, classes, heads=heads)
    if method == "efficient":
        return EfficientProbe(dim, classes, queries=queries)
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


METHODS = ("mean", "attentive", "efficient")


def train_probe(probe, x, mask, y, *, epochs: int, batch: int, lr: float, weight_decay: float, seed: int) -> float:
    """AdamW on cross-entropy; returns the seconds spent."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            loss = torch.nn.functional.cross_entropy(probe(x[idx], key_padding_mask=mask[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    probe.eval()
    return time.perf_counter() - t0


def accuracy(probe, x, mask, y, *, batch: int = 512) -> float:
    with torch.no_grad():
        pred = torch.cat(
            [probe(x[i : i + batch], key_padding_mask=mask[i : i + batch]).argmax(-1) for i in range(0, len(y), batch)]
        )
    return (pred == y).double().mean().item()


def run_probe_eval(
    *,
    n_examples: int = 3000,
    test_frac: float = 0.2,
    data_seed: int = 0,
    seeds=(0, 1, 2),
    methods=METHODS,
    epochs: int = 20,
    batch: int = 64,
    lrs=(1e-3, 3e-3, 1e-2, 3e-2),
    weight_decay: float = 1e-4,
    queries: int = 8,
    heads: int = 8,
    cache_dir=None,
    progress=None,
) -> list[dict]:
    """Train every probe of ``methods`` for each seed on MiniLM features of :func:`make_task`; one row per
    method: ``method, lr, val_acc_by_lr, params, pooling_params, acc_mean, acc_std, accs, train_acc_mean, train_s_mean,
    n_train, n_test`` (accuracies on the held-out split unless named ``train_``)."""
    say = progress or (lambda s: None)
    texts, labels = make_task(n_examples, seed=data_seed)
    t0 = time.perf_counter()
    x, mask = features(texts, cache_dir=cache_dir)
    say(f"features {tuple(x.shape)} in {time.perf_counter() - t0:.1f} s")
    y = torch.tensor(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed))
    n_test = max(1, int(round(test_frac * len(y))))
    te, tr = perm[:n_test], perm[n_test:]
    n_val = max(1, len(tr) // 5)
    val, fit = tr[:n_val], tr[n_val:]
    rows = []
    for method in methods:
        lr, val_accs = lrs[0], {}
        if len(lrs) > 1:  # each method's learning rate, chosen on a validation part of the training split
            for cand in lrs:
                torch.manual_seed(seeds[0])
                probe = make_probe(method, x.shape[-1], len(LABELS), queries=queries, heads=heads)
                kw = {"epochs": epochs, "batch": batch, "lr": cand, "weight_decay": weight_decay, "seed": seeds[0]}
                train_probe(probe, x[fit], mask[fit], y[fit], **kw)
                val_accs[cand] = accuracy(probe, x[val], mask[val], y[val])
            lr = max(lrs, key=lambda c: val_accs[c])
            say(f"{method}: validation accuracy by lr {val_accs} -> lr {lr:g}")
        accs, train_accs, secs = [], [], []
        for seed in seeds:
            torch.manual_seed(seed)
            probe = make_probe(method, x.shape[-1], len(LABELS), queries=queries, heads=heads)
            secs.append(
                train_probe(
                    probe,
                    x[tr],
                    mask[tr],
                    y[tr],
                    epochs=epochs,
                    batch=batch,
                    lr=lr,
                    weight_decay=weight_decay,
                    seed=seed,
                )
            )
            accs.append(accuracy(probe, x[te], mask[te], y[te]))
            train_accs.append(accuracy(probe, x[tr], mask[tr], y[tr]))
            say(f"{method} seed {seed}: test {accs[-1]:.3f} train {train_accs[-1]:.3f} ({secs[-1]:.1f} s)")
        rows.append(
            {
                "method": method,
                "lr": lr,
                "val_acc_by_lr": {str(k): v for k, v in val_accs.items()},
                "params": sum(p.numel() for p in probe.parameters()),
                "pooling_params": probe.pooling_parameters(),
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accs": accs,
                "train_acc_mean": statistics.fmean(train_accs),
                "train_s_mean": statistics.fmean(secs),
                "n_train": len(tr),
                "n_test": len(te),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| probe | lr | params | pooling params | test accuracy (mean ± sd) | per seed | train accuracy | train s |\n"
    )
    head += "|---|---|---|---|---|---|---|---|\n"
    body = ""
    for r in rows:
        acc = f"{100 * r['acc_mean']:.1f} ± {100 * r['acc_std']:.1f}%"
        seeds = ", ".join(f"{100 * a:.1f}" for a in r["accs"])
        body += f"| {r['method']} | {r['lr']:g} | {r['params']:,} | {r['pooling_params']:,} | {acc} | {seeds} "
        body += f"| {100 * r['train_acc_mean']:.1f}% | {r['train_s_mean']:.1f} |\n"
    n = rows[0] if rows else {"n_train": 0, "n_test": 0}
    note = (
        f"\nRole classification (the agent's category, 4 classes; chance 25%, knowing only which two categories "
        f"occur: 50%), {n['n_train']} train / {n['n_test']} test sentences, frozen all-MiniLM-L6-v2 token features.\n"
    )
    return head + body + note


def write(rows: list[dict], out) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(rows, indent=1))
    (out / "probe.md").write_text(markdown(rows))
    return {"json": out / "probe.json", "markdown": out / "probe.md"}
