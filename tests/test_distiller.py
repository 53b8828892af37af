"""The trainer's one view of distillation: the ``student.distiller.Distiller`` protocol, called in
its order (prepare -> soft_labels -> loss, one batch at a time), and no distiller = CE alone."""
from __future__ import annotations

import inspect
import types

import numpy as np
import pytest
import torch

from ckd.config import load_config
from student.config import DistillConfig
from student.distiller import Distiller, PreparedBatch
from student.models.sasrec import SASRec
from student.teacher_session import TeacherSession
from student.trainer import Trainer

pytestmark = pytest.mark.unit

ROWS, BATCH = 96, 32


class _Accelerator:
    """The part of accelerate.Accelerator the trainer uses in one process (a real one would set up
    process-wide accelerate state inside the test process)."""

    device = torch.device("cpu")
    process_index, num_processes, is_main_process = 0, 1, True
    state = types.SimpleNamespace()

    def prepare(self, *objs):
        return objs

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


class _Sampler:
    def set_epoch(self, epoch: int) -> None:
        pass

    def epoch_indices(self, epoch: int) -> np.ndarray:
        return np.arange(ROWS)


class RecordingDistiller:
    """Records each call; its loss is a candidate log-sum-exp, so the step trains on it alone."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.calls: list[tuple[str, int]] = []

    def prepare(self, batch, step_seed):
        self.calls.append(("prepare", step_seed))
        return PreparedBatch(batch, step_seed, candidates=torch.unique(batch.targets))

    def soft_labels(self, batches):
        for pb in batches:
            self.calls.append(("soft_labels", pb.step_seed))
            yield pb, {"t": np.full((len(pb.batch), len(pb.candidates)), float(pb.step_seed % 7), np.float32)}

    def loss(self, logits, prepared, batch, soft):
        self.calls.append(("loss", prepared.step_seed))
        assert torch.equal(batch.targets, prepared.batch.targets)  # the prepared batch, on the device
        assert logits.shape == (len(batch), self.vocab_size)
        kd = logits[:, prepared.candidates].logsumexp(-1).mean()
        return kd, {"kd": float(kd.detach()), "soft": float(soft["t"][0, 0])}


def _trainer(scientific, tmp_path, distiller: Distiller | None) -> Trainer:
    cfg = load_config(DistillConfig, None, overrides=[f"train.batch_size={BATCH}", "train.length_bucket_batches=0",
                                                      "train.progress=false", "train.seed=5"])
    torch.manual_seed(0)
    model = SASRec(scientific.vocab_size, max_len=50, hidden=16, layers=1, heads=1, dropout=0.0)
    return Trainer(cfg, scientific, model, _Accelerator(), tmp_path, _Sampler(), {}, distiller=distiller)


def test_trainer_calls_the_distiller_in_order_and_trains_on_its_loss(scientific, tmp_path):
    distiller = RecordingDistiller(scientific.vocab_size)
    trainer = _trainer(scientific, tmp_path, distiller)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    terms = trainer.train_epoch(2)
    seeds = [(5 * 1_000_003 + 2 * 10_007 + b) * 97 for b in range(ROWS // BATCH)]
    # one batch at a time: prepared, labelled, then its loss, with the step seed the CE path uses too
    assert distiller.calls == [(call, s) for s in seeds for call in ("prepare", "soft_labels", "loss")]
    assert terms["steps"] == 3 and terms["soft"] == pytest.approx(np.mean([s % 7 for s in seeds]))
    assert terms["loss"] == pytest.approx(terms["kd"]) and "ce" not in terms  # the distiller's loss was the step's
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_without_a_distiller_the_trainer_runs_ce_on_plain_prepared_batches(scientific, tmp_path):
    trainer = _trainer(scientific, tmp_path, None)
    batches = list(trainer._batches(2, trainer.epoch_batches(2)))
    assert [pb.step_seed for pb in batches] == [(5 * 1_000_003 + 2 * 10_007 + b) * 97 for b in range(3)]
    assert all(pb.candidates is None and pb.kd_rows is None for pb in batches)
    terms = trainer.train_epoch(2)
    assert terms["steps"] == 3 and terms["loss"] == pytest.approx(terms["ce"]) and "kd" not in terms


def test_teacher_session_implements_the_protocol_by_name():
    """TeacherSession is the Distiller the pipeline hands the trainer: same methods, same parameters."""
    for name in ("prepare", "soft_labels", "loss"):
        want = list(inspect.signature(getattr(Distiller, name)).parameters)
        assert list(inspect.signature(getattr(TeacherSession, name)).parameters) == want, name
