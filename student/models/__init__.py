"""Student models and the factory that builds one for a dataset by kind."""
from __future__ import annotations

from typing import Any

from student.models.base import STUDENTS, StudentBatch, StudentModel, register_student
# Importing each model module registers its class in STUDENTS.
from student.models.deepfm import DeepFM
from student.models.fm import FM
from student.models.lightgcn import LightGCN
from student.models.sasrec import SASRec


def build_student(kind: str, dataset, **kwargs: Any) -> StudentModel:
    """Build the student ``kind`` sized for ``dataset`` (a MultiDomainDataset); ``kwargs`` are its
    hyper-parameters (``model_config["kwargs"]`` of a checkpoint)."""
    if kind not in STUDENTS:
        raise ValueError(f"unknown student kind {kind!r}; known: {sorted(STUDENTS)}")
    return STUDENTS[kind].from_dataset(dataset, **kwargs)


__all__ = ["STUDENTS", "StudentBatch", "StudentModel", "SASRec", "FM", "DeepFM", "LightGCN",
           "build_student", "register_student"]
