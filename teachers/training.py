"""Generic teacher training loop: stages, AdamW, early stopping, best checkpoint, exact resume.

The training interface a teacher implements on top of ``teachers.base.Teacher``::

    def training_loss(self, histories: LongTensor[B, L], lengths: LongTensor[B],
                      targets: LongTensor[B], domains: LongTensor[B]) -> Tensor   # scalar
    def prepare_epoch(self, epoch: int) -> None                  # optional (refresh item caches)
    @classmethod
    def from_dataset(cls, dataset: MultiDomainDataset, **model_kwargs) -> Teacher   # builds it

``training_loss`` is the model's own objective and is called in train mode; histories are global
ids, oldest first, right-padded with 0 and trimmed to the batch's longest row. The loop evaluates
with ``ckd.metrics.evaluate_model`` (the ``RankingModel`` contract students follow too).

Run directory ``<run_dir>/`` (written with ``ckd.run_dir``): ``config.yaml`` (resolved),
``run.json`` (git SHA, argv, data dir), ``train.log``, ``metrics.json`` ({"valid": {domain: metrics},
"test": {...}, "best_epoch": n, ...}), ``best/`` (the final stage's best checkpoint, ``teachers.base``
format), ``stage_<name>/best/`` for earlier stages, and ``last/`` (model, optimizer, RNG and loop
state after each finished epoch; ``fit`` resumes from it after an interruption).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ckd.config import default_data_dir
from ckd.data.multidomain import MultiDomainDataset, SeqExamples, load_multidomain
from ckd.loop import (count_parameters, epoch_batches, peak_memory_mb, rng_state, set_rng_state,
                      torch_permutation, write_dir_atomically)
from ckd.metrics import evaluate_model, format_table
from ckd.run_dir import claim_run_dir, setup_logging, write_metrics, write_run_header
from teachers.base import TEACHERS, Teacher, TeacherContractError, load_teacher, save_teacher
from teachers.config import StageConfig, TeacherConfig

log = logging.getLogger("ckd.teachers")

SELECT_METRIC = "ndcg@10"


@runtime_checkable
class TrainableTeacher(Protocol):
    """What the loop needs besides the serving interface of ``teachers.base.Teacher``."""

    def training_loss(self, histories: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                      domains: torch.Tensor) -> torch.Tensor: ...


class TeacherTrainingError(RuntimeError):
    """A teacher cannot be trained as configured (missing method, diverged loss, bad resume)."""


# -- helpers ---------------------------------------------------------------------------------------

def teacher_class(kind: str) -> type[Teacher]:
    import teachers  # noqa: F401  (registers the built-in kinds)

    cls = TEACHERS.get(kind)
    if cls is None:
        raise TeacherTrainingError(f"unknown teacher kind {kind!r}; registered: {sorted(TEACHERS)}")
    for name in ("training_loss", "from_dataset"):
        if not callable(getattr(cls, name, None)):
            raise TeacherTrainingError(f"teacher kind {kind!r} has no {name}(): it cannot be trained")
    return cls


def build_teacher(kind: str, dataset: MultiDomainDataset, model_kwargs: dict[str, Any]) -> Teacher:
    """``<kind>.from_dataset(dataset, **model_kwargs)``."""
    return teacher_class(kind).from_dataset(dataset, **model_kwargs)


def transfer_parameters(source: Teacher, target: Teacher) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``source`` whose name and shape match one of ``target``'s, except
    per-item tables (leading dimension = either model's item count), which belong to a vocabulary.
    A teacher may define ``transfer_from(source) -> (copied, skipped)`` to replace this rule."""
    custom = getattr(target, "transfer_from", None)
    if callable(custom):
        return custom(source)
    src = source.state_dict()
    dst = target.state_dict()
    vocab_sizes = {source.num_items, target.num_items}
    copied, skipped = [], []
    new_state = {}
    for name, tensor in dst.items():
        s = src.get(name)
        if s is None or s.shape != tensor.shape or (tensor.dim() > 0 and tensor.shape[0] in vocab_sizes):
            skipped.append(name)
            continue
        new_state[name] = s.to(tensor.dtype)
        copied.append(name)
    target.load_state_dict(new_state, strict=False)
    return copied, skipped


def subsample_rows(ex: SeqExamples, domain_names: list[str], caps: dict[str, int], seed: int) -> SeqExamples:
    """Keep at most ``caps[domain]`` training rows of each named domain (seeded, order kept)."""
    if not caps:
        return ex
    unknown = sorted(set(caps) - set(domain_names))
    if unknown:
        raise TeacherTrainingError(f"max_train_rows names domains not in this stage: {unknown}")
    rng = np.random.default_rng(seed)
    keep = np.ones(len(ex), dtype=bool)
    for d, name in enumerate(domain_names):
        if name not in caps:
            continue
        idx = np.nonzero(ex.domains == d)[0]
        if len(idx) > caps[name]:
            drop = rng.choice(idx, size=len(idx) - int(caps[name]), replace=False)
            keep[drop] = False
    return ex.subset(np.nonzero(keep)[0])


# -- the loop --------------------------------------------------------------------------------------

class TeacherTrainer:
    """Trains ``cfg.kind`` through its stages into ``run_dir``; ``fit()`` returns metrics.json."""

    def __init__(self, cfg: TeacherConfig, run_dir: str | Path, data_dir: str | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.data_dir = data_dir or cfg.data.data_dir or default_data_dir()
        self.device = torch.device(cfg.train.device)
        self.stages = cfg.train.resolved_stages()
        self._datasets: dict[tuple[str, ...], MultiDomainDataset] = {}
        teacher_class(cfg.kind)  # fail before any work if the kind cannot train

    # paths
    def stage_dir(self, i: int) -> Path:
        return self.run_dir if i == len(self.stages) - 1 else self.run_dir / f"stage_{self.stages[i].name}"

    def best_dir(self, i: int) -> Path:
        return self.stage_dir(i) / "best"

    @property
    def last_dir(self) -> Path:
        return self.run_dir / "last"

    def dataset(self, stage: StageConfig) -> MultiDomainDataset:
        names = tuple(stage.domains or self.cfg.data.domains)
        if names not in self._datasets:
            self._datasets[names] = load_multidomain(self.data_dir, list(names), max_len=self.cfg.data.max_len)
        return self._datasets[names]

    def _stage_value(self, stage: StageConfig, key: str):
        v = getattr(stage, key)
        return getattr(self.cfg.train, key) if v is None else v

    # state
    def _save_last(self, model: Teacher, opt: torch.optim.Optimizer, gen: torch.Generator,
                   state: dict[str, Any]) -> None:
        def write(d: Path) -> None:
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                      str(d / "model.safetensors"))
            torch.save(opt.state_dict(), d / "optimizer.pt")
            save_file(rng_state(gen), str(d / "rng.safetensors"))
            (d / "state.json").write_text(json.dumps(state, indent=2))

        write_dir_atomically(self.last_dir, write)

    def _read_last(self) -> dict[str, Any] | None:
        p = self.last_dir / "state.json"
        if not p.is_file():
            return None
        state = json.loads(p.read_text())
        if state.get("stage_names") != [s.name for s in self.stages]:
            raise TeacherTrainingError(
                f"cannot resume from {self.last_dir}: it was written for stages {state.get('stage_names')}, "
                f"this config has {[s.name for s in self.stages]} (use a fresh --run-dir)")
        return state

    # one stage
    def _init_model(self, i: int, stage: StageConfig, dataset: MultiDomainDataset) -> Teacher:
        kwargs = {**self.cfg.model, **stage.model}
        model = build_teacher(self.cfg.kind, dataset, kwargs)
        src_dir = None
        if stage.init_from == "previous":
            src_dir = self.best_dir(i - 1)
        elif stage.init_from:
            src_dir = Path(stage.init_from)
        if src_dir is not None:
            source = load_teacher(src_dir)
            copied, skipped = transfer_parameters(source, model)
            if not copied:
                raise TeacherTrainingError(f"stage {stage.name}: nothing transferable in {src_dir}")
            log.info("stage %s: initialised %d tensors from %s (kept fresh: %s)", stage.name, len(copied),
                     src_dir, ", ".join(skipped) or "none")
        return model.to(self.device)

    def _run_stage(self, i: int, resume: dict[str, Any] | None,
                   finished: dict[str, Any] | None = None) -> dict[str, Any]:
        stage = self.stages[i]
        cfg = self.cfg.train
        dataset = self.dataset(stage)
        stage_seed = cfg.seed + 1000 * i
        # Seeded before the model is built: torch's start-up seed differs between processes, so an
        # unseeded initialisation made a retrained teacher land elsewhere (.0707-.0785 N@10 seen).
        torch.manual_seed(stage_seed)
        model = self._init_model(i, stage, dataset)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise TeacherTrainingError(f"stage {stage.name}: the model has no trainable parameters")
        opt = torch.optim.AdamW(trainable, lr=self._stage_value(stage, "lr"),
                                weight_decay=self._stage_value(stage, "weight_decay"))
        epochs = self._stage_value(stage, "epochs")
        batch_size = self._stage_value(stage, "batch_size")
        patience = self._stage_value(stage, "patience")
        gen = torch.Generator().manual_seed(stage_seed)
        torch.manual_seed(stage_seed)
        train = subsample_rows(dataset.splits["train"], dataset.domain_names,
                               {k: int(v) for k, v in stage.max_train_rows.items()}, stage_seed)
        eval_domains = stage.eval_domains or None
        early = stage.early_stopping and stage.evaluate
        st = {"stage": i, "stage_names": [s.name for s in self.stages], "epoch": 0, "best_score": -1.0,
              "best_epoch": -1, "bad_epochs": 0, "global_step": 0, "history": []}
        if resume is not None and resume["stage"] == i and resume["epoch"] > 0:
            model.load_state_dict(load_file(str(self.last_dir / "model.safetensors")), strict=True)
            opt.load_state_dict(torch.load(self.last_dir / "optimizer.pt", weights_only=True, map_location="cpu"))
            set_rng_state(load_file(str(self.last_dir / "rng.safetensors")), gen)
            st = resume
            log.info("stage %s: resumed at epoch %d (best %s %.4f at epoch %d)", stage.name, st["epoch"],
                     SELECT_METRIC, st["best_score"], st["best_epoch"])
        st["finished_stages"] = dict(finished or {})  # saved with every epoch's state (see fit)
        log.info("stage %s: %d training rows over %s, %d params (%d trainable), epochs %d, batch %d",
                 stage.name, len(train), dataset.domain_names, count_parameters(model),
                 count_parameters(model, True), epochs, batch_size)

        while st["epoch"] < epochs:
            epoch = st["epoch"]
            t0 = time.time()
            loss = self._train_epoch(model, opt, gen, train, batch_size, stage, epoch, st)
            rec: dict[str, Any] = {"epoch": epoch, "loss": loss, "train_s": round(time.time() - t0, 1)}
            stop = False
            if stage.evaluate:
                t1 = time.time()
                valid = evaluate_model(model, dataset, "valid", cfg.eval_batch_size, self.device, eval_domains)
                score = valid["mean"][SELECT_METRIC]
                rec.update(valid_ndcg10=score, valid_recall10=valid["mean"]["recall@10"],
                           eval_s=round(time.time() - t1, 1))
                if score > st["best_score"]:
                    st.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                    save_teacher(model, self.best_dir(i), extra={"stage": stage.name, "epoch": epoch,
                                                                 "valid": valid})
                else:
                    st["bad_epochs"] += 1
                    stop = early and st["bad_epochs"] > patience
            if not early:  # no selection on valid: the latest epoch is the stage's result
                st["best_epoch"] = epoch
                save_teacher(model, self.best_dir(i), extra={"stage": stage.name, "epoch": epoch})
            st["history"].append(rec)
            st["epoch"] = epoch + 1
            log.info("stage %s epoch %d: %s", stage.name, epoch,
                     " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            if stop:
                log.info("stage %s: early stop, no better valid %s for %d epochs", stage.name,
                         SELECT_METRIC, st["bad_epochs"])
                st["epoch"] = epochs  # finished
            self._save_last(model, opt, gen, st)
        return st

    def _train_epoch(self, model: Teacher, opt: torch.optim.Optimizer, gen: torch.Generator,
                     train: SeqExamples, batch_size: int, stage: StageConfig, epoch: int,
                     st: dict[str, Any]) -> float:
        cfg = self.cfg.train
        prepare = getattr(model, "prepare_epoch", None)
        if callable(prepare):
            prepare(epoch)
        model.train()
        # Both draws come from the stage's generator, rows first, then (when bucketing) batch order.
        perm = torch_permutation(gen)
        batches = epoch_batches(perm(len(train)), train.lengths, batch_size, cfg.length_bucket_batches, perm)
        n_batches = len(batches)
        if stage.max_steps_per_epoch:
            n_batches = min(n_batches, stage.max_steps_per_epoch)
        steps = range(n_batches)
        if cfg.progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"{stage.name} epoch {epoch}", unit="step", leave=False, file=sys.stderr)
        total, count = 0.0, 0
        for b in steps:
            idx = batches[b]
            lens = train.lengths[idx]
            L = int(lens.max())  # trim padding no row in this batch uses
            dev = self.device
            loss = model.training_loss(torch.as_tensor(train.histories[idx, :L], device=dev),
                                       torch.as_tensor(lens, device=dev),
                                       torch.as_tensor(train.targets[idx], device=dev),
                                       torch.as_tensor(train.domains[idx], device=dev))
            if not torch.isfinite(loss):
                raise TeacherTrainingError(f"stage {stage.name} epoch {epoch} step {b}: loss is {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
            opt.step()
            total += float(loss.detach())
            count += 1
            st["global_step"] += 1
            if cfg.progress:
                steps.set_postfix(loss=f"{total / count:.4f}")
            if st["global_step"] % cfg.log_every == 0:
                log.info("stage %s epoch %d step %d/%d loss %.4f", stage.name, epoch, b + 1, n_batches, total / count)
        return total / max(count, 1)

    # the whole run
    def fit(self) -> dict[str, Any]:
        claim_run_dir(self.run_dir)  # before anything is written into it
        setup_logging(self.run_dir)
        if self.cfg.train.threads > 0:
            torch.set_num_threads(self.cfg.train.threads)
        write_run_header(self.run_dir, self.cfg, {"data_dir": str(self.data_dir)})
        resume = self._read_last()
        first = 0
        # Every finished stage's result, also those of earlier invocations: last/ holds them, so a run
        # resumed after a stage (or all of them) finished still reports every epoch it trained.
        stage_results: dict[str, Any] = dict((resume or {}).get("finished_stages") or {})
        if resume is not None:
            first = resume["stage"]
            if resume["epoch"] >= self._stage_value(self.stages[first], "epochs"):
                stage_results[self.stages[first].name] = _stage_result(resume)
                first += 1  # that stage had finished
                resume = None
            log.info("resuming run %s at stage %d", self.run_dir, first)
        t0 = time.time()
        for i in range(first, len(self.stages)):
            st = self._run_stage(i, resume, stage_results)
            resume = None
            stage_results[self.stages[i].name] = _stage_result(st)
            if not self.best_dir(i).is_dir():
                raise TeacherTrainingError(f"stage {self.stages[i].name} produced no checkpoint")
        return self.finish(stage_results, time.time() - t0)

    def finish(self, stage_results: dict[str, Any] | None = None, train_s: float = 0.0) -> dict[str, Any]:
        """Evaluate the final best checkpoint on valid and test; write metrics.json."""
        last_stage = self.stages[-1]
        dataset = self.dataset(last_stage)
        best = load_teacher(self.best_dir(len(self.stages) - 1), expected_vocab_hash=dataset.vocab_hash(),
                            device=self.device)
        bs = self.cfg.train.eval_batch_size
        best_cfg = json.loads((self.best_dir(len(self.stages) - 1) / "config.json").read_text())
        metrics = {
            "valid": evaluate_model(best, dataset, "valid", bs, self.device),
            "test": evaluate_model(best, dataset, "test", bs, self.device),
            "best_epoch": int(best_cfg.get("epoch", -1)),
            "kind": self.cfg.kind,
            "checkpoint": str(self.best_dir(len(self.stages) - 1)),
            "checkpoint_sha256": best.checkpoint_sha256,
            "vocab_hash": dataset.vocab_hash(),
            "params": count_parameters(best),
            "peak_memory_mb": peak_memory_mb(self.device),
            "train_seconds_this_invocation": round(train_s, 1),
            "stages": stage_results or {},
        }
        write_metrics(self.run_dir, metrics)
        log.info("final (best epoch %d):\n%s", metrics["best_epoch"],
                 format_table({"valid": metrics["valid"], "test": metrics["test"]}))
        return metrics


def _stage_result(state: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json reports of a stage, from its training state."""
    return {"best_epoch": state["best_epoch"], "history": state["history"]}


def train_teacher(cfg: TeacherConfig, run_dir: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """Train (or resume) a teacher run; returns the metrics written to metrics.json."""
    return TeacherTrainer(cfg, run_dir, data_dir).fit()


__all__ = ["TrainableTeacher", "TeacherTrainer", "TeacherTrainingError", "train_teacher", "build_teacher",
           "transfer_parameters", "TeacherContractError"]
