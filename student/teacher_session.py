"""The student side of the teacher service for one training run.

Opens the service (joins ``service.ray_address``, or on rank 0 starts the embedded local Ray with
the replicas of ``service.spec`` and hands its address to the other ranks), checks every teacher's
contract against the student's data, and gives the trainer three hooks: ``prepare`` (build the
batch's candidates before teachers are asked), ``soft_labels`` (prefetching reader: requests go out
``service.prefetch`` batches ahead) and ``loss_fn`` (CE + lambda * KD with the integration).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Iterable

import numpy as np
import torch

from ckd.config import ConfigError
from ckd.data.multidomain import MultiDomainDataset
from student.distill import DistillLoss, build_candidates
from student.models.base import StudentBatch
from student.trainer import PreparedBatch

log = logging.getLogger("ckd")

_ADDR_BYTES = 512


def _broadcast_str(acc, text: str) -> str:
    """Rank 0's string on every rank (a fixed-size uint8 tensor: no pickles between ranks)."""
    if acc.num_processes == 1:
        return text
    from accelerate.utils import broadcast

    buf = torch.zeros(_ADDR_BYTES, dtype=torch.uint8, device=acc.device)
    if acc.is_main_process:
        raw = text.encode()
        if len(raw) > _ADDR_BYTES:
            raise ConfigError(f"Ray address too long to hand to other ranks: {text!r}")
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    buf = broadcast(buf, from_process=0).cpu()
    return bytes(buf[buf != 0].tolist()).decode()


class TeacherSession:
    def __init__(self, cfg, dataset: MultiDomainDataset, acc, pool, infos: dict[str, Any], deployment=None,
                 covered_domains: int | None = None):
        self.cfg, self.dataset, self.acc, self.pool = cfg, dataset, acc, pool
        self.infos = infos
        self.deployment = deployment
        self.domain_ranges = [dataset.domain_range(d) for d in range(dataset.num_domains)]
        temps = {n: float(cfg.service.temperatures.get(n, i.temperature)) for n, i in infos.items()}
        kd = cfg.kd
        self.loss = DistillLoss(self.domain_ranges, temps, kd_weight=kd.lambda_kd, temperature=kd.temperature,
                                integration=kd.integration, a=kd.alpha, b=kd.beta,
                                instance_weighting=kd.instance_weighting, in_batch_negatives=kd.in_batch_negatives,
                                label_smoothing=cfg.train.label_smoothing)
        self.kd_skipped_batches = 0
        # The teachers serve the first k domains' id space; rows of later domains get no KD.
        self.covered_domains = dataset.num_domains if covered_domains is None else covered_domains

    # -- opening / closing ---------------------------------------------------------------------
    @classmethod
    def open(cls, cfg, dataset: MultiDomainDataset, acc) -> "TeacherSession":
        from student.teacher_pool import TeacherPool

        svc = cfg.service
        deployment = None
        names = list(svc.teachers)
        token = os.environ.get(svc.token_env) if svc.token_env else None
        settings = dict(timeout_s=svc.deadline_s, on_unavailable=svc.failure_policy,
                        wait_budget_s=svc.wait_budget_s, token=token)
        if svc.endpoints:
            # Static replica list (servers started without Ray, e.g. by launch/experiments.py).
            names = names or list(svc.endpoints)
            pool = TeacherPool({n: svc.endpoints[n] for n in names}, **settings)
            return cls._checked(cfg, dataset, acc, pool, None)
        if svc.spec and not svc.ray_address:
            from cluster.deploy import load_spec

            spec = load_spec(svc.spec)
            names = names or [t.name for t in spec.teachers]
            unknown = sorted(set(names) - {t.name for t in spec.teachers})
            if unknown:
                raise ConfigError(f"service.teachers names {unknown}, not in the deploy spec {svc.spec}")
        if not names:
            raise ConfigError("service: name the teachers (service.teachers) or give a deploy spec (service.spec)")
        address = svc.ray_address
        if not address:
            if not svc.spec:
                raise ConfigError("service.spec is required for the embedded teacher service")
            if acc.is_main_process:
                from cluster.deploy import start_embedded

                spec.teachers = [t for t in spec.teachers if t.name in names]
                replicas = sum(t.replicas for t in spec.teachers)
                log.info("starting embedded Ray with %d teacher replica(s): %s", replicas, ", ".join(names))
                address, deployment = start_embedded(spec, num_cpus=max(2, replicas + 1))
            address = _broadcast_str(acc, address or "")
        pool = TeacherPool.from_ray(address, svc.namespace, names, **settings)
        return cls._checked(cfg, dataset, acc, pool, deployment)

    @classmethod
    def _checked(cls, cfg, dataset: MultiDomainDataset, acc, pool, deployment) -> "TeacherSession":
        """Wait for every teacher, then refuse any trained on another item vocabulary."""
        pool.wait_ready(timeout=cfg.service.ready_timeout_s)
        infos, covered = pool.check_coverage(dataset.prefix_vocabularies())
        for n, i in infos.items():
            log.info("teacher %s: kind %s, %d replica(s), tau %.3f, checkpoint %s", n, i.kind, i.replicas,
                     i.temperature, i.checkpoint_sha256[:12])
        if covered < dataset.num_domains:
            log.info("teachers cover %s; rows of %s train on CE only", ",".join(dataset.domain_names[:covered]),
                     ",".join(dataset.domain_names[covered:]))
        return cls(cfg, dataset, acc, pool, infos, deployment, covered_domains=covered)

    def close(self) -> None:
        self.pool.close()
        self.acc.wait_for_everyone()  # no rank may still be scoring when the replicas go
        if self.deployment is not None:
            self.deployment.shutdown()

    def info(self) -> dict[str, Any]:
        return {n: dataclasses.asdict(i) for n, i in self.infos.items()}

    def stats(self) -> dict[str, float]:
        return {**self.pool.stats(), "kd_skipped_batches": self.kd_skipped_batches}

    # -- trainer hooks -------------------------------------------------------------------------
    def prepare(self, batch: StudentBatch, seed: int) -> PreparedBatch:
        gen = torch.Generator().manual_seed(seed)
        kd_rows = None
        targets, domains = batch.targets, batch.domains
        if self.covered_domains < self.dataset.num_domains:
            kd_rows = torch.nonzero(domains < self.covered_domains).squeeze(1)
            targets, domains = targets[kd_rows], domains[kd_rows]
        cands, tcol, vmask = build_candidates(targets, domains, self.cfg.kd.num_sampled, self.domain_ranges, gen)
        return PreparedBatch(batch, seed, cands, tcol, vmask, kd_rows)

    @staticmethod
    def make_request(pb: PreparedBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        hist, lens = pb.batch.histories, pb.batch.lengths
        if pb.kd_rows is not None:
            if len(pb.kd_rows) == 0:
                return None
            lens = lens[pb.kd_rows]
            hist = hist[pb.kd_rows, : int(lens.max())]
        return hist.numpy(), lens.numpy(), pb.candidates.numpy()

    def soft_labels(self, batches: Iterable[PreparedBatch]):
        from student.soft_labels import SoftLabelReader

        return SoftLabelReader(batches, self.pool, self.make_request, window=self.cfg.service.prefetch)

    def loss_fn(self, logits: torch.Tensor, pb: PreparedBatch, batch: StudentBatch, soft, trainer):
        dev = logits.device
        scores = {t: (torch.from_numpy(np.array(v, dtype=np.float32)).to(dev) if v is not None else None)
                  for t, v in soft.items()}
        if soft and all(v is None for v in scores.values()):
            self.kd_skipped_batches += 1
        kd_rows = pb.kd_rows.to(dev) if pb.kd_rows is not None else None
        total, terms = self.loss(logits, batch.targets, batch.domains, pb.candidates.to(dev),
                                 pb.target_col.to(dev), pb.valid_mask.to(dev), scores, kd_rows=kd_rows)
        return total, {k: float(v) for k, v in terms.items()}

    def trainer_hooks(self) -> dict[str, Any]:
        return {"prepare": self.prepare, "soft_labels": self.soft_labels, "loss_fn": self.loss_fn}
