"""A small deterministic teacher for testing and benchmarking the service layer.

Kind ``mean_pool_embedding``: a seeded item-embedding table (row 0 = PAD = zeros); a history is the
mean of its items' embeddings; scores are dot products. It is a real ``Teacher`` subclass with a
real safetensors checkpoint, so the service code under test runs exactly as with a trained model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from teachers.base import Teacher, register_teacher, save_teacher


@register_teacher
class MeanPoolEmbeddingTeacher(Teacher):
    kind = "mean_pool_embedding"
    version = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float = 1.0, max_history: int = 50,
                 dim: int = 64, seed: int = 0):
        super().__init__(vocab_hash, num_items, temperature, max_history)
        self.dim, self.seed = int(dim), int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        table = torch.randn(num_items, self.dim, generator=gen) / self.dim ** 0.5
        table[0] = 0.0
        self.item_table = torch.nn.Embedding(num_items, self.dim, padding_idx=0, _weight=table)

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # PAD rows of the table are zero, so a plain sum over the padded row is the masked sum.
        summed = self.item_table(histories).sum(dim=1)
        return summed / lengths.clamp(min=1).to(summed.dtype).unsqueeze(1)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.item_table(item_ids)

    def config_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "seed": self.seed}


def make_fixture_checkpoint(directory: str | Path, num_items: int = 1000, vocab_hash: str = "fixture-vocab",
                            dim: int = 64, seed: int = 0, temperature: float = 1.0,
                            max_history: int = 50) -> Path:
    """Write a fixture-teacher checkpoint (safetensors + config.json) and return its directory."""
    model = MeanPoolEmbeddingTeacher(vocab_hash, num_items, temperature, max_history, dim=dim, seed=seed)
    return save_teacher(model, directory)
