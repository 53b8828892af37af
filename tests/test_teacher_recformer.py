"""Recformer teacher on real ScientificMM item texts (1,585 items: the smallest real catalogue),
at a tiny budget (1 layer, 16 tokens per item) so the whole file runs in seconds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.contract import TeacherContractError
from teachers.base import load_teacher, save_teacher
from teachers.recformer import (IGNORE_INDEX, TYPE_CLS, TYPE_KEY, TYPE_VALUE, RecformerTeacher, contrastive_loss,
                                mask_tokens, parse_item_text)

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


# -- pre-training objectives (the paper's MLM + item-item contrastive) ------------------------------

@pytest.fixture(scope="module")
def pretrain_model(scientific_mm):
    torch.manual_seed(0)
    return RecformerTeacher.from_dataset(scientific_mm, objective="pretrain", encode_table=False, **TINY)


def test_mlm_loss_equals_the_hand_computed_value(pretrain_model):
    m = pretrain_model
    H = m.encoder.config.hidden_size
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, H, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, 2003, IGNORE_INDEX], [1037, IGNORE_INDEX, 7592]])
    got = m.mlm_loss(hidden, labels)
    # By hand: dense, exact-erf GELU, LayerNorm written out, tied word table, bias, then the mean
    # over the three labelled tokens of -log softmax at the label.
    W = m.encoder.get_input_embeddings().weight.detach().double()
    head = m.mlm_head
    losses = []
    for r, c in [(0, 1), (1, 0), (1, 2)]:
        x = hidden[r, c].double() @ head.dense.weight.detach().double().T + head.dense.bias.detach().double()
        x = 0.5 * x * (1.0 + torch.erf(x / 2 ** 0.5))
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + head.norm.eps)
        x = x * head.norm.weight.detach().double() + head.norm.bias.detach().double()
        logits = W @ x + head.bias.detach().double()
        y = int(labels[r, c])
        losses.append(float(torch.logsumexp(logits, 0) - logits[y]))
    assert got.item() == pytest.approx(sum(losses) / 3, rel=1e-5)


def test_contrastive_loss_is_lowest_when_the_pairs_match():
    # Hand-computed: orthogonal unit pairs at temperature 0.5 give logits [[2, 0], [0, 2]], so the
    # loss is log(1 + e^-2) for each row.
    eye = torch.eye(2)
    assert contrastive_loss(eye, eye, 0.5).item() == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)
    import itertools

    g = torch.Generator().manual_seed(0)
    seq = torch.randn(4, 16, generator=g)
    items = seq + 0.1 * torch.randn(4, 16, generator=g)  # each sequence's own next item is nearest
    matched = contrastive_loss(seq, items, 0.05).item()
    for perm in itertools.permutations(range(4)):
        if list(perm) != [0, 1, 2, 3]:
            assert matched < contrastive_loss(seq, items[list(perm)], 0.05).item(), perm


def test_mask_tokens_follows_the_bert_recipe():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 200), generator=g)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # [CLS]
    out, labels = mask_tokens(ids, maskable, 0.15, mask_token_id=103, vocab_size=30522, generator=g)
    chosen = labels != IGNORE_INDEX
    assert not chosen[:, 0].any() and (labels[chosen] == ids[chosen]).all()
    assert (out[~chosen] == ids[~chosen]).all()  # unchosen tokens are untouched
    frac = chosen[:, 1:].float().mean().item()
    assert 0.13 < frac < 0.17
    n = chosen.sum().item()
    as_mask = (out[chosen] == 103).sum().item() / n
    kept = (out[chosen] == ids[chosen]).sum().item() / n
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.13


def test_pretraining_lowers_its_loss_and_hands_the_encoder_to_fine_tuning(scientific_mm, pretrain_model):
    from teachers.training import transfer_parameters

    torch.manual_seed(0)
    m = RecformerTeacher.from_dataset(scientific_mm, objective="pretrain", encode_table=False, **TINY).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    h, l, t, d = _batch(scientific_mm)
    losses = []
    for step in range(5):
        loss = m.training_loss(h, l, t, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
    fine = RecformerTeacher.from_dataset(scientific_mm, encode_table=False, **TINY)
    copied, skipped = transfer_parameters(m, fine)
    assert fine.mlm_head is None and not any(k.startswith("mlm_head") for k in copied)
    w = "encoder.encoder.layer.0.attention.self.query.weight"
    assert w in copied and torch.equal(fine.state_dict()[w], m.state_dict()[w])
    assert "item_table" in skipped  # the catalogue belongs to the vocabulary, not the encoder
