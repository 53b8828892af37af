"""A small deterministic teacher for testing and benchmarking the service layer.

Kind ``mean_pool_embedding``: a seeded item-embedding table (row 0 = PAD = zeros); a history is the
mean of its items' embeddings; scores are dot products. It is a real ``Teacher`` subclass with a
real safetensors checkpoint, so the service code under test runs exactly as with a trained model.

Injected latency, for fault tests and benchmarks: ``delay_ms`` (model config) sleeps that long in
every ``encode_histories`` call of every replica. ``fault_dir`` makes it per process and switchable
at run time: while ``<fault_dir>/delay_ms.<pid>`` exists, the replica with that pid sleeps the number
of milliseconds the file holds (instead of ``delay_ms``), so a test can slow one replica of a teacher
and heal it again without restarting anything.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from teachers.base import Teacher, register_teacher, save_teacher


@register_teacher
class MeanPoolEmbeddingTeacher(Teacher):
    kind = "mean_pool_embedding"
    version = "1"

    def __init__(self, vocab_hash: str, num_items: int, temperature: float = 1.0, max_history: int = 50,
                 dim: int = 64, seed: int = 0, delay_ms: float = 0.0, fault_dir: str = ""):
        super().__init__(vocab_hash, num_items, temperature, max_history)
        self.dim, self.seed = int(dim), int(seed)
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.delay_ms, self.fault_dir = float(delay_ms), str(fault_dir)
        gen = torch.Generator().manual_seed(self.seed)
        table = torch.randn(num_items, self.dim, generator=gen) / self.dim ** 0.5
        table[0] = 0.0
        self.item_table = torch.nn.Embedding(num_items, self.dim, padding_idx=0, _weight=table)

    def injected_delay_ms(self) -> float:
        """The latency this process injects per call now (see the module docstring)."""
        if self.fault_dir:
            try:
                return float((Path(self.fault_dir) / f"delay_ms.{os.getpid()}").read_text())
            except (FileNotFoundError, ValueError):
                pass  # no switch for this process (or one being rewritten): the configured delay
        return self.delay_ms

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        delay = self.injected_delay_ms()
        if delay > 0:
            time.sleep(delay / 1e3)
        # PAD rows of the table are zero, so a plain sum over the padded row is the masked sum.
        summed = self.item_table(histories).sum(dim=1)
        return summed / lengths.clamp(min=1).to(summed.dtype).unsqueeze(1)

    def item_embeddings(self, item_ids: torch.Tensor) -> torch.Tensor:
        return self.item_table(item_ids)

    def config_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dim": self.dim, "seed": self.seed}
        if self.delay_ms or self.fault_dir:  # only when set, so existing checkpoints stay byte-identical
            out.update(delay_ms=self.delay_ms, fault_dir=self.fault_dir)
        return out


def make_fixture_checkpoint(directory: str | Path, num_items: int = 1000, vocab_hash: str = "fixture-vocab",
                            dim: int = 64, seed: int = 0, temperature: float = 1.0,
                            max_history: int = 50, delay_ms: float = 0.0, fault_dir: str | Path = "") -> Path:
    """Write a fixture-teacher checkpoint (safetensors + config.json) and return its directory;
    ``delay_ms`` / ``fault_dir`` inject latency (module docstring)."""
    model = MeanPoolEmbeddingTeacher(vocab_hash, num_items, temperature, max_history, dim=dim, seed=seed,
                                     delay_ms=delay_ms, fault_dir=str(fault_dir))
    return save_teacher(model, directory)


def set_replica_delay(fault_dir: str | Path, pid: int, delay_ms: float | None) -> None:
    """Slow the replica process ``pid`` by ``delay_ms`` per call (None: heal it). The file is
    written whole and renamed into place, so a replica never reads half a number."""
    path = Path(fault_dir) / f"delay_ms.{pid}"
    if delay_ms is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(str(float(delay_ms)))
    tmp.replace(path)
