"""Integration weights on a hand-built batch where one teacher is confidently wrong: every mode
gives the weights its formula says (computed here independently, in numpy), and the reliability
prior is what takes the wrong teacher out."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from student.distill import integrate, reliability_prior

pytestmark = pytest.mark.unit

# 2 rows, 3 candidates, true item in column 0 for both rows.
GOOD1 = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
GOOD2 = np.array([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]])
WRONG = np.array([[0.02, 0.96, 0.02], [0.01, 0.01, 0.98]])  # confident, and wrong
TARGET = np.array([0, 0])


def _kl(p, q):
    return np.sum(np.where(p > 0, p * np.log(p / q), 0.0), axis=-1)


def _js(p, q):
    m = 0.5 * (p + q)
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def _hand(mode, a=1.0, b=1.0, prior=None):
    P = np.stack([GOOD1, GOOD2, WRONG])
    conf = P[:, [0, 1], TARGET]
    js = np.zeros((3, 3, 2))
    for t in range(3):
        for u in range(3):
            if t != u:
                js[t, u] = _js(P[t], P[u]) / math.log(2)
    cons = np.clip(1 - js.sum(1) / 2, 0, 1)
    g = {"both": a * np.log(conf) + b * cons, "confidence": a * np.log(conf), "consistency": b * cons,
         "mean": np.zeros_like(conf)}[mode]
    if prior is not None:
        g = g + np.array(prior)[:, None]
    w = np.exp(g - g.max(0))
    return w / w.sum(0)


def _run(mode, log_prior=None):
    probs = {n: torch.tensor(p, dtype=torch.float64) for n, p in (("good1", GOOD1), ("good2", GOOD2), ("wrong", WRONG))}
    q, w, r = integrate(probs, torch.tensor(TARGET), mode, 1.0, 1.0, instance_weighting=True, log_prior=log_prior)
    return q, np.stack([w["good1"].numpy(), w["good2"].numpy(), w["wrong"].numpy()])


@pytest.mark.parametrize("mode", ["mean", "confidence", "consistency", "both"])
def test_each_mode_gives_the_weights_of_its_formula(mode):
    q, w = _run(mode)
    np.testing.assert_allclose(w, _hand(mode), rtol=1e-10)
    P = np.stack([GOOD1, GOOD2, WRONG])
    np.testing.assert_allclose(q.numpy(), np.einsum("mb,mbc->bc", w, P), rtol=1e-10)
    if mode == "mean":
        np.testing.assert_allclose(w, 1 / 3)
    if mode in ("confidence", "both"):  # the wrong teacher's low p(true) lowers its weight
        assert (w[2] < w[0]).all() and (w[2] < w[1]).all()


def test_consistency_alone_cannot_tell_who_is_wrong_when_only_agreement_counts():
    """With consistency only, the wrong teacher loses weight only as far as it disagrees; it keeps a
    sizeable share (what the corrupted-teacher experiment measures), so the prior is needed."""
    _, w = _run("consistency")
    assert (w[2] > 0.15).all()


def test_reliability_prior_takes_the_wrong_teacher_out():
    # R_t: mean log p(true) over (here, two) training rows
    R = {n: float(np.log(p[[0, 1], TARGET]).mean()) for n, p in (("good1", GOOD1), ("good2", GOOD2), ("wrong", WRONG))}
    prior = reliability_prior(R, strength=2.0)
    x = 2.0 * np.array([R["good1"], R["good2"], R["wrong"]])
    expected = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
    np.testing.assert_allclose([prior["good1"], prior["good2"], prior["wrong"]], expected, rtol=1e-12)
    for mode in ("mean", "consistency", "both"):
        _, w = _run(mode, log_prior=prior)
        np.testing.assert_allclose(w, _hand(mode, prior=list(expected)), rtol=1e-10)
        assert (w[2] < 0.01).all(), (mode, w[2])
