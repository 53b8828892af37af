"""Run directories: resolved config, git SHA, seeds, logs and metrics of every run.

Both training loops (``teachers.training`` and ``student.trainer``/``student.pipeline``) write
their ``config.yaml``, ``run.json``, ``train.log`` and ``metrics.json`` through these functions;
the loop mechanics they share live in ``ckd.loop``.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ckd.config import dump_config, json_dump


def git_sha() -> str:
    """The commit the code runs at (with '-dirty' when the tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def default_run_dir(prefix: str = "runs") -> Path:
    return Path(prefix) / time.strftime("%Y%m%d-%H%M%S")


def setup_logging(run_dir: Path, rank: int = 0, name: str = "train.log") -> logging.Logger:
    """Log the "ckd" logger (and so its children, e.g. "ckd.teachers") to <run_dir>/<name> (rank 0)
    and stderr; other ranks log warnings only."""
    logger = logging.getLogger("ckd")
    logger.handlers.clear()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s")
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    logger.addHandler(sh)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / name)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False
    return logger


def write_run_header(run_dir: Path, config: Any, extra: dict[str, Any] | None = None) -> None:
    """Resolved config (YAML) and run facts (git SHA, argv, extra such as teacher info)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    json_dump({"git_sha": git_sha(), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               **(extra or {})}, run_dir / "run.json")


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """<run_dir>/metrics.json: a run's results (both loops' final evaluation)."""
    json_dump(metrics, run_dir / "metrics.json")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """What :func:`write_metrics` wrote."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())
