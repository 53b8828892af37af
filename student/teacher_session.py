"""The student side of the teacher service for one training run: a ``Distiller`` over a TeacherPool.

``TeacherSession.open`` joins the service the entry point names (a Ray address and teacher names,
or ``service.endpoints`` for servers started without Ray), waits for every teacher, and refuses any
trained on another item vocabulary. It never starts the service: ``launch/distill.py`` starts the
embedded one and shuts it down. As a ``student.distiller.Distiller`` it builds each batch's
candidates (``prepare``), reads soft labels ``service.prefetch`` batches ahead (``soft_labels``)
and computes CE + lambda * KD with the integration (``loss``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ckd.config import ConfigError
from ckd.data.multidomain import MultiDomainDataset
from student.distill import DistillLoss, build_candidates
from student.distiller import PreparedBatch, SoftLabels
from student.models.base import StudentBatch

log = logging.getLogger("ckd")


class TeacherSession:
    """Distills from the teachers of one TeacherPool (implements ``student.distiller.Distiller``)."""

    def __init__(self, cfg, dataset: MultiDomainDataset, acc, pool, infos: dict[str, Any],
                 covered_domains: int | None = None):
        self.cfg, self.dataset, self.acc, self.pool = cfg, dataset, acc, pool
        self.infos = infos
        self.domain_ranges = [dataset.domain_range(d) for d in range(dataset.num_domains)]
        temps = {n: float(cfg.service.temperatures.get(n, i.temperature)) for n, i in infos.items()}
        kd = cfg.kd
        self.criterion = DistillLoss(self.domain_ranges, temps, kd_weight=kd.lambda_kd, temperature=kd.temperature,
                                     integration=kd.integration, a=kd.alpha, b=kd.beta,
                                     instance_weighting=kd.instance_weighting,
                                     in_batch_negatives=kd.in_batch_negatives,
                                     label_smoothing=cfg.train.label_smoothing, kd_precision=kd.precision,
                                     gate=kd.gate, gate_floor=kd.gate_floor)
        self.kd_skipped_batches = 0
        self.reliability: dict[str, float] = {}  # teacher prior input (set_reliability_prior)
        self._row_scores: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}
        # Rows seen and rows that got soft labels, per domain (metrics.json "teacher_client"): the
        # evidence that every row of every covered domain was distilled.
        self.rows_seen = np.zeros(dataset.num_domains, dtype=np.int64)
        self.rows_labelled = np.zeros(dataset.num_domains, dtype=np.int64)
        # Rows the teacher-better gate let through (kd.gate), per domain: where the teachers still teach.
        self.rows_gate_open = np.zeros(dataset.num_domains, dtype=np.int64)
        # The teachers serve the first k domains' id space; rows of later domains get no KD.
        self.covered_domains = dataset.num_domains if covered_domains is None else covered_domains

    # -- opening / closing ---------------------------------------------------------------------
    @classmethod
    def open(cls, cfg, dataset: MultiDomainDataset, acc, ray_address: str = "",
             teachers: Sequence[str] = ()) -> "TeacherSession":
        """Join the teacher service: ``service.endpoints`` if given, else the Ray cluster at
        ``ray_address`` (default ``service.ray_address``) for ``teachers`` (default ``service.teachers``)."""
        from student.teacher_pool import TeacherPool

        svc = cfg.service
        names = list(teachers) or list(svc.teachers)
        token = os.environ.get(svc.token_env) if svc.token_env else None
        settings = dict(timeout_s=svc.deadline_s, on_unavailable=svc.failure_policy,
                        wait_budget_s=svc.wait_budget_s, token=token)
        if svc.endpoints:
            # Static replica list (servers started without Ray, e.g. by research/experiments.py).
            names = names or list(svc.endpoints)
            pool = TeacherPool({n: svc.endpoints[n] for n in names}, **settings)
            return cls._checked(cfg, dataset, acc, pool)
        address = ray_address or svc.ray_address
        if not address:
            raise ConfigError("service: no Ray address to join (the entry point starts the embedded service "
                              "of service.spec; or give service.ray_address / service.endpoints)")
        if not names:
            raise ConfigError("service: name the teachers (service.teachers) or give a deploy spec (service.spec)")
        pool = TeacherPool.from_ray(address, svc.namespace, names, **settings)
        return cls._checked(cfg, dataset, acc, pool)

    @classmethod
    def _checked(cls, cfg, dataset: MultiDomainDataset, acc, pool) -> "TeacherSession":
        """Wait for every teacher, then refuse any trained on another item vocabulary."""
        from protos.contract import TeacherContractError

        pool.wait_ready(timeout=cfg.service.ready_timeout_s)
        try:
            infos, covered = pool.check_coverage(dataset.prefix_vocabularies())
        except TeacherContractError as err:
            hint = vocabulary_order_hint(pool.describe(), dataset)
            if hint:
                raise TeacherContractError(f"{err}. {hint}") from None
            raise
        for n, i in infos.items():
            log.info("teacher %s: kind %s, %d replica(s), tau %.3f, checkpoint %s", n, i.kind, i.replicas,
                     i.temperature, i.checkpoint_sha256[:12])
        if covered < dataset.num_domains:
            log.info("teachers cover %s; rows of %s train on CE only", ",".join(dataset.domain_names[:covered]),
                     ",".join(dataset.domain_names[covered:]))
        session = cls(cfg, dataset, acc, pool, infos, covered_domains=covered)
        if cfg.kd.teacher_prior == "reliability":
            session.set_reliability_prior()
        return session

    def set_reliability_prior(self) -> dict[str, float]:
        """Score every training row once and set the integration's teacher prior from each teacher's
        mean log-probability of the true item (``student.distill.reliability_prior``)."""
        from student.distill import reliability_prior

        kd = self.cfg.kd
        scores = self.row_scores("train", negatives=kd.prior_negatives, seed=self.cfg.train.seed)
        self.reliability.clear()
        for name, s in scores.items():
            rows = np.isfinite(s).all(axis=1)
            if not rows.any():
                continue  # a teacher that answered for no row (skipped) gets no prior
            z = torch.from_numpy(s[rows].astype(np.float64)) / float(self.criterion.teacher_temps[name])
            self.reliability[name] = float(torch.log_softmax(z, dim=1)[:, 0].mean())
        prior = reliability_prior(self.reliability, kd.prior_strength)
        self.criterion.log_prior = prior
        log.info("teacher prior (reliability, strength %.2f): %s", kd.prior_strength,
                 ", ".join(f"{n} R={self.reliability[n]:.3f} w={np.exp(v):.3f}" for n, v in prior.items()))
        return prior

    def close(self) -> None:
        """Close the pool and wait until no rank is still scoring (the caller may then stop the service)."""
        self.pool.close()
        self.acc.wait_for_everyone()

    def info(self) -> dict[str, Any]:
        return {n: dataclasses.asdict(i) for n, i in self.infos.items()}

    def stats(self) -> dict[str, float]:
        names = self.dataset.domain_names
        extra: dict[str, Any] = {"teacher_reliability": self.reliability} if self.reliability else {}
        if self.cfg.kd.gate != "none":
            extra["kd_rows_gate_open"] = {n: int(v) for n, v in zip(names, self.rows_gate_open)}
        return {**self.pool.stats(), **extra, "kd_skipped_batches": self.kd_skipped_batches,
                "kd_rows_seen": {n: int(v) for n, v in zip(names, self.rows_seen)},
                "kd_rows_labelled": {n: int(v) for n, v in zip(names, self.rows_labelled)}}

    def row_scores(self, split: str = "train", negatives: int = 100, seed: int = 0,
                   batch_size: int = 512) -> dict[str, np.ndarray]:
        """Every teacher's raw scores of each row of ``split`` against [true item, ``negatives``
        items drawn (seeded, with replacement) from the row's domain]: {teacher: float32 [N, 1 + K]}.
        Rows of domains the teachers do not cover get NaN. The same on every rank."""
        key = (split, int(negatives), int(seed))
        cached = self._row_scores.get(key)
        if cached is not None:  # the curriculum and the teacher prior may both ask
            return cached
        ex = self.dataset.splits[split]
        n = len(ex)
        gen = np.random.default_rng(seed)
        cands = np.empty((n, 1 + negatives), dtype=np.int64)
        cands[:, 0] = ex.targets
        for d, (start, stop) in enumerate(self.domain_ranges):
            rows = np.nonzero(ex.domains == d)[0]
            cands[rows, 1:] = gen.integers(start, stop, size=(rows.size, negatives))
        out = {t: np.full((n, 1 + negatives), np.nan, dtype=np.float32) for t in self.infos}
        covered = np.nonzero(ex.domains < self.covered_domains)[0]
        for b in range(0, covered.size, batch_size):
            rows = covered[b: b + batch_size]
            L = int(ex.lengths[rows].max())
            scores = self.pool.score(ex.histories[rows, :L], ex.lengths[rows], cands[rows])
            for t, v in scores.items():
                if v is not None:
                    out[t][rows] = v
        self._row_scores[key] = out
        return out

    # -- Distiller -----------------------------------------------------------------------------
    def prepare(self, batch: StudentBatch, step_seed: int) -> PreparedBatch:
        """The batch's candidates and masks, sampled from a generator seeded with ``step_seed``."""
        gen = torch.Generator().manual_seed(step_seed)
        kd_rows = None
        targets, domains = batch.targets, batch.domains
        if self.covered_domains < self.dataset.num_domains:
            kd_rows = torch.nonzero(domains < self.covered_domains).squeeze(1)
            targets, domains = targets[kd_rows], domains[kd_rows]
        cands, tcol, vmask = build_candidates(targets, domains, self.cfg.kd.num_sampled, self.domain_ranges, gen)
        return PreparedBatch(batch, step_seed, cands, tcol, vmask, kd_rows)

    @staticmethod
    def make_request(pb: PreparedBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The Score request of a prepared batch (its covered rows only); None when it has none."""
        hist, lens = pb.batch.histories, pb.batch.lengths
        if pb.kd_rows is not None:
            if len(pb.kd_rows) == 0:
                return None
            lens = lens[pb.kd_rows]
            hist = hist[pb.kd_rows, : int(lens.max())]
        return hist.numpy(), lens.numpy(), pb.candidates.numpy()

    def soft_labels(self, batches: Iterable[PreparedBatch]) -> Iterable[tuple[PreparedBatch, SoftLabels]]:
        """The batches in order with their scores; requests go out ``service.prefetch`` batches ahead
        (their threads on ``service.prefetch_cpus`` when set). With ``kd.targets_on=prefetch`` each
        batch also arrives with its ``kd_targets``, computed in the prefetch thread."""
        from ckd.affinity import parse_cpus
        from student.soft_labels import SoftLabelReader

        svc = self.cfg.service
        finish = self.attach_targets if self.cfg.kd.targets_on == "prefetch" else None
        cpus = parse_cpus(svc.prefetch_cpus) if svc.prefetch_cpus else None
        return SoftLabelReader(batches, self.pool, self.make_request, window=svc.prefetch, finish=finish,
                               thread_cpus=cpus)

    def attach_targets(self, pb: PreparedBatch, soft: SoftLabels) -> SoftLabels:
        """Set ``pb.kd_targets``, the teachers' side of the batch's KD term (``DistillLoss.targets``),
        from its scores; runs in the prefetch thread as the scores arrive. Returns ``soft`` unchanged.
        Leaves it None when no teacher answered (the loss then counts the batch as skipped)."""
        if not any(v is not None for v in soft.values()):
            return soft
        t0 = time.perf_counter()
        scores = score_tensors(soft)
        domains = pb.batch.domains if pb.kd_rows is None else pb.batch.domains[pb.kd_rows]
        pb.kd_targets = self.criterion.targets(pb.candidates, pb.target_col, pb.valid_mask, domains, scores)
        add = getattr(self.pool, "add_timing", None)
        if add is not None:
            add("kd_targets", (time.perf_counter() - t0) * 1e3)
        return soft

    def loss(self, logits: torch.Tensor, prepared: PreparedBatch, batch: StudentBatch,
             soft: SoftLabels) -> tuple[torch.Tensor, dict[str, float]]:
        """CE + lambda * KD (``student.distill.DistillLoss``); counts batches every teacher skipped."""
        dev = logits.device
        targets = prepared.kd_targets
        # Scores to tensors only when the loss still needs them (no targets from the prefetch).
        scores = score_tensors(soft, dev) if targets is None else {}
        labelled = any(v is not None for v in soft.values())
        if soft and not labelled:
            self.kd_skipped_batches += 1
        nd = self.dataset.num_domains
        self.rows_seen += np.bincount(batch.domains.cpu().numpy(), minlength=nd)
        if labelled:
            doms = batch.domains if prepared.kd_rows is None else batch.domains[prepared.kd_rows.to(batch.domains.device)]
            self.rows_labelled += np.bincount(doms.cpu().numpy(), minlength=nd)
        kd_rows = prepared.kd_rows.to(dev) if prepared.kd_rows is not None else None
        total, terms = self.criterion(logits, batch.targets, batch.domains, prepared.candidates.to(dev),
                                      prepared.target_col.to(dev), prepared.valid_mask.to(dev), scores,
                                      kd_rows=kd_rows, kd_targets=targets)
        gate = self.criterion.last_gate
        if labelled and gate is not None:
            self.rows_gate_open += np.bincount(doms[(gate == 1).to(doms.device)].cpu().numpy(), minlength=nd)
            self.criterion.last_gate = None
        return total, {k: float(v) for k, v in terms.items()}


def score_tensors(soft: SoftLabels, device: torch.device | str = "cpu") -> dict[str, torch.Tensor | None]:
    """The teachers' float32 score arrays as tensors on ``device`` (copied: decoded replies can be
    read-only buffers); None stays None (a teacher skipped for the batch)."""
    return {t: (torch.from_numpy(np.array(v, dtype=np.float32)).to(device) if v is not None else None)
            for t, v in soft.items()}


def vocabulary_order_hint(infos: dict[str, Any], dataset: MultiDomainDataset) -> str:
    """For teachers whose item vocabulary is no prefix of the student's: the domain order each was
    trained on, when it is an ordering of the student's own domains, next to the student's order
    (the fix is then to list the domains in the teacher's order). "" when nothing can be said."""
    prefixes = {h for h, _ in dataset.prefix_vocabularies()}
    hints = []
    for name, info in infos.items():
        if info.vocab_hash in prefixes:
            continue
        order = dataset.domain_order_of(info.vocab_hash)
        if order is not None:
            hints.append(f"teacher {name} was trained on the domains in the order [{', '.join(order)}], "
                         f"the student's order is [{', '.join(dataset.domain_names)}]: global item ids "
                         f"differ, so list the student's domains in the teacher's order "
                         f"(data.domains=[{','.join(order + [d for d in dataset.domain_names if d not in order])}])")
    return "; ".join(hints)
