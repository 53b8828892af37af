"""Train the student, with or without teachers (the main job).

Single process:   ckd-distill --config configs/distill_scientific.yaml   (or python -m launch.distill ...)
Two processes:    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
                      --mixed_precision no --dynamo_backend no -m launch.distill --config ...
DeepSpeed:        accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m launch.distill ...
No teachers:      add --teachers none (plain SASRec baseline, CE only).

With teachers and no cluster address, this entry point starts an embedded local Ray on rank 0,
deploys the teacher replicas of service.spec from their checkpoints (CPU when there is no GPU),
hands its address to every rank, and shuts it down once every rank has finished; the student talks
to the replicas over loopback gRPC. The embedded default is closed: its Ray (GCS, raylet, workers,
agents; no dashboard) and the replicas listen on 127.0.0.1 only (cluster.deploy.start_embedded),
and the other ranks join it in Ray's loopback mode (ckd.ray_loopback.join_ray, via
TeacherPool.from_ray). With --ray-address it joins a running cluster's teacher service instead,
and with service.endpoints it talks to servers started without Ray.

--cpus 0,1 keeps the student's processes (every rank, every thread) on those cores, e.g. off the
cores the teacher replicas are pinned to (TeacherSpec.cpus). An embedded teacher service is started
first, so Ray's own daemons are not confined to the student's cores.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from ckd.config import ConfigError, default_data_dir, load_config

if TYPE_CHECKING:
    from cluster.deploy import DeploySpec, TeacherDeployment

log = logging.getLogger("ckd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (student.config.DistillConfig schema)")
    p.add_argument("--data-dir", help="data root (default: $CKD_DATA_DIR or ../shared/data/amazon)")
    p.add_argument("--run-dir", help="run directory (default runs/<timestamp>); an existing one resumes")
    p.add_argument("--teachers", help="'none' for no distillation, or a comma list of teacher names to keep")
    p.add_argument("--ray-address", help="join a running teacher service on this Ray cluster")
    p.add_argument("--cpus", metavar="LIST",
                   help="pin the student's processes to these cores, e.g. 0 or 0,1 or 0-3 (Linux)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.epochs=3 (repeatable)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    from student.config import DistillConfig, check_run

    extra: dict = {}
    if args.data_dir:
        extra.setdefault("data", {})["data_dir"] = args.data_dir
    if args.run_dir:
        extra["run_dir"] = args.run_dir
    if args.ray_address:
        extra.setdefault("service", {})["ray_address"] = args.ray_address
    cfg = load_config(DistillConfig, args.config, overrides=args.overrides, extra=extra)
    if not cfg.data.data_dir:
        cfg.data.data_dir = default_data_dir()
    if args.teachers:
        if args.teachers.strip().lower() == "none":
            cfg.service.enabled = False
        else:
            cfg.service.teachers = [t.strip() for t in args.teachers.split(",") if t.strip()]
    check_run(cfg)
    return cfg


def embedded_spec(cfg) -> tuple[DeploySpec, list[str]] | None:
    """The deploy spec this run starts itself, cut to the teachers it distils from, and their names
    (``service.teachers``, default: all of the spec). None when the run has no teachers or joins a
    running service (``service.ray_address``, ``service.endpoints``). The run joins the service it
    starts, so ``cfg.service.namespace`` becomes the spec's namespace (a spec with its own, e.g.
    configs/union/serve.yaml's ckd-union, would otherwise be looked up under the default)."""
    svc = cfg.service
    if not svc.active or svc.endpoints or svc.ray_address:
        return None
    from cluster.deploy import load_spec

    spec = load_spec(svc.spec)
    names = list(svc.teachers) or [t.name for t in spec.teachers]
    unknown = sorted(set(names) - {t.name for t in spec.teachers})
    if unknown:
        raise ConfigError(f"service.teachers names {unknown}, not in the deploy spec {svc.spec}")
    spec.teachers = [t for t in spec.teachers if t.name in names]
    if svc.embedded_history_memo_bytes:
        from dataclasses import replace

        spec.service = replace(spec.service, history_memo_bytes=svc.embedded_history_memo_bytes)
    svc.namespace = spec.namespace
    return spec, names


def start_embedded_service(spec: DeploySpec, names: list[str], acc) -> tuple[str, TeacherDeployment | None]:
    """Start the teacher replicas of ``spec`` on a local Ray on rank 0; every rank gets its address.
    Returns (address, deployment); the deployment is None on the other ranks."""
    from student.pipeline import broadcast_str

    address, deployment, error = "", None, None
    if acc.is_main_process:
        from cluster.deploy import start_embedded

        replicas = sum(t.replicas for t in spec.teachers)
        log.info("starting embedded Ray with %d teacher replica(s): %s", replicas, ", ".join(names))
        try:
            address, deployment = start_embedded(spec, num_cpus=max(2, replicas + 1))
        except BaseException as exc:  # noqa: BLE001 — the other ranks must not wait for an address forever
            error = exc
    # An empty address tells the other ranks that rank 0 failed (it raises its own error below).
    address = broadcast_str(acc, address)
    if error is not None:
        raise error
    if not address:
        raise RuntimeError("rank 0 could not start the embedded teacher service (see its log)")
    return address, deployment


def parse_student_cpus(text: str | None) -> list[int]:
    """The --cpus core list ([] when not given); ConfigError for a bad list or a missing core."""
    if not text:
        return []
    from ckd.affinity import AffinityError, parse_cpus

    try:
        cpus = parse_cpus(text)
    except AffinityError as exc:
        raise ConfigError(f"--cpus: {exc}") from None
    ncpu = os.cpu_count() or 1
    if max(cpus) >= ncpu:
        raise ConfigError(f"--cpus {text}: this machine has cores 0-{ncpu - 1}")
    return cpus


def pin_student(cpus: list[int]) -> None:
    """Pin every thread of this rank's process to ``cpus`` (threads started later inherit them)."""
    from ckd.affinity import format_cpus, pin_process

    pin_process(cpus)
    log.info("student process %d pinned to cores %s", os.getpid(), format_cpus(cpus))


def main(argv: list[str] | None = None) -> int:
    """The ``ckd-distill`` console script (also ``python -m launch.distill``, ``accelerate launch -m``)."""
    code = run(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        # DeepSpeed/gloo occasionally abort in atexit handlers after all work is done (STACK.md):
        # flush and leave without running them once the job has finished.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run(argv: list[str] | None = None) -> int:
    """Resolve the config, start the embedded teacher service if the run needs one, train."""
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
        embedded = embedded_spec(cfg)
        student_cpus = parse_student_cpus(args.cpus)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from ckd.run_dir import RunDirInUse
    from student.pipeline import prepare_run, run_distillation

    try:
        acc = prepare_run(cfg)
    except RunDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    address, names, deployment = "", [], None
    try:
        if embedded is not None:
            try:
                address, deployment = start_embedded_service(*embedded, acc)
            except ConfigError as exc:
                print(f"config error: {exc}", file=sys.stderr)
                return 2
            names = embedded[1]
        if student_cpus:
            pin_student(student_cpus)
        # run_distillation returns once every rank has finished scoring, so the replicas can go.
        metrics = run_distillation(cfg, acc, ray_address=address, teachers=names)
    finally:
        if deployment is not None:
            deployment.shutdown()
    return 0 if metrics is not None else 1


if __name__ == "__main__":
    sys.exit(main())
