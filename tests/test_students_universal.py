"""FM, DeepFM and LightGCN students on real Scientific data, plus their math on tiny inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ckd.data.multidomain import build_multidomain
from student.models import STUDENTS, SASRec, StudentBatch, StudentModel, build_student, register_student
from student.models.deepfm import DeepFM
from student.models.fm import FM
from student.models.lightgcn import LightGCN, training_edges

KINDS = ["fm", "deepfm", "lightgcn"]
# LightGCN's normalised propagation shrinks its gradients: it wants a ~5x larger step size
# (at 0.01 its loss falls only ~5% in 30 steps; measured, see the report).
LR = {"fm": 0.01, "deepfm": 0.01, "lightgcn": 0.05}


def _batch(ds, split: str, idx: np.ndarray) -> StudentBatch:
    ex = ds.splits[split]
    L = int(ex.lengths[idx].max())
    return StudentBatch(*(torch.as_tensor(a) for a in (ex.users[idx], ex.domains[idx],
                                                       ex.histories[idx, :L], ex.lengths[idx], ex.targets[idx])))


def _ce(model, batch: StudentBatch, start: int, stop: int) -> torch.Tensor:
    """Full-softmax CE over the domain's items, through forward() as the trainer calls it."""
    logits = model(batch)[:, start:stop]
    return torch.nn.functional.cross_entropy(logits, batch.targets - start)


# One torch thread: the shared 2-core machine (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.unit
def test_registry_and_factory():
    assert {"sasrec", "fm", "deepfm", "lightgcn"} <= set(STUDENTS)
    assert STUDENTS["fm"] is FM and STUDENTS["deepfm"] is DeepFM and STUDENTS["lightgcn"] is LightGCN
    assert STUDENTS["sasrec"] is SASRec
    with pytest.raises(ValueError, match="unknown student kind 'gru'"):
        build_student("gru", None)
    # one registry, one class per kind: a second class cannot take a kind over
    with pytest.raises(ValueError, match="'fm' is already registered by FM"):
        register_student(type("OtherFM", (StudentModel,), {"kind": "fm"}))
    assert STUDENTS["fm"] is FM


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_trains_on_real_scientific_slice(scientific, kind):
    """~30 Adam steps on 512 real training rows: the loss on that slice falls clearly."""
    torch.manual_seed(0)
    ds = scientific
    start, stop = ds.domain_range(0)
    model = build_student(kind, ds, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=LR[kind])
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ds.splits["train"]), 512, replace=False)
    probe = _batch(ds, "train", rows)
    with torch.no_grad():
        before = float(_ce(model, probe, start, stop))
    assert before == pytest.approx(np.log(stop - start), rel=0.05)  # near-uniform at init
    model.train()
    for step in range(30):
        b = _batch(ds, "train", rows[(step * 64) % 512:(step * 64) % 512 + 64])
        loss = _ce(model, b, start, stop)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        after = float(_ce(model, probe, start, stop))
    assert after < 0.8 * before, (kind, before, after)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_full_scores_and_candidate_forms_agree(scientific, kind):
    torch.manual_seed(1)
    ds = scientific
    start, stop = ds.domain_range(0)
    model = build_student(kind, ds, hidden=16, **({"chunk": 700} if kind == "deepfm" else {})).eval()
    b = _batch(ds, "test", np.arange(0, 2000, 97))
    B = len(b)
    with torch.no_grad():
        full = model.full_scores(b, start, stop)
        assert full.shape == (B, stop - start) and full.dtype == torch.float32
        torch.testing.assert_close(model(b)[:, start:stop], full)
        shared = torch.tensor([start, stop - 1, start + 5, start + 5, 100])
        s1 = model.score(b, shared)
        assert s1.shape == (B, 5)
        torch.testing.assert_close(s1, full[:, shared - start])
        # per-row candidates: each row gets the shared ids in its own order
        perm = torch.stack([torch.randperm(5) for _ in range(B)])
        s2 = model.score(b, shared[perm])
        torch.testing.assert_close(s2, s1.gather(1, perm))


@pytest.mark.unit
@pytest.mark.parametrize("last_item", [True, False])
def test_fm_matches_textbook_formula(last_item):
    """score = w0 + sum_f w_f + sum_{f<g} <e_f, e_g> over the field embeddings (history mean,
    last history item when enabled, user domain, item, item domain)."""
    torch.manual_seed(2)
    item_domain = np.array([-1, 0, 0, 1, 1, 1])
    m = FM(6, 2, hidden=4, item_domain=item_domain, last_item=last_item).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    hist = torch.tensor([[1, 2, 0], [4, 0, 0]])
    b = StudentBatch(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), hist,
                     torch.tensor([2, 1]), torch.tensor([1, 3]))
    cand = torch.tensor([1, 3, 5])
    with torch.no_grad():
        got = m.score(b, cand)
    f = m.fields
    assert hasattr(f, "last") == last_item
    for r in range(2):
        h = hist[r][hist[r] > 0]
        ud = int(item_domain[int(h[0])])
        for j, c in enumerate(cand.tolist()):
            cd = int(item_domain[c])
            embs = [f.hist.weight[h].mean(0), f.udom.weight[ud], f.item.weight[c], f.cdom.weight[cd]]
            first = (f.bias + f.hist_w.weight[h, 0].mean() + f.udom_w.weight[ud, 0]
                     + f.item_w.weight[c, 0] + f.cdom_w.weight[cd, 0])
            if last_item:  # the most recent item: 2 for row 0, 4 for row 1
                embs.append(f.last.weight[int(h[-1])])
                first = first + f.last_w.weight[int(h[-1]), 0]
            n = len(embs)
            pairs = sum(float(embs[x].detach() @ embs[y].detach()) for x in range(n) for y in range(x + 1, n))
            assert float(got[r, j]) == pytest.approx(float(first.detach()) + pairs, rel=1e-5, abs=1e-5)


@pytest.mark.unit
def test_deepfm_chunking_and_domain_blocks():
    torch.manual_seed(3)
    item_domain = np.array([-1, 0, 0, 0, 1, 1])
    kw = dict(hidden=4, item_domain=item_domain, mlp=(8, 4), domain_ranges=[(1, 4), (4, 6)])
    a, c = DeepFM(6, 2, chunk=1, **kw).eval(), DeepFM(6, 2, chunk=64, **kw).eval()
    c.load_state_dict(a.state_dict())
    b = StudentBatch(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]), torch.tensor([[1, 2], [4, 0], [3, 0]]),
                     torch.tensor([2, 1, 1]), torch.tensor([3, 5, 1]))
    with torch.no_grad():
        torch.testing.assert_close(a.full_scores(b, 1, 6), c.full_scores(b, 1, 6))
        out = a(b)
    assert out.shape == (3, 6)
    # each row's own domain holds real scores, every other column the finite "never" value
    torch.testing.assert_close(out[[0, 2], 1:4], a.full_scores(b, 1, 4)[[0, 2]])
    torch.testing.assert_close(out[1, 4:6], a.full_scores(b, 4, 6)[1])
    assert (out[[0, 2]][:, [0, 4, 5]] == -1e4).all() and (out[1, :4] == -1e4).all()
    # gradients flow through checkpointed chunks
    loss = a(b)[[0, 2], 1:4].logsumexp(1).sum()
    loss.backward()
    assert a.user_proj.weight.grad is not None and a.user_proj.weight.grad.abs().sum() > 0


@pytest.mark.unit
def test_deepfm_scores_without_autograd_equal_the_autograd_path_bit_for_bit():
    """Ranking (no autograd) reuses one pair block and writes into the output; training checkpoints
    each chunk and concatenates. Same numbers, for a catalogue that ends in a partial chunk and for
    per-row candidates."""
    torch.manual_seed(5)
    model = DeepFM(40, 1, hidden=8, mlp=(16, 4), chunk=7).eval()
    b = StudentBatch(torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long),
                     torch.tensor([[1, 2, 3], [4, 0, 0], [9, 8, 0]]), torch.tensor([3, 1, 2]), torch.tensor([5, 6, 7]))
    for candidates in (torch.arange(1, 40), torch.randint(1, 40, (3, 17))):
        with torch.no_grad():
            fast = model.score(b, candidates)
        slow = model.score(b, candidates)  # grad on: the checkpointed, concatenated chunks
        assert slow.requires_grad and fast.shape == slow.shape == (3, candidates.shape[-1])
        assert torch.equal(fast, slow.detach())


@pytest.mark.unit
def test_the_chunk_benchmark_compares_chunk_sizes_on_the_same_weights(tmp_path):
    """benchmarks.deepfm_chunk at tiny shapes: every chunk size scores the batch identically (the
    chunks split the candidate axis only), gradients agree to float rounding, the JSON says so."""
    import json

    from benchmarks import deepfm_chunk

    out = tmp_path / "chunk.json"
    assert deepfm_chunk.main(["--candidates", "300", "--rows", "16", "--max-len", "5", "--chunks", "64,7,300",
                              "--repeats", "1", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["chunk"] for r in got["rows"]] == [64, 7, 300] and got["shapes"]["candidates"] == 300
    others = got["rows"][1:]  # each against the first size (the first against itself says nothing)
    assert all(r["scores_max_abs_diff"] == 0.0 and r["grads_max_abs_diff"] < 1e-6 for r in others)
    assert len({r["loss"] for r in got["rows"]}) == 1  # the same scores give the same CE


@pytest.mark.unit
def test_lightgcn_propagation_matches_dense_reference():
    """2 users, items 1..3 (0 = PAD): u0-{1,2}, u1-{2,3}; dense D^-1/2 A D^-1/2, mean of 3 layers."""
    torch.manual_seed(4)
    users, items = np.array([0, 0, 1, 1, 0]), np.array([1, 2, 2, 3, 1])  # duplicate edge u0-1
    m = LightGCN(4, 1, hidden=3, num_users=2, edge_users=users, edge_items=items, layers=2)
    assert m.num_edges == 4
    A = torch.zeros(6, 6)
    for u, i in [(0, 1), (0, 2), (1, 2), (1, 3)]:
        A[u, 2 + i] = A[2 + i, u] = 1.0
    deg = A.sum(1)
    inv = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    An = inv[:, None] * A * inv[None, :]
    # spot values: u0-item2 edge = 1/sqrt(2*2); u0-item1 = 1/sqrt(2*1)
    assert float(An[0, 4]) == pytest.approx(0.5) and float(An[0, 3]) == pytest.approx(2 ** -0.5)
    e0 = torch.cat([m.user_emb.weight, m.item_emb.weight]).detach()
    ref = (e0 + An @ e0 + An @ (An @ e0)) / 3
    with torch.no_grad():
        u, it = m.propagate()
        torch.testing.assert_close(torch.cat([u, it]), ref)
        b = StudentBatch(torch.tensor([1, 0]), torch.zeros(2, dtype=torch.long), torch.tensor([[2], [1]]),
                         torch.tensor([1, 1]), torch.tensor([3, 2]))
        torch.testing.assert_close(m.full_scores(b, 1, 4), ref[[1, 0]][:, :3] @ ref[3:6].T)
        torch.testing.assert_close(m.score(b, torch.tensor([3, 1])), ref[[1, 0]][:, :3] @ ref[[5, 3]].T)
        cached = m.propagate()[0]
        assert cached.data_ptr() == u.data_ptr()  # reused while the weights are unchanged
        m.user_emb.weight.add_(1.0)
        assert not torch.equal(m.propagate()[0], u)  # in-place update invalidates the cache


@pytest.mark.integration
def test_lightgcn_graph_uses_training_split_only(scientific):
    ds = scientific
    tr = ds.splits["train"]
    users, items = training_edges(tr.users, tr.histories, tr.targets)
    train_pairs = set(zip(users.tolist(), items.tolist()))
    by_user: dict[int, set[int]] = {}
    for u, i in train_pairs:
        by_user.setdefault(u, set()).add(i)
    # a user's training items are exactly its valid history (when that is not capped at 50)
    va = ds.splits["valid"]
    checked = 0
    for u, h, n in zip(va.users, va.histories, va.lengths):
        if n < 50:
            assert by_user[int(u)] == set(h[:n].tolist())
            checked += 1
    assert checked > 8400
    # so no test target enters the graph unless the user also had it in training
    te = ds.splits["test"]
    for u, t, h, n in zip(te.users, te.targets, te.histories, te.lengths):
        if (int(u), int(t)) in train_pairs:
            assert int(t) in set(h[:n].tolist())
    m = build_student("lightgcn", ds, hidden=8)
    assert m.num_edges == len(train_pairs)
    assert m.num_users == 8442


@pytest.mark.integration
def test_multidomain_students_score_each_domain(data_dir, scientific):
    from ckd.data.unisrec import load_domain

    ds = build_multidomain([scientific.domains[0], load_domain(data_dir, "Office14")])
    rows = np.concatenate([np.arange(5), len(ds.splits["test"]) - 1 - np.arange(5)])
    b = _batch(ds, "test", rows)
    b.domains.zero_()  # evaluation passes placeholder domains: the models must not rely on them
    for kind in KINDS:
        torch.manual_seed(5)
        model = build_student(kind, ds, hidden=8).eval()
        with torch.no_grad():
            for d in range(2):
                start, stop = ds.domain_range(d)
                assert model.full_scores(b, start, stop).shape == (10, stop - start)
            full = model(b)
        assert full.shape == (10, ds.vocab_size) and torch.isfinite(full).all()
