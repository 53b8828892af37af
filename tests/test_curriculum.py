"""Curriculum: difficulty order on a hand-made dataset, pacing values, the DDP sampler."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckd.data.multidomain import build_multidomain
from ckd.data.unisrec import DomainData, Split
from student.curriculum import (PACINGS, CurriculumError, CurriculumSampler, difficulty_scores,
                                pacing_fraction, rank_normalise)

pytestmark = pytest.mark.unit


def _split(rows: list[tuple[int, list[int], int]]) -> Split:
    return Split(np.array([u for u, _, _ in rows], dtype=np.int64),
                 [np.array(h, dtype=np.int64) for _, h, _ in rows],
                 np.array([t for _, _, t in rows], dtype=np.int64))


def _domain(name: str, n_items: int, train: list[tuple[int, list[int], int]]) -> DomainData:
    users = sorted({u for u, _, _ in train})
    hold = _split([(u, [0], 1) for u in users])  # valid/test are not used by the curriculum
    return DomainData(name, [f"{name}{i}" for i in range(n_items)], len(users), _split(train),
                      hold, hold, None)


@pytest.fixture(scope="module")
def tiny():
    """Domain A (local items 0..5) rows 0-4, domain B (items 0..3) rows 5-6.

    item_popularity (train targets + first item of length-1 rows): A: a0=1, a1=4, a4=1, a5=1;
    B: b0=1, b1=2. Hand-computed (see test): difficulties
    A: [0.6875, 0.375, 0.125, 0.9375, 0.375], B: [1.0, 0.0].
    """
    a = _domain("A", 6, [(0, [0], 1), (1, [0, 1], 1), (2, [0, 1, 1], 1), (3, [4], 5),
                         (4, [0, 1, 1, 2], 1)])
    b = _domain("B", 4, [(0, [0], 1), (1, [0, 1], 1)])
    return build_multidomain([a, b], max_len=5)


def test_rank_normalise_ties_share_average_rank():
    np.testing.assert_allclose(rank_normalise(np.array([1, 2, 3, 1, 4])), [0.125, 0.5, 0.75, 0.125, 1.0])
    np.testing.assert_allclose(rank_normalise(np.array([7.0])), [0.5])


def test_difficulty_hand_computed(tiny):
    # Domain A: lengths [1,2,3,1,4] -> ranks [.125,.5,.75,.125,1];
    # mean log(1+count) of history+target: r0 (ln2+ln5)/2=1.151, r1 (ln2+2ln5)/3=1.304,
    # r2 (ln2+3ln5)/4=1.380, r3 (ln2+ln2)/2=0.693, r4 (ln2+3ln5+0)/5=1.104 -> ranks [.5,.75,1,0,.25];
    # diff = 1 - (len_rank + pop_rank)/2. Domain B: lengths [1,2], pop (ln2+ln3)/2 < (ln2+2ln3)/3.
    d = difficulty_scores(tiny)
    np.testing.assert_allclose(d, [0.6875, 0.375, 0.125, 0.9375, 0.375, 1.0, 0.0])
    # Length only / popularity only.
    np.testing.assert_allclose(difficulty_scores(tiny, popularity_weight=0.0),
                               [0.875, 0.5, 0.25, 0.875, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(difficulty_scores(tiny, length_weight=0.0),
                               [0.5, 0.25, 0.0, 1.0, 0.75, 1.0, 0.0])


def test_difficulty_extra_term_and_errors(tiny):
    extra = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, 9.0])  # larger = harder, ranked per domain
    d = difficulty_scores(tiny, length_weight=0.0, popularity_weight=0.0, extra=extra, extra_weight=1.0)
    np.testing.assert_allclose(d, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 1.0])
    with pytest.raises(CurriculumError, match="extra"):
        difficulty_scores(tiny, extra_weight=1.0)
    with pytest.raises(CurriculumError, match="weights"):
        difficulty_scores(tiny, length_weight=0.0, popularity_weight=0.0)
    with pytest.raises(CurriculumError, match="split"):
        difficulty_scores(tiny, split="nope")


def test_curriculum_order_easiest_first_with_stable_ties(tiny):
    s = CurriculumSampler(difficulty_scores(tiny), start_fraction=0.25, full_at_epoch=4)
    # 0.0 (row 6), 0.125 (2), 0.375 (1 then 4: tie broken by index), 0.6875 (0), 0.9375 (3), 1.0 (5)
    assert s.order.tolist() == [6, 2, 1, 4, 0, 3, 5]
    assert s.pool(0).tolist() == [6, 2]  # ceil(0.25 * 7) = 2 easiest rows
    assert sorted(s.pool(4).tolist()) == list(range(7))


def test_grouped_pool_takes_the_easiest_fraction_of_each_domain(tiny):
    d = difficulty_scores(tiny)
    s = CurriculumSampler(d, start_fraction=0.25, full_at_epoch=4, groups=tiny.splits["train"].domains)
    # A (rows 0-4): ceil(0.25 * 5) = 2 easiest -> rows 2, 1; B (rows 5-6): ceil(0.25 * 2) = 1 -> row 6.
    assert s.pool(0).tolist() == [2, 1, 6]
    assert sorted(s.pool(4).tolist()) == list(range(7))
    groups = np.random.default_rng(6).integers(0, 3, 300)
    g = CurriculumSampler(np.random.default_rng(7).random(300), groups=groups, start_fraction=0.3,
                          full_at_epoch=5, num_replicas=2, batch_size=4)
    for e in range(7):
        pool = g.pool(e)
        frac = g.fraction(e)
        for k in range(3):
            n_k = int((groups == k).sum())
            assert int((groups[pool] == k).sum()) == min(n_k, math.ceil(frac * n_k - 1e-9))
        if e < 6:
            assert set(pool.tolist()) <= set(g.pool(e + 1).tolist())
    tiny_pool = CurriculumSampler(np.arange(30.0), groups=np.arange(30) % 3, start_fraction=0.01,
                                  num_replicas=2, batch_size=4)
    assert tiny_pool.pool_size(0) >= 8  # still one batch per rank


def test_pacing_values_hand_computed():
    assert pacing_fraction("root", 0, 10, 0.25) == pytest.approx(0.25)
    assert pacing_fraction("root", 2.5, 10, 0.25) == pytest.approx(math.sqrt(0.0625 + 0.9375 * 0.25))
    assert pacing_fraction("root", 2.5, 10, 0.25) == pytest.approx(0.5448623679)
    assert pacing_fraction("root", 10, 10, 0.25) == 1.0
    assert pacing_fraction("root", 25, 10, 0.25) == 1.0
    assert pacing_fraction("linear", 5, 10, 0.25) == pytest.approx(0.625)
    assert pacing_fraction("step", 2, 10, 0.25) == pytest.approx(0.25)
    assert pacing_fraction("step", 2.5, 10, 0.25) == pytest.approx(0.4375)
    assert pacing_fraction("step", 9.99, 10, 0.25) == pytest.approx(0.8125)
    assert pacing_fraction("step", 10, 10, 0.25) == 1.0
    assert pacing_fraction("none", 0, 10, 0.25) == 1.0
    with pytest.raises(CurriculumError, match="unknown pacing"):
        pacing_fraction("cosine", 0, 10)
    with pytest.raises(CurriculumError, match="start"):
        pacing_fraction("root", 0, 10, 0.0)


@pytest.mark.parametrize("pacing", sorted(PACINGS))
def test_pool_grows_monotonically_to_all(pacing):
    rng = np.random.default_rng(0)
    s = CurriculumSampler(rng.random(101), pacing=pacing, start_fraction=0.2, full_at_epoch=6, batch_size=4)
    sizes = [s.pool_size(e) for e in range(10)]
    assert all(x <= y for x, y in zip(sizes, sizes[1:]))
    assert sizes[6:] == [101] * 4
    if pacing != "none":
        assert sizes[0] == math.ceil(0.2 * 101)
    for e in range(9):  # each pool extends the previous one, easiest first
        assert set(s.pool(e).tolist()) <= set(s.pool(e + 1).tolist())


def _two_ranks(drop_last: bool, **kw):
    d = np.random.default_rng(1).random(103)
    return [CurriculumSampler(d, num_replicas=2, rank=r, seed=7, drop_last=drop_last, full_at_epoch=5,
                              batch_size=4, **kw) for r in range(2)]


@pytest.mark.parametrize("enabled", [True, False])
def test_shards_disjoint_equal_and_cover_pool(enabled):
    for drop_last in (True, False):
        ranks = _two_ranks(drop_last, enabled=enabled)
        for epoch in range(7):
            shards = []
            for s in ranks:
                s.set_epoch(epoch)
                shards.append(list(s))
            pool = set(ranks[0].pool(epoch).tolist())
            assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == len(ranks[1])
            union = set(shards[0]) | set(shards[1])
            assert union <= pool
            if drop_last:
                assert not set(shards[0]) & set(shards[1])
                assert len(shards[0]) == len(set(shards[0]))
                assert len(pool) - len(union) < 2  # at most replicas-1 rows dropped
            else:
                assert union == pool
            if not enabled:
                assert pool == set(range(103))


def test_same_seed_same_order_other_seed_other_order():
    d = np.random.default_rng(2).random(64)
    a, b = CurriculumSampler(d, seed=3), CurriculumSampler(d, seed=3)
    c = CurriculumSampler(d, seed=4)
    for s in (a, b, c):
        s.set_epoch(8)
    assert list(a) == list(b)
    assert list(a) != list(c)
    a.set_epoch(9)
    assert list(a) != list(b)  # a new epoch is reshuffled


def test_resume_yields_identical_remaining_sequence():
    d = np.random.default_rng(3).random(200)
    kw = dict(num_replicas=2, rank=1, seed=11, full_at_epoch=4, batch_size=8)
    ref = CurriculumSampler(d, **kw)
    full = {}
    for e in range(3):
        ref.set_epoch(e)
        full[e] = list(ref)
    run = CurriculumSampler(d, **kw)
    run.set_epoch(1)
    it = iter(run)
    consumed = [next(it) for _ in range(13)]
    state = run.state_dict()
    assert state["epoch"] == 1 and state["position"] == 13
    resumed = CurriculumSampler(d, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # what a training loop does at the top of the restored epoch
    rest = list(resumed)
    assert consumed + rest == full[1]
    resumed.set_epoch(2)  # later epochs start from their beginning
    assert list(resumed) == full[2]


def test_resume_through_a_dataloader():
    """With a torch DataLoader (num_workers=0) the position equals batches consumed * batch size."""
    d = np.random.default_rng(4).random(90)
    kw = dict(num_replicas=2, rank=0, seed=5, full_at_epoch=3, batch_size=4)
    ds = torch.arange(90)
    ref = CurriculumSampler(d, **kw)
    ref.set_epoch(2)
    want = [b.tolist() for b in torch.utils.data.DataLoader(ds, batch_size=4, sampler=ref)]
    s = CurriculumSampler(d, **kw)
    s.set_epoch(2)
    got = []
    for k, b in enumerate(torch.utils.data.DataLoader(ds, batch_size=4, sampler=s)):
        got.append(b.tolist())
        if k == 2:
            state = s.state_dict()
            break
    assert state["position"] == 12
    s2 = CurriculumSampler(d, **kw)
    s2.load_state_dict(state)
    s2.set_epoch(2)
    got += [b.tolist() for b in torch.utils.data.DataLoader(ds, batch_size=4, sampler=s2)]
    assert got == want


def test_state_from_other_settings_is_refused():
    d = np.random.default_rng(5).random(50)
    state = CurriculumSampler(d, seed=1, num_replicas=2).state_dict()
    with pytest.raises(CurriculumError, match="num_replicas"):
        CurriculumSampler(d, seed=1, num_replicas=4).load_state_dict(state)
    with pytest.raises(CurriculumError, match="seed"):
        CurriculumSampler(d, seed=2, num_replicas=2).load_state_dict(state)
    with pytest.raises(CurriculumError, match="malformed"):
        CurriculumSampler(d).load_state_dict({"epoch": 0})


def test_small_pool_still_gives_every_rank_a_batch():
    s = CurriculumSampler(np.arange(40.0), num_replicas=2, rank=0, batch_size=8, start_fraction=0.1)
    assert s.pool_size(0) == 16  # ceil(0.1 * 40) = 4 < 2 ranks * 8
    assert len(s) == 8 and s.num_batches() == 1
