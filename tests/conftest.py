"""Test-run settings: hypothesis is derandomized under CI (a fixed, reproducible draw); locally it explores.

SmolLM2 is loaded once per test run (``load_smollm2`` caches it) and shared by every test that asks for it."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def smollm2():
    from attnkit.models import load_smollm2

    torch.set_num_threads(2)
    model, tok = load_smollm2()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


@pytest.fixture(scope="session")
def text_ids(smollm2):
    from attnkit.models import english_text

    _, tok = smollm2
    return tok(english_text()[:20000], return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def minilm():
    from attnkit.models import load_minilm

    return load_minilm()
