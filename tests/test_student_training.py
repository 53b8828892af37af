"""Real student training runs on real data (ScientificMM, the smallest domain), through the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

COMMON = ["--teachers", "none", "--set", "data.domains=ScientificMM", "--set", "train.max_steps_per_epoch=6",
          "--set", "train.batch_size=128", "--set", "train.progress=false", "--set", "train.threads=1",
          "--set", "curriculum.full_at_epoch=2"]


def start_distill(data_dir, run_dir, *extra, env_extra=None) -> tuple[subprocess.Popen, Path]:
    """Start one real single-thread run of the CLI; ``finish_distill`` waits for it. Independent
    runs started together use the box's two cores (each is deterministic at one thread)."""
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "launch.distill", "--run-dir", str(run_dir), *COMMON, *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, Path(run_dir)


def finish_distill(started: tuple[subprocess.Popen, Path]) -> tuple[dict, subprocess.CompletedProcess]:
    proc, run_dir = started
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return json.loads((run_dir / "metrics.json").read_text()), subprocess.CompletedProcess(proc.args, 0, out, err)


def run_distill(data_dir, run_dir, *extra, env_extra=None):
    return finish_distill(start_distill(data_dir, run_dir, *extra, env_extra=env_extra))


def fingerprint(run_dir, rank=0):
    return json.loads((Path(run_dir) / "ranks" / f"rank{rank}.json").read_text())


def test_short_run_learns_and_writes_its_run_directory(data_dir, tmp_path):
    metrics, proc = run_distill(data_dir, tmp_path / "run", "--set", "train.epochs=3", "--set", "train.lr=0.003",
                                "--set", "train.record_test_curve=true")
    hist = metrics["history"]
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"] - 0.05
    # the anytime curve: the test value recorded at the selected epoch is the run's reported test
    from research.anytime import read_curve

    curve = read_curve(tmp_path / "run")
    assert curve["steps"] == [h["global_step"] for h in hist] and curve["steps"][0] > 0
    assert curve["final"] == pytest.approx(metrics["test"]["mean"]["ndcg@10"], abs=1e-6)
    # 1,585 items: a random ranking gives NDCG@10 of about 0.003
    assert metrics["test"]["ScientificMM"]["ndcg@10"] > 0.01
    assert set(metrics) >= {"valid", "test", "best_epoch"}
    assert set(metrics["test"]["ScientificMM"]) == {"recall@10", "ndcg@10", "recall@50", "ndcg@50"}
    for f in ("config.yaml", "run.json", "train.log", "best/model.safetensors", "best/config.json"):
        assert (tmp_path / "run" / f).is_file(), f
    assert "recall@10" in proc.stdout  # the results table

    # launch/evaluate.py re-scores the best checkpoint to the trainer's numbers, with intervals
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    ev = subprocess.run([sys.executable, "-m", "launch.evaluate", str(tmp_path / "run" / "best"),
                         "--ci", "200", "--out", str(tmp_path / "ev"), "--device", "cpu"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for m, v in metrics["test"]["ScientificMM"].items():
        assert again["test"]["ScientificMM"][m] == pytest.approx(v, abs=1e-9)
        lo, hi = again["test_ci"]["ScientificMM"][m]
        assert lo <= v <= hi and lo < hi
    assert "bootstrap interval" in ev.stdout


def test_plateau_lr_decays_only_on_a_multiple_of_its_patience():
    from student.trainer import plateau_lr

    assert [plateau_lr(1.0, bad, 2, 0.5) for bad in range(5)] == [1.0, 1.0, 0.5, 1.0, 0.5]
    assert plateau_lr(1.0, 3, 0, 0.5) == 1.0  # 0 = constant lr


def test_scheduled_lr_warms_up_linearly_then_follows_half_a_cosine():
    from student.trainer import scheduled_lr

    assert [scheduled_lr(2.0, s, 0.0, 4, "constant") for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [scheduled_lr(2.0, 9, p, 0, "cosine") for p in (0.0, 0.5, 1.0, 1.7)] == pytest.approx([2.0, 1.0, 0.0, 0.0])
    assert scheduled_lr(2.0, 0, 0.5, 2, "cosine") == pytest.approx(0.5)  # half warmed up, half decayed


def test_cosine_schedule_sets_each_epochs_lr(data_dir, tmp_path):
    # Warm-up over 8 steps: epoch 0's last step (step 5) is still warming up, so the recorded lr also
    # checks which global step the trainer passes, not only the epoch progress.
    metrics, _ = run_distill(data_dir, tmp_path / "run", "--set", "train.epochs=3", "--set", "train.lr=0.004",
                             "--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=8",
                             "--set", "train.schedule_epochs=4", "--set", "curriculum.enabled=false")
    # The lr recorded after an epoch is the one its last step (6 steps an epoch) trained with:
    # 0.004 * 6/8 * (1 + cos(pi * 5/24)) / 2, then 0.004 * (1 + cos(pi * 11/24)) / 2, ...
    expected = [0.004 * 0.75 * (1 + math.cos(math.pi * 5 / 24)) / 2, 0.004 * (1 + math.cos(math.pi * 11 / 24)) / 2,
                0.004 * (1 + math.cos(math.pi * 17 / 24)) / 2]
    assert [h["lr"] for h in metrics["history"]] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("opt, averaged", [
    ([], False),
    (["--set", "train.ema_decay=0.9"], True),
    # The horizon is pinned: the "interruption" below is simulated with a smaller train.epochs. Warm-up
    # ends inside epoch 0, so a resume that lost the global step would warm up again and differ.
    (["--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=4", "--set", "train.schedule_epochs=3"],
     False)], ids=["plain", "ema", "cosine"])
def test_interrupted_run_resumes_to_the_same_result(data_dir, tmp_path, opt, averaged):
    # The straight run and the run "interrupted" after epoch 0 are independent: run them side by side.
    straight_run = start_distill(data_dir, tmp_path / "a", "--set", "train.epochs=3", *opt)
    interrupted_run = start_distill(data_dir, tmp_path / "b", "--set", "train.epochs=1", *opt)
    straight, _ = finish_distill(straight_run)
    finish_distill(interrupted_run)
    # After one epoch the best checkpoint is that epoch's weights: the live ones, or their average.
    from safetensors.torch import load_file

    best, live = (load_file(str(tmp_path / "b" / d / "model.safetensors")) for d in ("best", "last"))
    same = all(torch.equal(best[k], live[k]) for k in live)
    assert same == (not averaged)
    resumed, proc = run_distill(data_dir, tmp_path / "b", "--set", "train.epochs=3", *opt)
    assert "resumed from" in proc.stderr
    assert fingerprint(tmp_path / "a")["param_sha256"] == fingerprint(tmp_path / "b")["param_sha256"]
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in straight["history"]], abs=1e-6)
    assert resumed["test"]["ScientificMM"]["ndcg@10"] == pytest.approx(straight["test"]["ScientificMM"]["ndcg@10"],
                                                                        abs=1e-6)


def test_every_position_run_trains_the_chains(data_dir, tmp_path):
    # ScientificMM's prefix rows regrouped into chains: batch 128 chains, 6 steps an epoch.
    metrics, proc = run_distill(data_dir, tmp_path / "run", "--set", "train.epochs=3", "--set", "train.lr=0.003",
                                "--set", "train.objective=all_positions", "--set", "curriculum.enabled=false")
    assert "train rows regrouped into" in proc.stderr
    hist = metrics["history"]
    assert [h["steps"] for h in hist] == [6, 6, 6] and hist[-1]["loss"] < hist[0]["loss"] - 0.05
    assert metrics["test"]["ScientificMM"]["ndcg@10"] > 0.01  # random ranking: about 0.003


def test_length_sorted_pieces_train_as_the_whole_random_batch(data_dir, tmp_path):
    # Uniformly random batches, no dropout: computing each batch in 4 length-sorted pieces must give
    # the one-pass run's losses and metrics (only the float summation order differs).
    opts = ["--set", "train.epochs=2", "--set", "train.length_bucket_batches=0", "--set", "model.dropout=0",
            "--set", "curriculum.enabled=false", "--set", "train.lr=0.003"]
    whole_run = start_distill(data_dir, tmp_path / "whole", *opts)
    pieces_run = start_distill(data_dir, tmp_path / "pieces", *opts, "--set", "train.length_sorted_pieces=4")
    (whole, _), (pieces, _) = finish_distill(whole_run), finish_distill(pieces_run)
    assert [h["loss"] for h in pieces["history"]] == pytest.approx([h["loss"] for h in whole["history"]], rel=1e-5)
    assert pieces["history"][-1]["loss"] < pieces["history"][0]["loss"]
    for m, v in whole["test"]["ScientificMM"].items():
        assert pieces["test"]["ScientificMM"][m] == pytest.approx(v, abs=2e-3)
