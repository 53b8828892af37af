"""The corrupted teacher of the integration experiments: a real teacher with permuted item ids,
served over real gRPC on loopback, confidently ranking the wrong items."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


def test_permuted_teacher_serves_the_permutation_of_the_clean_top_item(scientific_mm, tmp_path):
    from student.teacher_pool import TeacherPool
    from teachers.base import load_teacher, save_teacher
    from teachers.permuted import PermutedTeacher, main
    from teachers.server import start_server
    from teachers.unisrec import UniSRecTeacher

    ds = scientific_mm
    torch.manual_seed(0)
    clean = UniSRecTeacher.from_dataset(ds, hidden=32, layers=1, heads=1, inner=32, n_experts=2).eval()
    save_teacher(clean, tmp_path / "clean")
    assert main(["--base", str(tmp_path / "clean"), "--out", str(tmp_path / "permuted"), "--seed", "7"]) == 0
    clean, bad = load_teacher(tmp_path / "clean"), load_teacher(tmp_path / "permuted")
    assert bad.kind == "permuted" and bad.checkpoint_sha256 != clean.checkpoint_sha256
    perm = bad.perm
    start, stop = ds.domain_range(0)
    # a permutation of the domain's own ids, PAD fixed, seeded
    assert perm[0] == 0 and sorted(perm[start:stop].tolist()) == list(range(start, stop))
    assert (perm[start:stop] != torch.arange(start, stop)).float().mean() > 0.9
    assert torch.equal(perm, PermutedTeacher.wrap(clean, 7).perm)

    servers = {n: start_server(t, name=n) for n, t in (("clean", clean), ("bad", bad))}
    pool = TeacherPool({n: [s.address] for n, s in servers.items()}, timeout_s=30.0)
    try:
        pool.check_coverage(ds.prefix_vocabularies())
        ex = ds.splits["valid"]
        L = int(ex.lengths[:16].max())
        hist, lens = ex.histories[:16, :L], ex.lengths[:16]
        cands = np.arange(start, stop)
        scores = pool.score(hist, lens, cands)
        top_clean = cands[scores["clean"].argmax(1)]
        top_bad = cands[scores["bad"].argmax(1)]
        # the corrupted teacher's top item, mapped through the permutation, is the clean top item
        assert (perm[torch.as_tensor(top_bad)].numpy() == top_clean).all()
        assert (top_bad != top_clean).mean() > 0.9
        # equally confident: the same sorted score profile, row by row
        np.testing.assert_allclose(np.sort(scores["bad"], 1), np.sort(scores["clean"], 1), rtol=1e-5, atol=1e-6)
    finally:
        pool.close()
        for s in servers.values():
            s.stop(0)
