"""Shared fixtures. Every model is local: an accidental hub call must fail fast."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from reprmerge_core.backbone import default_backbone_path
from tests.helpers import make_random_bundle, make_tiny_backbone


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, randomly initialised BERT with the real MiniLM tokenizer (fast, real transformers model)."""
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"))


@pytest.fixture
def random_bundle(tmp_path: Path, tiny_backbone_dir: Path) -> Path:
    """A valid bundle over the tiny backbone with statistics from random features."""
    return make_random_bundle(tmp_path / "bundle", tiny_backbone_dir, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle over the real MiniLM backbone (random statistics): for tests that need real backbone time."""
    return make_random_bundle(tmp_path_factory.mktemp("minilm") / "bundle", default_backbone_path(),
                              generator=torch.Generator().manual_seed(4), n=500)
