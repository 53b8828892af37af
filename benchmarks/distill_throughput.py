"""Distillation throughput: steps/s of the same student with and without teachers (issue 21).

    python -m benchmarks.distill_throughput                       # Scientific + Games, both candidate kinds
    python -m benchmarks.distill_throughput --domains Scientific --candidates in_batch --steps 5 --warmup 2
    python -m benchmarks.distill_throughput --spec Scientific=configs/serve_scientific.yaml --layouts own

For every domain (--domains) the student of --config (the demo student: SASRec, batch 256, one
torch thread) is trained for --warmup + --steps steps of the real training loop
(student.trainer.Trainer.train_epoch: curriculum sampler, length-bucketed batches, prefetching
SoftLabelReader, DistillLoss), once without teachers and once per candidate kind with them:
  * in_batch:         the batch's distinct targets (kd.num_sampled = 0);
  * whole_catalogue:  every item of the domain (kd.num_sampled = the domain's item count).
Each run is a fresh process (its own embedded Ray and teacher replicas, started as
launch/distill.py starts them); nothing is evaluated, only the timed steps run.

Core layouts (--layouts), the student on the same cores in its run with and without teachers:
  * own:        the student pinned to --student-cpus, the teachers to --teacher-cpus (disjoint;
                each teacher gets its own share when there are enough cores; TeacherSpec.cpus);
  * shared:     nothing pinned (everything on every core: how a run starts by default);
  * colocated:  the teachers pinned to the student's own cores (the co-located comparator).
Affinities are read back from /proc for the student and every replica and written to the JSON.

Per step (means over the timed steps): steps/s; step_ms (forward to optimizer step); wait_ms (the
loop waiting for its next batch: batch assembly, candidates and, with teachers, the soft labels);
label_wait_ms (of it, waiting for the teachers' scores); forward_ms, ce_ms, kd_ms (teacher
distributions + integration + the KD loss), other_loss_ms (scores to tensors, bookkeeping),
backward_ms, optimizer_ms; per request: candidates_ms (building a batch's candidates: on the
training thread, inside wait_ms), request_encode_ms (the request's arrays, flattening and tensor
encoding: in the prefetch threads, so off the training thread but on the student's cores), rpc_ms
and decode_ms per teacher call (the TeacherPool's own timings). The KD precision micro-benchmark
(float32 against float64 maths at each run's candidate width) runs last, on the student's cores.
The curriculum is off unless --curriculum (its first epoch holds only the shortest rows).

Steady state (--warm-epochs K): every run first trains K whole epochs untimed, then times its steps
in epoch K, where each training row comes back with new candidates. With --teacher-memo-mib M the
replicas keep a history memo of M MiB (service.embedded_history_memo_bytes, teachers/history_memo.py),
so from the second epoch on a teacher answers a row it has seen without encoding its history again:
--warm-epochs 1 --teacher-memo-mib M measures that, --warm-epochs 0 the first epoch (every history new).

Noisy machines (--rounds N): every (no-teacher, distilled) pair runs N times in turn, each ratio
against its own round's baseline; the JSON's ratio_over_rounds gives the median and the range.

Interference control (--labels-dropped): each distilled run gets a twin that serves the same
teachers and fetches every batch's soft labels exactly as it does, but trains on CE alone (the
labels are dropped, no KD maths). Against the no-teacher run it measures what the teachers' work
on the other cores costs the student (shared cache, memory bandwidth, the prefetch threads);
against the distilled run, what the student's own KD work costs. A ratio below target with the
twin's ratio near 1 is the system's cost; with the twin's ratio low, it is the machine's.

Where the label pipeline works (--targets-on, --prefetch-cpus): --targets-on step,prefetch runs, per
round, one distilled run per kd.targets_on mode (the teachers' side of the KD term in the training step,
or in the label-prefetch threads as the scores arrive), each against the round's no-teacher run;
--prefetch-cpus teachers puts the prefetch threads of every distilled run (twins included) on the
teachers' cores in layout own (service.prefetch_cpus), the training thread staying on the student's.

Teachers: --spec DOMAIN=SPEC (or one SPEC for every domain). Defaults: Scientific serves the demo
teachers of configs/demo/serve.yaml (build them with `make demo`); any other domain serves the demo
teacher configs retrained on it under runs/bench/teachers_<domain>/ (a generated spec whose missing
checkpoints are refused with the build commands; a throughput benchmark needs the teachers'
architecture, not their quality, so --set train.epochs=1 is enough). --fixture-teachers N serves N
generated mean-pool teachers on the domain's vocabulary instead: no training, tiny compute, so an
upper bound on the ratio.

Writes JSON (default runs/bench_distill_throughput.json; an existing file, and anything under
results/, only with --overwrite) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ckd.run_dir import git_sha

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "runs/bench_distill_throughput.json"
DEFAULT_CONFIG = "configs/demo/student.yaml"
DEMO_SPEC = "configs/demo/serve.yaml"
CANDIDATE_KINDS = ("in_batch", "whole_catalogue")
LAYOUTS = ("own", "shared", "colocated")


class BenchError(RuntimeError):
    """A run could not be set up or failed (its message names the run and the reason)."""


# ----------------------------------------------------------------------------- core sets


def split_cores(cores: list[int], parts: int) -> list[list[int]]:
    """``parts`` core sets for ``parts`` teachers: disjoint contiguous shares when there are at
    least as many cores as teachers (the first ones get the remainder), else all cores for each."""
    if parts <= 0:
        return []
    if len(cores) < parts:
        return [list(cores) for _ in range(parts)]
    base, extra = divmod(len(cores), parts)
    out, i = [], 0
    for p in range(parts):
        n = base + (1 if p < extra else 0)
        out.append(list(cores[i:i + n]))
        i += n
    return out


def resolve_layout(layout: str, student_cpus: list[int], teacher_cpus: list[int], n_teachers: int
                   ) -> tuple[list[int] | None, list[list[int]] | None]:
    """(student cores or None, [cores per teacher] or None) of a layout; None = not pinned."""
    if layout == "own":
        return student_cpus, split_cores(teacher_cpus, n_teachers)
    if layout == "colocated":
        return student_cpus, [list(student_cpus) for _ in range(n_teachers)]
    if layout == "shared":
        return None, None
    raise BenchError(f"unknown layout {layout!r}; have {LAYOUTS}")


# ----------------------------------------------------------------------------- teacher specs


def demo_spec_for(domain: str, root: Path) -> dict[str, Any]:
    """The demo teachers retrained on ``domain`` (checkpoints under runs/bench/teachers_<domain>/),
    with the command that builds each one (named by the spec check when a checkpoint is missing)."""
    from ckd.config import load_yaml

    demo = load_yaml(REPO / DEMO_SPEC)
    teachers = []
    for t in demo["teachers"]:
        name = t["name"]
        run_dir = f"runs/bench/teachers_{domain.lower()}/{name}"
        build = (f"ckd-train-teacher --config configs/demo/{name}.yaml --run-dir {run_dir} "
                 f"--set 'data.domains=[{domain}]' --set train.epochs=1")
        teachers.append({"name": name, "checkpoint": str(root / run_dir / "best"), "build": build,
                         "replicas": 1, "num_gpus": -1})
    return {"namespace": demo.get("namespace", "ckd"), "teachers": teachers}


def fixture_spec(dataset, n: int, directory: Path) -> dict[str, Any]:
    """``n`` generated mean-pool teachers (benchmarks/fixture_teacher.py) on ``dataset``'s vocabulary."""
    from benchmarks.fixture_teacher import make_fixture_checkpoint

    teachers = []
    for k in range(n):
        ck = make_fixture_checkpoint(directory / f"fixture{k}", num_items=dataset.vocab_size,
                                     vocab_hash=dataset.vocab_hash(), dim=64, seed=k, max_history=dataset.max_len)
        teachers.append({"name": f"fixture{k}", "checkpoint": str(ck), "replicas": 1})
    return {"namespace": "ckd", "teacher_modules": ["benchmarks.fixture_teacher"], "teachers": teachers}


# ----------------------------------------------------------------------------- one run (worker)


class _Timer:
    """Accumulates seconds per part and keeps one snapshot per training step, so the warm-up steps
    can be left out of every mean."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.parts: dict[str, float] = {}
        self.per_request: dict[str, list[float]] = {}
        self.snapshots: list[dict[str, float]] = []
        self.marks: list[tuple[float, float]] = []  # (start, end) of every training step
        self.widths: list[int] = []  # candidate columns of every prepared batch

    def reset(self) -> None:
        """Forget every timing so far (after untimed warm epochs)."""
        self.parts.clear()
        self.per_request.clear()
        self.snapshots.clear()
        self.marks.clear()
        self.widths.clear()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    def wrap(self, fn, part: str, per_request: bool = False):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                if per_request:
                    self.per_request.setdefault(part, []).append(dt)
                else:
                    self.add(part, dt)
        return timed


def instrument(trainer, session, timer: _Timer) -> list:
    """Time the parts of each step through hooks and wrappers on this run's objects (the training
    code itself is unchanged); returns the list that receives the SoftLabelReader of each epoch."""
    import student.teacher_pool as teacher_pool
    from student.trainer import unwrap

    model = unwrap(trainer.model)
    t_fwd = [0.0]
    model.register_forward_pre_hook(lambda *_: t_fwd.__setitem__(0, time.perf_counter()))

    def after_forward(*_):
        timer.sync()
        timer.add("forward", time.perf_counter() - t_fwd[0])
    model.register_forward_hook(after_forward)

    backward = trainer.acc.backward

    def timed_backward(loss, **kw):
        t0 = time.perf_counter()
        backward(loss, **kw)
        timer.sync()
        timer.add("backward", time.perf_counter() - t0)
    trainer.acc.backward = timed_backward
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    t_opt = [0.0]
    inner.register_step_pre_hook(lambda *_: t_opt.__setitem__(0, time.perf_counter()))
    inner.register_step_post_hook(lambda *_: timer.add("optimizer", time.perf_counter() - t_opt[0]))

    step = trainer.step

    def timed_step(pb, soft):
        t0 = time.perf_counter()
        out = step(pb, soft)
        t1 = time.perf_counter()
        timer.marks.append((t0, t1))
        timer.snapshots.append(dict(timer.parts))
        return out
    trainer.step = timed_step
    readers: list = []
    if session is None:
        trainer.ce_loss = timer.wrap(trainer.ce_loss, "ce")
        return readers
    session.criterion.timings = timer.parts  # ce, kd_targets, kd_loss (student.distill.DistillLoss)
    session.loss = timer.wrap(session.loss, "loss_total")
    prepare = timer.wrap(session.prepare, "candidates", per_request=True)

    def prepare_and_count(batch, seed):
        pb = prepare(batch, seed)
        timer.widths.append(int(pb.candidates.shape[0]))
        return pb
    session.prepare = prepare_and_count
    session.make_request = timer.wrap(session.make_request, "make_request", per_request=True)
    # The tensor codec's encode runs in the prefetch threads for each field of each request.
    teacher_pool.encode = timer.wrap(teacher_pool.encode, "tensor_encode", per_request=True)
    soft_labels = session.soft_labels

    def keep_reader(batches):
        reader = soft_labels(batches)
        readers.append(reader)
        return reader
    session.soft_labels = keep_reader
    return readers


def drop_labels(trainer, session, timer: _Timer) -> None:
    """The interference control: the session still builds candidates and fetches every batch's soft
    labels from the teachers, but the step's loss is the no-teacher run's CE (the labels are dropped)."""
    ce = timer.wrap(trainer.ce_loss, "ce")

    def ce_only(logits, pb, batch, soft):
        loss = ce(logits, batch)
        return loss, {"ce": float(loss.detach())}
    session.loss = ce_only


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarise(timer: _Timer, readers: list, warmup: int, steps: int, pool_stats: dict[str, float] | None,
              n_teachers: int) -> dict[str, Any]:
    """Per-step means over the timed steps (``warmup`` .. ``warmup + steps - 1``)."""
    marks, snaps = timer.marks, timer.snapshots
    if len(marks) < warmup + steps:
        raise BenchError(f"only {len(marks)} steps ran, {warmup + steps} wanted")
    lo, hi = warmup, warmup + steps - 1
    span = marks[hi][1] - marks[lo - 1][1] if lo > 0 else marks[hi][1] - marks[0][0]
    step_s = [e - s for s, e in marks[lo:hi + 1]]
    wait_s = [marks[i][0] - marks[i - 1][1] for i in range(max(lo, 1), hi + 1)]
    before = snaps[lo - 1] if lo > 0 else {}
    delta = {k: (snaps[hi].get(k, 0.0) - before.get(k, 0.0)) * 1e3 / steps for k in snaps[hi]}
    out: dict[str, Any] = {"steps_per_s": steps / span, "steps_timed": steps, "warmup_steps": warmup,
                           "step_ms": 1e3 * _mean(step_s), "wait_ms": 1e3 * (_mean(wait_s) or 0.0),
                           "forward_ms": delta.get("forward"), "ce_ms": delta.get("ce"),
                           "backward_ms": delta.get("backward"), "optimizer_ms": delta.get("optimizer")}
    if "kd_loss" in delta:
        kd = delta.get("kd_targets", 0.0) + delta["kd_loss"]
        out.update(kd_ms=kd, kd_targets_ms=delta.get("kd_targets"), kd_loss_ms=delta["kd_loss"],
                   other_loss_ms=delta.get("loss_total", 0.0) - kd - (delta.get("ce") or 0.0))
    waits = [w for r in readers for w in r.wait_ms]
    if waits:
        out["label_wait_ms"] = _mean(waits[lo:hi + 1])
    per = timer.per_request
    if "candidates" in per:
        out["candidates_ms"] = 1e3 * _mean(per["candidates"])
    if "make_request" in per:
        n_req = len(per["make_request"])
        encode_total = sum(per["make_request"]) + sum(per.get("tensor_encode", []))
        # The pool's own "encode" stage (flattening, casting) is a per-request mean in ms.
        flat_ms = (pool_stats or {}).get("encode_ms_mean", 0.0)
        out["request_encode_ms"] = 1e3 * encode_total / n_req + flat_ms
    if pool_stats:
        if "kd_targets_ms_mean" in pool_stats:  # kd.targets_on=prefetch: in the prefetch threads, per batch
            out["kd_targets_prefetch_ms"] = pool_stats["kd_targets_ms_mean"]
        for k in ("rpc_ms_mean", "rpc_ms_p50", "rpc_ms_p95", "decode_ms_mean", "score_ms_mean"):
            if k in pool_stats:
                out[k.replace("_ms_mean", "_ms")] = pool_stats[k]
        out["teacher_calls"] = pool_stats.get("calls", 0.0)
        out["retries"] = pool_stats.get("retries", 0.0)
    out["teachers"] = n_teachers
    return out


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One run: set up exactly as launch/distill.py does, train warmup + steps steps, time them."""
    t_start = time.perf_counter()
    from ckd.affinity import format_cpus, process_cpus, thread_cpus
    from ckd.data.multidomain import load_multidomain
    from launch.distill import embedded_spec, parse_args, pin_student, resolve_config, start_embedded_service

    run_dir = Path(job["run_dir"])
    domain = job["domain"]
    sets = [f"data.domains=[{','.join(entry_domains(domain))}]", f"train.batch_size={job['batch_size']}", f"train.threads={job['threads']}",
            "train.progress=false", "train.epochs=1000", f"train.seed={job['seed']}",
            f"curriculum.enabled={str(job['curriculum']).lower()}", f"kd.precision={job['kd_precision']}",
            f"service.prefetch={job['prefetch']}"]
    argv = ["--config", job["config"], "--run-dir", str(run_dir)]
    if job["data_dir"]:
        argv += ["--data-dir", job["data_dir"]]
    teachers = job["teachers"] != "none"
    spec_path = Path(job["spec"] or run_dir.parent / f"fixture_spec_{domain}.yaml")
    if teachers:
        sets.append(f"service.spec={spec_path}")
        if job.get("teacher_memo_mib"):
            sets.append(f"service.embedded_history_memo_bytes={int(job['teacher_memo_mib']) << 20}")
    else:
        argv += ["--teachers", "none"]
    for s in sets + list(job.get("extra_sets", [])):
        argv += ["--set", s]
    cfg = resolve_config(parse_args(argv))
    dataset = load_multidomain(cfg.data.data_dir, cfg.data.domains, max_len=cfg.data.max_len)
    if teachers:
        if job["teachers"] == "fixture":
            _write_yaml(spec_path, fixture_spec(dataset, job["fixture_teachers"], run_dir.parent / "fixtures"))
        if job["candidates"] == "whole_catalogue":
            if len(cfg.data.domains) > 1:
                raise BenchError(f"{domain}: whole_catalogue candidates are defined for one domain; "
                                 "a multi-domain student is measured with in_batch")
            start, stop = dataset.domain_range(0)
            cfg.kd.num_sampled = stop - start  # every item that is not a target of the batch
    embedded = embedded_spec(cfg)
    if embedded is not None:
        cfg.service.namespace = embedded[0].namespace  # the student joins the service this spec deploys
    from student.pipeline import build_sampler, checkpoint_config, prepare_run

    acc = prepare_run(cfg)
    deployment, address, names, replicas = None, "", [], {}
    t_service = 0.0
    try:
        if embedded is not None:
            spec, names = embedded
            gpus = _gpus()
            for t, cores in zip(spec.teachers, job["teacher_cpus"] or [None] * len(spec.teachers)):
                if cores:
                    t.cpus, t.cpus_per_replica, t.torch_threads = list(cores), 0, len(cores)
                t.precision = job.get("teacher_precision", "float32")
                if job["teacher_gpus"] is not None:
                    t.num_gpus = job["teacher_gpus"]
                elif t.num_gpus < 0 and 0 < gpus < len(spec.teachers):
                    # Fewer GPUs than teachers: share them (Ray fractional GPUs), or the later
                    # replicas would wait for a GPU that never frees.
                    t.num_gpus = gpus / len(spec.teachers)
            t0 = time.perf_counter()
            address, deployment = start_embedded_service(spec, names, acc)
            t_service = time.perf_counter() - t0
            for n in names:
                replicas[n] = [{"pid": i["pid"], "cpus": format_cpus(process_cpus(i["pid"])),
                                "threads_on_other_cores": sum(c != process_cpus(i["pid"])
                                                              for c in thread_cpus(i["pid"]).values())}
                               for i in deployment.infos(n)]
        if job["student_cpus"]:
            pin_student(job["student_cpus"])
        result = _train(cfg, acc, job, address, names, dataset, build_sampler, checkpoint_config)
    finally:
        if deployment is not None:
            deployment.shutdown()
    me = os.getpid()
    result.update(
        domain=domain, candidates=job["candidates"] if teachers else None, layout=job["layout"],
        teachers_source=job["teachers"], teacher_names=names, service_start_s=t_service,
        time_to_first_step_s=result.pop("_first_step_end") - t_start,
        student_cpus=format_cpus(process_cpus(me)),
        student_threads_on_other_cores=sum(c != process_cpus(me) for c in thread_cpus(me).values()),
        replicas=replicas, device=str(acc.device))
    return result


def _train(cfg, acc, job, address, names, dataset, build_sampler, checkpoint_config) -> dict[str, Any]:
    import torch

    from student.models import build_student
    from student.pipeline import seed_everything
    from student.trainer import Trainer

    seed_everything(cfg.train.seed)
    model_config = checkpoint_config(cfg, dataset)
    model = build_student(model_config["kind"], dataset, **model_config["kwargs"])
    sampler = build_sampler(cfg, dataset, acc)
    session = None
    if cfg.service.active:
        from student.teacher_session import TeacherSession

        session = TeacherSession.open(cfg, dataset, acc, ray_address=address, teachers=names)
    try:
        trainer = Trainer(cfg, dataset, model, acc, Path(cfg.run_dir), sampler, model_config, distiller=session)
        timer = _Timer(acc.device)
        readers = instrument(trainer, session, timer)
        if job.get("labels_dropped"):
            drop_labels(trainer, session, timer)
        warm_epochs = int(job.get("warm_epochs", 0))
        for epoch in range(warm_epochs):  # untimed whole epochs (fill the teachers' history memos)
            cfg.train.max_steps_per_epoch = 0
            trainer.train_epoch(epoch)
        if warm_epochs:
            timer.reset()
            readers.clear()
            if session is not None:
                session.pool.reset_timings()
        want = job["warmup"] + job["steps"]
        epoch = warm_epochs
        while len(timer.marks) < want:
            cfg.train.max_steps_per_epoch = want - len(timer.marks)
            ran = trainer.train_epoch(epoch)["steps"]
            if ran == 0:
                raise BenchError(f"epoch {epoch} has no batches")
            epoch += 1
        stats = session.pool.stats() if session is not None else None
        out = summarise(timer, readers, job["warmup"], job["steps"], stats, len(names))
        out["_first_step_end"] = timer.marks[0][1]
        out["epochs_touched"] = epoch
        out["warm_epochs"] = warm_epochs
        out["candidates_per_step"] = _mean(timer.widths)
        out["catalogue"] = int(sum(dataset.domain_range(i)[1] - dataset.domain_range(i)[0]
                                   for i in range(len(cfg.data.domains))))
        out["train_rows"] = len(dataset.splits["train"])
        out["torch_threads"] = torch.get_num_threads()
        return out
    finally:
        if session is not None:
            session.close()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------- driver


def run_job(job: dict[str, Any], timeout: float, log_dir: Path) -> dict[str, Any]:
    """One run in a fresh interpreter; its console goes to ``log_dir``; BenchError on failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = job["tag"]
    job_path = log_dir / f"{tag}.job.json"
    out_path = log_dir / f"{tag}.result.json"
    job_path.write_text(json.dumps(job, indent=1))
    if out_path.exists():
        out_path.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=str(job["threads"]), MKL_NUM_THREADS=str(job["threads"]))
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "benchmarks.distill_throughput", "--worker", str(job_path), "--worker-out",
           str(out_path)]
    with open(log_dir / f"{tag}.log", "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=REPO)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{tag}: no result within {timeout:.0f} s (log: {log_dir / (tag + '.log')})") from None
    if proc.returncode != 0 or not out_path.exists():
        tail = (log_dir / f"{tag}.log").read_text()[-3000:]
        raise BenchError(f"{tag}: worker exited {proc.returncode}\n{tail}")
    return json.loads(out_path.read_text())


def parse_specs(values: list[str], domains: list[str]) -> dict[str, str]:
    """--spec DOMAIN=PATH (repeatable) or a single PATH for every domain."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in domains:
            out[name] = path
        elif not sep:
            out.update({d: v for d in domains})
        else:
            raise BenchError(f"--spec {v!r}: {name!r} is not one of the --domains {domains}")
    return out


def entry_domains(entry: str) -> list[str]:
    """The data.domains of a --domains entry: one domain, or several joined by '+' (one student on
    all of them, e.g. Scientific+Office14+Games with the union teachers)."""
    return [d for d in entry.split("+") if d]


def domain_specs(values: list[str], domains: list[str], tmp: Path) -> dict[str, str]:
    """The teacher spec for each domain: --spec where given, else the demo teachers (Scientific's
    committed spec, or a spec written under ``tmp`` for the demo teachers retrained on that domain)."""
    specs = parse_specs(values, domains)
    for d in domains:
        if d not in specs:
            if len(entry_domains(d)) > 1:
                raise BenchError(f"--domains {d!r} trains one student on several domains: its teachers must "
                                 f"cover them all, name their spec (--spec {d}=configs/union/serve.yaml)")
            if d == "Scientific":
                specs[d] = DEMO_SPEC
            else:
                specs[d] = str(tmp / f"demo_teachers_{d}.yaml")
                _write_yaml(Path(specs[d]), demo_spec_for(d, REPO))
    return specs


def plan_jobs(args: argparse.Namespace, specs: dict[str, str], tmp: Path) -> list[dict[str, Any]]:
    """Every run: per domain, one no-teacher run per distinct student core set, then one run per
    (layout, candidate kind) with teachers."""
    from ckd.affinity import parse_cpus

    avail = sorted(os.sched_getaffinity(0))
    student = parse_cpus(args.student_cpus) if args.student_cpus else avail[:1]
    if args.teacher_cpus == "auto":
        teacher = [c for c in avail if c not in student] or avail
    else:
        teacher = parse_cpus(args.teacher_cpus)
    if "own" in args.layouts and set(student) & set(teacher):
        raise BenchError(f"layout 'own' needs disjoint cores: student {student}, teachers {teacher}")
    common = dict(config=args.config, data_dir=args.data_dir or "", batch_size=args.batch_size, threads=args.threads,
                  seed=args.seed, curriculum=args.curriculum, kd_precision=args.kd_precision,
                  prefetch=args.prefetch, warmup=args.warmup, steps=args.steps,
                  fixture_teachers=args.fixture_teachers, teacher_gpus=args.teacher_gpus,
                  teacher_precision=args.teacher_precision, extra_sets=list(args.overrides),
                  warm_epochs=args.warm_epochs, teacher_memo_mib=args.teacher_memo_mib)
    jobs = []
    for domain in args.domains:
        if len(entry_domains(domain)) > 1 and "whole_catalogue" in args.candidates:
            raise BenchError(f"--domains {domain!r}: whole_catalogue candidates are defined for one domain; "
                             "measure a multi-domain student with --candidates in_batch")
        n_teachers = args.fixture_teachers or _count_teachers(specs[domain])
        baselines: dict[str, str] = {}
        for layout in args.layouts:
            s_cpus, t_cpus = resolve_layout(layout, student, teacher, n_teachers)
            key = ",".join(map(str, s_cpus)) if s_cpus else "unpinned"
            if key not in baselines:
                baselines[key] = tag = f"{domain}-none-{key.replace(',', '_')}"
                jobs.append({**common, "tag": tag, "domain": domain, "layout": layout, "teachers": "none",
                             "candidates": None, "student_cpus": s_cpus, "teacher_cpus": None, "spec": None,
                             "run_dir": str(tmp / tag), "baseline_of": key})
            modes = targets_modes(args)
            for kind in args.candidates:
                for mode in modes:
                    # One mode keeps the tags of earlier runs; several name theirs (side by side per round).
                    tag = f"{domain}-{kind}-{layout}" + (f"-targets_{mode}" if len(modes) > 1 else "")
                    job = {**common, "tag": tag, "domain": domain, "layout": layout,
                           "teachers": "fixture" if args.fixture_teachers else "spec", "candidates": kind,
                           "student_cpus": s_cpus, "teacher_cpus": t_cpus, "spec": specs.get(domain),
                           "run_dir": str(tmp / tag), "baseline": baselines[key], "targets_on": mode,
                           "extra_sets": label_pipeline_sets(args, layout, teacher, mode) + common["extra_sets"]}
                    if args.labels_dropped:
                        twin = f"{tag}-labels_dropped"
                        jobs.append({**job, "tag": twin, "run_dir": str(tmp / twin), "labels_dropped": True})
                        job["labels_dropped_twin"] = twin
                    jobs.append(job)
    return in_rounds(jobs, getattr(args, "rounds", 1), tmp)


def targets_modes(args: argparse.Namespace) -> list[str]:
    """The kd.targets_on modes of --targets-on (a comma list: each a distilled run per round)."""
    modes = [m for m in args.targets_on.split(",") if m]
    if not modes or any(m not in ("step", "prefetch") for m in modes):
        raise BenchError(f"--targets-on {args.targets_on!r}: a comma list of step and prefetch")
    return modes


def label_pipeline_sets(args: argparse.Namespace, layout: str, teacher_cpus: list[int], mode: str) -> list[str]:
    """The --set overrides of a run with teachers for where its label pipeline works: kd.targets_on
    (``mode``), and in layout own with --prefetch-cpus teachers, the prefetch threads on the
    teachers' cores (service.prefetch_cpus); the training thread stays on the student's."""
    from ckd.affinity import format_cpus

    sets = [f"kd.targets_on={mode}"]
    if args.prefetch_cpus == "teachers" and layout == "own":
        sets.append(f"service.prefetch_cpus={format_cpus(teacher_cpus)}")
    return sets


def in_rounds(jobs: list[dict[str, Any]], rounds: int, tmp: Path) -> list[dict[str, Any]]:
    """``jobs`` run ``rounds`` times one after another (baseline, distilled, baseline, distilled, ...):
    each round's ratios are measured against that round's own baseline, so a box whose speed drifts
    over minutes gives a spread of ratios instead of one lucky or unlucky pair."""
    if rounds <= 1:
        return [{**j, "round": 0} for j in jobs]
    out = []
    for k in range(rounds):
        for j in jobs:
            tag = f"{j['tag']}-r{k}"
            out.append({**j, "tag": tag, "round": k, "run_dir": str(tmp / tag),
                        **{ref: f"{j[ref]}-r{k}" for ref in ("baseline", "labels_dropped_twin") if j.get(ref)}})
    return out


def ratios_over_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (domain, candidates, layout): every round's ratio, their median, min and max; with the
    interference control, the same for the twin against no teachers (``labels_dropped``) and for
    the distilled run against its twin (``kd_work``)."""
    import statistics

    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        if r.get("ratio") is None:
            continue
        g = groups.setdefault((r["domain"], r["candidates"], r["layout"], r.get("targets_on", "step")), {})
        for key, field in (("ratio", "ratio"), ("labels_dropped", "labels_dropped_ratio"), ("kd_work", "kd_work_ratio")):
            if r.get(field) is not None:
                g.setdefault(key, []).append(r[field])

    def spread(v: list[float]) -> dict[str, Any]:
        return {"ratios": v, "median": statistics.median(v), "min": min(v), "max": max(v)}
    out = []
    for (d, c, lay, mode), g in groups.items():
        row = {"domain": d, "candidates": c, "layout": lay, "targets_on": mode, "rounds": len(g["ratio"]),
               **spread(g["ratio"])}
        row.update({key: spread(v) for key, v in g.items() if key != "ratio"})
        out.append(row)
    return out


def _count_teachers(spec_path: str) -> int:
    from ckd.config import load_yaml

    return len(load_yaml(spec_path).get("teachers", []))


def check_specs(specs: dict[str, str]) -> None:
    """Refuse, before anything runs, a spec whose checkpoints are missing (naming how to build them)."""
    from ckd.config import ConfigError
    from cluster.deploy import load_spec

    problems = []
    for domain, path in specs.items():
        try:
            load_spec(path)
        except ConfigError as exc:
            problems.append(f"{domain} ({path}): {exc}")
    if problems:
        raise BenchError("teachers missing; build them first (or run with --fixture-teachers 2):\n" +
                         "\n".join(problems))


def kd_micro(widths: dict[str, float], batch: int, threads: int, repeats: int = 20) -> dict[str, Any]:
    """KD loss forward + backward on [batch, C] float32 logits, float32 against float64 maths."""
    import torch

    from student.distill import kd_loss

    torch.set_num_threads(threads)
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, c in widths.items():
        c = max(2, int(round(c)))
        z = torch.randn(batch, c, generator=g)
        q = torch.softmax(torch.randn(batch, c, generator=g), -1)
        valid = torch.ones(batch, c, dtype=torch.bool)
        row = {}
        for prec in ("float32", "float64"):
            times = []
            for i in range(repeats + 3):
                zz = z.clone().requires_grad_(True)
                t0 = time.perf_counter()
                kd_loss(zz, q, valid, 1.0, precision=prec).backward()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            times.sort()
            row[f"{prec}_ms"] = 1e3 * times[len(times) // 2]
        row["float64_over_float32"] = row["float64_ms"] / row["float32_ms"]
        out[name] = {"B": batch, "C": c, **row}
    return out


def build_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run with teachers, its ratio to the no-teacher run with the same student cores."""
    by_tag = {r["tag"]: r for r in runs}
    rows = []
    for r in runs:
        if r.get("teachers_source") == "none" or "baseline" not in r or r.get("labels_dropped"):
            continue
        base = by_tag.get(r["baseline"])
        ratio = r["steps_per_s"] / base["steps_per_s"] if base else None
        twin = by_tag.get(r.get("labels_dropped_twin") or "")
        rows.append({"domain": r["domain"], "candidates": r["candidates"], "layout": r["layout"],
                     "round": r.get("round", 0), "targets_on": r.get("targets_on", "step"),
                     "student_cpus": r["student_cpus"], "teacher_cpus": _teacher_cores(r),
                     "C": r.get("candidates_per_step"), "steps_per_s": r["steps_per_s"],
                     "no_teacher_steps_per_s": base["steps_per_s"] if base else None, "ratio": ratio,
                     **{k: r.get(k) for k in ("step_ms", "wait_ms", "label_wait_ms", "request_encode_ms", "kd_ms",
                                              "kd_targets_ms", "kd_loss_ms", "kd_targets_prefetch_ms",
                                              "ce_ms", "forward_ms", "backward_ms", "optimizer_ms", "rpc_ms")},
                     "no_teacher_step_ms": base["step_ms"] if base else None,
                     "no_teacher_ce_ms": base.get("ce_ms") if base else None,
                     **(_twin_fields(twin, base, r) if twin else {})})
    return rows


def _twin_fields(twin: dict[str, Any], base: dict[str, Any] | None, r: dict[str, Any]) -> dict[str, Any]:
    """The interference control's numbers beside a distilled row (module docstring)."""
    return {"labels_dropped_steps_per_s": twin["steps_per_s"],
            "labels_dropped_ratio": twin["steps_per_s"] / base["steps_per_s"] if base else None,
            "kd_work_ratio": r["steps_per_s"] / twin["steps_per_s"],
            **{f"labels_dropped_{k}": twin.get(k) for k in ("step_ms", "ce_ms", "forward_ms", "backward_ms",
                                                              "label_wait_ms")}}


def _teacher_cores(r: dict[str, Any]) -> str:
    return "; ".join(f"{n}:" + "/".join(x["cpus"] for x in reps) for n, reps in r.get("replicas", {}).items())


def print_table(rows: list[dict[str, Any]], res: dict[str, Any]) -> None:
    def f(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    print(f"\nDistillation throughput ({res['machine']['description']}); student {res['config']}, "
          f"batch {res['settings']['batch_size']}, {res['settings']['steps']} timed steps after "
          f"{res['settings']['warmup']}, teachers: {res['settings']['teachers']}")
    head = (f"{'domain':10s} {'candidates':15s} {'layout':9s} {'student':7s} {'teachers':28s} {'C':>6s} "
            f"{'steps/s':>7s} {'alone':>6s} {'ratio':>5s} | {'step':>6s} {'wait':>6s} {'labels':>6s} "
            f"{'encode':>6s} {'KD':>6s} {'CE':>6s} {'fwd':>6s} {'bwd':>6s} {'opt':>5s} {'alone step':>10s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['domain']:10s} {r['candidates']:15s} {r['layout']:9s} {r['student_cpus']:7s} "
              f"{r['teacher_cpus'][:28]:28s} {f(r['C'], '.0f'):>6s} {f(r['steps_per_s'], '.2f'):>7s} "
              f"{f(r['no_teacher_steps_per_s'], '.2f'):>6s} {f(r['ratio'], '.2f'):>5s} | {f(r['step_ms']):>6s} "
              f"{f(r['wait_ms']):>6s} {f(r['label_wait_ms']):>6s} {f(r['request_encode_ms'], '.2f'):>6s} "
              f"{f(r['kd_ms']):>6s} {f(r['ce_ms']):>6s} {f(r['forward_ms']):>6s} {f(r['backward_ms']):>6s} "
              f"{f(r['optimizer_ms']):>5s} {f(r['no_teacher_step_ms']):>10s}")
    print("(ms per step; 'labels' = waiting for soft labels, part of 'wait'; 'encode' = building and encoding the "
          "request, off the training thread; 'alone' = the same student without teachers on the same cores)")
    off = [r for r in rows if r.get("kd_targets_prefetch_ms") is not None]
    if off:
        print("KD split (kd.targets_on=prefetch): teachers' side in the prefetch threads, student's side in the step: " +
              "; ".join(f"{r['domain']} {r['layout']} round {r['round']}: {f(r['kd_targets_prefetch_ms'])} ms per batch "
                        f"off the training thread, {f(r.get('kd_loss_ms'))} ms KD loss in the step" for r in off))
    twins = [r for r in rows if r.get("labels_dropped_steps_per_s") is not None]
    if twins:
        print("Interference control (teachers serving, labels fetched and dropped, CE only): "
              "twin/alone = what the teachers' work costs the student; distilled/twin = its own KD work")
        for r in twins:
            print(f"  {r['domain']} {r['candidates']} {r['layout']} round {r['round']}: twin "
                  f"{f(r['labels_dropped_steps_per_s'], '.2f')} steps/s, twin/alone {f(r['labels_dropped_ratio'], '.2f')}, "
                  f"distilled/twin {f(r['kd_work_ratio'], '.2f')}; CE ms alone/twin/distilled "
                  f"{f(r['no_teacher_ce_ms'])}/{f(r['labels_dropped_ce_ms'])}/{f(r['ce_ms'])}")
    micro = res.get("kd_precision_micro")
    if micro:
        print("KD loss forward+backward, float32 vs float64 maths: " + "; ".join(
            f"{k} [{v['B']}x{v['C']}] {v['float32_ms']:.2f} vs {v['float64_ms']:.2f} ms "
            f"({v['float64_over_float32']:.2f}x)" for k, v in micro.items()))


def machine() -> dict[str, Any]:
    from research.experiments import machine_description, ram_gib

    ram = ram_gib()
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    desc = f"{machine_description('cpu', memory=True)}, load {load[0]:.2f} at start"
    return {"cpus": os.cpu_count(), "available_cpus": sorted(os.sched_getaffinity(0)), "platform": platform.platform(),
            "processor": platform.processor(), "ram_gib": ram, "loadavg_start": list(load), "description": desc}


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="Scientific,Games",
                    help="comma list (default Scientific,Games); A+B+C is one student on those domains")
    ap.add_argument("--candidates", default=",".join(CANDIDATE_KINDS), help="in_batch,whole_catalogue")
    ap.add_argument("--layouts", default="own,shared", help="comma list of own, shared, colocated")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="student config (data.domains is set per domain)")
    ap.add_argument("--spec", action="append", default=[], metavar="[DOMAIN=]SPEC",
                    help="teacher deploy spec, per domain or for all (defaults: module docstring)")
    ap.add_argument("--fixture-teachers", type=int, default=0, metavar="N",
                    help="serve N generated mean-pool teachers instead of a spec (no training needed)")
    ap.add_argument("--student-cpus", default="", help="the student's cores (default: the first available)")
    ap.add_argument("--teacher-cpus", default="auto", help="the teachers' cores in layout own (default: the rest)")
    ap.add_argument("--teacher-gpus", type=float, default=None,
                    help="num_gpus per replica (default: the spec's; on a GPU machine e.g. 0.25 to share one)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="steps run before timing")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the student")
    ap.add_argument("--prefetch", type=int, default=4, help="service.prefetch (batches requested ahead)")
    ap.add_argument("--kd-precision", default="float32", choices=("float32", "float64"))
    ap.add_argument("--teacher-precision", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="every served teacher's inference precision (TeacherSpec.precision)")
    ap.add_argument("--curriculum", action="store_true",
                    help="keep the config's curriculum (default off: epoch 0 of a curriculum is its easiest, "
                         "shortest rows, so its steps are not representative)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every (baseline, distilled) pair this many times, alternating; report the median ratio")
    ap.add_argument("--labels-dropped", action="store_true",
                    help="add the interference control: a twin of each distilled run that fetches the labels "
                         "and trains on CE alone (module docstring)")
    ap.add_argument("--targets-on", default="step",
                    help="kd.targets_on of the runs with teachers, a comma list of step and prefetch (each a "
                         "distilled run per round): the teachers' side of the KD term in the training step, or "
                         "in the label-prefetch threads as the scores arrive")
    ap.add_argument("--prefetch-cpus", default="student", choices=("student", "teachers"),
                    help="layout own: the label-prefetch threads on the student's cores, or on the teachers' "
                         "(service.prefetch_cpus; the training thread stays on the student's)")
    ap.add_argument("--warm-epochs", type=int, default=0, metavar="K",
                    help="train K whole epochs untimed before the timed steps (steady state; module docstring)")
    ap.add_argument("--teacher-memo-mib", type=int, default=0, metavar="M",
                    help="the replicas keep a history memo of M MiB (service.history_memo_bytes; 0: off)")
    ap.add_argument("--data-dir", default="", help="data root (default $CKD_DATA_DIR or ../shared/data/amazon)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra student config override for every run (repeatable)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--keep", action="store_true", help="keep the runs' folders and logs (printed)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output (a relative path is relative to the repository)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (required under results/)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for c in args.candidates:
        if c not in CANDIDATE_KINDS:
            ap.error(f"--candidates: {c!r} is not one of {CANDIDATE_KINDS}")
    for x in args.layouts:
        if x not in LAYOUTS:
            ap.error(f"--layouts: {x!r} is not one of {LAYOUTS}")
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (the first step carries the pipeline's start-up)")
    return args


def refuse_out(out: str, overwrite: bool) -> str | None:
    """Why --out may not be written (None: it may): an existing file, or results/, needs --overwrite."""
    p = Path(out)
    resolved = (p if p.is_absolute() else REPO / p).resolve()
    results = (REPO / "results").resolve()
    if (resolved == results or results in resolved.parents) and not overwrite:
        return f"{out} is under results/ (committed evidence): pass --overwrite to write there"
    if p.exists() and not overwrite:
        return f"{out} already exists; pass --overwrite to replace it"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_cli(argv)
    if args.worker:
        result = worker(json.loads(Path(args.worker).read_text()))
        result["tag"] = json.loads(Path(args.worker).read_text())["tag"]
        Path(args.worker_out).write_text(json.dumps(result, indent=1))
        return 0
    why = refuse_out(args.out, args.overwrite)
    if why:
        print(why, file=sys.stderr)
        return 2
    os.chdir(REPO)
    tmp = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    try:
        specs: dict[str, str] = {}
        if not args.fixture_teachers:
            specs = domain_specs(args.spec, args.domains, tmp)
            check_specs(specs)
        jobs = plan_jobs(args, specs, tmp)
        res: dict[str, Any] = {
            "benchmark": "distill_throughput", "command": " ".join(shlex.quote(a) for a in sys.argv),
            "git_sha": git_sha(),
            "machine": machine(), "config": args.config,
            "settings": {k: getattr(args, k) for k in ("domains", "candidates", "layouts", "steps", "warmup",
                                                       "batch_size", "threads", "prefetch", "kd_precision",
                                                       "teacher_precision", "curriculum", "seed", "student_cpus",
                                                       "teacher_cpus", "warm_epochs", "teacher_memo_mib", "rounds",
                                                       "labels_dropped", "targets_on", "prefetch_cpus")},
            "runs": []}
        res["settings"]["teachers"] = (f"{args.fixture_teachers} fixture teacher(s)" if args.fixture_teachers
                                       else {d: specs[d] for d in args.domains})
        t0 = time.perf_counter()
        for i, job in enumerate(jobs):
            print(f"[{i + 1}/{len(jobs)}] {job['tag']} ...", flush=True)
            r = run_job(job, args.timeout, tmp / "logs")
            r["round"] = job.get("round", 0)
            if job["teachers"] == "none":
                r["teachers_source"] = "none"
            else:
                r["baseline"] = job["baseline"]
                r["targets_on"] = job["targets_on"]
                r["labels_dropped"] = bool(job.get("labels_dropped"))
                if job.get("labels_dropped_twin"):
                    r["labels_dropped_twin"] = job["labels_dropped_twin"]
            res["runs"].append(r)
            print(f"        {r['steps_per_s']:.2f} steps/s, step {r['step_ms']:.1f} ms, wait {r['wait_ms']:.1f} ms"
                  + (f", C {r['candidates_per_step']:.0f}" if r.get("candidates_per_step") else ""), flush=True)
        res["wall_s"] = time.perf_counter() - t0
        res["table"] = build_table(res["runs"])
        res["ratio_over_rounds"] = ratios_over_rounds(res["table"])
        widths = {}
        for r in res["runs"]:
            if r.get("candidates_per_step"):
                widths[f"{r['domain']}/{r['candidates']}"] = r["candidates_per_step"]
        if widths:
            from ckd.affinity import parse_cpus, pin_process

            cores = parse_cpus(args.student_cpus) if args.student_cpus else sorted(os.sched_getaffinity(0))[:1]
            pin_process(cores)  # the KD micro-benchmark on the student's cores
            res["kd_precision_micro"] = kd_micro(widths, args.batch_size, args.threads)
        res["machine"]["loadavg_end"] = list(os.getloadavg())
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print_table(res["table"], res)
        if args.rounds > 1:
            for g in res["ratio_over_rounds"]:
                print(f"{g['domain']} {g['candidates']} {g['layout']}: ratio median {g['median']:.2f} over "
                      f"{g['rounds']} rounds (min {g['min']:.2f}, max {g['max']:.2f})")
                for key, what in (("labels_dropped", "twin/alone"), ("kd_work", "distilled/twin")):
                    if key in g:
                        print(f"    {what}: median {g[key]['median']:.2f} (min {g[key]['min']:.2f}, "
                              f"max {g[key]['max']:.2f})")
        print(f"wrote {out}")
        if args.keep:
            print(f"runs and logs kept in {tmp}")
    except BenchError as exc:
        print(f"error: {exc}\n(runs and logs kept in {tmp})", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
