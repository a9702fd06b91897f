"""Shared fixtures: tiny tokenizers with real chat templates and tiny Qwen2/Llama models on disk.

Everything is built offline in about a second and cached for the whole session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sample_data import NAMES, greeting_conversations, write_jsonl
from training_hub.tiny import build_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tokenizer_factory():
    """Return a function template_name -> tokenizer (cached per template)."""
    cache: dict = {}

    def make(template: str | None = "chatml"):
        if template not in cache:
            cache[template] = build_tokenizer(template=template, corpus=[" ".join(NAMES)])
        return cache[template]

    return make


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Return a function (architecture, template) -> path of a saved tiny model (cached)."""
    cache: dict = {}

    def make(architecture: str = "qwen2", template: str | None = "chatml") -> Path:
        key = (architecture, template)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{architecture}-{template}")
            cache[key] = save_tiny_model(out, architecture=architecture, template=template, corpus=[" ".join(NAMES)])
        return cache[key]

    return make


@pytest.fixture
def greeting_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "greetings.jsonl", greeting_conversations())
