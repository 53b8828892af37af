"""Two real processes under `accelerate launch` (DDP over gloo on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

ACCELERATE_2P = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "0"]


def launch_two(data_dir, run_dir, *extra, timeout=600):
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    cmd = ACCELERATE_2P + ["-m", "launch.distill", "--run-dir", str(run_dir), "--teachers", "none",
                           "--set", "data.domains=ScientificMM", "--set", "train.epochs=2",
                           "--set", "train.max_steps_per_epoch=4", "--set", "train.batch_size=64",
                           "--set", "train.progress=false", "--set", "train.threads=1", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("extra", [[], ["--set", "train.length_sorted_pieces=3"]], ids=["one_pass", "pieces"])
def test_two_processes_train_in_sync(data_dir, tmp_path, extra):
    # With pieces, gradients are synchronised on each step's last piece only: a wrong no_sync
    # would leave the replicas apart.
    launch_two(data_dir, tmp_path / "ddp", *extra)
    ranks = [json.loads((tmp_path / "ddp" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    # DDP averaged the gradients: both replicas hold identical parameters after 8 steps
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "ScientificMM" in metrics["test"]


def test_two_processes_agree_on_plateau_lr_decay_and_early_stop(data_dir, tmp_path):
    # lr 1e-12 leaves the weights (and so valid NDCG@10) flat: epochs 1 and 2 are plateau epochs, so
    # after epoch 2 rank 0 halves the lr (decay patience 2) and stops (patience 2); rank 1 must follow.
    # Patience 2 needs rank 0 to count plateau epochs across epochs under DDP, not one at a time.
    launch_two(data_dir, tmp_path / "ddp", "--set", "train.epochs=6", "--set", "train.lr=1e-12",
               "--set", "train.patience=2", "--set", "train.lr_decay_patience=2",
               "--set", "train.lr_decay_factor=0.5")
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    ndcg = [h["valid_ndcg@10"] for h in metrics["history"]]
    assert ndcg[1] <= ndcg[0] and ndcg[2] <= ndcg[0]  # the plateau the test relies on
    assert len(ndcg) == 3  # stopped after two plateau epochs, not at train.epochs=6
    assert [h["lr"] for h in metrics["history"]] == [1e-12] * 3
    ranks = [json.loads((tmp_path / "ddp" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["lr"] == ranks[1]["lr"] == pytest.approx(0.5e-12, rel=1e-12)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 12
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]


def test_two_processes_follow_the_same_schedule_on_every_position_chains(data_dir, tmp_path):
    # Each rank sets the cosine lr from its own step count and epoch progress (nothing is broadcast),
    # on its own shard of the chains: both ranks must land on the rule's lr at the same step.
    import math

    proc = launch_two(data_dir, tmp_path / "ddp", "--set", "train.lr=0.002", "--set", "train.lr_schedule=cosine",
                      "--set", "train.schedule_epochs=4", "--set", "train.objective=all_positions",
                      "--set", "curriculum.enabled=false")
    assert "train rows regrouped into" in proc.stderr  # rank 0 logs it; rank 1 logs warnings only
    ranks = [json.loads((tmp_path / "ddp" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 8
    # The last step is epoch 1's fourth of four: progress (1 + 3/4) / 4 of the horizon.
    expected = 0.002 * (1 + math.cos(math.pi * 1.75 / 4)) / 2
    assert ranks[0]["lr"] == ranks[1]["lr"] == pytest.approx(expected, rel=1e-12)
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
