"""research/seeds.py: real short runs over two seeds, their summary, reuse, and a mixed-setting refusal."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

SETTING = ["--teachers", "none", "--set", "data.domains=ScientificMM", "--set", "train.max_steps_per_epoch=3",
           "--set", "train.batch_size=128", "--set", "train.progress=false", "--set", "train.threads=1",
           "--set", "train.epochs=1", "--set", "curriculum.enabled=false", "--set", "model.hidden=16"]


def seeds(data_dir, root, *extra):
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "research.seeds", *SETTING, "--runs-root", str(root),
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_two_seeds_summarised_reused_and_never_mixed(data_dir, tmp_path):
    root, out = tmp_path / "runs", tmp_path / "seeds.json"
    proc = seeds(data_dir, root, "--seeds", "1", "2", "--parallel", "2", "--reference", "ndcg@10=0.0",
                 "--reference", "recall@10=0.9", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = [json.loads((root / f"seed{s}" / "metrics.json").read_text())["test"]["ScientificMM"] for s in (1, 2)]
    for m in ("recall@10", "ndcg@10", "recall@50", "ndcg@50"):
        assert report["mean"][m] == pytest.approx((runs[0][m] + runs[1][m]) / 2, abs=1e-12)
        assert report["sd"][m] == pytest.approx(abs(runs[0][m] - runs[1][m]) / math.sqrt(2), abs=1e-12)
    assert runs[0] != runs[1]  # two seeds, two models
    valid = [json.loads((root / f"seed{s}" / "metrics.json").read_text())["valid"]["ScientificMM"]["ndcg@10"]
             for s in (1, 2)]
    best = 0 if valid[0] >= valid[1] else 1
    assert report["selected_by_valid"]["seed"] == best + 1 and report["selected_by_valid"]["test"] == runs[best]
    assert report["seeds_clearing_reference"] == [] and not report["mean_clears_reference"]  # recall@10 >= 0.9
    assert [r["reused"] for r in report["records"]] == [False, False]
    assert "mean" in proc.stdout and "seeds clearing it: none of 2" in proc.stdout
    for s in (1, 2):
        assert f"seed: {s}\n" in (root / f"seed{s}" / "config.yaml").read_text()

    stamp = (root / "seed1" / "metrics.json").stat().st_mtime_ns
    again = seeds(data_dir, root, "--seeds", "1", "2", "--reference", "ndcg@10=0.0", "--out", str(out),
                  "--overwrite")  # the first call wrote it: replacing it needs the flag
    assert again.returncode == 0, again.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["reused"] for r in report["records"]] == [True, True]
    assert report["seeds_clearing_reference"] == [1, 2] and report["mean_clears_reference"]
    assert (root / "seed1" / "metrics.json").stat().st_mtime_ns == stamp

    mixed = seeds(data_dir, root, "--seeds", "1", "--set", "model.hidden=32")
    assert mixed.returncode != 0 and "model.hidden: wanted 32, run has 16" in mixed.stderr
    pinned = seeds(data_dir, root, "--seeds", "1", "--set", "train.seed=3")
    assert pinned.returncode != 0 and "the seeds come from --seeds" in pinned.stderr
