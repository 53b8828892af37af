"""Typed configuration of a teacher training run (``launch/train_teacher.py``).

Precedence: CLI (``--set section.key=value`` and the named flags) > the teacher's YAML > these
defaults; unknown keys are errors (``ckd.config.load_config``).

A run is one or more *stages* trained in order (e.g. UniSRec "pretrain" on several domains, then
"finetune" on one). A stage may override the data domains, the model's constructor arguments and
the optimisation settings; a field left at ``None`` / empty inherits the run-level value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckd.config import ConfigError, DataConfig


@dataclass
class StageConfig:
    """One training stage. ``None`` / empty fields inherit from ``train`` / ``data`` / ``model``."""

    name: str = "train"
    domains: list[str] = field(default_factory=list)  # empty: data.domains
    model: dict[str, Any] = field(default_factory=dict)  # merged over the run's model kwargs
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    patience: int | None = None
    early_stopping: bool = True  # False: no valid-based stopping; the last epoch is kept as best
    evaluate: bool = True  # evaluate on valid each epoch (False also implies no early stopping)
    eval_domains: list[str] = field(default_factory=list)  # empty: all of the stage's domains
    max_steps_per_epoch: int = 0  # 0: the whole training split each epoch
    max_train_rows: dict[str, int] = field(default_factory=dict)  # domain -> row cap (seeded sample)
    # "" : fresh model; "previous": parameters of the previous stage's best; else a checkpoint dir.
    init_from: str = ""

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"stage name {self.name!r} must be a non-empty name without '/'")
        for key in ("epochs", "batch_size", "patience"):
            v = getattr(self, key)
            if v is not None and v < (0 if key == "patience" else 1):
                raise ConfigError(f"stage {self.name}: {key} must be positive, got {v}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"stage {self.name}: lr must be > 0")
        if self.max_steps_per_epoch < 0:
            raise ConfigError(f"stage {self.name}: max_steps_per_epoch must be >= 0")
        for dom, cap in self.max_train_rows.items():
            if int(cap) < 1:
                raise ConfigError(f"stage {self.name}: max_train_rows.{dom} must be >= 1")


@dataclass
class TeacherTrainConfig:
    """The ``train:`` section of a teacher run (student.config.StudentTrainConfig is the student's)."""

    epochs: int = 50
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    # stop once MORE than this many epochs in a row had no better valid NDCG@10 (mean over domains):
    # patience 2 runs a third bad epoch, unlike the student's train.patience (stops at that many)
    patience: int = 5
    seed: int = 2022
    device: str = "cpu"
    eval_batch_size: int = 1024
    grad_clip: float = 0.0  # 0: no clipping
    # >0: shuffle, then sort rows by history length within pools of this many batches and shuffle
    # the batches: far less padding for attention models on short-history data. 0: plain shuffle.
    length_bucket_batches: int = 0
    threads: int = 2  # torch intra-op threads; 0 = leave torch's default
    log_every: int = 50  # steps between loss lines in train.log
    progress: bool = True  # tqdm bar
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage "train"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.patience < 0:
            raise ConfigError("train.patience must be >= 0")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"train.stages: duplicate stage names {names}")
        if self.stages and self.stages[0].init_from == "previous":
            raise ConfigError("train.stages[0].init_from: 'previous' needs a previous stage")

    def resolved_stages(self) -> list[StageConfig]:
        return list(self.stages) if self.stages else [StageConfig()]


@dataclass
class TeacherConfig:
    kind: str = ""  # registered teacher kind, e.g. "unisrec"
    model: dict[str, Any] = field(default_factory=dict)  # kwargs of <Teacher>.from_dataset
    data: DataConfig = field(default_factory=DataConfig)
    train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)

    def validate(self) -> None:
        if not self.kind:
            raise ConfigError("kind: name the teacher kind (e.g. unisrec, recformer, unim2rec)")
