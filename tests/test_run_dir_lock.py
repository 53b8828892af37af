"""One training process per run directory (ckd.run_dir.claim_run_dir): a second process is refused
with the holder named and writes nothing; a holder killed with SIGKILL leaves no stale lock."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ckd.run_dir import RunDirInUse, claim_run_dir

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys; from pathlib import Path; from ckd.run_dir import claim_run_dir; "
        "claim_run_dir(Path(sys.argv[1])); print('claimed', flush=True); sys.stdin.read()")


def _holder(run_dir: Path) -> subprocess.Popen:
    """A real second process that claims ``run_dir`` and keeps it until killed or its stdin closes."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "claimed"
    return p


def test_a_held_run_dir_is_refused_and_freed_when_its_holder_is_killed(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunDirInUse, match=rf"in use by another training process \(pid {holder.pid} on "):
            claim_run_dir(run_dir)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    claim_run_dir(run_dir)  # the kernel dropped the dead holder's lock: no stale lock to clean up
    assert (run_dir / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    claim_run_dir(run_dir)  # claiming again in the holding process is a no-op


def test_ckd_distill_into_a_run_dir_in_use_exits_3_and_writes_nothing(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        env = {**os.environ, "CKD_DATA_DIR": str(data_dir)}
        r = subprocess.run([sys.executable, "-m", "launch.distill", "--config", "configs/demo/student.yaml",
                            "--run-dir", str(run_dir), "--teachers", "none", "--set", "train.epochs=1"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert r.returncode == 3, r.stderr[-2000:]
    assert f"run directory {run_dir} is in use by another training process (pid {holder.pid} on " in r.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no config, log or checkpoint written
