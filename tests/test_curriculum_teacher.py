"""A curriculum driven by the teachers themselves: their confidence in the true item (or their
disagreement about it) orders the rows; the sampler stays seeded, resumable and disjoint across ranks."""
from __future__ import annotations

import numpy as np
import pytest

from student.curriculum import CurriculumError, CurriculumSampler, teacher_difficulty


def _hand_pool():
    """6 rows, 2 teachers, 1 true item + 2 negatives; both teachers tau = 1."""
    a = np.log(np.array([[8, 1, 1], [1, 1, 1], [6, 2, 2], [1, 4, 5], [9, 0.5, 0.5], [2, 4, 4]], dtype=np.float64))
    b = np.log(np.array([[8, 1, 1], [8, 1, 1], [6, 2, 2], [1, 4, 5], [9, 0.5, 0.5], [2, 4, 4]], dtype=np.float64))
    return {"a": a.astype(np.float32), "b": b.astype(np.float32)}, {"a": 1.0, "b": 1.0}


def test_teacher_confidence_orders_a_hand_built_pool_as_designed():
    scores, temps = _hand_pool()
    # p(true) by hand: a = .8, 1/3, .6, .1, .9, .2 ; b = .8, .8, .6, .1, .9, .2
    conf = np.array([[0.8, 1 / 3, 0.6, 0.1, 0.9, 0.2], [0.8, 0.8, 0.6, 0.1, 0.9, 0.2]])
    diff = teacher_difficulty(scores, temps, "confidence")
    np.testing.assert_allclose(diff, 1 - conf.mean(0), rtol=1e-6)
    dis = teacher_difficulty(scores, temps, "disagreement")
    np.testing.assert_allclose(dis, np.abs(conf[0] - conf[1]), atol=1e-6)
    # easiest first: the rows the teachers are surest of the true item
    sampler = CurriculumSampler(diff, start_fraction=0.5, full_at_epoch=4, batch_size=1, pacing="linear")
    assert sampler.order.tolist() == [4, 0, 2, 1, 5, 3]
    assert sorted(sampler.pool(0).tolist()) == [0, 2, 4]  # half the pool at epoch 0: the 3 surest rows
    assert sampler.pool_size(4) == 6
    # disagreement: only row 1 is disputed, so it comes last
    assert CurriculumSampler(dis, batch_size=1).order[-1] == 1
    with pytest.raises(CurriculumError, match="signal"):
        teacher_difficulty(scores, temps, "loudness")
    assert (teacher_difficulty({"a": scores["a"]}, temps, "disagreement") == 0).all()


def test_teacher_driven_sampler_is_seeded_resumable_and_disjoint_across_ranks():
    rng = np.random.default_rng(0)
    scores = {t: rng.normal(size=(101, 21)).astype(np.float32) for t in ("a", "b", "c")}
    diff = teacher_difficulty(scores, {"a": 1.0, "b": 0.5, "c": 2.0}, "confidence")
    kw = dict(seed=5, full_at_epoch=3, batch_size=4, num_replicas=2, drop_last=True)
    r0, r1 = CurriculumSampler(diff, rank=0, **kw), CurriculumSampler(diff, rank=1, **kw)
    again = CurriculumSampler(diff, rank=0, **kw)
    for epoch in range(4):
        for s in (r0, r1, again):
            s.set_epoch(epoch)
        a, b = list(r0), list(r1)
        assert a == list(again)  # seeded
        assert not set(a) & set(b) and len(a) == len(b)  # disjoint, equal shards
        assert set(a) | set(b) <= set(r0.pool(epoch).tolist())
    run = CurriculumSampler(diff, rank=1, **kw)
    run.set_epoch(2)
    it = iter(run)
    head = [next(it) for _ in range(7)]
    resumed = CurriculumSampler(diff, rank=1, **kw)
    resumed.load_state_dict(run.state_dict())
    resumed.set_epoch(2)
    r1.set_epoch(2)
    assert head + list(resumed) == list(r1)  # resumed mid-epoch: exactly the remaining indices


@pytest.mark.integration
def test_row_scores_come_from_the_served_teachers(scientific_mm, tmp_path):
    """The session scores every training row against [true item, K seeded negatives of its domain]
    over real gRPC; column 0 equals the teacher's own score of the true item."""
    import torch

    from benchmarks.fixture_teacher import make_fixture_checkpoint
    from student.config import DistillConfig
    from student.teacher_pool import TeacherPool
    from student.teacher_session import TeacherSession
    from teachers.base import load_teacher
    from teachers.server import start_server

    ds = scientific_mm
    path = make_fixture_checkpoint(tmp_path / "t", num_items=ds.vocab_size, vocab_hash=ds.vocab_hash(), seed=2)
    teacher = load_teacher(path)
    server = start_server(teacher, name="fx")
    pool = TeacherPool({"fx": [server.address]}, timeout_s=30.0)
    try:
        cfg = DistillConfig()
        session = TeacherSession._checked(cfg, ds, None, pool)
        scores = session.row_scores("train", negatives=5, seed=3, batch_size=1000)
        again = session.row_scores("train", negatives=5, seed=3, batch_size=333)
    finally:
        pool.close()
        server.stop(0)
    ex = ds.splits["train"]
    s = scores["fx"]
    assert s.shape == (len(ex), 6) and np.isfinite(s).all()
    np.testing.assert_array_equal(s, again["fx"])  # seeded, whatever the batching
    rows = np.arange(0, len(ex), 997)
    L = int(ex.lengths[rows].max())
    with torch.no_grad():
        own = teacher.score(torch.as_tensor(ex.histories[rows, :L]), torch.as_tensor(ex.lengths[rows]),
                            torch.as_tensor(ex.targets[rows]).view(-1, 1)).numpy()[:, 0]
    np.testing.assert_allclose(s[rows, 0], own, rtol=1e-5, atol=1e-6)
