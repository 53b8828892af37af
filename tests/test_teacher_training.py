"""The generic teacher training loop on real Scientific rows: run directory, stages, resume."""
from __future__ import annotations

import json

import pytest
import torch

from ckd.config import ConfigError, load_config
from teachers.base import load_teacher
from teachers.config import TeacherConfig
from teachers.training import TeacherTrainer, train_teacher, transfer_parameters
from teachers.unisrec import UniSRecTeacher

TINY = {"hidden": 16, "inner": 16, "layers": 1, "heads": 1, "n_experts": 2, "dropout": 0.1, "attn_dropout": 0.1}


# One torch thread: the shared 2-core machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(data_dir, epochs: int, stages: list[dict]) -> TeacherConfig:
    return load_config(TeacherConfig, extra={
        "kind": "unisrec", "model": TINY,
        "data": {"data_dir": str(data_dir), "domains": ["Scientific"], "max_len": 20},
        "train": {"epochs": epochs, "batch_size": 128, "lr": 3e-3, "seed": 7, "progress": False,
                  "threads": 1, "eval_batch_size": 4096, "length_bucket_batches": 4, "stages": stages}})


FINETUNE = {"name": "finetune", "model": {"objective": "finetune", "item_mode": "text+id"},
            "max_train_rows": {"Scientific": 2000}, "max_steps_per_epoch": 4}


@pytest.mark.unit
def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="epoch"):
        load_config(TeacherConfig, extra={"kind": "unisrec", "train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="stages"):
        load_config(TeacherConfig, extra={"kind": "unisrec", "train": {"stages": [{"name": "a", "lr_x": 1}]}})


@pytest.mark.unit
def test_run_dir_metrics_and_exact_resume(data_dir, tmp_path):
    # two epochs in one go
    full = train_teacher(_cfg(data_dir, 2, [FINETUNE]), tmp_path / "full")
    # one epoch, then "interrupted", then resumed to two epochs from last/
    train_teacher(_cfg(data_dir, 1, [FINETUNE]), tmp_path / "resumed")
    resumed = train_teacher(_cfg(data_dir, 2, [FINETUNE]), tmp_path / "resumed")
    h_full = full["stages"]["finetune"]["history"]
    h_res = json.loads((tmp_path / "resumed" / "last" / "state.json").read_text())["history"]
    assert [r["loss"] for r in h_full] == pytest.approx([r["loss"] for r in h_res], rel=1e-6)
    assert resumed["test"] == full["test"]

    run = tmp_path / "full"
    for name in ("config.yaml", "run.json", "train.log", "metrics.json", "best/model.safetensors"):
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["data_dir"] == str(data_dir)
    assert "stage finetune epoch 1:" in (run / "train.log").read_text()  # the loop's log reaches the file
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["valid"]) == {"Scientific", "mean"} and set(m["test"]) == {"Scientific", "mean"}
    assert set(m["test"]["Scientific"]) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
    assert m["best_epoch"] in (0, 1)
    # the best checkpoint is the epoch with the best valid NDCG@10, and loads against the data
    best_valid = max(r["valid_ndcg10"] for r in h_full)
    assert m["valid"]["mean"]["ndcg@10"] == pytest.approx(best_valid, abs=1e-9)
    assert isinstance(load_teacher(run / "best", expected_vocab_hash=m["vocab_hash"]), UniSRecTeacher)


@pytest.mark.unit
def test_a_resumed_run_reports_every_epoch_it_trained(data_dir, tmp_path):
    """metrics.json keeps the history of stages an earlier invocation finished: (a) interrupted after
    the last epoch, before metrics.json was written; (b) interrupted in the second stage."""
    stages = [{"name": "pretrain", "model": {"objective": "pretrain", "item_mode": "text"}, "epochs": 1,
               "evaluate": False, "early_stopping": False, "max_train_rows": {"Scientific": 1000},
               "max_steps_per_epoch": 2},
              {**FINETUNE, "init_from": "previous", "max_steps_per_epoch": 2}]
    full = train_teacher(_cfg(data_dir, 2, stages), tmp_path / "full")
    assert [len(full["stages"][s]["history"]) for s in ("pretrain", "finetune")] == [1, 2]

    (tmp_path / "full" / "metrics.json").unlink()  # (a)
    again = train_teacher(_cfg(data_dir, 2, stages), tmp_path / "full")
    assert again["stages"] == full["stages"] and again["test"] == full["test"]

    train_teacher(_cfg(data_dir, 1, stages), tmp_path / "cut")  # (b): fine-tuning stops after epoch 0
    resumed = train_teacher(_cfg(data_dir, 2, stages), tmp_path / "cut")
    assert set(resumed["stages"]) == {"pretrain", "finetune"}
    assert [r["loss"] for r in resumed["stages"]["pretrain"]["history"]] == \
        pytest.approx([r["loss"] for r in full["stages"]["pretrain"]["history"]], rel=1e-6)
    assert [r["epoch"] for r in resumed["stages"]["finetune"]["history"]] == [0, 1]


@pytest.mark.unit
def test_retraining_is_seeded_whatever_the_process_start_seed(data_dir, tmp_path):
    """torch seeds its global generator differently in every process: two trainings that start from
    different global states (as two processes do) must give the same weights and metrics. UniM2Rec
    does not seed its own initialisation (UniSRec does), so it shows the loop's seeding."""
    def cfg() -> TeacherConfig:
        return load_config(TeacherConfig, extra={
            "kind": "unim2rec",
            "model": {"modalities": ["clip_text", "image"], "hidden": 16, "num_layers": 1, "num_heads": 1,
                      "dropout": 0.1, "modality_dropout": 0.3, "use_id": True},
            "data": {"data_dir": str(data_dir), "domains": ["ScientificMM"], "max_len": 20},
            "train": {"epochs": 1, "batch_size": 128, "lr": 3e-3, "seed": 7, "progress": False, "threads": 1,
                      "eval_batch_size": 4096,
                      "stages": [{"name": "train", "max_steps_per_epoch": 4}]}})

    torch.manual_seed(123)
    a = train_teacher(cfg(), tmp_path / "a")
    torch.manual_seed(456)
    b = train_teacher(cfg(), tmp_path / "b")
    assert a["test"] == b["test"]
    wa = load_teacher(tmp_path / "a" / "best").state_dict()
    wb = load_teacher(tmp_path / "b" / "best").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.unit
def test_stages_pretrain_then_finetune_transfers_weights(data_dir, tmp_path):
    stages = [{"name": "pretrain", "model": {"objective": "pretrain", "item_mode": "text"}, "epochs": 1,
               "evaluate": False, "early_stopping": False, "max_train_rows": {"Scientific": 1000},
               "max_steps_per_epoch": 3},
              {**FINETUNE, "init_from": "previous", "max_steps_per_epoch": 1}]
    trainer = TeacherTrainer(_cfg(data_dir, 1, stages), tmp_path / "run")
    trainer.fit()
    pre = load_teacher(tmp_path / "run" / "stage_pretrain" / "best")
    fin_fresh = trainer._init_model(1, trainer.stages[1], trainer.dataset(trainer.stages[1]))
    # the fine-tuning model starts from the pre-trained adaptor and encoder, with a fresh ID table
    torch.testing.assert_close(fin_fresh.adaptor.experts[0].proj.weight, pre.adaptor.experts[0].proj.weight)
    torch.testing.assert_close(fin_fresh.encoder.layers[0].linear1.weight, pre.encoder.layers[0].linear1.weight)
    copied, skipped = transfer_parameters(pre, fin_fresh)
    assert "id_emb.weight" in skipped and "text_emb" in skipped and "adaptor.w_gate" in copied
    assert (tmp_path / "run" / "best" / "config.json").is_file()


@pytest.mark.unit
def test_domain_cross_entropy_equals_the_masked_full_softmax():
    """The per-domain-block loss the union teachers train with is the masked [B, V] softmax CE."""
    import torch.nn.functional as F

    from teachers.losses import domain_cross_entropy, domain_ranges

    g = torch.Generator().manual_seed(0)
    item_domain = torch.tensor([-1] + [0] * 5 + [1] * 9 + [2] * 3)
    ranges = domain_ranges(item_domain)
    assert ranges == {0: (1, 6), 1: (6, 15), 2: (15, 18)}
    seq = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(18, 4, generator=g, dtype=torch.float64, requires_grad=True)
    domains = torch.tensor([0, 1, 1, 2, 0, 1, 2])
    targets = torch.tensor([3, 7, 14, 17, 1, 6, 15])
    got = domain_cross_entropy(seq, table, targets, domains, ranges, 0.07)
    full = (seq @ table.T / 0.07).masked_fill(item_domain.view(1, -1) != domains.view(-1, 1), float("-inf"))
    want = F.cross_entropy(full, targets)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    g1 = torch.autograd.grad(got, (seq, table))
    g2 = torch.autograd.grad(want, (seq, table))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="contiguous"):
        domain_ranges(torch.tensor([-1, 0, 1, 0]))
