"""Shared test builders as fixtures (8 fake CPU devices are set up by the repository's root conftest.py)."""

from __future__ import annotations

import pytest
from step_fixtures import make_batch, tiny_model


@pytest.fixture
def model():
    """A fresh tiny random LLaMA (3 layers, d=16, vocab 64; `step_fixtures.tiny_model`)."""
    return tiny_model()


@pytest.fixture(scope="session")
def forget_batch() -> dict:
    """8 ragged rows of 8 tokens (left padding, prompt tokens without loss), seed 1."""
    return make_batch(1)


@pytest.fixture(scope="session")
def retain_batch() -> dict:
    """8 ragged rows of 8 tokens, seed 2."""
    return make_batch(2)
