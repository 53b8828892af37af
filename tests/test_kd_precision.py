"""KD in float32 against the float64 reference, on real Scientific batches (issue 21).

The student is a small seeded SASRec trained for a few CE steps on real rows (so its logits have a
realistic spread, not the near-uniform ones of a fresh initialisation); candidates come from
``student.distill.build_candidates`` on a real batch (in-batch, in-batch + 256 sampled, and the
whole catalogue of 4,385 items); q is what a run distils: two teacher-like score matrices (the
student's logits scaled and perturbed) through ``teacher_distributions`` and ``integrate``, with
the instance weights r. Near-zero KL: q equal to the student's own tempered softmax, and q a hair
(1e-3 in logit space) away from it.

Stated tolerances (eps32 = 1.19e-7, the float32 machine epsilon):
  loss      |L32 - L64| <= 1e-5 * |L64| + 8 * eps32 * T^2 * mean_i r_i (H(q_i) + H(q_i, s_i))
            (near its minimum KL is a difference of two O(log C) sums, so its float32 value has an
            absolute rounding floor; this floor is 3e-7 to 6e-5 on these cases, and the measured
            error is at most 6e-8 on every one of them; at q = s float32 gives -3e-8..+5e-8 where
            float64 gives |L| < 1e-9)
  gradient  ||g32 - g64||_F <= 1e-5 * ||g64||_F + 32 * eps32 * (T / B) * ||r_i s_i||_F
            (the gradient is r_i T (s_i - q_i) / B with no cancellation beyond float32 rounding of
            s; measured: relative 3e-8 to 2e-7 away from the minimum; near it the gradient itself
            is 1e-12 to 6e-6, the error at most 2.3e-9, under a floor of 1.6e-9 to 4.2e-8, i.e.
            10x to 20x inside it)
No case needs float64, so the default precision is float32 (student/distill.py ``_kd_dtype``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from student.distill import (DistillError, DistillLoss, build_candidates, domain_ce, integrate, kd_loss,
                             kd_loss_positive, masked_log_softmax, teacher_distributions)
from student.models import build_student
from student.trainer import make_student_batch

pytestmark = pytest.mark.unit

EPS32 = float(torch.finfo(torch.float32).eps)
RTOL = 1e-5
LOSS_FLOOR = 8.0  # x eps32 x T^2 x mean r (H(q) + H(q, s))
GRAD_FLOOR = 32.0  # x eps32 x T / B x ||r s||


@pytest.fixture(scope="module")
def real_batch(scientific):
    """(full logits [B, V] of a briefly trained seeded SASRec on a real batch, the batch, ranges)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is fastest on a shared box
    try:
        return _train_briefly(scientific)
    finally:
        torch.set_num_threads(threads)


def _train_briefly(ds):
    torch.manual_seed(0)
    ranges = [ds.domain_range(d) for d in range(ds.num_domains)]
    model = build_student("sasrec", ds, hidden=32, layers=1, heads=1, dropout=0.0, attn_dropout=0.0, max_len=50)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    rng = np.random.default_rng(0)
    n = len(ds.splits["train"])
    for _ in range(30):
        b = make_student_batch(ds, "train", rng.choice(n, 256, replace=False))
        loss = domain_ce(model(b), b.targets, b.domains, ranges)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = make_student_batch(ds, "train", rng.choice(n, 256, replace=False))
    with torch.no_grad():
        full = model(batch)
    assert full.dtype == torch.float32 and float(full[:, 1:].std()) > 0.3  # a real spread of scores
    return full, batch, ranges


def _candidates(real_batch, k: int):
    full, batch, ranges = real_batch
    cands, tcol, valid = build_candidates(batch.targets, batch.domains, k, ranges, torch.Generator().manual_seed(1))
    return full[:, cands].contiguous(), tcol, valid


def _teacher_q(z: torch.Tensor, tcol: torch.Tensor, valid: torch.Tensor, temps: tuple[float, float]):
    """The integrated q and r of two teacher-like score matrices (scaled, perturbed student logits)."""
    g = torch.Generator().manual_seed(2)
    scores = {f"t{k}": z * 1.5 + 0.5 * torch.randn(z.shape, generator=g) for k in range(2)}
    probs = teacher_distributions(scores, {"t0": temps[0], "t1": temps[1]}, valid)
    q, _, r = integrate(probs, tcol)
    return q, r


def _near(z: torch.Tensor, valid: torch.Tensor, T: float, hair: float) -> torch.Tensor:
    """The student's own tempered softmax (hair = 0) or one `hair` away in logit space, as float32."""
    zz = z.double()
    if hair:
        zz = zz + hair * torch.randn(z.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return masked_log_softmax(zz, valid, T).exp().float()


def _loss_and_grad(fn, z: torch.Tensor, precision: str, *args):
    zz = z.clone().requires_grad_(True)
    loss = fn(zz, *args, precision=precision)
    loss.backward()
    return loss.detach().double().item(), zz.grad.double()


def _bounds(z, q, valid, T, r):
    """(loss floor, gradient floor) of the stated tolerances, from the float64 quantities."""
    log_s = masked_log_softmax(z.double(), valid, T)
    qd = q.double().masked_fill(~valid, 0.0)
    ent = -torch.xlogy(qd, qd).sum(-1)
    cross = -(qd * log_s.masked_fill(~valid, 0.0)).sum(-1)
    rd = r.double()
    loss_floor = LOSS_FLOOR * EPS32 * T * T * float((rd * (ent + cross)).mean())
    grad_floor = GRAD_FLOOR * EPS32 * T / z.shape[0] * float((rd[:, None] * log_s.exp()).norm())
    return loss_floor, grad_floor


CASES = [  # (name, sampled negatives K, teacher temperatures, student T)
    ("in_batch", 0, (0.5, 1.0), 1.0),
    ("in_batch_T2", 0, (0.5, 1.0), 2.0),
    ("sampled_256", 256, (0.5, 1.0), 1.0),
    ("whole_catalogue", 4385, (0.5, 1.0), 1.0),
    ("whole_catalogue_T2", 4385, (0.5, 1.0), 2.0),
    ("whole_catalogue_peaked", 4385, (0.07, 0.07), 1.0),  # the text teachers' tau: nearly one-hot q
]


@pytest.mark.parametrize("name,k,temps,T", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("target", ["teachers", "self", "hair"])
def test_float32_kd_matches_float64(real_batch, name, k, temps, T, target):
    z, tcol, valid = _candidates(real_batch, k)
    if k:
        assert valid.sum(-1).min() > 200  # sampled columns are there
    q, r = _teacher_q(z, tcol, valid, temps)
    if target != "teachers":
        q = _near(z, valid, T, 0.0 if target == "self" else 1e-3)
    for fn, extra in ((kd_loss, (q, valid, T, r)), (kd_loss_positive, (q, valid, tcol, T, r))):
        l32, g32 = _loss_and_grad(fn, z, "float32", *extra)
        l64, g64 = _loss_and_grad(fn, z, "float64", *extra)
        loss_floor, grad_floor = _bounds(z, q, valid, T, r)
        what = f"{fn.__name__} {name} q={target}"
        assert math.isfinite(l32) and torch.isfinite(g32).all(), what
        assert abs(l32 - l64) <= RTOL * abs(l64) + loss_floor, f"{what}: loss {l32!r} vs {l64!r}"
        g_err = float((g32 - g64).norm())
        assert g_err <= RTOL * float(g64.norm()) + grad_floor, f"{what}: gradient error {g_err:.3e}"
        if target == "teachers":
            # Away from the minimum the floors do not matter: plain relative agreement.
            assert abs(l32 - l64) <= 1e-5 * abs(l64), what
            assert g_err <= 1e-5 * float(g64.norm()), what
        else:
            # Near-zero KL: float32 gives a value within its floor of 0 (float64: within ~1e-9).
            assert abs(l64) < (1e-8 if target == "self" else 1e-5), f"{what}: reference {l64!r} not near 0"
            assert abs(l32) <= abs(l64) + loss_floor, f"{what}: float32 {l32!r}"


def test_float32_is_the_default_and_widens_half_precision(real_batch):
    z, tcol, valid = _candidates(real_batch, 0)
    q, r = _teacher_q(z, tcol, valid, (0.5, 1.0))
    # The function default follows the logits (float32 here); the run's default is float32 too.
    assert kd_loss(z, q, valid, 1.0, r).item() == kd_loss(z, q, valid, 1.0, r, precision="float32").item()
    crit = DistillLoss([(1, 4386)], {"t": 1.0})
    assert crit.kd_precision == "float32"
    # bf16 logits are widened to float32 for the maths, never computed in bf16.
    zb = z.bfloat16()
    assert kd_loss(zb, q, valid, 1.0, r).item() == kd_loss(zb.float(), q, valid, 1.0, r, precision="float32").item()
    with pytest.raises(DistillError, match="precision"):
        kd_loss(z, q, valid, 1.0, r, precision="float16")
    with pytest.raises(DistillError, match="precision"):
        DistillLoss([(1, 4386)], {"t": 1.0}, kd_precision="bf16")


def test_distill_loss_precision_switch_and_timings(real_batch):
    """DistillLoss runs the KD term in the configured precision (same value to the stated
    tolerance) and, when asked, times its parts."""
    full, batch, ranges = real_batch
    cands, tcol, valid = build_candidates(batch.targets, batch.domains, 0, ranges)
    g = torch.Generator().manual_seed(4)
    scores = {"a": full[:, cands] + 0.3 * torch.randn(len(batch), len(cands), generator=g)}
    out = {}
    for prec in ("float32", "float64"):
        crit = DistillLoss(ranges, {"a": 1.0}, temperature=1.0, kd_precision=prec)
        crit.timings = {}
        _, terms = crit(full, batch.targets, batch.domains, cands, tcol, valid, scores)
        out[prec] = float(terms["kd"])
        assert set(crit.timings) == {"ce", "kd_targets", "kd_loss"} and all(v >= 0 for v in crit.timings.values())
    assert out["float32"] == pytest.approx(out["float64"], rel=1e-5)


def test_config_precision_is_checked():
    from ckd.config import ConfigError
    from student.config import KDConfig

    assert KDConfig().precision == "float32"
    KDConfig(precision="float64").validate()
    with pytest.raises(ConfigError, match="kd.precision"):
        KDConfig(precision="half").validate()
