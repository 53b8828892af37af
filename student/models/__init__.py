"""Student models and the factory that builds one for a dataset by kind."""
from __future__ import annotations

from typing import Any, Callable

from student.models.base import STUDENTS, StudentBatch, StudentModel, register_student
from student.models.deepfm import DeepFM
from student.models.fm import FM
from student.models.lightgcn import LightGCN, training_edges
from student.models.sasrec import SASRec


def _build_sasrec(dataset, **kw: Any) -> StudentModel:
    return SASRec(dataset.vocab_size, **kw)


def _build_fm(dataset, **kw: Any) -> StudentModel:
    return FM(dataset.vocab_size, dataset.num_domains, item_domain=dataset.item_domain, **kw)


def _build_deepfm(dataset, **kw: Any) -> StudentModel:
    ranges = [dataset.domain_range(d) for d in range(dataset.num_domains)]
    return DeepFM(dataset.vocab_size, dataset.num_domains, item_domain=dataset.item_domain,
                  domain_ranges=ranges, **kw)


def _build_lightgcn(dataset, **kw: Any) -> StudentModel:
    tr = dataset.splits["train"]  # the graph sees training interactions only
    users, items = training_edges(tr.users, tr.histories, tr.targets)
    return LightGCN(dataset.vocab_size, dataset.num_domains, num_users=dataset.num_users,
                    edge_users=users, edge_items=items, **kw)


# kind -> builder(dataset, **kwargs); other student families add their builder here.
BUILDERS: dict[str, Callable[..., StudentModel]] = {
    "sasrec": _build_sasrec,
    "fm": _build_fm,
    "deepfm": _build_deepfm,
    "lightgcn": _build_lightgcn,
}


def build_student(kind: str, dataset, **kwargs: Any) -> StudentModel:
    """Build the student ``kind`` sized for ``dataset`` (a MultiDomainDataset)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown student kind {kind!r}; known: {sorted(BUILDERS)}")
    return BUILDERS[kind](dataset, **kwargs)


__all__ = ["STUDENTS", "BUILDERS", "StudentBatch", "StudentModel", "SASRec", "FM", "DeepFM", "LightGCN",
           "build_student", "register_student"]
