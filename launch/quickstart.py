"""The main job end to end on the embedded default (what `make demo` runs).

1. Train every teacher of configs/quickstart.yaml whose checkpoint is missing (once; later runs
   reuse runs/teachers/*), each with launch/train_teacher.py and the overrides listed there.
2. Distil the student with launch/distill.py: an embedded local Ray serves the teachers over
   loopback gRPC, soft labels are fetched batch by batch, and the metrics table is printed.

    ckd-demo [--plan configs/quickstart.yaml] [--data-dir D] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout: configs and runs/ are relative to it

from ckd.config import default_data_dir, load_yaml


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"step failed (exit {proc.returncode}): {' '.join(cmd[1:])}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to launch/distill.py")
    args = ap.parse_args(argv)
    plan = load_yaml(args.plan)
    data_dir = args.data_dir or default_data_dir()
    if not (Path(data_dir) / "Scientific").is_dir():
        print(f"error: no data under {data_dir}: set CKD_DATA_DIR or --data-dir", file=sys.stderr)
        return 2
    py = sys.executable
    for t in plan.get("teachers", []):
        ckpt = REPO / t["run_dir"] / "best" / "model.safetensors"
        if ckpt.is_file():
            print(f"teacher {t['name']}: using {ckpt.parent}")
            continue
        print(f"teacher {t['name']}: training ({t['config']})", flush=True)
        cmd = [py, "launch/train_teacher.py", "--config", t["config"], "--run-dir", t["run_dir"],
               "--data-dir", data_dir]
        for o in t.get("overrides", []):
            cmd += ["--set", o]
        run(cmd)
    cmd = [py, "launch/distill.py", "--config", plan["distill"]["config"], "--data-dir", data_dir]
    if plan["distill"].get("run_dir"):
        cmd += ["--run-dir", plan["distill"]["run_dir"]]
    for o in plan["distill"].get("overrides", []) + args.overrides:
        cmd += ["--set", o]
    run(cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
