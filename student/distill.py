"""In-batch multi-teacher distillation: candidates, teacher distributions, integration, losses.

Notation: a batch of B rows (history h_i, target v_i, domain d_i); candidates C (global item ids);
teacher t's raw scores S^t [B, |C|]; the student's logits Z [B, |C|] on the same candidates.

Candidates (``build_candidates``): C = the batch's *distinct* targets (in-batch negatives), then
optionally K sampled items of the batch's domains (K split over the domains in proportion to their
rows; items sampled without replacement and never equal to a batch target). ``target_col[i]`` is
the column of v_i. Two kinds of column must not act as a negative for row i:
  * another row's target equal to v_i -- "masking duplicate positives" holds by construction,
    because equal targets collapse into one column, which is row i's own positive;
  * items of another domain -- a user of domain d_i is ranked only against d_i's catalogue (the
    evaluation protocol), so a cross-domain item is not a valid negative.
So the mask is ``valid_mask[i, j] = domain(C_j) == d_i``; masked columns get probability 0 in
every distribution below, and row i's own positive is always valid.

Teacher distribution: p^t_i = softmax over valid j of S^t_ij / tau_t.

Integration (``integrate``), per row i over the teachers present for the batch:
  confidence   c^t_i    = p^t_i[v_i]
  consistency  cons^t_i = 1 - mean_{u != t} JS(p^t_i, p^u_i) / ln 2   (in [0, 1]; 1 for one teacher)
  weights      w^t_i    = softmax_t(g^t_i),  g = a*log c + b*cons ("both"), a*log c ("confidence"),
                          b*cons ("consistency"), 0 ("mean")
  mixture      q_i      = sum_t w^t_i p^t_i
  instance     r~_i     = q_i[v_i]^gamma * mean_t cons^t_i,    r_i = min(r_max, r~_i / mean_k r~_k)
r_i is small where the mixture is unsure of the true item or the teachers disagree; dividing by
the batch mean keeps the average KD scale at 1 (so lambda keeps its meaning), and r_max bounds a
single row's weight in a batch where nearly every row is down-weighted (only then is the clipped
mean below 1). gamma < 1 softens the confidence factor, since q_i[v_i] also shrinks with the number
of valid candidates of row i's domain. ``instance_weighting=False`` gives r = 1.

Teacher prior (``log_prior``, ``kd.teacher_prior=reliability``): a per-teacher term added to every
row's g before the softmax, g^t_i += log pi_t, with pi = softmax_t(kappa * R_t) and R_t = teacher
t's mean log-probability of the true item over the training rows (scored once before training,
against the true item and K seeded negatives; ``reliability_prior``). The per-row modes measure
confidence and agreement, which a teacher that is confident and wrong passes; R_t is its agreement
with the ground truth, which it fails, so its weight falls by exp(-kappa * (R_best - R_t)).

KD loss (``kd_loss``): KD = mean_i r_i * T^2 * KL(q_i || softmax(Z_i / T)) over valid columns
(0 log 0 = 0); zero exactly when the student's tempered softmax equals q. Computed in float32
by default (``precision``; float64 stays available as a reference): tests/test_kd_precision.py
bounds the difference on real batches, near-zero KL included. Returned as float32.
A row whose domain has a single valid column (its positive alone) contributes 0: give the batch
sampled negatives (K > 0) or several rows per domain.

Positive-only ablation ("without in-batch negatives", ``kd_loss_positive``): the teachers' ranking
among the negatives is not distilled; only the probability of the true item is, as a binary KD
term  mean_i r_i * T^2 * KL(Bern(q_i[v_i]) || Bern(s_i[v_i])), s_i = softmax(Z_i / T) over the same
valid candidates (the negatives collapse into one "other" outcome). The teacher request and the
integration weights are unchanged, so the ablation isolates what the loss distils.

Teacher-better gate (``kd.gate=teacher_better``, ``teacher_better_gate``): g_i = 1 when the mixture
puts more probability on the true item than the student's tempered softmax over the same valid
candidates (q_i[v_i] > s_i[v_i], s detached), else ``gate_floor``; KD then uses r_i * g_i. The
integration weighs teachers against each other, so where every teacher is weaker than the student
(a domain they saw little of) it still distils the best of them at full strength; the gate stops
distilling a row once the student already ranks its true item above the teachers' mixture. It is
applied after r is normalised, so the batch's KD scale falls as the student outgrows the teachers.

Total (``DistillLoss``): L = w_ce * CE(Z over all items of d_i, v_i) + lambda * KD, a
torchdistill-style weighted sum of named terms, each with a switch.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

INTEGRATION_MODES = ("mean", "confidence", "consistency", "both")
KD_GATES = ("none", "teacher_better")
_LN2 = math.log(2.0)


class DistillError(ValueError):
    """Inputs to the distillation maths do not fit together (shapes, domains, non-finite scores)."""


class NoTeacherSignal(DistillError):
    """Every teacher is missing for this batch (all skipped): there is nothing to distil."""


# --------------------------------------------------------------------------------------------
# Candidates


def candidate_domains(candidates: torch.Tensor, domain_ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Domain id of each candidate (global id) from the [start, stop) ranges; -1 if in none."""
    dom = torch.full_like(candidates, -1)
    for d, (start, stop) in enumerate(domain_ranges):
        dom[(candidates >= start) & (candidates < stop)] = d
    return dom


def _split_quota(k: int, counts: list[int]) -> list[int]:
    """Split k over groups in proportion to counts (largest remainder, ties to the earlier group)."""
    total = sum(counts)
    raw = [k * c / total for c in counts]
    quota = [math.floor(x) for x in raw]
    rest = sorted(range(len(counts)), key=lambda g: (-(raw[g] - quota[g]), g))
    for g in rest[: k - sum(quota)]:
        quota[g] += 1
    return quota


def build_candidates(targets: torch.Tensor, domains: torch.Tensor, num_sampled: int,
                     domain_ranges: Sequence[tuple[int, int]],
                     generator: torch.Generator | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates [C], each row's positive column [B], and valid_mask [B, C] (see module doc).

    Columns are the sorted distinct targets, then the sampled negatives. ``num_sampled`` = K;
    a domain with fewer non-target items than its share gets all of them.
    """
    if targets.ndim != 1 or domains.shape != targets.shape:
        raise DistillError(f"targets {tuple(targets.shape)} and domains {tuple(domains.shape)} must be [B]")
    if num_sampled < 0:
        raise DistillError(f"num_sampled must be >= 0, got {num_sampled}")
    tdom = candidate_domains(targets, domain_ranges)
    if not torch.equal(tdom, domains):
        bad = int(torch.nonzero(tdom != domains)[0, 0])
        raise DistillError(f"row {bad}: target {int(targets[bad])} is not an item of domain "
                           f"{int(domains[bad])} (ranges {list(domain_ranges)})")
    uniq, target_col = torch.unique(targets, sorted=True, return_inverse=True)
    parts = [uniq]
    if num_sampled > 0:
        doms, counts = torch.unique(domains, sorted=True, return_counts=True)
        quota = _split_quota(num_sampled, counts.tolist())
        for d, k in zip(doms.tolist(), quota):
            if k == 0:
                continue
            start, stop = domain_ranges[d]
            perm = torch.randperm(stop - start, generator=generator) + start
            perm = perm[~torch.isin(perm, uniq)]
            parts.append(perm[:k].to(targets.device))
    candidates = torch.cat(parts)
    valid_mask = candidate_domains(candidates, domain_ranges).unsqueeze(0) == domains.unsqueeze(1)
    return candidates, target_col, valid_mask


# --------------------------------------------------------------------------------------------
# Distributions and integration


def masked_log_softmax(logits: torch.Tensor, valid_mask: torch.Tensor | None,
                       temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) over valid columns; invalid columns are -inf. ``valid_mask`` None:
    every column is valid (one domain's block of a batch)."""
    if temperature <= 0:
        raise DistillError(f"temperature must be > 0, got {temperature}")
    z = logits / temperature
    if valid_mask is not None:
        z = z.masked_fill(~valid_mask, float("-inf"))
    return torch.log_softmax(z, dim=-1)


def teacher_log_distributions(scores: Mapping[str, torch.Tensor | None], temps: Mapping[str, float],
                              valid_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """log p^t = log_softmax(S^t / tau_t) over valid columns (-inf elsewhere), per teacher;
    teachers given as None (skipped for this batch) are left out. ``valid_mask`` None: every
    column is valid."""
    out: dict[str, torch.Tensor] = {}
    all_valid = valid_mask is None or bool(valid_mask.all())
    for name, s in scores.items():
        if s is None:
            continue
        if valid_mask is not None and s.shape != valid_mask.shape:
            raise DistillError(f"teacher {name}: scores {tuple(s.shape)} != candidates "
                               f"{tuple(valid_mask.shape)}")
        if name not in temps:
            raise DistillError(f"teacher {name}: no temperature given")
        # Teachers are never trained through the KD loss; detached, the masked p log p terms below
        # (0 * -inf where p = 0) cannot put NaN into a gradient.
        s = s.detach().float()
        # One pass when every score is finite (the usual case); only then are the valid columns
        # looked at one by one (boolean indexing copies, which costs at a whole-catalogue width).
        if not bool(torch.isfinite(s).all()) and (
                all_valid or not bool(torch.isfinite(s.masked_fill(~valid_mask, 0.0)).all())):
            raise DistillError(f"teacher {name}: non-finite scores on valid candidates")
        out[name] = masked_log_softmax(s, valid_mask, float(temps[name]))
    return out


def teacher_distributions(scores: Mapping[str, torch.Tensor | None], temps: Mapping[str, float],
                          valid_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """p^t = softmax(S^t / tau_t) over valid columns, per teacher; teachers given as None (skipped
    for this batch) are left out."""
    return {n: lp.exp() for n, lp in teacher_log_distributions(scores, temps, valid_mask).items()}


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, 0 log 0 = 0 (q > 0 wherever p > 0 is the caller's job)."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row (natural log, in [0, ln 2]): the reference definition,
    0.5 KL(p || m) + 0.5 KL(q || m) with m the average."""
    m = 0.5 * (p + q)
    return 0.5 * _kl_rows(p, m) + 0.5 * _kl_rows(q, m)


def _plogp_rows(p: torch.Tensor, log_p: torch.Tensor | None = None) -> torch.Tensor:
    """sum_c p log p per row (0 log 0 = 0), from ``log_p`` when given (no log taken)."""
    if log_p is None:
        return torch.xlogy(p, p).sum(-1)
    return torch.where(p > 0, p * log_p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)


def pairwise_js(P: torch.Tensor, log_P: torch.Tensor | None = None) -> torch.Tensor:
    """[M, M, B] Jensen-Shannon divergences of every pair of the M distributions P [M, B, C], as
    JS = H(m) - (H(p) + H(q)) / 2, the same value as ``js_divergence`` up to rounding (at least 0).

    One logarithm per pair over [B, C] (none per teacher when ``log_P`` is given), against four for
    the KL form: at a whole-catalogue width the teachers' consistency cost the student more than
    its own KD loss (issue 21)."""
    M = P.shape[0]
    neg_h = torch.stack([_plogp_rows(P[t], None if log_P is None else log_P[t]) for t in range(M)])  # [M, B]
    js = torch.zeros(M, M, P.shape[1], dtype=P.dtype, device=P.device)
    for t in range(M):
        for u in range(t + 1, M):
            m = 0.5 * (P[t] + P[u])
            js[t, u] = js[u, t] = (0.5 * (neg_h[t] + neg_h[u]) - torch.xlogy(m, m).sum(-1)).clamp_min(0.0)
    return js


def integrate(probs: Mapping[str, torch.Tensor | None], target_col: torch.Tensor, mode: str = "both",
              a: float = 1.0, b: float = 1.0, instance_weighting: bool = True, gamma: float = 0.5,
              r_max: float = 5.0, eps: float = 1e-12, log_prior: Mapping[str, float] | None = None,
              log_probs: Mapping[str, torch.Tensor | None] | None = None, normalise: bool = True,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Mix teacher distributions: (q [B, C], weights {teacher: [B]}, r [B]) -- module doc.
    ``log_prior``: {teacher: log pi_t} added to every row's integration logit (teacher prior).
    ``log_probs``: the same distributions' logs (``teacher_log_distributions``), which spares the
    consistency its per-teacher logarithms. ``normalise=False`` returns r~ (before the batch
    normalisation, ``normalise_instance_weights``), for a batch integrated in parts."""
    if mode not in INTEGRATION_MODES:
        raise DistillError(f"unknown integration mode {mode!r}; have {INTEGRATION_MODES}")
    names = [n for n, p in probs.items() if p is not None]
    if not names:
        raise NoTeacherSignal("no teacher distribution for this batch")
    P = torch.stack([probs[n] for n in names])  # [M, B, C]
    M = P.shape[0]
    rows = torch.arange(P.shape[1], device=P.device)
    conf = P[:, rows, target_col]  # [M, B]
    if M == 1:
        cons = torch.ones_like(conf)
    else:
        log_P = None
        if log_probs is not None and all(log_probs.get(n) is not None for n in names):
            log_P = torch.stack([log_probs[n] for n in names])
        js = pairwise_js(P, log_P) / _LN2
        cons = 1.0 - js.sum(1) / (M - 1)  # the diagonal is 0
        cons = cons.clamp(0.0, 1.0)
    log_conf = conf.clamp_min(eps).log()
    if mode == "both":
        g = a * log_conf + b * cons
    elif mode == "confidence":
        g = a * log_conf
    elif mode == "consistency":
        g = b * cons
    else:
        g = torch.zeros_like(conf)
    if log_prior:
        g = g + torch.tensor([float(log_prior[n]) for n in names], dtype=g.dtype, device=g.device).unsqueeze(1)
    w = torch.softmax(g, dim=0)  # [M, B]
    q = (w.unsqueeze(-1) * P).sum(0)
    if instance_weighting:
        r = instance_weights_raw(q, cons, target_col, gamma, eps)
        r = normalise_instance_weights(r, r_max, eps) if normalise else r
    else:
        r = torch.ones_like(q[:, 0])
    return q, {n: w[k] for k, n in enumerate(names)}, r


def instance_weights_raw(q: torch.Tensor, cons: torch.Tensor, target_col: torch.Tensor, gamma: float,
                         eps: float = 1e-12) -> torch.Tensor:
    """r~ [B] = q_i[v_i]^gamma * mean_t cons^t_i (module doc), before the batch normalisation."""
    rows = torch.arange(q.shape[0], device=q.device)
    return q[rows, target_col].clamp_min(eps) ** gamma * cons.mean(0)


def normalise_instance_weights(r_raw: torch.Tensor, r_max: float, eps: float = 1e-12) -> torch.Tensor:
    """r = min(r_max, r~ / mean_k r~_k) over the whole batch (module doc)."""
    return (r_raw / r_raw.mean().clamp_min(eps)).clamp(max=r_max)


def reliability_prior(true_log_probs: Mapping[str, float], strength: float = 1.0) -> dict[str, float]:
    """{teacher: log pi_t}, pi = softmax_t(strength * R_t), from each teacher's mean log-probability
    R_t of the true item over the training rows (module doc, "Teacher prior")."""
    if not true_log_probs:
        raise DistillError("a teacher prior needs at least one teacher's reliability")
    if strength < 0:
        raise DistillError(f"prior strength must be >= 0, got {strength}")
    names = list(true_log_probs)
    x = torch.tensor([strength * float(true_log_probs[n]) for n in names], dtype=torch.float64)
    return {n: float(v) for n, v in zip(names, torch.log_softmax(x, dim=0))}


def teacher_better_gate(q: torch.Tensor, student_logits: torch.Tensor, valid_mask: torch.Tensor | None,
                        target_col: torch.Tensor, T: float, floor: float = 0.0) -> torch.Tensor:
    """g [B] (module doc, "Teacher-better gate"): 1 where q_i[v_i] > s_i[v_i], s = softmax(Z_i / T)
    over row i's valid columns (no gradient flows through the gate; ``valid_mask`` None: all of
    them), else ``floor``."""
    if not 0.0 <= floor <= 1.0:
        raise DistillError(f"gate floor must be in [0, 1], got {floor}")
    rows = torch.arange(q.shape[0], device=q.device)
    with torch.no_grad():
        log_s = masked_log_softmax(student_logits.detach().float(), valid_mask, T)[rows, target_col]
        log_q = q.detach().float()[rows, target_col].clamp_min(1e-30).log()
        open_ = log_q > log_s
    return torch.where(open_, torch.ones_like(log_q), torch.full_like(log_q, float(floor)))


# --------------------------------------------------------------------------------------------
# Losses


KD_PRECISIONS = ("float32", "float64")


def _kd_dtype(logits: torch.Tensor, precision: str | None) -> torch.dtype:
    """The dtype the KD maths runs in: ``precision`` ("float32" or "float64") when given, else the
    logits' own dtype. Never below float32: bf16/fp16 logits are widened (a half-precision KL
    would be all rounding). float32 is what a run uses by default (kd.precision): on real batches
    its loss and gradient agree with the float64 reference within the bounds that
    tests/test_kd_precision.py states and checks, near-zero KL included, while float64 maths take
    1.5-3x as long (kd_precision_micro of benchmarks/distill_throughput.py): about +35% per step at
    a whole-catalogue width of 4,386 candidates (issue 21)."""
    if precision is None:
        return torch.float64 if logits.dtype == torch.float64 else torch.float32
    if precision not in KD_PRECISIONS:
        raise DistillError(f"unknown KD precision {precision!r}; have {KD_PRECISIONS}")
    return torch.float64 if precision == "float64" else torch.float32


def kd_loss(student_logits: torch.Tensor, q: torch.Tensor, valid_mask: torch.Tensor, T: float,
            r: torch.Tensor | None = None, precision: str | None = None) -> torch.Tensor:
    """mean_i r_i * T^2 * KL(q_i || softmax(Z_i / T)) over valid columns (float32 result).

    ``precision``: "float32" or "float64", the dtype the maths runs in; None: the logits' dtype
    (at least float32, ``_kd_dtype``).
    Near its minimum KL is a difference of two O(log C) sums, so its float32 value there carries an
    absolute rounding error (measured on real batches: at most 6e-8, bounded by
    8 * eps32 * T^2 * mean r (H(q) + H(q, s))); the gradient, r (softmax - q) T / B, has no such
    cancellation and keeps float32 rounding of the probabilities (tests/test_kd_precision.py)."""
    if student_logits.shape != q.shape or q.shape != valid_mask.shape:
        raise DistillError(f"shapes differ: logits {tuple(student_logits.shape)}, q {tuple(q.shape)}, "
                           f"mask {tuple(valid_mask.shape)}")
    per_row = kd_per_row(student_logits, q, valid_mask, T, precision)
    if r is not None:
        per_row = r.to(per_row.dtype) * per_row
    return per_row.mean().float()


def kd_per_row(student_logits: torch.Tensor, q: torch.Tensor, valid_mask: torch.Tensor | None, T: float,
               precision: str | None = None) -> torch.Tensor:
    """T^2 * KL(q_i || softmax(Z_i / T)) per row [B], in the KD dtype (``kd_loss`` without r and the
    mean). ``valid_mask`` None: every column is valid (one domain's block of a batch), which spares
    the masking passes."""
    dtype = _kd_dtype(student_logits, precision)
    if valid_mask is None:
        log_s = torch.log_softmax(student_logits.to(dtype) / T, dim=-1)
        q = q.to(dtype)
        kl = torch.xlogy(q, q) - q * log_s
    else:
        log_s = masked_log_softmax(student_logits.to(dtype), valid_mask, T)
        q = q.to(dtype).masked_fill(~valid_mask, 0.0)
        # log_s is -inf exactly on masked columns, where q = 0: zero it there so 0 * -inf gives no NaN.
        kl = torch.xlogy(q, q) - q * log_s.masked_fill(~valid_mask, 0.0)
    return T * T * kl.sum(-1)


def kd_loss_positive(student_logits: torch.Tensor, q: torch.Tensor, valid_mask: torch.Tensor,
                     target_col: torch.Tensor, T: float, r: torch.Tensor | None = None,
                     precision: str | None = None) -> torch.Tensor:
    """Positive-only KD: mean_i r_i * T^2 * KL(Bern(q_i[v_i]) || Bern(s_i[v_i])), in ``precision``.

    log(1 - s) is the log-sum-exp of the other valid columns (stable when s is near 1); a row whose
    only valid column is its positive has q = s = 1 and contributes 0."""
    if student_logits.shape != q.shape or q.shape != valid_mask.shape:
        raise DistillError(f"shapes differ: logits {tuple(student_logits.shape)}, q {tuple(q.shape)}, "
                           f"mask {tuple(valid_mask.shape)}")
    per_row = kd_positive_per_row(student_logits, q, valid_mask, target_col, T, precision)
    if r is not None:
        per_row = r.to(per_row.dtype) * per_row
    return per_row.mean().float()


def kd_positive_per_row(student_logits: torch.Tensor, q: torch.Tensor, valid_mask: torch.Tensor,
                        target_col: torch.Tensor, T: float, precision: str | None = None) -> torch.Tensor:
    """T^2 * KL(Bern(q_i[v_i]) || Bern(s_i[v_i])) per row [B] (``kd_loss_positive`` without r and the mean)."""
    dtype = _kd_dtype(student_logits, precision)
    rows = torch.arange(q.shape[0], device=q.device)
    log_s = masked_log_softmax(student_logits.to(dtype), valid_mask, T)
    is_pos = torch.zeros_like(valid_mask)
    is_pos[rows, target_col] = True
    others = valid_mask & ~is_pos
    has_other = others.any(-1)
    # Rows with no other column get a dummy finite row (their term is selected away below), so
    # neither the value nor the gradient of logsumexp over all -inf can turn into NaN.
    other_logs = torch.where(others, log_s, torch.full_like(log_s, float("-inf")))
    other_logs = torch.where(has_other.unsqueeze(-1), other_logs, torch.zeros_like(log_s))
    log_1ms = torch.logsumexp(other_logs, dim=-1)
    p = q.to(dtype)[rows, target_col].clamp(0.0, 1.0)
    pos = torch.xlogy(p, p) - p * log_s[rows, target_col]
    neg = torch.xlogy(1 - p, 1 - p) - (1 - p) * log_1ms
    return T * T * (pos + torch.where(has_other, neg, torch.zeros_like(neg)))


def domain_ce(full_logits: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor,
              domain_ranges: Sequence[tuple[int, int]], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over all items of each row's domain; ``full_logits`` [B, V] has one
    column per global item id (column 0 = PAD, never in a domain). Rows are grouped by domain and
    each group uses its own slice of columns (cheaper than masking B x V to -inf)."""
    V = full_logits.shape[1]
    total = full_logits.new_zeros((), dtype=torch.float32)
    for d in torch.unique(domains).tolist():
        if not 0 <= d < len(domain_ranges):
            raise DistillError(f"domain {d} has no item range (have {len(domain_ranges)} domains)")
        start, stop = domain_ranges[d]
        if stop > V:
            raise DistillError(f"full_logits has {V} columns but domain {d} ends at {stop}")
        rows = torch.nonzero(domains == d).squeeze(1)
        local = targets[rows] - start
        if bool(((local < 0) | (local >= stop - start)).any()):
            raise DistillError(f"a target of a domain-{d} row lies outside [{start}, {stop})")
        total = total + F.cross_entropy(full_logits[rows, start:stop].float(), local, reduction="sum",
                                        label_smoothing=label_smoothing)
    return total / targets.shape[0]


@dataclass
class KDTargets:
    """The half of a batch's KD term that does not depend on the student: per domain block, the
    rows, their candidate columns, the target's column among them, the teachers' mixture q and the
    integration weights w; and r, every KD row's instance weight, normalised over the batch.

    ``DistillLoss.targets`` builds it from the teachers' scores alone, so it can be computed where
    the scores arrive (the label prefetch, ``kd.targets_on=prefetch``) instead of on the training
    thread; ``DistillLoss.forward(kd_targets=...)`` then only adds the student's side. ``present``
    is empty when no teacher answered for the batch."""

    present: list[str]
    n_rows: int
    r: torch.Tensor  # [B'] float32
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = \
        field(default_factory=list)  # (rows, cols, tcol, q, w) per domain

    def to(self, device: torch.device | str) -> "KDTargets":
        """The same targets on ``device`` (``Tensor.to`` copies nothing that is already there)."""
        mv = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return KDTargets(list(self.present), self.n_rows, mv(self.r),
                         [(mv(a), mv(b), mv(c), mv(q), {n: mv(v) for n, v in w.items()})
                          for a, b, c, q, w in self.blocks])


class DistillLoss(nn.Module):
    """L = ce_weight * CE + kd_weight * KD, a weighted sum of named terms, each with a switch.

    ``forward`` returns (total, terms): terms["ce"], terms["kd"] are the unweighted loss values
    (detached); diagnostics: terms["kd_teachers"] (teachers present), terms["r_mean"],
    terms["r_min"], terms["w/<teacher>"] (mean integration weight), terms["gate_open"] (share of
    rows the teacher-better gate lets through; with ``gate`` on). If every teacher is missing
    for a batch the KD term is 0 for it and kd_teachers = 0 (the caller counts skips).
    ``last_gate``: the last batch's gate per KD row (None without the gate), for per-domain counts.

    ``by_domain`` (default): when the valid mask is build_candidates' own (a row's valid columns are
    exactly its domain's candidates), the teacher distributions, integration and KD run on each
    domain's block [rows of d, candidates of d] alone, with no masked columns: the same values up to
    float rounding (the instance weights are still normalised over the whole batch), on fewer cells
    (a mixed union batch: about two thirds of B x C) and without the masking passes. Any other mask,
    or ``by_domain=False``, takes the masked path over the whole [B, C].
    """

    def __init__(self, domain_ranges: Sequence[tuple[int, int]], teacher_temps: Mapping[str, float], *,
                 ce_weight: float = 1.0, kd_weight: float = 1.0, use_ce: bool = True, use_kd: bool = True,
                 temperature: float = 2.0, integration: str = "both", a: float = 1.0, b: float = 1.0,
                 instance_weighting: bool = True, gamma: float = 0.5, r_max: float = 5.0,
                 in_batch_negatives: bool = True, label_smoothing: float = 0.0,
                 kd_precision: str = "float32", log_prior: Mapping[str, float] | None = None,
                 gate: str = "none", gate_floor: float = 0.0, by_domain: bool = True):
        super().__init__()
        if gate not in KD_GATES:
            raise DistillError(f"unknown KD gate {gate!r}; have {KD_GATES}")
        if kd_precision not in KD_PRECISIONS:
            raise DistillError(f"unknown KD precision {kd_precision!r}; have {KD_PRECISIONS}")
        if integration not in INTEGRATION_MODES:
            raise DistillError(f"unknown integration mode {integration!r}; have {INTEGRATION_MODES}")
        if temperature <= 0 or any(t <= 0 for t in teacher_temps.values()):
            raise DistillError("temperatures must be > 0")
        if not (use_ce or use_kd):
            raise DistillError("both loss terms are switched off")
        self.domain_ranges = [tuple(map(int, r)) for r in domain_ranges]
        self.teacher_temps = dict(teacher_temps)
        self.weights = {"ce": float(ce_weight), "kd": float(kd_weight)}
        self.enabled = {"ce": bool(use_ce), "kd": bool(use_kd)}
        self.temperature = float(temperature)
        self.integration, self.a, self.b = integration, float(a), float(b)
        self.instance_weighting, self.gamma, self.r_max = bool(instance_weighting), float(gamma), float(r_max)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.label_smoothing = float(label_smoothing)
        self.kd_precision = kd_precision
        self.log_prior = dict(log_prior) if log_prior else None  # teacher prior (module doc)
        self.gate, self.gate_floor = gate, float(gate_floor)
        self.by_domain = bool(by_domain)
        self.last_gate: torch.Tensor | None = None
        # Set to a dict to accumulate wall seconds per part of forward ("ce", "kd_targets": teacher
        # distributions and integration, "kd_loss"), as benchmarks/distill_throughput.py does; None
        # (the default) times nothing. On CUDA each part is synchronised first, so only when asked.
        self.timings: dict[str, float] | None = None

    def forward(self, full_logits: torch.Tensor, targets: torch.Tensor, domains: torch.Tensor,
                candidates: torch.Tensor | None = None, target_col: torch.Tensor | None = None,
                valid_mask: torch.Tensor | None = None,
                teacher_scores: Mapping[str, torch.Tensor | None] | None = None,
                cand_logits: torch.Tensor | None = None, kd_rows: torch.Tensor | None = None,
                kd_targets: KDTargets | None = None,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``full_logits`` [B, V] over global ids; candidates/target_col/valid_mask from
        ``build_candidates``; ``cand_logits`` defaults to ``full_logits[:, candidates]``.

        ``kd_rows``: the rows the teachers cover (a multi-domain student whose teachers serve only
        some domains); candidates, masks and teacher scores then describe those rows only, and KD is
        their sum divided by B, i.e. uncovered rows contribute 0 to the batch mean.

        ``kd_targets``: the batch's ``targets(...)``, computed beforehand (off the training thread);
        the teacher scores are then not read again and the loss equals the one computed here."""
        terms: dict[str, torch.Tensor] = {}
        total = full_logits.new_zeros((), dtype=torch.float32)
        tick = self._clock(full_logits)
        if self.enabled["ce"]:
            ce = domain_ce(full_logits, targets, domains, self.domain_ranges, self.label_smoothing)
            tick("ce")
            total = total + self.weights["ce"] * ce
            terms["ce"] = ce.detach()
        if self.enabled["kd"]:
            if kd_targets is not None:  # computed beforehand: here only moved to the device
                if candidates is None:
                    raise DistillError("KD from precomputed targets: pass the batch's candidates")
                targets = kd_targets.to(full_logits.device)
            else:
                if candidates is None or target_col is None or valid_mask is None or teacher_scores is None:
                    raise DistillError("KD is on: pass candidates, target_col, valid_mask and teacher_scores")
                row_domains = domains if kd_rows is None else domains[kd_rows]
                targets = self.targets(candidates, target_col, valid_mask, row_domains, teacher_scores)
            if targets is not None:
                tick("kd_targets")
                kd = self._kd_from_targets(targets, full_logits, cand_logits, candidates, kd_rows, terms, tick)
                if kd is not None:
                    total = total + self.weights["kd"] * kd
                return total, terms
            log_probs = teacher_log_distributions(teacher_scores, self.teacher_temps, valid_mask)
            probs = {n: lp.exp() for n, lp in log_probs.items()}
            terms["kd_teachers"] = torch.tensor(float(len(probs)))
            if probs:
                q, w, r = integrate(probs, target_col, self.integration, self.a, self.b,
                                    self.instance_weighting, self.gamma, self.r_max, log_prior=self.log_prior,
                                    log_probs=log_probs)
                tick("kd_targets")
                if cand_logits is not None:
                    z = cand_logits
                elif kd_rows is None:
                    z = full_logits[:, candidates]
                else:  # one [B', C] gather, not a [B', V] copy first
                    z = full_logits[kd_rows.unsqueeze(1), candidates.unsqueeze(0)]
                if self.gate == "teacher_better":
                    g = teacher_better_gate(q, z, valid_mask, target_col, self.temperature, self.gate_floor)
                    r = r * g
                    self.last_gate = g
                    terms["gate_open"] = (g == 1).float().mean()
                if self.in_batch_negatives:
                    kd = kd_loss(z, q, valid_mask, self.temperature, r, self.kd_precision)
                else:
                    kd = kd_loss_positive(z, q, valid_mask, target_col, self.temperature, r, self.kd_precision)
                tick("kd_loss")
                if kd_rows is not None:
                    kd = kd * (kd_rows.numel() / full_logits.shape[0])
                total = total + self.weights["kd"] * kd
                terms["kd"] = kd.detach()
                terms["r_mean"], terms["r_min"] = r.mean().detach(), r.min().detach()
                for name, wt in w.items():
                    terms[f"w/{name}"] = wt.mean().detach()
            else:
                terms["kd"] = total.new_zeros(())
        return total, terms

    def _domain_blocks(self, candidates: torch.Tensor, valid_mask: torch.Tensor,
                       row_domains: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """[(rows, cols)] per domain of the KD rows: that domain's rows and its candidate columns,
        when ``valid_mask`` is exactly build_candidates' mask (a column is valid for a row iff it is an
        item of the row's domain); None for any other mask, which then takes the masked path."""
        cdom = candidate_domains(candidates, self.domain_ranges).to(row_domains.device)
        if not torch.equal(valid_mask.to(row_domains.device), cdom.unsqueeze(0) == row_domains.unsqueeze(1)):
            return None
        return [(torch.nonzero(row_domains == d).squeeze(1), torch.nonzero(cdom == d).squeeze(1))
                for d in torch.unique(row_domains).tolist()]

    def targets(self, candidates: torch.Tensor, target_col: torch.Tensor, valid_mask: torch.Tensor,
                row_domains: torch.Tensor, teacher_scores: Mapping[str, torch.Tensor | None]) -> KDTargets | None:
        """The student-independent half of the KD term (``KDTargets``) for a batch's KD rows
        (``row_domains``: their domains), from the teachers' scores alone; pass it to ``forward`` as
        ``kd_targets``. None when the by-domain blocks do not apply (``by_domain`` off or another
        mask): ``forward`` then computes everything from the scores, on the masked path."""
        if not self.by_domain:
            return None
        blocks = self._domain_blocks(candidates, valid_mask, row_domains)
        return None if blocks is None else self._targets_by_domain(blocks, target_col, teacher_scores)

    def _targets_by_domain(self, blocks: list[tuple[torch.Tensor, torch.Tensor]], target_col: torch.Tensor,
                           teacher_scores: Mapping[str, torch.Tensor | None]) -> KDTargets:
        """Teacher distributions and integration one domain block at a time (class doc, "by_domain")."""
        present = [n for n, v in teacher_scores.items() if v is not None]
        n_rows = int(sum(rows.numel() for rows, _ in blocks))
        if not present:
            return KDTargets([], n_rows, torch.ones(n_rows))
        dev = teacher_scores[present[0]].device
        r_all = torch.ones(n_rows, dtype=torch.float32, device=dev)
        parts = []
        for rows, cols in blocks:
            rows, cols = rows.to(dev), cols.to(dev)
            sub = {n: teacher_scores[n][rows.unsqueeze(1), cols.unsqueeze(0)] for n in present}
            log_probs = teacher_log_distributions(sub, self.teacher_temps, None)
            probs = {n: lp.exp() for n, lp in log_probs.items()}
            tcol = torch.searchsorted(cols, target_col.to(dev)[rows])  # cols ascend: the target's place among them
            q, w, r_raw = integrate(probs, tcol, self.integration, self.a, self.b, self.instance_weighting,
                                    self.gamma, self.r_max, log_prior=self.log_prior, log_probs=log_probs,
                                    normalise=False)
            r_all[rows] = r_raw.float()
            parts.append((rows, cols, tcol, q, w))
        if self.instance_weighting:  # normalised over the whole batch, as the masked path does
            r_all = normalise_instance_weights(r_all, self.r_max)
        return KDTargets(present, n_rows, r_all, parts)

    def _kd_from_targets(self, targets: KDTargets, full_logits: torch.Tensor, cand_logits: torch.Tensor | None,
                         candidates: torch.Tensor, kd_rows: torch.Tensor | None, terms: dict[str, torch.Tensor],
                         tick) -> torch.Tensor | None:
        """The student's side of the KD term from ``targets``; fills ``terms`` as the masked path
        does. None when no teacher answered for the batch."""
        present = targets.present
        terms["kd_teachers"] = torch.tensor(float(len(present)))
        if not present:
            terms["kd"] = full_logits.new_zeros((), dtype=torch.float32)
            return None
        n_rows, r_all = targets.n_rows, targets.r
        gate = torch.ones_like(r_all)
        kd_sum = None
        # One gather of the candidates' logits, as the masked path does: its backward writes the
        # [B, V] gradient once; each block then selects from the [B', C] copy (cheap to backpropagate).
        if cand_logits is not None:
            z_all = cand_logits
        elif kd_rows is None:
            z_all = full_logits[:, candidates]
        else:
            z_all = full_logits[kd_rows.unsqueeze(1), candidates.unsqueeze(0)]
        for rows, cols, tcol, q, _ in targets.blocks:
            z = z_all.index_select(0, rows).index_select(1, cols)
            if self.gate == "teacher_better":
                gate[rows] = teacher_better_gate(q, z, None, tcol, self.temperature, self.gate_floor)
            if self.in_batch_negatives:
                per_row = kd_per_row(z, q, None, self.temperature, self.kd_precision)
            else:
                ones = torch.ones(q.shape, dtype=torch.bool, device=q.device)
                per_row = kd_positive_per_row(z, q, ones, tcol, self.temperature, self.kd_precision)
            block_sum = ((r_all[rows] * gate[rows]).to(per_row.dtype) * per_row).sum()
            kd_sum = block_sum if kd_sum is None else kd_sum + block_sum
        kd = (kd_sum / n_rows).float()
        tick("kd_loss")
        if kd_rows is not None:
            kd = kd * (kd_rows.numel() / full_logits.shape[0])
        r = r_all * gate
        if self.gate == "teacher_better":
            self.last_gate = gate
            terms["gate_open"] = (gate == 1).float().mean()
        terms["kd"] = kd.detach()
        terms["r_mean"], terms["r_min"] = r.mean().detach(), r.min().detach()
        for name in present:
            terms[f"w/{name}"] = (sum(w[name].sum() for *_, w in targets.blocks) / n_rows).detach()
        return kd

    def _clock(self, like: torch.Tensor):
        """``tick(part)``: add the seconds since the previous tick to ``self.timings[part]`` (a no-op
        unless ``self.timings`` is a dict)."""
        if self.timings is None:
            return lambda part: None
        timings, cuda = self.timings, like.is_cuda
        last = [time.perf_counter()]

        def tick(part: str) -> None:
            if cuda:
                torch.cuda.synchronize(like.device)
            now = time.perf_counter()
            timings[part] = timings.get(part, 0.0) + now - last[0]
            last[0] = now

        return tick
