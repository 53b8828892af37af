"""SASRec's input scaling option (Kang & McAuley's sqrt(hidden) on input item embeddings)."""
from __future__ import annotations

import math

import torch

from student.models.base import StudentBatch
from student.models.sasrec import SASRec


def _batch() -> StudentBatch:
    hist = torch.tensor([[5, 9, 2, 0, 0], [7, 1, 3, 8, 4]])
    lengths = torch.tensor([3, 5])
    zeros = torch.zeros(2, dtype=torch.long)
    return StudentBatch(zeros, zeros, hist, lengths, torch.tensor([4, 6]))


def test_scale_input_multiplies_only_the_input_item_embeddings():
    torch.manual_seed(0)
    scaled = SASRec(12, max_len=5, hidden=16, layers=2, heads=2, dropout=0.5, scale_input=True).eval()
    plain = SASRec(12, max_len=5, hidden=16, layers=2, heads=2, dropout=0.5).eval()
    plain.load_state_dict(scaled.state_dict())
    b = _batch()
    with torch.no_grad():
        assert not torch.allclose(scaled.sequence_states(b.histories), plain.sequence_states(b.histories))
        # the same encoder fed sqrt(16) = 4x the item embeddings, positions unscaled
        plain.item_emb.weight.mul_(4.0)
        torch.testing.assert_close(scaled.sequence_states(b.histories), plain.sequence_states(b.histories))
        # scores still use the unscaled (shared) output embeddings
        seq = scaled.seq_repr(b.histories, b.lengths)
        torch.testing.assert_close(scaled.full_scores(b, 1, 12), seq @ scaled.item_emb.weight[1:12].T)


def test_scale_input_reaches_the_model_and_its_checkpoint_config(scientific):
    from ckd.config import load_config
    from student.config import DistillConfig
    from student.models import build_student
    from student.pipeline import checkpoint_config

    def build(cfg):  # as the trainer does, and launch/evaluate.py from a checkpoint's config.json
        model_config = checkpoint_config(cfg, scientific)
        return build_student(model_config["kind"], scientific, **model_config["kwargs"]), model_config

    cfg = load_config(DistillConfig, None, overrides=["model.kind=sasrec", "model.hidden=300",
                                                      "model.extra.scale_input=true"])
    model, model_config = build(cfg)
    assert model.input_scale == math.sqrt(300)
    assert model_config["kwargs"]["scale_input"] is True  # launch/evaluate.py rebuilds from these
    default, _ = build(load_config(DistillConfig, None, overrides=["model.kind=sasrec"]))
    assert default.input_scale == 1.0
