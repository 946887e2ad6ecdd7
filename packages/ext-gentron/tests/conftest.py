"""Shared fixtures of the GenTron tests: the hub is off for every test, one set of tiny text encoders, and the
tiny BERT encoder of the CLI runs."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def encoder(tmp_path_factory) -> Path:
    """A tiny random BERT text encoder (width 16) for the CLI runs of the ``gentron-digits`` recipe."""
    return save_tiny_text_encoder(tmp_path_factory.mktemp("enc") / "bert", "bert", hidden_size=16)
