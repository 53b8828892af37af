"""The union of domains at a tiny size, end to end: a teacher of the union [ScientificMM, Office14]
scores every domain's items at their global ids over real gRPC on loopback; the vocabulary contract
accepts it for a student of the same union and refuses it, naming both orders, for a student that
lists the domains the other way round; and a real two-domain distillation run gives soft labels to
every row of both domains."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration
UNION = ["ScientificMM", "Office14"]


@pytest.fixture(scope="module")
def union(data_dir):
    from ckd.data.multidomain import load_multidomain

    return load_multidomain(data_dir, UNION, max_len=50)


@pytest.fixture(scope="module")
def union_reversed(data_dir):
    from ckd.data.multidomain import load_multidomain

    return load_multidomain(data_dir, UNION[::-1], max_len=50)


@pytest.fixture(scope="module")
def fixture_server(union, tmp_path_factory):
    """A fixture teacher of the union's vocabulary, served by a real gRPC server on loopback."""
    from benchmarks.fixture_teacher import make_fixture_checkpoint
    from teachers.base import load_teacher
    from teachers.server import start_server

    path = make_fixture_checkpoint(tmp_path_factory.mktemp("union") / "t", num_items=union.vocab_size,
                                   vocab_hash=union.vocab_hash(), seed=3, temperature=0.5)
    server = start_server(load_teacher(path), name="union_fixture")
    yield server
    server.stop(0)


def _rows(ds, domain: int, n: int):
    ex = ds.splits["valid"]
    idx = np.nonzero(ex.domains == domain)[0][:n]
    L = int(ex.lengths[idx].max())
    return ex.histories[idx, :L], ex.lengths[idx]


def test_union_teacher_scores_each_domains_items_at_their_global_ids(union):
    from student.teacher_pool import TeacherPool
    from teachers.server import start_server
    from teachers.unisrec import UniSRecTeacher

    torch.manual_seed(0)
    teacher = UniSRecTeacher.from_dataset(union, hidden=32, layers=1, heads=1, inner=32, n_experts=2).eval()
    assert teacher.num_items == union.vocab_size == 1 + 1585 + 2420
    server = start_server(teacher, name="unisrec_union")
    pool = TeacherPool({"unisrec_union": [server.address]}, timeout_s=30.0)
    try:
        infos, covered = pool.check_coverage(union.prefix_vocabularies())  # the same union: accepted
        assert covered == 2 and infos["unisrec_union"].num_items == union.vocab_size
        gen = np.random.default_rng(0)
        for d in range(2):
            start, stop = union.domain_range(d)
            hist, lens = _rows(union, d, 6)
            cands = gen.integers(start, stop, size=(6, 40))  # [B, C] global ids of domain d
            served = pool.score(hist, lens, cands)["unisrec_union"]
            assert served.shape == (6, 40) and served.dtype == np.float32
            with torch.no_grad():
                full = teacher.full_scores(torch.as_tensor(hist), torch.as_tensor(lens), start, stop)
            # column j of the full-domain scores is global id start + j
            expected = np.take_along_axis(full.numpy(), cands - start, axis=1)
            np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
    finally:
        pool.close()
        server.stop(0)


def test_vocabulary_contract_names_both_orders(union, union_reversed, fixture_server):
    from protos.contract import TeacherContractError
    from student.config import DistillConfig
    from student.teacher_pool import TeacherPool
    from student.teacher_session import TeacherSession

    cfg = DistillConfig()
    cfg.service.ready_timeout_s = 30.0
    same = TeacherPool({"u": [fixture_server.address]}, timeout_s=30.0)
    try:
        session = TeacherSession._checked(cfg, union, None, same)
        assert session.covered_domains == 2
    finally:
        same.close()
    other = TeacherPool({"u": [fixture_server.address]}, timeout_s=30.0)
    try:
        with pytest.raises(TeacherContractError) as err:
            TeacherSession._checked(cfg, union_reversed, None, other)
    finally:
        other.close()
    msg = str(err.value)
    assert "[ScientificMM, Office14]" in msg and "[Office14, ScientificMM]" in msg, msg
    assert "data.domains=[ScientificMM,Office14]" in msg


def test_two_domain_distillation_labels_every_row_of_both_domains(union, fixture_server, data_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    endpoints = json.dumps({"u": [fixture_server.address]})
    cmd = [sys.executable, "-m", "launch.distill", "--run-dir", str(run),
           "--set", f"service.endpoints={endpoints}", "--set", "service.spec=", "--set", "service.teachers=[u]",
           "--set", "data.domains=[ScientificMM,Office14]", "--set", "train.epochs=1",
           "--set", "train.max_steps_per_epoch=6", "--set", "train.batch_size=64", "--set", "train.progress=false",
           "--set", "train.threads=1", "--set", "kd.num_sampled=8", "--set", "curriculum.enabled=false",
           # the teacher-better gate decides per row whether to distil; it never changes which rows get labels
           "--set", "kd.gate=teacher_better"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    client = metrics["teacher_client"]
    seen, labelled = client["kd_rows_seen"], client["kd_rows_labelled"]
    assert sum(seen.values()) == 6 * 64
    for domain in UNION:  # both domains trained, and no row of either went without soft labels
        assert seen[domain] > 0 and labelled[domain] == seen[domain], client
        assert 0 <= client["kd_rows_gate_open"][domain] <= labelled[domain], client
    gate_open = metrics["history"][0]["gate_open"]  # the epoch's mean share of rows distilled
    assert sum(client["kd_rows_gate_open"].values()) / (6 * 64) == pytest.approx(gate_open, abs=1e-6)
    assert set(metrics["test"]) >= set(UNION)
