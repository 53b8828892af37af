"""The student training loop under accelerate (single process, DDP or DeepSpeed).

One trainer owns: per-rank curriculum shards, the forward/backward step (CE over the instance's
domain, plus KD when soft labels come with the batch), evaluation on rank 0, early stopping on
valid NDCG@10, best/last checkpoints and exact resume at an epoch boundary.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ckd.data.multidomain import MultiDomainDataset
from ckd.loop import (commit_dir, count_parameters, epoch_batches, fresh_dir, peak_memory_mb, rng_state,
                      set_rng_state, staging_dir)
from ckd.metrics import evaluate_model, format_table
from ckd.run_dir import write_metrics
from student.distill import domain_ce
from student.distiller import Distiller, PreparedBatch, SoftLabels
from student.models.base import StudentBatch, StudentModel

log = logging.getLogger("ckd")


def make_student_batch(dataset: MultiDomainDataset, split: str, idx: np.ndarray) -> StudentBatch:
    ex = dataset.splits[split]
    # Trim padding columns no row in this batch uses: attention cost follows the longest row.
    L = int(ex.lengths[idx].max())
    pos = None if ex.position_targets is None else torch.as_tensor(ex.position_targets[idx, :L])
    return StudentBatch(torch.as_tensor(ex.users[idx]), torch.as_tensor(ex.domains[idx]),
                        torch.as_tensor(ex.histories[idx, :L]), torch.as_tensor(ex.lengths[idx]),
                        torch.as_tensor(ex.targets[idx]), pos)


def plateau_lr(lr: float, bad_epochs: int, decay_patience: int, factor: float) -> float:
    """The lr for the next epoch: ``lr * factor`` when ``bad_epochs`` (epochs in a row without a
    better valid NDCG@10) has just reached a multiple of ``decay_patience``, else ``lr``."""
    if decay_patience > 0 and bad_epochs > 0 and bad_epochs % decay_patience == 0:
        return lr * factor
    return lr


def scheduled_lr(base_lr: float, step: int, progress: float, warmup_steps: int, schedule: str) -> float:
    """The lr of optimizer step ``step`` (0-based, counted over the whole run) at ``progress``
    (epochs done, fractional, over the schedule's horizon in epochs): a linear warm-up factor over
    the first ``warmup_steps`` steps times, for "cosine", a half cosine that reaches 0 at progress 1
    and stays there. Progress is measured in epochs so a curriculum's growing epochs need no step count."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    if schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return lr


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def save_student(model: StudentModel, directory: Path, config: dict[str, Any]) -> None:
    """Weights as safetensors + the constructor config as JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


class Trainer:
    """Trains ``model`` on ``dataset`` with ``accelerator``; see module docstring."""

    def __init__(self, cfg, dataset: MultiDomainDataset, model: StudentModel, accelerator, run_dir: Path,
                 sampler, model_config: dict[str, Any], distiller: Distiller | None = None):
        self.cfg = cfg
        self.dataset = dataset
        self.acc = accelerator
        self.run_dir = run_dir
        self.sampler = sampler
        self.model_config = model_config
        self.distiller = distiller  # None: CE only
        self.device = accelerator.device
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None:
            # No DataLoader goes through prepare(): DeepSpeed learns the micro-batch from here, and
            # a plain torch optimizer is allowed (DeepSpeedCPUAdam would JIT-compile for ~40 s).
            ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
            ds_plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
        if ds_plugin is not None and cfg.train.length_sorted_pieces > 1:
            raise ValueError("train.length_sorted_pieces accumulates gradients over several backward passes "
                             "per step, which DeepSpeed's engine counts as steps: use DDP or one process")
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.ema = None
        if cfg.train.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(unwrap(self.model), multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay))
        self.domain_ranges = [dataset.domain_range(d) for d in range(dataset.num_domains)]
        self.state = {"epoch": 0, "global_step": 0, "best_ndcg10": -1.0, "best_epoch": -1, "bad_epochs": 0,
                      "history": []}
        self.timings: dict[str, float] = {"step_s": 0.0, "wait_s": 0.0, "eval_s": 0.0, "steps": 0}

    @property
    def eval_model(self) -> StudentModel:
        """The weights that are validated and kept as best: the moving average when on, else the live model."""
        return self.ema.module if self.ema is not None else unwrap(self.model)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def _deepspeed(self) -> bool:
        return getattr(self.acc.state, "deepspeed_plugin", None) is not None

    def save_last(self) -> None:
        """Everything needed to resume exactly at the next epoch boundary, written to a temporary
        folder first so an interruption mid-save leaves the previous ``last`` intact."""
        last = self.run_dir / "last"
        tmp = staging_dir(last)
        if self.is_main:
            fresh_dir(last)
        self.acc.wait_for_everyone()
        if self._deepspeed():
            # ZeRO partitions the optimizer state: every rank writes its own shard.
            self.acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        save_file(rng_state(), str(tmp / f"rng_rank{self.acc.process_index}.safetensors"))
        if self.is_main:
            save_student(unwrap(self.model), tmp, self.model_config)
            if self.ema is not None:
                save_file({k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()},
                          str(tmp / "ema.safetensors"))
            if not self._deepspeed():
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            sampler_state = self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}
            (tmp / "trainer_state.json").write_text(json.dumps({**self.state, "sampler": sampler_state}))
        self.acc.wait_for_everyone()
        if self.is_main:
            commit_dir(tmp, last)
        self.acc.wait_for_everyone()

    def try_resume(self) -> bool:
        """Resume from <run_dir>/last if present; returns whether it did."""
        last = self.run_dir / "last"
        if not (last / "trainer_state.json").is_file():
            return False
        state = json.loads((last / "trainer_state.json").read_text())
        sampler_state = state.pop("sampler", {})
        self.state.update(state)
        unwrap(self.model).load_state_dict(load_file(str(last / "model.safetensors")), strict=True)
        if self.ema is not None:
            if not (last / "ema.safetensors").is_file():
                raise RuntimeError(f"{last} has no ema.safetensors: it was saved with train.ema_decay=0, "
                                   "so this run cannot resume it with weight averaging on")
            self.ema.load_state_dict(load_file(str(last / "ema.safetensors"), device=str(self.device)))
        if self._deepspeed():
            self.acc.load_state(str(last / "accelerate"))
        else:
            opt = torch.load(last / "optimizer.pt", weights_only=True, map_location="cpu")
            self.optimizer.load_state_dict(opt)
        if hasattr(self.sampler, "load_state_dict") and sampler_state:
            self.sampler.load_state_dict(sampler_state)
        rng_path = last / f"rng_rank{self.acc.process_index}.safetensors"
        if rng_path.is_file():
            set_rng_state(load_file(str(rng_path)))
        log.info("resumed from %s at epoch %d (best valid ndcg@10 %.4f at epoch %d)", last,
                 self.state["epoch"], self.state["best_ndcg10"], self.state["best_epoch"])
        return True

    # -- training ------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch``: its curriculum shard, optionally length-bucketed (rows
        sorted by length within pools of batches, then the batch order shuffled, all seeded)."""
        t = self.cfg.train
        # The shard comes shuffled by the sampler; the batch order's own stream is per (seed, epoch, rank).
        rng = np.random.default_rng([t.seed, epoch, self.acc.process_index])
        batches = epoch_batches(self.sampler.epoch_indices(epoch), self.dataset.splits["train"].lengths,
                                t.batch_size, t.length_bucket_batches, rng.permutation, drop_last=True)
        if self.cfg.train.max_steps_per_epoch:
            batches = batches[: self.cfg.train.max_steps_per_epoch]
        return batches

    def _batches(self, epoch: int, selections: list[np.ndarray]) -> Iterator[PreparedBatch]:
        for b, sel in enumerate(selections):
            seed = (self.cfg.train.seed * 1_000_003 + epoch * 10_007 + b) * 97 + self.acc.process_index
            batch = make_student_batch(self.dataset, "train", sel)
            yield self.distiller.prepare(batch, seed) if self.distiller is not None else PreparedBatch(batch, seed)

    def ce_loss(self, logits: torch.Tensor, batch: StudentBatch) -> torch.Tensor:
        """Full-softmax CE over the items of each instance's own domain (each supervised position's,
        averaged over positions, when the batch carries position targets)."""
        if batch.position_targets is None:
            targets, domains = batch.targets, batch.domains
        else:
            keep = batch.position_targets != 0
            targets = batch.position_targets[keep]
            domains = batch.domains[:, None].expand_as(batch.position_targets)[keep]
        return domain_ce(logits, targets, domains, self.domain_ranges, self.cfg.train.label_smoothing)

    def step(self, pb: PreparedBatch, soft: SoftLabels | None) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.length_sorted_pieces > 1:
            loss = self.backward_in_length_sorted_pieces(pb.batch, self.cfg.train.length_sorted_pieces)
            terms = {"ce": loss}
        else:
            batch = pb.batch.to(self.device)
            # Through the wrapper's forward: DDP/DeepSpeed synchronise gradients only there.
            logits = self.model(batch)
            if self.distiller is not None:
                loss, terms = self.distiller.loss(logits, pb, batch, soft)
            else:
                loss = self.ce_loss(logits, batch)
                terms = {"ce": float(loss.detach())}
            self.acc.backward(loss)
            loss = float(loss.detach())
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        return {"loss": loss, **terms}

    def backward_in_length_sorted_pieces(self, batch: StudentBatch, pieces: int) -> float:
        """Accumulate the gradient of the batch's mean CE from ``pieces`` forward/backward passes over
        its rows sorted by history length, each trimmed to its longest row; returns the batch's loss.
        Each piece's loss is its CE sum over the batch size, so the gradients add up to the batch's.
        DDP synchronises only on the last piece."""
        chunks = [c for c in torch.tensor_split(torch.argsort(batch.lengths, stable=True), pieces) if len(c)]
        total = 0.0
        for i, rows in enumerate(chunks):
            piece = batch.select(rows).to(self.device)
            last = i == len(chunks) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                loss = self.ce_loss(self.model(piece), piece) * (len(rows) / len(batch))
                self.acc.backward(loss)
            total += float(loss.detach())
        return total

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        self.sampler.set_epoch(epoch)
        selections = self.epoch_batches(epoch)
        batches: Iterable = self._batches(epoch, selections)
        stream = self.distiller.soft_labels(batches) if self.distiller is not None else ((b, None) for b in batches)
        totals: dict[str, float] = {}
        n = 0
        bar = None
        if self.cfg.train.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=len(selections), desc=f"epoch {epoch}", unit="step", leave=False, dynamic_ncols=True)
        t_wait = time.perf_counter()
        for pb, soft in stream:
            t0 = time.perf_counter()
            self.timings["wait_s"] += t0 - t_wait
            self.apply_lr_schedule(epoch + n / len(selections))
            terms = self.step(pb, soft)
            t_wait = time.perf_counter()
            self.timings["step_s"] += t_wait - t0
            self.timings["steps"] += 1
            self.state["global_step"] += 1
            n += 1
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + v
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4f}")
        if bar is not None:
            bar.close()
        return {k: v / max(n, 1) for k, v in totals.items()} | {"steps": n}

    def fit(self) -> dict[str, Any]:
        """Train until early stop or ``train.epochs``; returns the metrics dict (also written)."""
        cfg = self.cfg
        self.try_resume()
        start = self.state["epoch"]
        for epoch in range(start, cfg.train.epochs):
            if self.state["bad_epochs"] >= cfg.train.patience:
                break
            t0 = time.perf_counter()
            train_terms = self.train_epoch(epoch)
            epoch_s = time.perf_counter() - t0
            # [stop, next lr]: decided on rank 0, summed with the other ranks' zeros.
            decision = torch.zeros(2, dtype=torch.float64, device=self.device)
            if self.is_main:
                t1 = time.perf_counter()
                valid = evaluate_model(self.eval_model, self.dataset, "valid", cfg.train.eval_batch_size, self.device)
                self.timings["eval_s"] += time.perf_counter() - t1
                ndcg = valid["mean"]["ndcg@10"]
                improved = ndcg > self.state["best_ndcg10"]
                if improved:
                    self.state.update(best_ndcg10=ndcg, best_epoch=epoch, bad_epochs=0)
                    save_student(self.eval_model, self.run_dir / "best", self.model_config)
                else:
                    self.state["bad_epochs"] += 1
                rec = {"epoch": epoch, "global_step": self.state["global_step"], "train_s": round(epoch_s, 3),
                       "lr": self.lr, **{k: round(v, 6) for k, v in train_terms.items()},
                       "valid_ndcg@10": round(ndcg, 6), "valid_recall@10": round(valid["mean"]["recall@10"], 6)}
                if cfg.train.record_test_curve:  # recorded for anytime curves only, never selected on
                    t2 = time.perf_counter()
                    test = evaluate_model(self.eval_model, self.dataset, "test", cfg.train.eval_batch_size,
                                          self.device)
                    self.timings["eval_s"] += time.perf_counter() - t2
                    rec.update({"test_ndcg@10": round(test["mean"]["ndcg@10"], 6),
                                "test_recall@10": round(test["mean"]["recall@10"], 6)})
                self.state["history"].append(rec)
                log.info("epoch %d  %.1fs  loss %.4f  valid recall@10 %.4f ndcg@10 %.4f%s", epoch, epoch_s,
                         train_terms.get("loss", float("nan")), valid["mean"]["recall@10"], ndcg,
                         "  *best*" if improved else "")
                decision[0] = float(self.state["bad_epochs"] >= cfg.train.patience)
                decision[1] = plateau_lr(self.lr, self.state["bad_epochs"], cfg.train.lr_decay_patience,
                                         cfg.train.lr_decay_factor)
            self.state["epoch"] = epoch + 1
            # Every rank must agree on the early-stop and lr decisions taken on rank 0.
            if self.acc.num_processes > 1:
                decision = self.acc.reduce(decision, reduction="sum")
            stop, next_lr = float(decision[0]) > 0, float(decision[1])
            if not self.is_main:
                # Only rank 0 counts plateau epochs; the others just need to know a stop happened.
                self.state["bad_epochs"] = cfg.train.patience if stop else 0
            if next_lr != self.lr:
                log.info("valid NDCG@10 flat for %d epochs: lr %.3g -> %.3g", cfg.train.lr_decay_patience,
                         self.lr, next_lr)
                self.lr = next_lr
            self.save_last()
            if stop:
                break
        return self.finish()

    def apply_lr_schedule(self, epochs_done: float) -> None:
        """Set this step's lr from ``train.lr_schedule``/``warmup_steps`` (no-op when both are off,
        so the constant and plateau-decay paths keep the optimizer's own lr)."""
        t = self.cfg.train
        if t.lr_schedule == "constant" and t.warmup_steps == 0:
            return
        horizon = t.schedule_epochs or t.epochs
        self.lr = scheduled_lr(t.lr, self.state["global_step"], epochs_done / horizon, t.warmup_steps, t.lr_schedule)

    @property
    def lr(self) -> float:
        """The optimizer's current lr, the one place it lives (resume restores it with the optimizer state)."""
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def write_rank_fingerprint(self) -> None:
        """Each rank records world size and a digest of its final parameters, so a run can prove
        its replicas stayed synchronised (DDP) rather than training apart."""
        import hashlib

        h = hashlib.sha256()
        for name, p in sorted(unwrap(self.model).state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        out = self.run_dir / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{self.acc.process_index}.json").write_text(json.dumps(
            {"rank": self.acc.process_index, "world_size": self.acc.num_processes,
             "global_step": self.state["global_step"], "lr": self.lr,
             "param_sha256": h.hexdigest()}))

    def timing_summary(self) -> dict[str, float] | None:
        """Step timings of the steps this process ran (None when it ran none, e.g. a run resumed
        after its last epoch: timings are not carried across an interruption)."""
        steps = self.timings["steps"]
        if steps == 0:
            return None
        return {"step_ms": 1000 * self.timings["step_s"] / steps, "wait_ms": 1000 * self.timings["wait_s"] / steps,
                "steps_per_s": steps / max(self.timings["step_s"] + self.timings["wait_s"], 1e-9),
                "epoch_s": float(np.mean([h["train_s"] for h in self.state["history"]])),
                "eval_s": self.timings["eval_s"], "steps_timed": steps}

    def finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint on valid and test (rank 0) and write metrics.json."""
        self.write_rank_fingerprint()
        self.acc.wait_for_everyone()
        metrics: dict[str, Any] = {}
        if self.is_main:
            best = self.run_dir / "best" / "model.safetensors"
            model = unwrap(self.model)
            if best.is_file():
                model.load_state_dict(load_file(str(best)), strict=True)
            valid = evaluate_model(model, self.dataset, "valid", self.cfg.train.eval_batch_size, self.device)
            test = evaluate_model(model, self.dataset, "test", self.cfg.train.eval_batch_size, self.device)
            metrics = {"valid": valid, "test": test, "best_epoch": self.state["best_epoch"],
                       "epochs_run": self.state["epoch"], "global_step": self.state["global_step"],
                       "history": self.state["history"],
                       "timing": self.timing_summary(),
                       "world_size": self.acc.num_processes,
                       "num_parameters": count_parameters(model),
                       "peak_memory_mb": peak_memory_mb(self.device)}
            write_metrics(self.run_dir, metrics)
            log.info("results (best epoch %d)\n%s", self.state["best_epoch"],
                     format_table({"valid": valid, "test": test}))
        self.acc.wait_for_everyone()
        return metrics

