"""Pre-train / fine-tune a teacher from a YAML config (teachers.config.TeacherConfig schema).

    ckd-train-teacher --config configs/teachers/unisrec_scientific.yaml \
        [--data-dir D] [--run-dir R] [--set train.epochs=3 ...]

The data root is --data-dir, else data.data_dir of the config, else $CKD_DATA_DIR, else
../shared/data/amazon. The run directory defaults to runs/teachers/<config name>; an existing run
directory with a ``last/`` folder resumes where it stopped. Stage-level settings (a stage's own
epochs, lr, model arguments) live in the YAML's train.stages list; --set reaches the run-level
values that stages inherit when they leave a field unset, and
``--set train.stages.<stage name>.<key>=value`` one stage's own field (e.g.
``--set train.stages.finetune.init_from=''`` to fine-tune without pre-training).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


from ckd.config import ConfigError, default_data_dir, load_config, load_yaml, parse_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="teacher YAML (teachers.config.TeacherConfig schema)")
    p.add_argument("--data-dir", help="data root (default: data.data_dir, $CKD_DATA_DIR, ../shared/data/amazon)")
    p.add_argument("--run-dir", help="run directory (default runs/teachers/<config stem>); an existing one resumes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    return p.parse_args(argv)


STAGE_PREFIX = "train.stages."


def split_stage_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``train.stages.<name>.<key>=value`` overrides from the others."""
    stage = [i for i in items if i.startswith(STAGE_PREFIX)]
    return [i for i in items if not i.startswith(STAGE_PREFIX)], stage


def apply_stage_overrides(stages: list[dict], items: list[str]) -> list[dict]:
    """Apply ``train.stages.<name>.<key>[.<subkey>]=value`` to the YAML's stage list by name."""
    out = [dict(s) for s in stages]
    by_name = {s.get("name", "train"): s for s in out}
    for item in items:
        tree = parse_overrides([item[len(STAGE_PREFIX):]])
        (name, sub), = tree.items()
        if name not in by_name:
            raise ConfigError(f"override {item!r}: no stage named {name!r}; stages: {sorted(by_name)}")
        if not isinstance(sub, dict):
            raise ConfigError(f"override {item!r} must name a key of stage {name!r}")
        for k, v in sub.items():
            node = by_name[name]
            if isinstance(v, dict) and v and isinstance(node.get(k), dict):  # {} replaces
                node[k] = {**node[k], **v}
            else:
                node[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    from ckd.metrics import format_table
    from ckd.run_dir import RunDirInUse
    from teachers.config import TeacherConfig
    from teachers.training import train_teacher

    try:
        extra: dict = {"data": {"data_dir": args.data_dir}} if args.data_dir else {}
        overrides, stage_overrides = split_stage_overrides(args.overrides)
        if stage_overrides:
            extra.setdefault("train", {})["stages"] = apply_stage_overrides(
                load_yaml(args.config).get("train", {}).get("stages", []), stage_overrides)
        cfg = load_config(TeacherConfig, args.config, overrides=overrides, extra=extra)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not cfg.data.data_dir:
        cfg.data.data_dir = default_data_dir()
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / "teachers" / Path(args.config).stem
    try:
        metrics = train_teacher(cfg, run_dir, cfg.data.data_dir)
    except RunDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"\n{cfg.kind} — best epoch {metrics['best_epoch']}, checkpoint {metrics['checkpoint']}")
    print(format_table({"valid": metrics["valid"], "test": metrics["test"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
