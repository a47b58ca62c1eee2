"""Builders of small real artefacts for tests: a tiny BERT checkpoint and a bundle over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from reprmerge_core.backbone import default_backbone_path
from reprmerge_core.bundle import write_bundle
from reprmerge_core.bundle.manifest import BackboneInfo, CorrectionInfo, MergeInfo, TaskInfo
from reprmerge_core.correction import TaskHead, TaskStatistics

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_backbone(out: Path, hidden: int = 32, seed: int = 0) -> Path:
    """Random 2-layer BERT (hidden `hidden`) saved as safetensors, with MiniLM's tokenizer files."""
    torch.manual_seed(seed)
    src = default_backbone_path()
    vocab = sum(1 for _ in (src / "vocab.txt").open())
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def random_statistics(dim: int, n: int, generator: torch.Generator) -> TaskStatistics:
    """Statistics of n random merged features and an expert that is a noisy linear map of them."""
    zm = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    mix = torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    ze = zm @ mix.T + 0.1 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return TaskStatistics.from_features(zm, ze)


def make_random_bundle(out: Path, backbone_dir: Path, generator: torch.Generator,
                       tasks: dict[str, list[str]] | None = None, n: int = 64, pooling: str = "mean") -> Path:
    tasks = tasks or {"alpha": ["no", "yes"], "beta": ["a", "b", "c"], "gamma": ["x", "y"]}
    dim = BertConfig.from_pretrained(backbone_dir).hidden_size
    infos = [TaskInfo(name=t, labels=labels, calibration_samples=n) for t, labels in tasks.items()]
    stats = [random_statistics(dim, n, generator) for _ in tasks]
    heads = [TaskHead(torch.randn(len(l), dim, generator=generator), torch.randn(len(l), generator=generator))
             for l in tasks.values()]
    return write_bundle(
        out, tasks=infos, statistics=stats, heads=heads, backbone_dir=backbone_dir,
        correction=CorrectionInfo(beta=0.3, normalisation="energy"),
        merge=MergeInfo(method="task_arithmetic", parameters={"lambda": 0.3}),
        backbone=BackboneInfo(source="tiny-random-bert", pooling=pooling, max_length=32),
    )
