"""Run directories: resolved config, git SHA, seeds, logs and metrics of every run.

Both training loops (``teachers.training`` and ``student.trainer``/``student.pipeline``) write
their ``config.yaml``, ``run.json``, ``train.log`` and ``metrics.json`` through these functions;
the loop mechanics they share live in ``ckd.loop``.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from ckd.config import dump_config, json_dump

# Resolved-config keys (dotted) that say where or how a run ran, not what it trained: two runs that
# differ only here are the same recipe (the union collect's config check, research.retrain_check).
EXECUTION_KEYS = frozenset({"data.data_dir", "train.progress", "train.threads", "train.device",
                            "train.eval_batch_size", "service.embedded_history_memo_bytes"})


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


class RunDirInUse(RuntimeError):
    """Another live process is training into the same run directory."""


LOCK_FILE = ".lock"
_held: dict[str, IO[str]] = {}  # run directory -> its open lock file, kept open for the process's life


def claim_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on ``<run_dir>/.lock`` for the rest of this process.

    Two processes training into one run directory (a second ``research.union run``, a retried job
    whose first attempt still lives) would interleave their checkpoints and metrics, and a resume
    would read a mixture. The lock is an OS lock (flock) on an open file: the kernel drops it when
    the process exits, even on kill -9, so a crashed run never leaves a stale lock behind. Claiming
    a directory this process already holds is a no-op. Raises :class:`RunDirInUse` naming the
    holder (pid, host, since when) when another process holds it."""
    import fcntl

    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that wrote no details"
        f.close()
        raise RunDirInUse(f"run directory {run_dir} is in use by another training process ({holder}): wait for "
                          "it to finish or stop it, or pick another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    f.flush()
    _held[key] = f


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


def read_run_header(run_dir: Path) -> dict[str, Any]:
    """What :func:`write_run_header` wrote to run.json (git_sha, argv, started, extra), or {} when
    the run directory has none."""
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """<run_dir>/metrics.json: a run's results (both loops' final evaluation)."""
    json_dump(metrics, run_dir / "metrics.json")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """What :func:`write_metrics` wrote."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())
