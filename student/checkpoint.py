"""Load a saved student (safetensors + config.json) strictly, against the data it was trained on."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ckd.data.multidomain import MultiDomainDataset
from student.models import build_student
from student.models.base import StudentModel


class StudentCheckpointError(ValueError):
    """A student checkpoint is incomplete or does not match the data."""


def read_student_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise StudentCheckpointError(f"student checkpoint incomplete: {path} not found")
    return json.loads(path.read_text())


def load_student(directory: str | Path, dataset: MultiDomainDataset,
                 device: str | torch.device = "cpu") -> StudentModel:
    """Rebuild the model from its config and load its weights (strict); refuses another vocabulary."""
    d = Path(directory)
    cfg = read_student_config(d)
    if cfg["vocab_hash"] != dataset.vocab_hash():
        raise StudentCheckpointError(
            f"student checkpoint {d} was trained on domains {cfg.get('domains')} (vocabulary "
            f"{cfg['vocab_hash'][:12]}...), the data here is {dataset.domain_names} ({dataset.vocab_hash()[:12]}...)")
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise StudentCheckpointError(f"student checkpoint incomplete: {weights} not found")
    model = build_student(cfg["kind"], dataset, **cfg["kwargs"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval()
