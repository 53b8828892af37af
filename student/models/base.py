"""The student model contract (RecBole-style: a model scores, a trainer owns the loop).

Every student is built for a dataset by ``from_dataset`` and scores a batch of instances against
candidate items and against a whole domain's catalogue. Inputs are a ``StudentBatch`` of global ids
(see ckd.data.multidomain); outputs are raw logits. Inference needs no teacher and no network.
A student class registers itself under its ``kind`` with ``@register_student``: ``STUDENTS`` is
the one registry ``student.models.build_student`` reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from ckd.data.multidomain import MultiDomainDataset


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
    """Subclasses implement ``from_dataset`` and ``score``; ``full_scores`` defaults to scoring the id range."""

    kind: str = "student"
    vocab_size: int = 0

    @classmethod
    def from_dataset(cls, dataset: MultiDomainDataset, **kwargs: Any) -> StudentModel:
        """This student sized for ``dataset`` (vocabulary, domains, graph...); ``kwargs`` are the
        model's own hyper-parameters, as a checkpoint's config.json stores them."""
        raise NotImplementedError

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

    def ranking_scores(self, users: torch.Tensor, histories: torch.Tensor, lengths: torch.Tensor,
                       start: int, stop: int) -> torch.Tensor:
        """The ``ckd.metrics.RankingModel`` contract every model follows: ``full_scores`` of a batch
        of these rows. Domains and targets are zero placeholders: no student reads them to score a
        catalogue (FM takes the domain from the history)."""
        zeros = torch.zeros_like(users)
        return self.full_scores(StudentBatch(users, zeros, histories, lengths, zeros), start, stop)


# kind -> student class; filled by @register_student as each model module is imported.
STUDENTS: dict[str, type[StudentModel]] = {}


def register_student(cls: type[StudentModel]) -> type[StudentModel]:
    """Class decorator: make ``cls`` buildable by its ``kind``."""
    if STUDENTS.get(cls.kind, cls) is not cls:
        raise ValueError(f"student kind {cls.kind!r} is already registered by {STUDENTS[cls.kind].__name__}")
    STUDENTS[cls.kind] = cls
    return cls
