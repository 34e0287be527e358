"""Calibration files: per-model results of an offline calibration, keyed by the model's config, read offline.

A file is JSON: ``{"format": "attnkit-calibration/1", "method": ..., "model_key": ..., "model": {...},
"settings": {...}, "values": [[...], ...]}``. ``model_key`` hashes the fields of the config that fix the
attention shapes (architecture, layers, heads, KV heads, head size, hidden size, vocabulary, RoPE), so a file
made for one model is refused by another. The files attnkit ships live in ``attnkit/hf/calibrations``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import AttnkitError, bad

FORMAT = "attnkit-calibration/1"
SHIPPED = Path(__file__).parent / "calibrations"
_KEY_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_size",
    "vocab_size",
    "rope_parameters",
    "max_position_embeddings",
)


class CalibrationError(AttnkitError, ValueError):
    """A calibration file is missing, unreadable, or made for another model or method."""


def model_summary(model) -> dict:
    if not hasattr(model, "config"):
        raise CalibrationError(bad("model", "a transformers model (its config keys the calibration)", model))
    cfg = model.config.get_text_config()
    out = {}
    for f in _KEY_FIELDS:
        v = getattr(cfg, f, None)
        if f == "head_dim" and v is None:
            v = cfg.hidden_size // cfg.num_attention_heads
        if f == "num_key_value_heads" and v is None:
            v = cfg.num_attention_heads
        out[f] = v
    return out


def model_key(model) -> str:
    blob = json.dumps(model_summary(model), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save(path, model, method: str, values, settings: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "method": method,
        "model_key": model_key(model),
        "model": model_summary(model),
        "settings": settings,
        "values": values,
    }
    path.write_text(json.dumps(doc, indent=1, default=str))
    return path


def load(path, model, method: str) -> dict:
    """The document at ``path``, checked: format, method, and that it was made for ``model``."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(
            bad("path", f"an existing {method} calibration file (run `attnkit calibrate`)", str(path))
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationError(bad("path", "a readable JSON calibration file", f"{path}: {e}")) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CalibrationError(bad("path", f"a file in format {FORMAT}", f"{path}: format={_get(doc, 'format')}"))
    if doc.get("method") != method:
        raise CalibrationError(bad("path", f"a {method} calibration", f"{path}: a {doc.get('method')} one"))
    if doc.get("model_key") != model_key(model):
        raise CalibrationError(
            bad("path", f"a calibration for this model (key {model_key(model)})", f"{path}: key {doc.get('model_key')}")
        )
    cfg = model.config.get_text_config()
    vals = doc.get("values")
    layers, heads = cfg.num_hidden_layers, model_summary(model)["num_key_value_heads"]
    if (
        not isinstance(vals, list)
        or len(vals) != layers
        or any(not isinstance(r, list) or len(r) != heads for r in vals)
    ):
        raise CalibrationError(bad("path", f"values of shape ({layers}, {heads}, ...)", f"{path}: malformed values"))
    return doc


def shipped(model, method: str) -> Path:
    """The calibration file attnkit ships for ``model`` and ``method`` (CalibrationError if none)."""
    key = model_key(model)
    path = SHIPPED / f"{method}-{key}.json"
    if not path.is_file():
        raise CalibrationError(
            bad("model", f"a model attnkit ships a {method} calibration for", f"key {key}; run `attnkit calibrate`")
        )
    return path


def _get(doc, k):
    return doc.get(k) if isinstance(doc, dict) else type(doc).__name__
