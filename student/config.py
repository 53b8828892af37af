"""Typed configuration of a student run (``launch/distill.py``).

Precedence: CLI (--set section.key=value and the named flags) > experiment YAML > these defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckd.config import ConfigError, DataConfig


@dataclass
class ModelConfig:
    kind: str = "sasrec"
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific constructor arguments


@dataclass
class StudentTrainConfig:
    """The ``train:`` section of a student run (teachers.config.TeacherTrainConfig is the teachers')."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better valid NDCG@10 before stopping
    # True: also evaluate the test split after every epoch and record it in metrics.json's history
    # (anytime curves, research/anytime.py). Never used for any decision: selection stays on valid.
    record_test_curve: bool = False
    # Step decay on a valid plateau: after every lr_decay_patience epochs in a row without a better
    # valid NDCG@10, lr *= lr_decay_factor. 0 = constant lr (RecBole's setting).
    lr_decay_patience: int = 0
    lr_decay_factor: float = 0.5
    # > 0: keep an exponential moving average of the weights (updated every step with this decay);
    # validation, the best checkpoint and the final metrics use the average. 0 = off.
    ema_decay: float = 0.0
    # Per-step lr schedule on top of train.lr: linear warm-up over warmup_steps, then "constant" or
    # "cosine" (half a cosine from lr down to 0 at the end of schedule_epochs, flat at 0 after;
    # schedule_epochs 0 = train.epochs). Early stopping still picks the best epoch.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    schedule_epochs: int = 0
    # "last": one instance per train row, loss at its last position (RecBole's prefix rows).
    # "all_positions": the same (history, next item) pairs regrouped into one row per chain of
    # prefixes, with the loss at every position of it (SASRec's original training; batch_size then
    # counts chains). SASRec alone only: distillation and the curriculum score one instance per row.
    objective: str = "last"
    # Label smoothing of the CE target over the instance's domain items (0 = plain CE, RecBole's).
    label_smoothing: float = 0.0
    seed: int = 2024
    eval_batch_size: int = 1024
    max_steps_per_epoch: int = 0  # 0 = the whole (paced) pool each epoch
    # Batches of similar history length (sorted within pools of this many batches, batch order then
    # shuffled): padding, and so student and teacher compute, follow the rows' real lengths. 0 = off.
    length_bucket_batches: int = 50
    # > 1: compute each batch in this many pieces of similar history length (each trimmed to its
    # longest row), accumulating gradients, so a uniformly random batch (length_bucket_batches=0)
    # costs about what a bucketed one does; the step is the batch's. CE only (no teachers, last
    # position), not under DeepSpeed. 0 or 1 = one pass.
    length_sorted_pieces: int = 0
    log_every: int = 50
    threads: int = 0  # torch intra-op threads per process; 0 = leave torch's default
    progress: bool = True

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.lr_decay_patience < 0:
            raise ConfigError("train.lr_decay_patience must be >= 0 (0 = constant lr)")
        if not 0 < self.lr_decay_factor < 1:
            raise ConfigError("train.lr_decay_factor must be in (0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("train.ema_decay must be in [0, 1) (0 = no weight averaging)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if self.warmup_steps < 0 or self.schedule_epochs < 0:
            raise ConfigError("train.warmup_steps and train.schedule_epochs must be >= 0")
        if self.length_sorted_pieces < 0:
            raise ConfigError("train.length_sorted_pieces must be >= 0 (0 or 1 = one pass per batch)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.objective not in ("last", "all_positions"):
            raise ConfigError(f"train.objective must be 'last' or 'all_positions', not {self.objective!r}")
        if self.lr_decay_patience > 0 and (self.lr_schedule != "constant" or self.warmup_steps > 0):
            # Both would write the optimizer's lr; one rule per run keeps the recorded lr explainable.
            raise ConfigError("train.lr_decay_patience cannot be combined with train.lr_schedule/warmup_steps")


@dataclass
class CurriculumConfig:
    # Off by default: on valid the parameter analysis picks the whole pool from the first step, and
    # the curricula of docs/results_mechanisms.md score below no curriculum or level with it. It stays
    # a switch (the paper's method: configs/demo/student.yaml, configs/distill_scientific.yaml and the
    # union students turn it on).
    enabled: bool = False
    pacing: str = "root"
    start_fraction: float = 0.25
    full_at_epoch: int = 5  # epoch from which all training data is in play
    length_weight: float = 0.5
    popularity_weight: float = 0.5
    # Difficulty from the served teachers (student.curriculum.teacher_difficulty): "none",
    # "confidence" (1 - their mean probability of the true item) or "disagreement"; scored once,
    # before training, against the true item and `teacher_negatives` seeded negatives per row.
    teacher_signal: str = "none"
    teacher_weight: float = 1.0
    teacher_negatives: int = 100

    def validate(self) -> None:
        if not 0 < self.start_fraction <= 1:
            raise ConfigError("curriculum.start_fraction must be in (0, 1]")
        if self.teacher_signal not in ("none", "confidence", "disagreement"):
            raise ConfigError(f"curriculum.teacher_signal must be none, confidence or disagreement, "
                              f"not {self.teacher_signal!r}")
        if self.teacher_weight < 0 or self.teacher_negatives < 1:
            raise ConfigError("curriculum.teacher_weight must be >= 0 and teacher_negatives >= 1")


@dataclass
class KDConfig:
    # 3, not the paper's 1: picked on valid by the parameter analysis on Scientific and Office14
    # (docs/results_mechanisms.md section 6), and the converged Scientific run's value.
    lambda_kd: float = 3.0
    temperature: float = 1.0  # student-side T in T^2 * KL(q || softmax(s / T))
    in_batch_negatives: bool = True  # False: positive-only distillation (ablation)
    num_sampled: int = 0  # extra sampled candidates from the batch's domains
    integration: str = "both"  # mean | confidence | consistency | both
    alpha: float = 1.0  # weight of log-confidence in the integration logits
    beta: float = 1.0  # weight of consistency in the integration logits
    instance_weighting: bool = True
    # The dtype of the KD loss maths: float32, or float64 as a reference (about a third slower per
    # step at a whole-catalogue width); tests/test_kd_precision.py bounds their difference.
    precision: str = "float32"
    # A per-teacher prior on the integration weights (student.distill, "Teacher prior"): "none", or
    # "reliability": pi = softmax(prior_strength * each teacher's mean log-probability of the true
    # item over the training rows, scored once against prior_negatives seeded negatives per row).
    teacher_prior: str = "none"
    prior_strength: float = 1.0
    prior_negatives: int = 100
    # "teacher_better": distil a row only while the teachers' mixture puts more probability on its
    # true item than the student does (student.distill, "Teacher-better gate"); other rows get
    # gate_floor times their KD weight. "none": every row, as the paper.
    gate: str = "none"
    gate_floor: float = 0.0
    # Where the teachers' side of the KD term (teacher distributions, integration, instance weights:
    # student.distill.KDTargets) is computed: "step", on the training thread inside the loss; or
    # "prefetch", in the label-prefetch thread as each batch's scores arrive, overlapped with the
    # student's steps (on service.prefetch_cpus when set). The same loss either way (a test checks).
    targets_on: str = "step"

    def validate(self) -> None:
        if self.targets_on not in ("step", "prefetch"):
            raise ConfigError(f"kd.targets_on: {self.targets_on!r} is not step|prefetch")
        if self.gate not in ("none", "teacher_better"):
            raise ConfigError(f"kd.gate: {self.gate!r} is not none|teacher_better")
        if not 0.0 <= self.gate_floor <= 1.0:
            raise ConfigError("kd.gate_floor must be in [0, 1]")
        if self.teacher_prior not in ("none", "reliability"):
            raise ConfigError(f"kd.teacher_prior: {self.teacher_prior!r} is not none|reliability")
        if self.prior_strength < 0 or self.prior_negatives < 1:
            raise ConfigError("kd.prior_strength must be >= 0 and kd.prior_negatives >= 1")
        if self.precision not in ("float32", "float64"):
            raise ConfigError(f"kd.precision: {self.precision!r} is not float32|float64")
        if self.integration not in ("mean", "confidence", "consistency", "both"):
            raise ConfigError(f"kd.integration: {self.integration!r} is not mean|confidence|consistency|both")
        if self.temperature <= 0:
            raise ConfigError("kd.temperature must be > 0")


@dataclass
class ServiceClientConfig:
    """The ``service:`` section: which teacher service the student distils from and how its client
    behaves (the servers' own settings belong to the deploy spec)."""

    enabled: bool = True  # False (or --teachers none): plain CE training, no teacher service
    spec: str = ""  # deploy spec YAML (cluster.deploy.DeploySpec) for the embedded default
    teachers: list[str] = field(default_factory=list)  # names to distil from; empty = all in the spec
    ray_address: str = ""  # empty: embedded local Ray started by launch/distill.py (rank 0)
    endpoints: dict[str, list[str]] = field(default_factory=dict)  # static {teacher: [host:port]}, no Ray
    namespace: str = "ckd"
    failure_policy: str = "wait"  # fail | skip | wait (bounded by wait_budget_s)
    wait_budget_s: float = 120.0
    prefetch: int = 4  # batches requested ahead of the one training
    deadline_s: float = 30.0
    token_env: str = ""  # environment variable holding the shared service token
    temperatures: dict[str, float] = field(default_factory=dict)  # override a teacher's own tau
    ready_timeout_s: float = 300.0
    # The embedded service's replicas (the ones this run starts from ``spec``) keep a history memo of
    # this many bytes (ServiceLimits.history_memo_bytes; 0: the spec's own setting). An execution
    # setting: it changes how fast the teachers answer, not what they answer.
    embedded_history_memo_bytes: int = 0
    # Cores of the student's label-prefetch threads (request encoding, reply decoding and, with
    # kd.targets_on=prefetch, the teachers' side of the KD term), e.g. "1" or "2-3"; empty: the
    # student process's own cores. Only those threads move; the training thread stays where it is.
    prefetch_cpus: str = ""

    def validate(self) -> None:
        if self.prefetch_cpus:
            from ckd.affinity import AffinityError, parse_cpus

            try:
                parse_cpus(self.prefetch_cpus)
            except AffinityError as err:
                raise ConfigError(f"service.prefetch_cpus: {err}") from None
        if self.embedded_history_memo_bytes < 0:
            raise ConfigError("service.embedded_history_memo_bytes must be >= 0 (0: the deploy spec's setting)")
        if self.failure_policy not in ("fail", "skip", "wait"):
            raise ConfigError(f"service.failure_policy: {self.failure_policy!r} is not fail|skip|wait")
        if self.prefetch < 1:
            raise ConfigError("service.prefetch must be >= 1")

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.spec or self.ray_address or self.endpoints)


@dataclass
class DistillConfig:
    run_dir: str = ""  # empty: runs/<timestamp>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: StudentTrainConfig = field(default_factory=StudentTrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    service: ServiceClientConfig = field(default_factory=ServiceClientConfig)


def check_run(cfg: DistillConfig) -> None:
    """Checks across sections, once the command line has decided whether teachers take part."""
    if cfg.train.length_sorted_pieces > 1 and (cfg.service.active or cfg.train.objective != "last"):
        raise ConfigError("train.length_sorted_pieces splits a batch's rows for the CE loss at their last "
                          "position only: run it with --teachers none and train.objective=last")
    if cfg.curriculum.enabled and cfg.curriculum.teacher_signal != "none" and not cfg.service.active:
        raise ConfigError(f"curriculum.teacher_signal={cfg.curriculum.teacher_signal} ranks rows by the teachers' "
                          "scores: it needs the teacher service (or set curriculum.teacher_signal=none)")
    if cfg.train.objective == "all_positions":
        if cfg.model.kind != "sasrec":
            raise ConfigError(f"train.objective=all_positions needs model.kind=sasrec (got {cfg.model.kind!r}): "
                              "only a sequence encoder has a state at every position")
        if cfg.curriculum.enabled:
            raise ConfigError("train.objective=all_positions cannot be combined with curriculum.enabled: "
                              "the curriculum ranks one (history, target) instance per row, not chains")
        if cfg.service.active:
            raise ConfigError("train.objective=all_positions trains SASRec alone: teachers score the last "
                              "position of each row, so run it with --teachers none")
