"""The student model contract (RecBole-style: a model scores, a trainer owns the loop).

Every student scores a batch of instances against candidate items and against a whole domain's
catalogue. Inputs are a ``StudentBatch`` of global ids (see ckd.data.multidomain); outputs are raw
logits. Inference needs no teacher and no network.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StudentBatch:
    users: torch.Tensor  # int64 [B] global user ids
    domains: torch.Tensor  # int64 [B]
    histories: torch.Tensor  # int64 [B, L] global item ids, oldest first, 0-padded on the right
    lengths: torch.Tensor  # int64 [B]
    targets: torch.Tensor  # int64 [B] global item ids
    # int64 [B, L] or None: each position's next item, PAD where it has no loss (train.objective
    # all_positions); forward() then returns logits for those positions only.
    position_targets: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "StudentBatch":
        pos = None if self.position_targets is None else self.position_targets.to(device, non_blocking=True)
        return StudentBatch(*(t.to(device, non_blocking=True) for t in
                              (self.users, self.domains, self.histories, self.lengths, self.targets)), pos)

    def select(self, rows: torch.Tensor) -> "StudentBatch":
        """These rows of the batch, histories (and position targets) trimmed to their longest row."""
        L = int(self.lengths[rows].max())
        pos = None if self.position_targets is None else self.position_targets[rows, :L]
        return StudentBatch(self.users[rows], self.domains[rows], self.histories[rows, :L], self.lengths[rows],
                            self.targets[rows], pos)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


class StudentModel(nn.Module):
    """Subclasses implement ``score``; ``full_scores`` defaults to scoring the id range."""

    kind: str = "student"
    vocab_size: int = 0

    def forward(self, batch: StudentBatch) -> torch.Tensor:
        """Logits over the whole vocabulary [B, vocab_size] (PAD and other domains included;
        the loss masks them)."""
        if batch.position_targets is not None:
            raise NotImplementedError(f"the {self.kind} student predicts at the last position only "
                                      "(train.objective=all_positions needs a sequence encoder)")
        return self.full_scores(batch, 0, self.vocab_size)

    def score(self, batch: StudentBatch, candidates: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] for candidates [C] (shared) or [B, C] (per row)."""
        raise NotImplementedError

    def full_scores(self, batch: StudentBatch, start: int, stop: int) -> torch.Tensor:
        """Logits [B, stop - start] over global ids [start, stop) (one domain's catalogue)."""
        return self.score(batch, torch.arange(start, stop, device=batch.histories.device))


STUDENTS: dict[str, type[StudentModel]] = {}


def register_student(cls: type[StudentModel]) -> type[StudentModel]:
    STUDENTS[cls.kind] = cls
    return cls
