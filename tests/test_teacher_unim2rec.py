"""UniM2Rec teacher on the real ScientificMM CLIP-style text and image features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from protos.contract import TeacherContractError
from teachers.base import load_teacher, save_teacher
from teachers.unim2rec import UniM2RecTeacher

pytestmark = pytest.mark.integration

# The CLIP-style text and image modalities only: the MiniLM modality needs a 3-minute text
# encoding on a cold cache, which the run itself does once (teachers.text_encoder caches it).
SMALL = dict(modalities=["clip_text", "image"], hidden=32, num_layers=1, num_heads=2, dropout=0.1,
             modality_dropout=0.3, use_id=True)


def _model(ds, **kw):
    torch.manual_seed(0)
    return UniM2RecTeacher.from_dataset(ds, **{**SMALL, **kw})


def _batch(ds, n=64, split="train"):
    ex = ds.splits[split]
    idx = np.arange(n)
    return (torch.as_tensor(ex.histories[idx]), torch.as_tensor(ex.lengths[idx]),
            torch.as_tensor(ex.targets[idx]), torch.as_tensor(ex.domains[idx]))


def test_training_steps_lower_the_loss(scientific_mm):
    m = _model(scientific_mm).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    h, l, t, d = _batch(scientific_mm)
    losses = []
    for _ in range(15):
        loss = m.training_loss(h, l, t, d)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_score_deterministic_and_round_trip(scientific_mm, tmp_path):
    m = _model(scientific_mm).eval()
    h, l, _, _ = _batch(scientific_mm, 8, "test")
    cands = torch.arange(1, 101)
    s1, s2 = m.score(h, l, cands), m.score(h, l, cands)
    assert s1.dtype == torch.float32 and s1.shape == (8, 100) and torch.equal(s1, s2)
    save_teacher(m, tmp_path / "ck")
    loaded = load_teacher(tmp_path / "ck", expected_vocab_hash=scientific_mm.vocab_hash())
    assert torch.equal(loaded.score(h, l, cands), s1)
    with pytest.raises(TeacherContractError):
        load_teacher(tmp_path / "ck", expected_vocab_hash="f" * 64)


def test_missing_image_falls_back_to_text_and_image_matters(scientific_mm):
    m = _model(scientific_mm).eval()
    h, l, _, _ = _batch(scientific_mm, 8, "test")
    cands = torch.arange(1, 201)
    full = m.score(h, l, cands)
    # Take the image away from candidates 1..100 (and from every history item).
    m.has_image[1:101] = False
    m.has_image[h[h > 0]] = False
    without = m.score(h, l, cands)
    assert torch.isfinite(without).all()
    assert (without[:, :100] - full[:, :100]).abs().max() > 1e-3  # the image changed those scores
    # An item with no image is fused from its text alone: same as its text-only fusion.
    ids = torch.tensor([5, 50])
    text_only = torch.tensor([[True, False], [True, False]])
    assert torch.allclose(m.fuse(ids), m.fuse(ids, present=text_only))
    # With no modality at all (PAD) the fusion is still finite.
    assert torch.isfinite(m.fuse(torch.tensor([0]))).all()


@pytest.mark.unit
def test_modality_dropout_never_drops_everything(scientific_mm):
    m = _model(scientific_mm, modality_dropout=1.0).train()
    present = torch.tensor([[True, True], [True, False], [False, True], [False, False]]).repeat(50, 1)
    kept = m._drop_modalities(present)
    assert (kept <= present).all()  # never invents a modality
    assert (kept.sum(-1)[present.any(-1)] == 1).all()  # p=1: exactly one survives where any exists


def test_shared_clip_projection_maps_image_and_clip_text_alike(scientific_mm, tmp_path):
    """shared_clip_projection: the image goes through clip_text's projection (no image projection of
    its own; its whitening shift starts at the mean of both), it survives a checkpoint round trip, and
    a teacher without both CLIP modalities refuses it."""
    m = _model(scientific_mm, shared_clip_projection=True).eval()
    assert set(m.proj) == {"clip_text"} and m.projection_of("image") == "clip_text"
    both = np.concatenate([scientific_mm.features[k][scientific_mm.feature_mask[k]
                                                     & (np.abs(scientific_mm.features[k]).sum(1) > 0)]
                           for k in ("feat1CLS", "feat3CLS")])
    assert torch.allclose(m.proj["clip_text"].shift, torch.as_tensor(both.mean(0)), atol=1e-6)
    ids = torch.tensor([3, 40, 77])
    z = m.proj["clip_text"](m.feat_image[ids])  # the image through the shared map, by hand
    present = torch.tensor([[False, True]] * 3)  # image only
    want = m.item_norm(z + m.missing[0] + m.item_id(ids))
    assert torch.allclose(m.fuse(ids, present=present), want, atol=1e-5)
    h, l, _, _ = _batch(scientific_mm, 8, "test")
    cands = torch.arange(1, 101)
    save_teacher(m, tmp_path / "ck")
    loaded = load_teacher(tmp_path / "ck", expected_vocab_hash=scientific_mm.vocab_hash())
    assert loaded.shared_clip_projection and torch.equal(loaded.score(h, l, cands), m.score(h, l, cands))
    with pytest.raises(TeacherContractError, match="shared_clip_projection needs the clip_text and image"):
        _model(scientific_mm, modalities=["clip_text"], shared_clip_projection=True)


@pytest.mark.unit
def test_unknown_modality_is_a_clear_error(scientific):
    with pytest.raises(TeacherContractError, match="feat3CLS"):
        UniM2RecTeacher.from_dataset(scientific, modalities=["image"], hidden=16)


def test_served_teacher_scores_items_without_images_from_their_text(scientific_mm, tmp_path):
    """A request over items of which some lack image features gets a defined answer over real gRPC:
    those items are scored from their text path (gated fusion renormalised over the modalities they
    have, plus the learned missing-image vector), exactly as the teacher scores them with the image
    masked out; items with images are unchanged."""
    from student.teacher_pool import TeacherPool
    from teachers.base import load_teacher, save_teacher
    from teachers.server import start_server

    m = _model(scientific_mm).eval()
    m.has_image[1:101] = False  # these items arrive without image features
    save_teacher(m, tmp_path / "mm")
    served = load_teacher(tmp_path / "mm")
    assert not served.has_image[1:101].any() and served.has_image[101:201].all()
    server = start_server(served, name="mm")
    pool = TeacherPool({"mm": [server.address]}, timeout_s=30.0)
    try:
        pool.check_coverage(scientific_mm.prefix_vocabularies())
        h, l, _, _ = _batch(scientific_mm, 8, "test")
        L = int(l.max())
        cands = np.arange(1, 201)
        got = pool.score(h[:, :L].numpy(), l.numpy(), cands)["mm"]
    finally:
        pool.close()
        server.stop(0)
    assert np.isfinite(got).all() and got.shape == (8, 200)
    with torch.no_grad():
        seq = served.encode_histories(h[:, :L], l)
        ids = torch.as_tensor(cands)
        text_only = torch.tensor([True, False]).expand(len(ids), 2)
        want_text = served.similarity(seq, served.fuse(ids, present=text_only)).numpy()
        want_own = served.similarity(seq, served.fuse(ids)).numpy()
    np.testing.assert_allclose(got[:, :100], want_text[:, :100], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want_own, rtol=1e-5, atol=1e-6)
