"""Shared fixtures of the GenTron tests: the hub is off for every test, and one set of tiny text encoders."""

from __future__ import annotations

import pytest

from dtx_gentron.text import save_tiny_text_encoder

WIDTHS = {"clip": 16, "t5": 12, "bert": 8}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    """Folders of tiny random CLIP (width 16), T5 (12) and BERT (8) text encoders with a word-level tokenizer."""
    root = tmp_path_factory.mktemp("encoders")
    return {kind: str(save_tiny_text_encoder(root / kind, kind, hidden_size=w)) for kind, w in WIDTHS.items()}
