"""Recformer teacher on real ScientificMM item texts (1,585 items: the smallest real catalogue),
at a tiny budget (1 layer, 16 tokens per item) so the whole file runs in seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.contract import TeacherContractError
from teachers.base import load_teacher, save_teacher
from teachers.recformer import TYPE_CLS, TYPE_KEY, TYPE_VALUE, RecformerTeacher, parse_item_text

pytestmark = pytest.mark.integration

TINY = dict(num_layers=1, item_tokens=16, attr_tokens={"title": 8, "brand": 2, "category": 3},
            max_seq_tokens=48, max_seq_items=4, stage1_epochs=1)


@pytest.fixture(scope="module")
def model(scientific_mm):
    torch.manual_seed(0)
    return RecformerTeacher.from_dataset(scientific_mm, **TINY)


def _batch(ds, n=16, split="train"):
    ex = ds.splits[split]
    idx = np.arange(n)
    return (torch.as_tensor(ex.histories[idx]), torch.as_tensor(ex.lengths[idx]),
            torch.as_tensor(ex.targets[idx]), torch.as_tensor(ex.domains[idx]))


@pytest.mark.unit
def test_parse_item_text_splits_from_the_right():
    assert parse_item_text("Gorilla Glue, 8 ounce. Industrial & Scientific Tapes. Gorilla. ") == {
        "title": "Gorilla Glue, 8 ounce", "category": "Industrial & Scientific Tapes", "brand": "Gorilla"}
    # a title with its own ". " keeps it; an empty category stays empty
    assert parse_item_text("Filament 0.05mm. Sold by X. Cat. Brand. ") == {
        "title": "Filament 0.05mm. Sold by X", "category": "Cat", "brand": "Brand"}
    assert parse_item_text("Exhaust Fan, 120 Volt. . TPI. ")["category"] == ""
    assert parse_item_text("Only a title") == {"title": "Only a title", "brand": "", "category": ""}


def test_items_are_key_value_tokens(model, scientific_mm):
    n = int(model.item_token_len[1])
    types = model.item_token_types[1, :n].tolist()
    assert 0 < n <= 16 and types[0] == TYPE_KEY and TYPE_VALUE in types
    assert int(model.item_token_len[0]) == 0  # PAD has no tokens


def test_flatten_is_most_recent_first_with_cls_and_budget(model):
    hist = torch.tensor([[5, 7, 9, 0, 0, 0], [3, 0, 0, 0, 0, 0]])
    lens = torch.tensor([3, 1])
    ids, types, item_pos, mask = model.flatten_histories(hist, lens)
    assert ids.shape[1] <= 48 and ids[0, 0] == model.cls_token_id and types[0, 0] == TYPE_CLS
    n9, n7 = int(model.item_token_len[9]), int(model.item_token_len[7])
    # the most recent item (9) comes first, at item position 1, then 7 at position 2
    assert ids[0, 1: 1 + n9].tolist() == model.item_token_ids[9, :n9].tolist()
    assert item_pos[0, 1: 1 + n9].unique().tolist() == [1]
    assert ids[0, 1 + n9: 1 + n9 + min(n7, 47 - n9)].tolist() == model.item_token_ids[7, :min(n7, 47 - n9)].tolist()
    n3 = int(model.item_token_len[3])
    assert int(mask[1].sum()) == 1 + n3 and not mask[1, 1 + n3:].any()


def test_training_steps_lower_the_loss(scientific_mm):
    torch.manual_seed(0)
    m = RecformerTeacher.from_dataset(scientific_mm, **TINY).train()
    m.prepare_epoch(0)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    h, l, t, d = _batch(scientific_mm)
    losses = []
    for _ in range(6):
        loss = m.training_loss(h, l, t, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
    # stage 1 re-encodes the item table, stage 2 leaves it frozen
    before = m.item_table.clone()
    m.prepare_epoch(0)
    assert not torch.allclose(before, m.item_table)
    frozen = m.item_table.clone()
    m.prepare_epoch(1)
    assert torch.equal(frozen, m.item_table)


def test_score_is_deterministic_float32(model, scientific_mm):
    model.eval()
    h, l, _, _ = _batch(scientific_mm, 8, "test")
    cands = torch.arange(1, 51)
    s1, s2 = model.score(h, l, cands), model.score(h, l, cands)
    assert s1.dtype == torch.float32 and s1.shape == (8, 50) and torch.equal(s1, s2)
    assert float(s1.abs().max()) <= 1.0 + 1e-5  # raw cosines
    per_row = model.score(h, l, cands.expand(8, 50))
    assert torch.allclose(per_row, s1, atol=1e-6)


def test_checkpoint_round_trip_and_vocab_check(model, scientific_mm, tmp_path):
    model.eval()
    h, l, _, _ = _batch(scientific_mm, 4, "test")
    save_teacher(model, tmp_path / "ck")
    loaded = load_teacher(tmp_path / "ck", expected_vocab_hash=scientific_mm.vocab_hash())
    assert torch.equal(loaded.score(h, l, torch.arange(1, 30)), model.score(h, l, torch.arange(1, 30)))
    assert loaded.describe().temperature == pytest.approx(0.05)
    with pytest.raises(TeacherContractError):
        load_teacher(tmp_path / "ck", expected_vocab_hash="0" * 64)
