"""Student models and the factory that builds one for a dataset by kind."""
from __future__ import annotations

from typing import Any, Callable

from student.models.base import STUDENTS, StudentBatch, StudentModel, register_student
from student.models.sasrec import SASRec


def _build_sasrec(dataset, **kw: Any) -> StudentModel:
    return SASRec(dataset.vocab_size, **kw)


# kind -> builder(dataset, **kwargs); other student families add their builder here.
BUILDERS: dict[str, Callable[..., StudentModel]] = {"sasrec": _build_sasrec}


def build_student(kind: str, dataset, **kwargs: Any) -> StudentModel:
    """Build the student ``kind`` sized for ``dataset`` (a MultiDomainDataset)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown student kind {kind!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[kind](dataset, **kwargs)


__all__ = ["STUDENTS", "BUILDERS", "StudentBatch", "StudentModel", "SASRec", "build_student", "register_student"]
