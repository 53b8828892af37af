"""Curriculum for distillation: per-sequence difficulty, pacing, and a seeded, resumable DDP sampler.

Difficulty (``difficulty_scores``) -- "short sequences of rare items are hard". For training row i
of domain d, with history h_i (length n_i) and target v_i:

    pop_i   = mean over x in h_i + [v_i] of log(1 + count(x))      count = dataset.item_popularity()
    rk_d(z) = rank of z among the rows of domain d, ties get their average rank, scaled to [0, 1]
              (0 = smallest value; a domain with one row gets 0.5)
    diff_i  = (wl * (1 - rk_d(n_i)) + wp * (1 - rk_d(pop_i)) + we * rk_d(extra_i)) / (wl + wp + we)

so diff_i is in [0, 1], longer histories and more popular items are easier, and ``extra`` (e.g.
teacher disagreement, larger = harder) is an optional third term.

Teacher-driven difficulty (``teacher_difficulty``, ``curriculum.teacher_signal``): the served
teachers score every training row once, before training, against its true item and K seeded
negatives of its domain (column 0 = the true item). With p^t_i = softmax(s^t_i / tau_t):

    confidence    extra_i = 1 - mean_t p^t_i[0]                   (the teachers doubt the true item)
    disagreement  extra_i = mean_{t<u} |p^t_i[0] - p^u_i[0]|      (they disagree about it; 0 for one)

and it enters as the ``extra`` term, ranked per domain like the others. Ranks are taken *per domain*:
domains differ in history length and popularity scale (Games' counts dwarf Scientific's), and a
global ranking would let one domain fill the whole early pool, which would break mixed-domain
batches. Per-domain ranks make "the easiest 25%" roughly the easiest 25% of every domain (ties,
e.g. Scientific's many length-1 rows, skew it a little); pass ``groups=domains`` to the sampler
to make it exact.

Pacing (``PACINGS``; each maps progress p = t / T, clipped to [0, 1], and a start fraction s to the
fraction of the data in play; t = epoch, T = ``full_at_epoch``, the epoch from which all data is used):

    root   f(p) = min(1, sqrt(s^2 + (1 - s^2) * p))          (Platanios et al., NAACL 2019)
    linear f(p) = min(1, s + (1 - s) * p)
    step   f(p) = s + (1 - s) * floor(p * k) / k             (k = num_steps stages; f(1) = 1)
    none   f(p) = 1

All are non-decreasing in p and equal 1 from p = 1 on, so the pool only grows and reaches 100%.

Sampler (``CurriculumSampler``): the rows are ordered easiest first (stable tie-break by index).
Epoch e's pool is the first ceil(f(e / T) * N) rows of that order (at least one batch per rank);
with ``groups`` (e.g. the domain of each row) it is the first ceil(f * N_g) rows of each group's
own order, so every domain enters at the same pace.
The pool is shuffled by a generator seeded with (seed, e) only, so every rank computes the same
permutation without communication; rank r takes positions r, r + R, r + 2R, ... (R = replicas).
Every rank gets the same number of indices (hence the same number of batches, which DDP needs):
``drop_last=True`` drops the last (pool mod R) shuffled rows, so the shards are disjoint;
``drop_last=False`` pads by wrapping around the shuffled pool, so the union covers the pool and
only the padding repeats. ``state_dict`` holds the epoch and the position within the epoch;
``load_state_dict`` makes the next iteration of that epoch skip what was already consumed, so a
resumed run sees exactly the remaining indices. ``enabled=False`` is the "no curriculum" ablation:
the pool is all data every epoch, with the same seeding and sharding.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from ckd.data.multidomain import MultiDomainDataset


class CurriculumError(ValueError):
    """Bad curriculum setting or a sampler state that does not fit this sampler."""


# --------------------------------------------------------------------------------------------
# Difficulty


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Average ranks of ``values`` scaled to [0, 1] (0 = smallest); ties share a rank."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if n == 1:
        return np.full(1, 0.5)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    avg_rank = first + (counts - 1) / 2.0  # 0-based average rank of each distinct value
    return avg_rank[inverse] / (n - 1)


def _per_domain_rank(values: np.ndarray, domains: np.ndarray) -> np.ndarray:
    out = np.empty(values.shape[0], dtype=np.float64)
    for d in np.unique(domains):
        rows = np.flatnonzero(domains == d)
        out[rows] = rank_normalise(values[rows])
    return out


def mean_log_popularity(histories: np.ndarray, lengths: np.ndarray, targets: np.ndarray,
                        popularity: np.ndarray) -> np.ndarray:
    """Mean of log(1 + count) over each row's history items and its target (PAD excluded)."""
    logpop = np.log1p(np.asarray(popularity, dtype=np.float64))
    logpop[0] = 0.0  # PAD never counts (item_popularity already zeroes it; be explicit)
    hist_sum = logpop[histories].sum(axis=1)  # PAD positions add 0
    return (hist_sum + logpop[targets]) / (lengths + 1)


def difficulty_scores(dataset: MultiDomainDataset, split: str = "train", length_weight: float = 0.5,
                      popularity_weight: float = 0.5, extra: np.ndarray | None = None,
                      extra_weight: float = 0.0) -> np.ndarray:
    """Difficulty in [0, 1] of each row of ``dataset.splits[split]`` (formula in the module doc)."""
    if split not in dataset.splits:
        raise CurriculumError(f"unknown split {split!r}; have {sorted(dataset.splits)}")
    weights = (length_weight, popularity_weight, extra_weight)
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise CurriculumError(f"difficulty weights must be finite, >= 0 and not all 0: {weights}")
    ex = dataset.splits[split]
    n = len(ex)
    if extra_weight > 0 and extra is None:
        raise CurriculumError("extra_weight > 0 needs an `extra` array")
    score = np.zeros(n, dtype=np.float64)
    if length_weight > 0:
        score += length_weight * (1.0 - _per_domain_rank(ex.lengths.astype(np.float64), ex.domains))
    if popularity_weight > 0:
        pop = mean_log_popularity(ex.histories, ex.lengths, ex.targets, dataset.item_popularity())
        score += popularity_weight * (1.0 - _per_domain_rank(pop, ex.domains))
    if extra_weight > 0:
        extra = np.asarray(extra, dtype=np.float64)
        if extra.shape != (n,):
            raise CurriculumError(f"extra has shape {extra.shape}, expected ({n},)")
        if not np.all(np.isfinite(extra)):
            raise CurriculumError("extra holds NaN or inf")
        score += extra_weight * _per_domain_rank(extra, ex.domains)
    return score / sum(weights)


TEACHER_SIGNALS = ("none", "confidence", "disagreement")


def teacher_difficulty(scores: dict[str, np.ndarray], temperatures: dict[str, float], signal: str) -> np.ndarray:
    """Per-row difficulty from the teachers' raw scores ({teacher: [N, 1 + K]}, column 0 = the true
    item; formula in the module doc). Larger = harder."""
    if signal not in TEACHER_SIGNALS[1:]:
        raise CurriculumError(f"teacher signal must be one of {TEACHER_SIGNALS[1:]}, not {signal!r}")
    if not scores:
        raise CurriculumError("teacher-driven difficulty needs at least one teacher's scores")
    conf = []
    for name, s in scores.items():
        z = np.asarray(s, dtype=np.float64) / float(temperatures[name])
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        conf.append(p[:, 0] / p.sum(axis=1))
    c = np.stack(conf)  # [M, N]
    if signal == "confidence":
        return 1.0 - c.mean(axis=0)
    m = c.shape[0]
    if m == 1:
        return np.zeros(c.shape[1])
    pairs = [np.abs(c[t] - c[u]) for t in range(m) for u in range(t + 1, m)]
    return np.mean(pairs, axis=0)


# --------------------------------------------------------------------------------------------
# Pacing

PacingFn = Callable[..., float]
PACINGS: dict[str, PacingFn] = {}


def register_pacing(name: str) -> Callable[[PacingFn], PacingFn]:
    def deco(fn: PacingFn) -> PacingFn:
        PACINGS[name] = fn
        return fn
    return deco


@register_pacing("root")
def root_pacing(p: float, start: float, **_: object) -> float:
    return min(1.0, math.sqrt(start * start + (1.0 - start * start) * p))


@register_pacing("linear")
def linear_pacing(p: float, start: float, **_: object) -> float:
    return min(1.0, start + (1.0 - start) * p)


@register_pacing("step")
def step_pacing(p: float, start: float, num_steps: int = 4, **_: object) -> float:
    return min(1.0, start + (1.0 - start) * math.floor(p * num_steps + 1e-9) / num_steps)


@register_pacing("none")
def no_pacing(p: float, start: float, **_: object) -> float:
    return 1.0


def pacing_fraction(name: str, t: float, full_at: float, start: float = 0.25,
                    num_steps: int = 4) -> float:
    """Fraction of the data in play at time ``t`` (epoch or step) when all is in play at ``full_at``."""
    if name not in PACINGS:
        raise CurriculumError(f"unknown pacing {name!r}; have {sorted(PACINGS)}")
    if not 0.0 < start <= 1.0:
        raise CurriculumError(f"start fraction must be in (0, 1], got {start}")
    if num_steps < 1:
        raise CurriculumError(f"num_steps must be >= 1, got {num_steps}")
    p = 1.0 if full_at <= 0 else min(1.0, max(0.0, t / full_at))
    return PACINGS[name](p, start, num_steps=num_steps)


# --------------------------------------------------------------------------------------------
# Sampler


class CurriculumSampler:
    """Seeded, resumable, DDP-sharded sampler over a growing easiest-first pool (see module doc).

    Use like ``torch.utils.data.DistributedSampler``: call ``set_epoch(e)`` before each epoch and
    iterate for this rank's indices. ``len()`` is this rank's full shard for the current epoch.
    """

    def __init__(self, difficulties: np.ndarray, *, pacing: str = "root", start_fraction: float = 0.25,
                 full_at_epoch: int = 10, num_steps: int = 4, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, batch_size: int = 1, drop_last: bool = True, enabled: bool = True,
                 groups: np.ndarray | None = None):
        diff = np.asarray(difficulties, dtype=np.float64)
        if diff.ndim != 1 or diff.shape[0] == 0:
            raise CurriculumError(f"difficulties must be a non-empty 1-D array, got shape {diff.shape}")
        if not np.all(np.isfinite(diff)):
            raise CurriculumError("difficulties hold NaN or inf")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise CurriculumError(f"rank {rank} is not in 0..{num_replicas - 1}")
        if batch_size < 1:
            raise CurriculumError(f"batch_size must be >= 1, got {batch_size}")
        if diff.shape[0] < num_replicas and drop_last:
            raise CurriculumError(f"{diff.shape[0]} samples cannot give {num_replicas} ranks one each")
        pacing_fraction(pacing, 0, full_at_epoch, start_fraction, num_steps)  # validates the settings
        self.num_samples = int(diff.shape[0])
        self.pacing, self.start_fraction = pacing, float(start_fraction)
        self.full_at_epoch = int(full_at_epoch)
        self.num_steps, self.seed = int(num_steps), int(seed)
        self.num_replicas, self.rank, self.batch_size = int(num_replicas), int(rank), int(batch_size)
        self.drop_last, self.enabled = bool(drop_last), bool(enabled)
        # Easiest first; lexsort's last key is primary, the index breaks ties stably.
        self.order = np.lexsort((np.arange(self.num_samples), diff))
        self.group_orders: list[np.ndarray] | None = None
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != diff.shape:
                raise CurriculumError(f"groups has shape {groups.shape}, expected {diff.shape}")
            # Each group's rows, easiest first (the global order restricted to the group).
            self.group_orders = [self.order[groups[self.order] == g] for g in np.unique(groups)]
        self.epoch = 0
        self.position = 0  # indices of the current epoch already yielded (or restored)
        self._resume: tuple[int, int] | None = None  # (epoch, position) from load_state_dict

    # -- pool and shards -----------------------------------------------------------------------
    def fraction(self, epoch: int) -> float:
        """Fraction of the data in play at ``epoch`` (1 when the curriculum is off)."""
        if not self.enabled:
            return 1.0
        return pacing_fraction(self.pacing, epoch, self.full_at_epoch, self.start_fraction, self.num_steps)

    def _group_sizes(self, frac: float) -> list[int]:
        return [min(len(o), math.ceil(frac * len(o) - 1e-9)) for o in self.group_orders or []]

    def pool_size(self, epoch: int) -> int:
        return int(self.pool(epoch).shape[0])

    def pool(self, epoch: int) -> np.ndarray:
        """Row indices in play at ``epoch``, easiest first (per group, when grouped); all rows in
        index order when the curriculum is off."""
        n = self.num_samples
        if not self.enabled:
            return np.arange(n)
        # At least one full batch per rank, so the earliest epochs still train every rank.
        need = max(min(n, self.num_replicas * self.batch_size), 1)
        frac = self.fraction(epoch)
        if self.group_orders is None:
            return self.order[: max(min(n, math.ceil(frac * n - 1e-9)), need)]
        if sum(self._group_sizes(frac)) < need:
            frac = need / n  # scale every group up alike; ceil per group keeps the sum >= need
        return np.concatenate([o[:k] for o, k in zip(self.group_orders, self._group_sizes(frac))])

    def _generator(self, epoch: int) -> np.random.Generator:
        # Depends on (seed, epoch) only: identical on every rank and on every resume.
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))

    def shard_length(self, epoch: int | None = None) -> int:
        n = self.pool_size(self.epoch if epoch is None else epoch)
        return n // self.num_replicas if self.drop_last else -(-n // self.num_replicas)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's full shard of ``epoch`` (default: the current one), in iteration order."""
        epoch = self.epoch if epoch is None else epoch
        pool = self.pool(epoch)
        shuffled = pool[self._generator(epoch).permutation(pool.shape[0])]
        per = self.shard_length(epoch)
        total = per * self.num_replicas
        shuffled = shuffled[:total] if self.drop_last else np.resize(shuffled, total)  # resize wraps
        return shuffled[self.rank: total: self.num_replicas]

    def num_batches(self, epoch: int | None = None) -> int:
        return -(-self.shard_length(epoch) // self.batch_size)

    # -- Sampler protocol ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; keeps a restored position only if it belongs to this epoch."""
        self.epoch = int(epoch)
        self.position = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            self.position = self._resume[1]

    def __len__(self) -> int:
        return self.shard_length()

    def __iter__(self) -> Iterator[int]:
        idx = self.epoch_indices()
        start = self.position
        self._resume = None  # a restored position is used once
        for k in range(start, idx.shape[0]):
            self.position = k + 1
            yield int(idx[k])

    # -- resume ----------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, object]:
        return {"num_samples": self.num_samples, "num_replicas": self.num_replicas, "seed": self.seed,
                "pacing": self.pacing, "start_fraction": self.start_fraction,
                "full_at_epoch": self.full_at_epoch, "num_steps": self.num_steps,
                "batch_size": self.batch_size, "drop_last": self.drop_last, "enabled": self.enabled,
                "order_head": [int(i) for i in self.order[:8]],
                "groups": None if self.group_orders is None else [len(o) for o in self.group_orders]}

    def state_dict(self, position: int | None = None) -> dict[str, object]:
        """Epoch and position within it. The position defaults to the indices this rank has
        yielded; a loader that prefetches ahead (num_workers > 0) should pass the number of
        indices its trainer actually consumed (steps this epoch * batch size)."""
        pos = self.position if position is None else int(position)
        if not 0 <= pos <= self.shard_length():
            raise CurriculumError(f"position {pos} is outside 0..{self.shard_length()} of epoch {self.epoch}")
        return {"epoch": self.epoch, "position": pos, "settings": self._fingerprint()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore; the next iteration of the saved epoch starts where the saved run stopped.
        Refuses a state saved with other settings (the remaining sequence would differ)."""
        try:
            epoch, pos, settings = int(state["epoch"]), int(state["position"]), state["settings"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CurriculumError(f"malformed sampler state: {exc!r}") from None
        mine = self._fingerprint()
        if settings != mine:
            diff = {k: (settings.get(k), v) for k, v in mine.items() if settings.get(k) != v}
            raise CurriculumError(f"sampler state was saved with other settings (saved, now): {diff}")
        if not 0 <= pos <= self.shard_length(epoch):
            raise CurriculumError(f"position {pos} is outside 0..{self.shard_length(epoch)} of epoch {epoch}")
        self._resume = (epoch, pos)
        self.set_epoch(epoch)

    @classmethod
    def plain(cls, num_samples: int, **kwargs: object) -> "CurriculumSampler":
        """Seeded shuffled sampler over all rows (the "no curriculum" ablation)."""
        return cls(np.zeros(num_samples), enabled=False, **kwargs)
