"""Full-ranking metrics (leave-one-out, UniSRec/RecBole protocol), and the one evaluation every
model goes through.

Ties are broken pessimistically: the target ranks after every other item with the same score,
so a model that scores all items alike earns nothing.

Every model, teacher or student, follows :class:`RankingModel` (as every RecBole model implements
``full_sort_predict``), so both training loops and ``launch/evaluate.py`` evaluate with the same
:func:`evaluate_model` / :func:`evaluate_ranks`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import numpy as np
import torch

KS = (10, 50)
METRIC_NAMES = tuple(f"{m}@{k}" for k in KS for m in ("recall", "ndcg"))


def target_ranks(scores: torch.Tensor, target_cols: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target column in its row: #other items scoring >= the target."""
    tgt = scores.gather(1, target_cols.view(-1, 1))
    return (scores >= tgt).sum(dim=1) - 1


def per_user_metrics(ranks: np.ndarray, ks: Iterable[int] = KS) -> dict[str, np.ndarray]:
    """Each user's Recall@k (hit) and NDCG@k from its 0-based target rank (one target per user)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return out


def metrics_from_ranks(ranks: np.ndarray, ks: Iterable[int] = KS) -> dict[str, float]:
    """Recall@k (hit rate: one target per user) and NDCG@k averaged over users (0 with no users)."""
    return {m: float(v.mean()) if v.size else 0.0 for m, v in per_user_metrics(ranks, ks).items()}


# score_fn(users [B], histories [B, L], lengths [B], start, stop) -> scores [B, stop - start]
# over the global ids [start, stop) of one domain.
ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@torch.no_grad()
def full_ranking_ranks(score_fn: ScoreFn, dataset, split: str, batch_size: int = 512,
                       device: str | torch.device = "cpu", domains: list[str] | None = None,
                       mask_history: bool = False) -> dict[str, np.ndarray]:
    """0-based rank of each example's target among all items of its own domain, per domain, in
    the split's order. ``mask_history`` removes items already in the history from the ranking; it
    is off by default, as in UniSRec/RecBole."""
    ex = dataset.splits[split]
    out: dict[str, np.ndarray] = {}
    for d, name in enumerate(dataset.domain_names):
        if domains is not None and name not in domains:
            continue
        start, stop = dataset.domain_range(d)
        idx = np.nonzero(ex.domains == d)[0]
        # Batches of similar history length, each trimmed to its longest row: a model's cost follows
        # the real lengths instead of the padded width. Ranks go back to the split's order.
        order = np.argsort(ex.lengths[idx], kind="stable")
        ranks = np.zeros(len(idx), dtype=np.int64)
        for b in range(0, len(idx), batch_size):
            pos = order[b: b + batch_size]
            sel = idx[pos]
            hist = torch.as_tensor(ex.histories[sel, : int(ex.lengths[sel].max())], device=device)
            lens = torch.as_tensor(ex.lengths[sel], device=device)
            users = torch.as_tensor(ex.users[sel], device=device)
            tgt = torch.as_tensor(ex.targets[sel], device=device) - start
            scores = score_fn(users, hist, lens, start, stop).float()
            if mask_history:
                cols = (hist - start).clamp(min=0, max=stop - start - 1)
                valid = (hist >= start) & (hist < stop) & (cols != tgt.view(-1, 1))
                scores = scores.scatter(1, torch.where(valid, cols, tgt.view(-1, 1)),
                                        torch.where(valid, float("-inf"), scores.gather(1, tgt.view(-1, 1))))
            ranks[pos] = target_ranks(scores, tgt).cpu().numpy()
        out[name] = ranks
    return out


def metrics_by_domain(ranks: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per-domain metrics from :func:`full_ranking_ranks`, plus their unweighted mean under "mean"."""
    out = {name: metrics_from_ranks(r) for name, r in ranks.items()}
    if out:
        out["mean"] = {m: float(np.mean([v[m] for v in out.values()])) for m in METRIC_NAMES}
    return out


def evaluate_full_ranking(score_fn: ScoreFn, dataset, split: str, batch_size: int = 512,
                          device: str | torch.device = "cpu",
                          domains: list[str] | None = None,
                          mask_history: bool = False) -> dict[str, dict[str, float]]:
    """Per-domain metrics (and their unweighted mean under "mean") for ``split``: each example is
    ranked against all items of its own domain (see :func:`full_ranking_ranks`)."""
    return metrics_by_domain(full_ranking_ranks(score_fn, dataset, split, batch_size, device, domains,
                                                mask_history))


@runtime_checkable
class RankingModel(Protocol):
    """The evaluation contract of every model: ``teachers.base.Teacher`` and
    ``student.models.base.StudentModel`` both implement it.

    ``ranking_scores(users [B], histories [B, L], lengths [B], start, stop) -> [B, stop - start]``:
    each row's scores over the global item ids [start, stop) of one domain, higher ranking first.
    Histories are global ids, oldest first, right-padded with 0 and trimmed to the batch's longest
    row; a model reads what it needs (sequence models the histories, LightGCN the users). The method
    has :data:`ScoreFn`'s signature. ``train``/``training`` are ``torch.nn.Module``'s: evaluation
    runs in eval mode and restores the mode after.
    """

    training: bool

    def train(self, mode: bool = True) -> Any: ...

    def ranking_scores(self, users: torch.Tensor, histories: torch.Tensor, lengths: torch.Tensor,
                       start: int, stop: int) -> torch.Tensor: ...


def evaluate_ranks(model: RankingModel, dataset, split: str, batch_size: int = 1024,
                   device: str | torch.device = "cpu",
                   domains: list[str] | None = None) -> dict[str, np.ndarray]:
    """Each ``split`` example's 0-based target rank over its own domain's items, per domain in the
    split's order (:func:`full_ranking_ranks` of ``model.ranking_scores``, in eval mode, restored after)."""
    was_training = model.training
    model.train(False)
    try:
        return full_ranking_ranks(model.ranking_scores, dataset, split, batch_size=batch_size, device=device,
                                  domains=domains)
    finally:
        model.train(was_training)


def evaluate_model(model: RankingModel, dataset, split: str, batch_size: int = 1024,
                   device: str | torch.device = "cpu",
                   domains: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Full-ranking Recall/NDCG@10/50 of ``model`` on ``split``, per domain and their mean under "mean"
    (:func:`evaluate_ranks` then :func:`metrics_by_domain`)."""
    return metrics_by_domain(evaluate_ranks(model, dataset, split, batch_size, device, domains))


def bootstrap_ci(ranks: np.ndarray, ks: Iterable[int] = KS, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each metric over users (resampled with replacement):
    how far a metric measured on this many users can move by the luck of which users were drawn."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap_ci: level must lie in (0, 1), got {level}")
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("bootstrap_ci: no ranks to resample")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, ranks.size, size=(n_boot, ranks.size))  # users of each resample
    out: dict[str, tuple[float, float]] = {}
    for name, values in per_user_metrics(ranks, ks).items():
        lo, hi = np.percentile(values[draws].mean(axis=1), [100 * (1 - level) / 2, 100 * (1 + level) / 2])
        out[name] = (float(lo), float(hi))
    return out


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Render {split: {domain: {metric: value}}} as a fixed-width table."""
    header = f"{'split':<6} {'domain':<14} " + " ".join(f"{m:>10}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for split, per_domain in results.items():
        if not isinstance(per_domain, dict):
            continue
        for dom, vals in per_domain.items():
            lines.append(f"{split:<6} {dom:<14} " + " ".join(f"{vals[m]:>10.4f}" for m in METRIC_NAMES))
    return "\n".join(lines)


def format_ci_table(values: dict[str, dict[str, float]], intervals: dict[str, dict[str, Any]]) -> str:
    """Render each domain's metric as "value [lo, hi]" from {domain: {metric: value}} and
    {domain: {metric: (lo, hi)}} (domains without an interval, such as "mean", are left out)."""
    header = f"{'domain':<14} " + " ".join(f"{m:>24}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for dom, ci in intervals.items():
        cells = [f"{values[dom][m]:.4f} [{ci[m][0]:.4f}, {ci[m][1]:.4f}]" for m in METRIC_NAMES]
        lines.append(f"{dom:<14} " + " ".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)
