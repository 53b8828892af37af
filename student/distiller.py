"""What the student trainer asks of a distillation method (the trainer's only view of teachers).

The trainer runs plain CE when it is given no ``Distiller``. With one, each training step is:

1. ``prepare(batch, step_seed)``: the batch plus what distilling it needs (candidate items, masks),
   built before any teacher is asked, from the step's own seed;
2. ``soft_labels(prepared_batches)``: the same batches, in order, each with its teachers' scores
   (an implementation may ask ahead while the student computes);
3. ``loss(logits, prepared, batch, soft)``: the step's loss and its named terms for the log.

``student.teacher_session.TeacherSession`` implements it against the teacher service.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from student.models.base import StudentBatch

# Teacher name -> its raw scores float32 [B', C] on the prepared candidates, or None when that
# teacher was skipped for this batch. Empty when no row of the batch is covered by a teacher.
SoftLabels = Mapping[str, "np.ndarray | None"]


@dataclass
class PreparedBatch:
    """A student batch plus what its distillation needs (built before teachers are asked)."""

    batch: StudentBatch
    step_seed: int
    candidates: torch.Tensor | None = None  # [C] global ids
    target_col: torch.Tensor | None = None  # [B]
    valid_mask: torch.Tensor | None = None  # [B', C]
    kd_rows: torch.Tensor | None = None  # rows the teachers cover (None = all B); B' = len(kd_rows)
    # The teachers' side of the KD term (student.distill.KDTargets), when the label prefetch computed
    # it as the scores arrived (kd.targets_on=prefetch); None: the loss computes it from the scores.
    kd_targets: Any = None


class Distiller(Protocol):
    """A distillation method as the trainer calls it (see the module docstring for the order)."""

    def prepare(self, batch: StudentBatch, step_seed: int) -> PreparedBatch:
        """``batch`` (on the CPU) with its distillation fields; ``step_seed`` seeds any sampling."""
        ...

    def soft_labels(self, batches: Iterable[PreparedBatch]) -> Iterable[tuple[PreparedBatch, SoftLabels]]:
        """Each of ``batches``, in input order, with its teachers' scores."""
        ...

    def loss(self, logits: torch.Tensor, prepared: PreparedBatch, batch: StudentBatch,
             soft: SoftLabels) -> tuple[torch.Tensor, dict[str, float]]:
        """(the loss to back-propagate, its named terms as floats) for the student's ``logits``
        [B, V] on ``batch`` (``prepared.batch`` moved to the training device)."""
        ...
