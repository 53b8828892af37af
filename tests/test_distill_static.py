"""Distillation against teachers served by the real gRPC server (no Ray), single process:
the contract check refuses a teacher of another item vocabulary; a matching one is distilled."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def _serve(tmp_path, ds, name, vocab_hash, seed):
    from teachers.base import load_teacher
    from benchmarks.fixture_teacher import make_fixture_checkpoint
    from teachers.server import start_server

    make_fixture_checkpoint(tmp_path / name, num_items=ds.vocab_size, vocab_hash=vocab_hash, seed=seed)
    return start_server(load_teacher(tmp_path / name), name=name)


def _distill(data_dir, run_dir, endpoints, *extra):
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "launch.distill", "--run-dir", str(run_dir),
           "--set", f"service.endpoints={json.dumps(endpoints)}", "--set", "data.domains=ScientificMM",
           "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=4", "--set", "train.batch_size=64",
           "--set", "train.progress=false", "--set", "train.threads=1", "--set", "service.ready_timeout_s=20",
           *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_teacher_of_another_vocabulary_is_refused(scientific_mm, data_dir, tmp_path):
    server = _serve(tmp_path, scientific_mm, "wrong", "0" * 64, seed=1)
    try:
        proc = _distill(data_dir, tmp_path / "run", {"wrong": [server.address]})
    finally:
        server.stop(0)
    assert proc.returncode != 0
    assert "different domains or item ids" in proc.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_static_endpoints_distil_with_two_teachers(scientific_mm, data_dir, tmp_path):
    servers = [_serve(tmp_path, scientific_mm, n, scientific_mm.vocab_hash(), seed=s) for n, s in (("a", 1), ("b", 2))]
    try:
        proc = _distill(data_dir, tmp_path / "run", {"a": [servers[0].address], "b": [servers[1].address]},
                        "--set", "kd.integration=both", "--set", "kd.num_sampled=16")
    finally:
        for s in servers:
            s.stop(0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    h = m["history"][0]
    assert h["kd"] > 0 and h["kd_teachers"] == 2
    assert 0 < h["w/a"] < 1 and h["w/a"] + h["w/b"] == pytest.approx(1.0, abs=1e-5)
    assert m["teacher_client"]["batches"] >= 4


@pytest.mark.parametrize("kind,lr", [("fm", 0.01), ("deepfm", 0.01), ("lightgcn", 0.05)])
def test_other_student_families_distil_and_learn(kind, lr, scientific_mm, data_dir, tmp_path):
    server = _serve(tmp_path, scientific_mm, "a", scientific_mm.vocab_hash(), seed=1)
    try:
        proc = _distill(data_dir, tmp_path / "run", {"a": [server.address]}, "--set", f"model.kind={kind}",
                        "--set", "train.epochs=3", "--set", f"train.lr={lr}", "--set", "curriculum.enabled=false")
    finally:
        server.stop(0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert all(h["kd"] > 0 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_multidomain_student_distils_only_the_domains_its_teachers_cover(scientific_mm, data_dir, tmp_path):
    """One student on ScientificMM + Office14 (mixed batches) with a teacher of ScientificMM only:
    the teacher is accepted (its ids are the student's first domain), KD runs on the covered rows,
    Office14 rows train on CE alone, and both domains are evaluated."""
    server = _serve(tmp_path, scientific_mm, "a", scientific_mm.vocab_hash(), seed=1)
    try:
        proc = _distill(data_dir, tmp_path / "run", {"a": [server.address]},
                        "--set", "data.domains=[ScientificMM,Office14]", "--set", "curriculum.enabled=false")
    finally:
        server.stop(0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teachers cover ScientificMM; rows of Office14 train on CE only" in proc.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(m["test"]) == {"ScientificMM", "Office14", "mean"}
    h = m["history"][0]
    assert h["kd"] > 0 and h["kd_teachers"] == 1
    assert m["teacher_client"]["batches"] >= 4


def test_teacher_of_a_later_domain_only_is_refused(data_dir, tmp_path):
    """A teacher of Office14 alone does not share the id space of a [ScientificMM, Office14] student."""
    from ckd.data.multidomain import load_multidomain

    office = load_multidomain(data_dir, ["Office14"], max_len=50)
    server = _serve(tmp_path, office, "b", office.vocab_hash(), seed=1)
    try:
        proc = _distill(data_dir, tmp_path / "run", {"b": [server.address]},
                        "--set", "data.domains=[ScientificMM,Office14]")
    finally:
        server.stop(0)
    assert proc.returncode != 0
    assert "different domains or item ids" in proc.stderr
