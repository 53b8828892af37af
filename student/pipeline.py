"""Wiring of one student run: accelerator, data, model, sampler, teachers, trainer, report.

The teacher service is not started here: the entry point (``launch/distill.py``) starts the
embedded one and passes its Ray address to ``run_distillation`` on every rank.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ckd.config import ConfigError, to_dict
from ckd.data.multidomain import MultiDomainDataset, load_multidomain
from ckd.metrics import format_table
from ckd.run_dir import claim_run_dir, setup_logging, write_run_header
from student.models import build_student

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("ckd")


def make_accelerator() -> Accelerator:
    """Accelerator for CPU or GPU, DDP or DeepSpeed (see STACK.md for the CPU traps)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = [InitProcessGroupKwargs(backend="gloo")] if (distributed and not cuda) else []
    # cpu=True would silently drop DeepSpeed; without it on CPU DDP would not synchronise.
    return Accelerator(cpu=(not cuda) and not deepspeed, kwargs_handlers=handlers)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


_BROADCAST_BYTES = 512


def broadcast_str(acc: Accelerator, text: str) -> str:
    """Rank 0's string on every rank (a fixed-size uint8 tensor: no pickles between ranks)."""
    if acc.num_processes == 1:
        return text
    from accelerate.utils import broadcast

    buf = torch.zeros(_BROADCAST_BYTES, dtype=torch.uint8, device=acc.device)
    if acc.is_main_process:
        raw = text.encode()
        if len(raw) > _BROADCAST_BYTES:
            raise ConfigError(f"too long to hand to other ranks ({len(raw)} > {_BROADCAST_BYTES} bytes): {text!r}")
        buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    buf = broadcast(buf, from_process=0).cpu()
    return bytes(buf[buf != 0].tolist()).decode()


def shared_run_dir(cfg, acc) -> Path:
    """The same run directory on every rank (rank 0's timestamp is broadcast)."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = torch.tensor([int(time.time())], dtype=torch.int64, device=acc.device)
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        stamp = broadcast(stamp, from_process=0)
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.localtime(int(stamp.item())))


def checkpoint_config(cfg, dataset: MultiDomainDataset) -> dict[str, Any]:
    """The JSON-able config every student checkpoint stores (config.json): ``kind`` and ``kwargs``
    rebuild the model with ``student.models.build_student``, as launch/evaluate.py does."""
    kwargs = {"hidden": cfg.model.hidden, **cfg.model.extra}
    if cfg.model.kind == "sasrec":
        kwargs.update(layers=cfg.model.layers, heads=cfg.model.heads, dropout=cfg.model.dropout,
                      attn_dropout=cfg.model.dropout, max_len=cfg.data.max_len)
    return {"kind": cfg.model.kind, "kwargs": kwargs, "vocab_hash": dataset.vocab_hash(),
            "vocab_size": dataset.vocab_size, "domains": dataset.domain_names, "max_len": cfg.data.max_len}


def build_sampler(cfg, dataset: MultiDomainDataset, acc, teacher_session=None):
    """The curriculum sampler; with ``curriculum.teacher_signal`` the teachers of
    ``teacher_session`` score every training row first (``student.curriculum.teacher_difficulty``)."""
    from student.curriculum import CurriculumSampler, difficulty_scores, teacher_difficulty

    cur = cfg.curriculum
    extra, extra_weight = None, 0.0
    if cur.enabled and cur.teacher_signal != "none":
        if teacher_session is None:
            raise ConfigError(f"curriculum.teacher_signal={cur.teacher_signal} needs the teacher service")
        scores = teacher_session.row_scores("train", negatives=cur.teacher_negatives, seed=cfg.train.seed)
        temps = {n: float(cfg.service.temperatures.get(n, i.temperature)) for n, i in teacher_session.infos.items()}
        extra = teacher_difficulty(scores, temps, cur.teacher_signal)
        extra = np.where(np.isfinite(extra), extra, np.nanmean(extra) if np.isfinite(extra).any() else 0.0)
        extra_weight = cur.teacher_weight
        log.info("curriculum: teacher %s scored %d training rows (mean difficulty %.4f)", cur.teacher_signal,
                 extra.shape[0], float(extra.mean()))
    diff = difficulty_scores(dataset, "train", length_weight=cur.length_weight,
                             popularity_weight=cur.popularity_weight, extra=extra, extra_weight=extra_weight)
    return CurriculumSampler(diff, pacing=cfg.curriculum.pacing, start_fraction=cfg.curriculum.start_fraction,
                             full_at_epoch=cfg.curriculum.full_at_epoch, seed=cfg.train.seed,
                             num_replicas=acc.num_processes, rank=acc.process_index,
                             batch_size=cfg.train.batch_size, enabled=cfg.curriculum.enabled,
                             groups=dataset.splits["train"].domains)


def prepare_run(cfg) -> Accelerator:
    """Checks, the accelerator, threads, seeds, the run directory (same on every rank; written into
    ``cfg.run_dir``) and logging into it; returns the accelerator."""
    from student.config import check_run

    check_run(cfg)
    acc = make_accelerator()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)
    run_dir = shared_run_dir(cfg, acc)
    cfg.run_dir = str(run_dir)
    if acc.is_main_process:
        claim_run_dir(run_dir)  # before anything is written into it
    setup_logging(run_dir, acc.process_index)
    return acc


def run_distillation(cfg, acc: Accelerator | None = None, *, ray_address: str = "",
                     teachers: Sequence[str] = ()) -> dict[str, Any] | None:
    """Run one student training job described by a resolved DistillConfig.

    ``acc``: the accelerator of ``prepare_run(cfg)`` when the caller already ran it (it does when it
    starts the embedded teacher service first). ``ray_address`` and ``teachers``: the teacher service
    to join, overriding ``service.ray_address`` and ``service.teachers``."""
    if acc is None:
        acc = prepare_run(cfg)
    run_dir = Path(cfg.run_dir)
    dataset = load_multidomain(cfg.data.data_dir, cfg.data.domains, max_len=cfg.data.max_len)
    if cfg.train.objective == "all_positions":
        from student.sequence_targets import every_position_view

        dataset.splits["train"] = every_position_view(dataset.splits["train"])
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    log.info("data: %s, %d items, %d train rows; world size %d on %s, process group backend %s, %s",
             ",".join(dataset.domain_names), dataset.vocab_size - 1, len(dataset.splits["train"]),
             acc.num_processes, acc.device, backend, acc.distributed_type)
    seed_everything(cfg.train.seed)  # same initial weights on every rank, whatever loading consumed
    model_config = checkpoint_config(cfg, dataset)
    model = build_student(model_config["kind"], dataset, **model_config["kwargs"])
    # A teacher-driven curriculum needs the teachers' scores, so its sampler waits for the session.
    teacher_driven = cfg.curriculum.enabled and cfg.curriculum.teacher_signal != "none"
    sampler = None if teacher_driven else build_sampler(cfg, dataset, acc)

    from student.trainer import Trainer

    teacher_session = None
    teacher_info: dict[str, Any] = {}
    if cfg.service.active:
        from student.teacher_session import TeacherSession

        teacher_session = TeacherSession.open(cfg, dataset, acc, ray_address=ray_address, teachers=teachers)
        teacher_info = teacher_session.info()
    if teacher_driven:
        sampler = build_sampler(cfg, dataset, acc, teacher_session)
    if acc.is_main_process:
        write_run_header(run_dir, cfg, {"seed": cfg.train.seed, "world_size": acc.num_processes,
                                        "device": str(acc.device), "vocab_hash": dataset.vocab_hash(),
                                        "teachers": teacher_info})
    try:
        trainer = Trainer(cfg, dataset, model, acc, run_dir, sampler, model_config, distiller=teacher_session)
        metrics = trainer.fit()
        if teacher_session is not None and acc.is_main_process:
            metrics["teacher_client"] = teacher_session.stats()
            from ckd.run_dir import write_metrics

            write_metrics(run_dir, metrics)
    finally:
        if teacher_session is not None:
            teacher_session.close()
    if acc.is_main_process:
        print(f"\nrun directory: {run_dir}")
        print(format_table({"valid": metrics["valid"], "test": metrics["test"]}))
        t = metrics["timing"]
        speed = (f"{t['steps_per_s']:.1f} steps/s  |  step {t['step_ms']:.1f} ms, waiting for soft labels "
                 f"{t['wait_ms']:.1f} ms" if t else "no steps run in this process")
        print(f"best epoch {metrics['best_epoch']}  |  {speed}  |  {metrics['num_parameters']:,} parameters")
    acc.wait_for_everyone()
    acc.end_training()
    return metrics if acc.is_main_process else {"rank": acc.process_index, "config": to_dict(cfg)}
