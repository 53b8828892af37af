"""Full-ranking metrics against hand-computed rankings (ties broken pessimistically)."""
import math

import numpy as np
import pytest
import torch

from ckd.data.multidomain import build_multidomain
from ckd.data.unisrec import DomainData, Split
from ckd.metrics import bootstrap_ci, evaluate_full_ranking, metrics_from_ranks, target_ranks

pytestmark = pytest.mark.unit


def test_ranks_strict_and_ties():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1],   # target col 2: one item above -> rank 1
                           [0.3, 0.3, 0.3, 0.3],   # all tied: target ranks last -> rank 3
                           [0.1, 0.8, 0.8, 0.2]])  # target col 1 tied with col 2 -> rank 1
    ranks = target_ranks(scores, torch.tensor([2, 0, 1]))
    assert ranks.tolist() == [1, 3, 1]


def test_metrics_from_ranks_hand_computed():
    m = metrics_from_ranks(np.array([0, 9, 10, 49, 50]))
    assert m["recall@10"] == pytest.approx(2 / 5)
    assert m["recall@50"] == pytest.approx(4 / 5)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(11)) / 5)
    assert m["ndcg@50"] == pytest.approx((1 + 1 / math.log2(11) + 1 / math.log2(12) + 1 / math.log2(51)) / 5)


def _tiny_two_domain():
    def dom(name, n_items, hist, tgt):
        sp = Split(np.arange(len(tgt)), [np.asarray(h) for h in hist], np.asarray(tgt))
        return DomainData(name, [f"{name}{i}" for i in range(n_items)], len(tgt), sp, sp, sp,
                          [f"t{i}" for i in range(n_items)])
    return build_multidomain([dom("A", 3, [[0], [1]], [1, 2]), dom("B", 4, [[0, 1]], [3])], max_len=4)


def test_evaluate_ranks_only_within_the_users_domain():
    ds = _tiny_two_domain()
    assert ds.domain_range(0) == (1, 4) and ds.domain_range(1) == (4, 8)

    def score_fn(users, hist, lens, start, stop):
        # global id as score: higher id ranks first
        return torch.arange(start, stop, dtype=torch.float32).repeat(len(users), 1)

    res = evaluate_full_ranking(score_fn, ds, "test")
    # domain A targets: global 2 (rank 1 of [3,2,1]) and 3 (rank 0); domain B target: global 7 (rank 0)
    assert res["A"]["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
    assert res["B"]["recall@10"] == 1.0 and res["B"]["ndcg@10"] == 1.0
    assert res["mean"]["ndcg@10"] == pytest.approx((res["A"]["ndcg@10"] + 1.0) / 2)


def test_history_masking_switch():
    ds = _tiny_two_domain()

    def score_fn(users, hist, lens, start, stop):
        return torch.arange(stop, start, -1, dtype=torch.float32).repeat(len(users), 1)  # low id first

    # domain B: history items 4,5 rank above the target 7; masking them lifts the target two places
    plain = evaluate_full_ranking(score_fn, ds, "test", domains=["B"])
    masked = evaluate_full_ranking(score_fn, ds, "test", domains=["B"], mask_history=True)
    assert plain["B"]["ndcg@10"] == pytest.approx(1 / math.log2(5))
    assert masked["B"]["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_batches_are_trimmed_to_their_rows_and_ranks_come_back_in_split_order():
    from ckd.metrics import full_ranking_ranks

    # Five users of one 8-item domain, history lengths 3, 1, 4, 1, 2, all with target local item 6.
    # Item i scores -i, and user u's target scores 0.5 - u: exactly items 0..u-1 score above it.
    hists = [[0, 1, 2], [3], [0, 1, 2, 3], [4], [5, 6]]
    sp = Split(np.arange(5), [np.asarray(h) for h in hists], np.full(5, 6))
    ds = build_multidomain([DomainData("A", [f"i{i}" for i in range(8)], 5, sp, sp, sp,
                                       [f"t{i}" for i in range(8)])], max_len=6)
    widths = []

    def score_fn(users, hist, lens, start, stop):
        widths.append((hist.shape[1], lens.tolist()))
        assert bool((hist[torch.arange(len(lens)), lens - 1] > 0).all())  # real items up to each length
        scores = -torch.arange(stop - start, dtype=torch.float32).repeat(len(users), 1)
        scores[:, 6] = 0.5 - users.float()
        return scores

    ranks = full_ranking_ranks(score_fn, ds, "test", batch_size=2)["A"]
    assert ranks.tolist() == [0, 1, 2, 3, 4]  # user u's rank is u, whatever order the batches took
    assert widths == [(1, [1, 1]), (3, [2, 3]), (4, [4])]  # sorted by length, each trimmed to its longest


def _id_scoring_models():
    """A teacher and a student that score each item by its global id, recording the mode they ran in."""
    from student.models.base import StudentModel
    from teachers.base import Teacher

    modes = []

    class IdTeacher(Teacher):
        def encode_histories(self, histories, lengths):
            modes.append(self.training)
            return torch.ones(len(lengths), 1)

        def item_embeddings(self, item_ids):
            return item_ids.float().unsqueeze(-1)

    class IdStudent(StudentModel):
        def score(self, batch, candidates):
            modes.append(self.training)
            return candidates.float().expand(len(batch), -1)

    return IdTeacher("hash", 8, 1.0, 4), IdStudent(), modes


def test_teachers_and_students_follow_one_ranking_contract_and_one_evaluation():
    from ckd.metrics import RankingModel, evaluate_model

    ds = _tiny_two_domain()
    teacher, student, modes = _id_scoring_models()
    for model in (teacher, student):
        assert isinstance(model, RankingModel)
        model.train()
        res = evaluate_model(model, ds, "test")
        # as in test_evaluate_ranks_only_within_the_users_domain: each model scored its rows over
        # their own domain's id range only
        assert res["A"]["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1.0) / 2)
        assert res["B"]["ndcg@10"] == 1.0
        assert model.training  # the caller's mode comes back
    assert modes and not any(modes)  # scored in eval mode (dropout off) every time


def test_trimmed_batches_rank_as_the_padded_width_does(scientific_mm):
    from ckd.metrics import full_ranking_ranks
    from student.models.sasrec import SASRec

    torch.manual_seed(0)
    model = SASRec(scientific_mm.vocab_size, max_len=50, hidden=32, dropout=0.5).eval()
    trimmed = model.ranking_scores

    def padded(users, hist, lens, start, stop):  # what every batch looked like before: width 50
        return trimmed(users, torch.nn.functional.pad(hist, (0, 50 - hist.shape[1])), lens, start, stop)

    a = full_ranking_ranks(trimmed, scientific_mm, "test", batch_size=256)["ScientificMM"]
    b = full_ranking_ranks(padded, scientific_mm, "test", batch_size=256)["ScientificMM"]
    assert len(a) == len(scientific_mm.splits["test"]) and np.array_equal(a, b)


def test_bootstrap_interval_matches_the_binomial_width():
    # 1,000 users, half of them hit at rank 0 (NDCG 1), half miss (rank 100): Recall@10 = 0.5,
    # whose 95% interval is 0.5 +- 1.96 * sqrt(0.25 / 1000) = 0.5 +- 0.031.
    ranks = np.array([0] * 500 + [100] * 500)
    ci = bootstrap_ci(ranks, n_boot=2000, seed=1)
    for m in ("recall@10", "ndcg@10"):  # NDCG of a rank-0 hit is 1, so both metrics coincide here
        lo, hi = ci[m]
        assert lo < 0.5 < hi
        assert (hi - lo) == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 1000), rel=0.1)
    assert ci["recall@50"] == ci["recall@10"]  # rank 100 misses @50 too
    assert bootstrap_ci(ranks, n_boot=2000, seed=1) == ci  # seeded: the same interval again
    # every user a hit: no luck in the draw, a zero-width interval
    assert bootstrap_ci(np.zeros(50, dtype=int), n_boot=100)["ndcg@10"] == (1.0, 1.0)


def test_bootstrap_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="no ranks"):
        bootstrap_ci(np.zeros(0))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(np.zeros(3), level=1.5)
