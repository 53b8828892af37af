"""Distillation maths: candidates, KD against hand-computed values, integration weights, DistillLoss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from student.distill import (DistillError, DistillLoss, NoTeacherSignal, build_candidates, domain_ce,
                             integrate, js_divergence, kd_loss, kd_loss_positive, masked_log_softmax,
                             pairwise_js, teacher_better_gate, teacher_distributions)

pytestmark = pytest.mark.unit

RANGES = [(1, 11), (11, 16)]  # domain 0: ids 1..10, domain 1: ids 11..15


def _softmax(xs: list[float]) -> list[float]:
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


# -- candidates --------------------------------------------------------------------------------

def test_candidates_collapse_duplicates_and_mask_other_domains():
    targets = torch.tensor([5, 12, 5, 3])
    domains = torch.tensor([0, 1, 0, 0])
    cand, col, valid = build_candidates(targets, domains, 0, RANGES)
    assert cand.tolist() == [3, 5, 12]
    assert col.tolist() == [1, 2, 1, 0]  # rows 0 and 2 share target 5: one column, their positive
    assert valid.tolist() == [[True, True, False], [False, False, True],
                              [True, True, False], [True, True, False]]
    assert torch.equal(cand[col], targets)


def test_sampled_negatives_are_new_items_of_the_batch_domains():
    targets = torch.tensor([5, 12, 5, 3])
    domains = torch.tensor([0, 1, 0, 0])
    g = torch.Generator().manual_seed(0)
    cand, col, valid = build_candidates(targets, domains, 8, RANGES, g)
    sampled = cand[3:]
    assert len(sampled) == 8 and len(set(cand.tolist())) == len(cand)
    assert not set(sampled.tolist()) & {3, 5, 12}
    # Quota 8 * 3/4 = 6 for domain 0, 2 for domain 1.
    assert sum(1 <= x < 11 for x in sampled.tolist()) == 6
    assert sum(11 <= x < 16 for x in sampled.tolist()) == 2
    assert torch.equal(cand[col], targets)
    assert valid[1].sum() == 3 and valid[0].sum() == 8  # domain 1: 12 + 2 sampled; domain 0: 2 + 6
    again = build_candidates(targets, domains, 8, RANGES, torch.Generator().manual_seed(0))[0]
    assert torch.equal(cand, again)
    # A domain with fewer free items than its quota gives all it has (domain 1: 5 items, 1 target).
    cand2 = build_candidates(torch.tensor([12]), torch.tensor([1]), 10, RANGES, g)[0]
    assert sorted(cand2.tolist()) == [11, 12, 13, 14, 15]


def test_candidates_refuse_target_outside_its_domain():
    with pytest.raises(DistillError, match="row 1"):
        build_candidates(torch.tensor([5, 3]), torch.tensor([0, 1]), 0, RANGES)


# -- teacher distributions -----------------------------------------------------------------------

def test_teacher_distribution_is_tempered_softmax_over_valid_columns():
    valid = torch.tensor([[True, True, False]])
    s = torch.tensor([[1.0, 0.0, 9.0]])
    p = teacher_distributions({"t": s, "gone": None}, {"t": 0.5, "gone": 1.0}, valid)
    assert list(p) == ["t"]
    want = _softmax([2.0, 0.0])
    assert p["t"].tolist()[0] == pytest.approx([want[0], want[1], 0.0])
    with pytest.raises(DistillError, match="non-finite"):
        teacher_distributions({"t": torch.tensor([[float("nan"), 0.0, 0.0]])}, {"t": 1.0}, valid)


# -- KD loss ------------------------------------------------------------------------------------

def test_kd_loss_hand_computed_2x3():
    # float64 inputs: the hand values assume exact decimals (float32 0.3 is 0.30000001).
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    valid = torch.ones(2, 3, dtype=torch.bool)
    T = 2.0
    # softmax(z/T): row 0 [0.50648, 0.30720, 0.18632], row 1 [0.18632, 0.50648, 0.30720];
    # KL row 0 = 0.000616657, row 1 = 0.032323946; mean of T^2 * KL = 0.0658812047.
    assert kd_loss(z, q, valid, T).item() == pytest.approx(0.0658812047, rel=1e-6)
    s0, s1 = _softmax([0.5, 0.0, -0.5]), _softmax([0.0, 1.0, 0.5])
    kl0 = sum(a * math.log(a / b) for a, b in zip([0.5, 0.3, 0.2], s0))
    kl1 = sum(a * math.log(a / b) for a, b in zip([0.1, 0.6, 0.3], s1))
    r = torch.tensor([0.5, 1.5])
    assert kd_loss(z, q, valid, T, r).item() == pytest.approx((0.5 * 4 * kl0 + 1.5 * 4 * kl1) / 2, rel=1e-6)


def test_kd_loss_masked_column_is_ignored():
    # Row 1's column 0 is another domain's item: q puts 0 there, the student's logit there is huge.
    q = torch.tensor([[0.5, 0.3, 0.2], [0.0, 0.7, 0.3]])
    z = torch.tensor([[1.0, 0.0, -1.0], [50.0, 2.0, 1.0]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [False, True, True]])
    s1 = _softmax([1.0, 0.5])
    kl1 = 0.7 * math.log(0.7 / s1[0]) + 0.3 * math.log(0.3 / s1[1])
    loss = kd_loss(z, q, valid, 2.0)
    assert loss.item() == pytest.approx((4 * 0.000616657 + 4 * kl1) / 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad[1, 0] == 0


def test_kd_loss_zero_when_student_matches_mixture():
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    q = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    T = 3.0
    z = T * torch.log(q.clamp_min(1e-30)) + torch.tensor([[7.0], [-2.0]], dtype=torch.float64)  # any shift
    assert abs(kd_loss(z, q, valid, T, torch.tensor([1.3, 0.7])).item()) < 1e-7
    assert abs(kd_loss_positive(z, q, valid, torch.tensor([1, 3]), T).item()) < 1e-7
    # The same in float32 (how a student runs) stays at float32 rounding level.
    assert abs(kd_loss(z.float(), q.float(), valid, T).item()) < 1e-6


def test_positive_only_kd_hand_computed():
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    z = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    s = _softmax([0.5, 0.0, -0.5])[1]  # positive is column 1
    want = 4 * (0.3 * math.log(0.3 / s) + 0.7 * math.log(0.7 / (1 - s)))
    got = kd_loss_positive(z, q, torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), 2.0)
    assert got.item() == pytest.approx(want, rel=1e-6)


# -- integration --------------------------------------------------------------------------------

def _three_teachers():
    """Rows 0 and 1, 4 candidates, target column 0 on both. Teachers good1/good2 agree and put
    their mass on the target; 'wrong' puts its mass on column 2."""
    good1 = torch.tensor([[0.70, 0.10, 0.10, 0.10], [0.60, 0.20, 0.10, 0.10]])
    good2 = torch.tensor([[0.65, 0.15, 0.10, 0.10], [0.70, 0.10, 0.10, 0.10]])
    wrong = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.10, 0.10, 0.70, 0.10]])
    return {"good1": good1, "good2": good2, "wrong": wrong}, torch.tensor([0, 0])


@pytest.mark.parametrize("mode", ["confidence", "consistency", "both"])
def test_wrong_teacher_gets_less_weight(mode):
    probs, col = _three_teachers()
    q, w, r = integrate(probs, col, mode)
    assert (w["wrong"] < w["good1"]).all() and (w["wrong"] < w["good2"]).all()
    total = w["good1"] + w["good2"] + w["wrong"]
    assert torch.allclose(total, torch.ones(2))
    assert torch.allclose(q.sum(-1), torch.ones(2))
    mean_q = (probs["good1"] + probs["good2"] + probs["wrong"]) / 3
    assert (q[:, 0] > mean_q[:, 0]).all()  # the mixture moves towards the true item


def test_mean_mode_gives_equal_weights():
    probs, col = _three_teachers()
    q, w, _ = integrate(probs, col, "mean")
    for name in probs:
        assert torch.allclose(w[name], torch.full((2,), 1 / 3))
    assert torch.allclose(q, sum(probs.values()) / 3)


def test_confidence_weights_hand_computed():
    probs, col = _three_teachers()
    _, w, _ = integrate(probs, col, "confidence", a=1.0)
    # softmax(log c) = c / sum(c): row 0 c = (0.70, 0.65, 0.05)
    assert w["good1"][0].item() == pytest.approx(0.70 / 1.40)
    assert w["wrong"][0].item() == pytest.approx(0.05 / 1.40)


def test_consistency_is_one_minus_mean_normalised_js():
    probs, col = _three_teachers()
    _, w, _ = integrate(probs, col, "consistency", b=1.0)
    p = {k: v[0:1] for k, v in probs.items()}
    js = lambda x, y: js_divergence(p[x], p[y]).item() / math.log(2)  # noqa: E731
    cons = {"good1": 1 - (js("good1", "good2") + js("good1", "wrong")) / 2,
            "good2": 1 - (js("good2", "good1") + js("good2", "wrong")) / 2,
            "wrong": 1 - (js("wrong", "good1") + js("wrong", "good2")) / 2}
    z = sum(math.exp(c) for c in cons.values())
    for name, c in cons.items():
        assert w[name][0].item() == pytest.approx(math.exp(c) / z, rel=1e-5)


def test_instance_weight_lower_where_teachers_disagree():
    # Row 0: both teachers confident on the target. Row 1: they disagree (one on target, one not).
    t1 = torch.tensor([[0.8, 0.1, 0.1], [0.8, 0.1, 0.1]])
    t2 = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    _, _, r = integrate({"t1": t1, "t2": t2}, torch.tensor([0, 0]), "both")
    assert r[1] < r[0]
    assert r.mean().item() == pytest.approx(1.0)
    # Row 1 where both agree but are unsure of the target is also lowered.
    t3 = torch.tensor([[0.8, 0.1, 0.1], [0.34, 0.33, 0.33]])
    _, _, r2 = integrate({"t1": t3, "t2": t3.clone()}, torch.tensor([0, 0]), "both")
    assert r2[1] < r2[0]
    _, _, r_off = integrate({"t1": t1, "t2": t2}, torch.tensor([0, 0]), "both", instance_weighting=False)
    assert torch.equal(r_off, torch.ones(2))


def test_single_and_missing_teachers():
    probs, col = _three_teachers()
    q, w, _ = integrate({"good1": probs["good1"], "wrong": None}, col, "both")
    assert list(w) == ["good1"] and torch.allclose(w["good1"], torch.ones(2))
    assert torch.equal(q, probs["good1"])
    with pytest.raises(NoTeacherSignal):
        integrate({"a": None}, col, "both")


# -- total loss ---------------------------------------------------------------------------------

def _batch():
    targets = torch.tensor([5, 12, 5, 3])
    domains = torch.tensor([0, 1, 0, 0])
    cand, col, valid = build_candidates(targets, domains, 0, RANGES)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(4, 16, generator=g, requires_grad=True)
    scores = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(4, 3, generator=g), "c": None}
    return targets, domains, cand, col, valid, full, scores


def test_domain_ce_is_cross_entropy_over_the_domain_slice():
    targets, domains, *_, full, _ = _batch()
    want = torch.stack([F.cross_entropy(full[i, s:e][None], targets[i:i + 1] - s)
                        for i, (s, e) in enumerate(RANGES[d] for d in domains.tolist())]).mean()
    assert domain_ce(full, targets, domains, RANGES).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(DistillError, match="outside"):
        domain_ce(full, torch.tensor([12, 12, 5, 3]), domains, RANGES)  # row 0 is domain 0


def test_domain_ce_label_smoothing_spreads_eps_over_the_domain_items_only():
    targets, domains, *_, full, _ = _batch()
    eps = 0.2
    want = []
    for i, d in enumerate(domains.tolist()):
        s, e = RANGES[d]
        logp = torch.log_softmax(full[i, s:e], 0)
        # (1 - eps) on the target, eps spread uniformly over the domain's items (never PAD or the other domain)
        want.append(-(1 - eps) * logp[targets[i] - s] - eps * logp.mean())
    got = domain_ce(full, targets, domains, RANGES, label_smoothing=eps)
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-6)
    assert got.item() != pytest.approx(domain_ce(full, targets, domains, RANGES).item(), rel=1e-3)
    _, terms = DistillLoss(RANGES, {}, use_kd=False, label_smoothing=eps)(full, targets, domains)
    assert terms["ce"].item() == pytest.approx(got.item(), rel=1e-6)


def test_teacher_session_hands_train_label_smoothing_to_its_loss(scientific):
    from ckd.config import load_config
    from student.config import DistillConfig
    from student.teacher_session import TeacherSession

    cfg = load_config(DistillConfig, None, overrides=["train.label_smoothing=0.3"])
    session = TeacherSession(cfg, scientific, acc=None, pool=None, infos={})
    assert session.criterion.label_smoothing == pytest.approx(0.3)


@pytest.mark.parametrize("in_batch", [True, False])
def test_distill_loss_is_weighted_sum_of_named_terms(in_batch):
    targets, domains, cand, col, valid, full, scores = _batch()
    temps = {"a": 0.5, "b": 1.0, "c": 1.0}
    loss = DistillLoss(RANGES, temps, kd_weight=0.7, temperature=2.0, integration="both",
                       in_batch_negatives=in_batch)
    total, terms = loss(full, targets, domains, cand, col, valid, scores)
    probs = teacher_distributions(scores, temps, valid)
    q, _, r = integrate(probs, col, "both")
    z = full[:, cand]
    kd = kd_loss(z, q, valid, 2.0, r) if in_batch else kd_loss_positive(z, q, valid, col, 2.0, r)
    ce = domain_ce(full, targets, domains, RANGES)
    assert total.item() == pytest.approx((ce + 0.7 * kd).item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(ce.item()) and terms["kd"].item() == pytest.approx(kd.item())
    assert terms["kd_teachers"].item() == 2 and {"w/a", "w/b"} <= set(terms)
    total.backward()
    assert torch.isfinite(full.grad).all()


def test_distill_loss_switches_and_all_teachers_skipped():
    targets, domains, cand, col, valid, full, scores = _batch()
    temps = {"a": 1.0, "b": 1.0, "c": 1.0}
    ce_only = DistillLoss(RANGES, temps, use_kd=False)
    total, terms = ce_only(full, targets, domains)
    assert set(terms) == {"ce"}
    skipped = DistillLoss(RANGES, temps)
    total2, terms2 = skipped(full, targets, domains, cand, col, valid, {"a": None, "b": None})
    assert terms2["kd"].item() == 0.0 and terms2["kd_teachers"].item() == 0
    assert total2.item() == pytest.approx(total.item())
    kd_only = DistillLoss(RANGES, temps, use_ce=False)
    _, terms3 = kd_only(full, targets, domains, cand, col, valid, scores)
    assert "ce" not in terms3 and terms3["kd"].item() > 0
    with pytest.raises(DistillError, match="switched off"):
        DistillLoss(RANGES, temps, use_ce=False, use_kd=False)
    with pytest.raises(DistillError, match="integration"):
        DistillLoss(RANGES, temps, integration="max")


def test_kd_over_covered_rows_only_is_their_sum_over_the_whole_batch():
    """Teachers serving domain 0 only: KD is computed on the domain-0 rows and divided by all B
    rows (uncovered rows contribute 0); CE still covers every row."""
    torch.manual_seed(0)
    targets = torch.tensor([2, 12, 5, 14, 5])
    domains = torch.tensor([0, 1, 0, 1, 0])
    full = torch.randn(5, 16)
    rows = torch.tensor([0, 2, 4])
    cand, col, valid = build_candidates(targets[rows], domains[rows], 3, RANGES, torch.Generator().manual_seed(1))
    scores = {"a": torch.randn(3, len(cand))}
    loss = DistillLoss(RANGES, {"a": 1.0}, kd_weight=1.0, temperature=1.0, instance_weighting=False)
    total, terms = loss(full, targets, domains, cand, col, valid, scores, kd_rows=rows)
    q = torch.softmax(scores["a"], -1)
    log_s = torch.log_softmax(full[rows][:, cand], -1)
    by_hand = (q * (q.log() - log_s)).sum() / 5
    assert terms["kd"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert total.item() == pytest.approx((domain_ce(full, targets, domains, RANGES) + by_hand).item(), rel=1e-5)


def test_pairwise_js_equals_the_kl_form_with_masked_columns():
    """The entropy form the integration uses (one log per pair) gives the reference KL-form JS of
    every pair, also where columns are masked (p = 0, log p = -inf) and with the logs given."""
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(6, 40, generator=g) > 0.3
    valid[:, 0] = True
    scores = {f"t{k}": 3 * torch.randn(6, 40, generator=g, dtype=torch.float64) for k in range(3)}
    log_p = {n: masked_log_softmax(s, valid) for n, s in scores.items()}
    P = torch.stack([lp.exp() for lp in log_p.values()])
    ref = torch.stack([torch.stack([js_divergence(P[t], P[u]) for u in range(3)]) for t in range(3)])
    for got in (pairwise_js(P), pairwise_js(P, torch.stack(list(log_p.values())))):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert float(ref.max()) > 0.05  # distinct teachers: a real divergence to match, not zeros


def test_teacher_better_gate_stops_kd_where_the_student_already_beats_the_teacher():
    """Three rows of one domain, candidates [1, 2, 3], target column 0 for each. Teacher
    probabilities of the true item 0.5 in every row; the student's (T = 1) are by hand
    e^2/(e^2+2) = 0.787 (row 0), 1/3 (row 1), e^1/(e^1+2) = 0.576 (row 2). So the gate is open on
    row 1 only; KD = the row-1 KL alone over the 3 rows, and with floor 0.25 the other two add a
    quarter of theirs."""
    targets = torch.tensor([1, 1, 1])
    domains = torch.tensor([0, 0, 0])
    cand = torch.tensor([1, 2, 3])
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.5, 0.25, 0.25]] * 3)
    valid = torch.ones(3, 3, dtype=torch.bool)
    col = torch.zeros(3, dtype=torch.long)
    s_true = [math.e ** 2 / (math.e ** 2 + 2), 1 / 3, math.e / (math.e + 2)]
    assert [v > 0.5 for v in s_true] == [True, False, True]
    assert teacher_better_gate(q, z, valid, col, 1.0).tolist() == [0.0, 1.0, 0.0]
    assert teacher_better_gate(q, z, valid, col, 1.0, floor=0.25).tolist() == [0.25, 1.0, 0.25]
    # A student tempered at T = 4 is flatter: row 0's e^0.5/(e^0.5+2) = 0.452 < 0.5, so it opens too.
    assert teacher_better_gate(q, z, valid, col, 4.0).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(DistillError, match="gate floor"):
        teacher_better_gate(q, z, valid, col, 1.0, floor=1.5)

    def kl(row: int) -> float:
        s = _softmax(z[row].tolist())
        return sum(p * math.log(p / sv) for p, sv in zip(q[row].tolist(), s))

    full = torch.zeros(3, 16)
    full[:, 1:4] = z
    # Teacher scores whose softmax (tau 1) is q; no instance weighting, so r = 1 before the gate.
    scores = {"a": q.log()}
    for floor, expect in ((0.0, kl(1) / 3), (0.25, (0.25 * kl(0) + kl(1) + 0.25 * kl(2)) / 3)):
        loss = DistillLoss(RANGES, {"a": 1.0}, temperature=1.0, instance_weighting=False, use_ce=False,
                           gate="teacher_better", gate_floor=floor)
        _, terms = loss(full, targets, domains, cand, col, valid, scores)
        assert terms["kd"].item() == pytest.approx(expect, rel=1e-5)
        assert terms["gate_open"].item() == pytest.approx(1 / 3)
        assert loss.last_gate.tolist() == [floor, 1.0, floor]
    _, ungated = DistillLoss(RANGES, {"a": 1.0}, temperature=1.0, instance_weighting=False,
                             use_ce=False)(full, targets, domains, cand, col, valid, scores)
    assert ungated["kd"].item() == pytest.approx((kl(0) + kl(1) + kl(2)) / 3, rel=1e-5)
    assert "gate_open" not in ungated
    with pytest.raises(DistillError, match="unknown KD gate"):
        DistillLoss(RANGES, {"a": 1.0}, gate="always")


THREE_DOMAINS = [(1, 41), (41, 61), (61, 161)]


def _three_domain_batch(kd_rows: bool):
    """48 rows of three domains of unequal size (161 items), shuffled; sampled negatives, so the
    candidates are not in domain order; three teachers' scores. Returns (targets, domains, kd rows or
    None, the KD rows' domains, candidates, target columns, valid mask, scores)."""
    ranges = THREE_DOMAINS
    g = torch.Generator().manual_seed(3)
    domains = torch.tensor([0] * 6 + [1] * 10 + [2] * 32)[torch.randperm(48, generator=g)]
    targets = torch.stack([torch.randint(ranges[d][0], ranges[d][1], (1,), generator=g)[0] for d in domains.tolist()])
    rows = torch.nonzero(domains != 1).squeeze(1) if kd_rows else None
    t_rows, t_doms = (targets, domains) if rows is None else (targets[rows], domains[rows])
    cand, col, valid = build_candidates(t_rows, t_doms, 12, ranges, torch.Generator().manual_seed(4))
    scores = {f"t{k}": torch.randn(len(t_rows), len(cand), generator=g) * 0.3 for k in range(3)}
    return targets, domains, rows, t_doms, cand, col, valid, scores


@pytest.mark.parametrize("in_batch, gate, integration, kd_rows", [
    (True, "none", "both", False), (True, "teacher_better", "both", True),
    (False, "none", "mean", True), (True, "none", "confidence", False)])
def test_by_domain_blocks_give_the_masked_path_s_loss_terms_and_gradient(in_batch, gate, integration, kd_rows):
    """Three domains of unequal size in one batch, sampled negatives (so the candidates are not in
    domain order), one teacher skipped: the per-domain blocks give the masked path's KD, diagnostics,
    gate and gradient to float32 rounding."""
    ranges, B, V = THREE_DOMAINS, 48, 161
    targets, domains, rows, _, cand, col, valid, scores = _three_domain_batch(kd_rows)
    scores["t1"] = None  # skipped for this batch
    temps = {n: 0.1 for n in scores}
    got = {}
    for by_domain in (True, False):
        full = (torch.randn(B, V, generator=torch.Generator().manual_seed(5)) * 2).requires_grad_()
        loss = DistillLoss(ranges, temps, temperature=1.5, integration=integration, in_batch_negatives=in_batch,
                           gate=gate, by_domain=by_domain)
        total, terms = loss(full, targets, domains, cand, col, valid, scores, kd_rows=rows)
        total.backward()
        got[by_domain] = (total.detach(), terms, full.grad, loss.last_gate)
    (t_a, terms_a, grad_a, gate_a), (t_b, terms_b, grad_b, gate_b) = got[True], got[False]
    torch.testing.assert_close(t_a, t_b, rtol=1e-5, atol=1e-6)
    assert set(terms_a) == set(terms_b) and terms_b["kd"] > 0
    for k in terms_a:
        torch.testing.assert_close(terms_a[k], terms_b[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)
    if gate != "none":
        assert torch.equal(gate_a, gate_b) and 0 < float(gate_a.mean()) < 1


def test_a_mask_other_than_the_domains_own_takes_the_masked_path():
    loss = DistillLoss(RANGES, {"a": 1.0})
    targets, domains = torch.tensor([5, 12, 3]), torch.tensor([0, 1, 0])
    cand, _, valid = build_candidates(targets, domains, 0, RANGES)
    assert [len(r) for r, _ in loss._domain_blocks(cand, valid, domains)] == [2, 1]
    narrowed = valid.clone()
    narrowed[0, 0] = False  # row 0 may not see one of its domain's candidates: no longer blockwise
    assert loss._domain_blocks(cand, narrowed, domains) is None


@pytest.mark.parametrize("gate, kd_rows", [("none", False), ("teacher_better", True)])
def test_targets_computed_beforehand_give_the_same_loss_terms_and_gradient(gate, kd_rows):
    """kd.targets_on=prefetch: ``DistillLoss.targets`` from the scores alone, then ``forward`` with
    ``kd_targets`` and no scores, equals the loss computed in the step, bit for bit (same maths, same
    order); a mask that is not the domains' own gives no targets (the step then computes them)."""
    ranges, B, V = THREE_DOMAINS, 48, 161
    targets, domains, rows, t_doms, cand, col, valid, scores = _three_domain_batch(kd_rows)
    loss = DistillLoss(ranges, {n: 0.2 for n in scores}, temperature=1.5, gate=gate)
    got = []
    for before in (False, True):
        full = (torch.randn(B, V, generator=torch.Generator().manual_seed(9)) * 2).requires_grad_()
        kw = {}
        if before:
            kw["kd_targets"] = loss.targets(cand, col, valid, t_doms, scores)
            assert kw["kd_targets"] is not None and kw["kd_targets"].present == ["t0", "t1", "t2"]
        total, terms = loss(full, targets, domains, cand, col, valid, None if before else scores, kd_rows=rows, **kw)
        total.backward()
        got.append((total.detach(), terms, full.grad, loss.last_gate))
    (t_a, terms_a, grad_a, gate_a), (t_b, terms_b, grad_b, gate_b) = got
    assert torch.equal(t_a, t_b) and terms_a.keys() == terms_b.keys() and terms_a["kd"] > 0
    assert all(torch.equal(terms_a[k], terms_b[k]) for k in terms_a)
    assert torch.equal(grad_a, grad_b)
    if gate != "none":
        assert torch.equal(gate_a, gate_b) and 0 < float(gate_a.mean()) < 1
    narrowed = valid.clone()
    narrowed[0, int(col[0])] = False
    assert loss.targets(cand, col, narrowed, t_doms, scores) is None
    assert DistillLoss(ranges, {n: 0.2 for n in scores}, by_domain=False).targets(cand, col, valid, t_doms,
                                                                                    scores) is None


def test_teacher_session_attaches_targets_for_the_covered_rows_only(data_dir):
    """A student on Scientific + Office14 whose teacher covers Scientific only: the targets the
    prefetch attaches (``attach_targets``) describe the covered rows, and the session's loss from
    them equals the loss computed from the scores in the step, bit for bit."""
    import dataclasses
    from types import SimpleNamespace

    import numpy as np

    from ckd.config import load_config
    from ckd.data.multidomain import load_multidomain
    from student.config import DistillConfig
    from student.models.base import StudentBatch
    from student.teacher_session import TeacherSession

    ds = load_multidomain(data_dir, ["Scientific", "Office14"])
    cfg = load_config(DistillConfig, None, overrides=["kd.num_sampled=16", "kd.targets_on=prefetch"])
    session = TeacherSession(cfg, ds, acc=None, pool=None, infos={"t": SimpleNamespace(temperature=0.5)},
                             covered_domains=1)
    ex = ds.splits["train"]
    rows = np.concatenate([np.nonzero(ex.domains == d)[0][:12] for d in (0, 1)])
    rows = rows[np.random.default_rng(0).permutation(rows.size)]
    L = int(ex.lengths[rows].max())
    batch = StudentBatch(*(torch.as_tensor(a) for a in (ex.users[rows], ex.domains[rows], ex.histories[rows, :L],
                                                        ex.lengths[rows], ex.targets[rows])))
    pb = session.prepare(batch, step_seed=5)
    assert pb.kd_rows.tolist() == torch.nonzero(batch.domains == 0).squeeze(1).tolist()
    scores = np.random.default_rng(1).normal(size=(len(pb.kd_rows), len(pb.candidates))).astype(np.float32)
    in_step = dataclasses.replace(pb)
    session.attach_targets(pb, {"t": scores})
    assert pb.kd_targets is not None and pb.kd_targets.n_rows == 12 and in_step.kd_targets is None
    logits = torch.randn(len(batch), ds.vocab_size, generator=torch.Generator().manual_seed(2))
    got = [session.loss(logits, p, batch, {"t": scores}) for p in (pb, in_step)]
    assert torch.equal(got[0][0], got[1][0]) and got[0][1] == got[1][1] and got[0][1]["kd"] > 0
