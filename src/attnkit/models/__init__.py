"""Real pretrained models available offline (from PyPI packages) and what attnkit captures from them."""

from .minilm import load_minilm
from .smollm2 import capture_qkv, english_text, load_smollm2

__all__ = ["capture_qkv", "english_text", "load_minilm", "load_smollm2"]
