"""Train the student, with or without teachers (the main job).

Single process:   python launch/distill.py --config configs/distill_scientific.yaml
Two processes:    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
                      --mixed_precision no --dynamo_backend no launch/distill.py --config ...
DeepSpeed:        accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml launch/distill.py ...
No teachers:      add --teachers none (plain SASRec baseline, CE only).

With teachers and no cluster address, this process starts an embedded local Ray, deploys the
teacher replicas from their checkpoints (CPU when there is no GPU) and talks to them over loopback
gRPC; with --ray-address it joins a running cluster's teacher service instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd.config import ConfigError, default_data_dir, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (student.config.DistillConfig schema)")
    p.add_argument("--data-dir", help="data root (default: $CKD_DATA_DIR or ../shared/data/amazon)")
    p.add_argument("--run-dir", help="run directory (default runs/<timestamp>); an existing one resumes")
    p.add_argument("--teachers", help="'none' for no distillation, or a comma list of teacher names to keep")
    p.add_argument("--ray-address", help="join a running teacher service on this Ray cluster")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from student.pipeline import run_distillation

    metrics = run_distillation(cfg)
    return 0 if metrics is not None else 1


if __name__ == "__main__":
    code = main()
    # DeepSpeed/gloo occasionally abort in atexit handlers after all work is done (STACK.md):
    # flush and leave without running them once the job has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        os._exit(code)
    sys.exit(code)
