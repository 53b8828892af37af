"""The memory budget the teacher service advertises holds for every request inside its limits.

Scoring gathers candidate embeddings block by block (``teachers.base.GatherPlan``): a property test
checks, for any limits and any request inside them, that no block the code would gather exceeds
``max_gather_bytes`` (one embedding at least), that the blocks tile the score matrix exactly once,
and that the scoring's working set stays within ``ServiceLimits.scoring_bytes``. The real scoring
path (a teacher that records every gathered tensor) is then run, in process and behind a real gRPC
server on 127.0.0.1, and its scores compared with the one-block product. RSS is measured by
``benchmarks/memory.py``, not here. Describe advertises the limits and the history cut.
"""
from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fixture_teacher import MeanPoolEmbeddingTeacher
from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import ServiceLimits, TeacherInfo
from protos.tensor_codec import encode
from teachers.base import GatherPlan
from teachers.server import start_server

pytestmark = pytest.mark.integration

N_ITEMS = 400
DIM = 12


class RecordingTeacher(MeanPoolEmbeddingTeacher):
    """The fixture teacher, recording the bytes of every candidate-embedding tensor it gathers."""

    kind = "recording_mean_pool"
    cosine = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gathered: list[int] = []

    def candidate_embeddings(self, candidates: torch.Tensor) -> torch.Tensor:
        out = super().candidate_embeddings(candidates)
        self.gathered.append(out.numel() * out.element_size())
        return out

    def similarity(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if self.cosine:  # the text teachers' similarity: normalise both sides, then the default product
            return super().similarity(F.normalize(seq, dim=-1), F.normalize(items, dim=-1))
        return super().similarity(seq, items)


def _teacher(cosine: bool = False) -> RecordingTeacher:
    t = RecordingTeacher("limits-vocab", N_ITEMS, dim=DIM, max_history=6, seed=3).eval()
    t.cosine = cosine
    return t


def _walk(plan: GatherPlan, cap: int = 4000) -> None:
    """The blocks tile [rows, cols] exactly once, row-major (the first ``cap`` blocks are walked;
    past them the arithmetic of the ranges is checked)."""
    row_starts = list(range(0, plan.rows, plan.block_rows))
    col_starts = list(range(0, plan.cols, plan.block_cols))
    assert len(row_starts) * len(col_starts) == plan.num_blocks
    cells = 0
    for (rs, cs), (r0, c0) in zip(itertools.islice(plan.blocks(), cap), itertools.product(row_starts, col_starts)):
        assert (rs.start, cs.start) == (r0, c0)
        assert rs.stop == min(plan.rows, r0 + plan.block_rows) and cs.stop == min(plan.cols, c0 + plan.block_cols)
        cells += (rs.stop - rs.start) * (cs.stop - cs.start)
    if plan.num_blocks <= cap:
        assert cells == plan.rows * plan.cols


@st.composite
def _limits_and_request(draw):
    lim = ServiceLimits(max_batch_rows=draw(st.integers(1, 8192)), max_candidates=draw(st.integers(1, 131072)),
                        max_score_cells=draw(st.integers(1, 8 * 1024 * 1024)),
                        max_gather_bytes=draw(st.one_of(st.integers(1, 4096), st.integers(1, 1 << 31))))
    b = draw(st.integers(1, lim.max_batch_rows))
    c = draw(st.integers(1, max(1, min(lim.max_candidates, lim.max_score_cells // b))))
    if b * c > lim.max_score_cells:  # only when even one candidate per row is over the limit
        b = max(1, lim.max_score_cells // c)
    dim = draw(st.sampled_from([1, 8, 32, 64, 128, 300, 768, 1024, 4096]))
    itemsize = draw(st.sampled_from([2, 4, 8]))
    return lim, b, c, draw(st.booleans()), dim * itemsize


@settings(max_examples=400, deadline=None)
@given(case=_limits_and_request())
def test_any_request_within_the_limits_gathers_within_the_budget(case):
    lim, b, c, per_row, emb = case
    assert b <= lim.max_batch_rows and c <= lim.max_candidates and b * c <= lim.max_score_cells
    plan = GatherPlan.make(b, c, per_row, emb, lim.max_gather_bytes)
    # What one block gathers: never over the budget, unless the budget is below one embedding.
    assert plan.block_bytes <= lim.gather_bytes(emb)
    assert plan.block_embeddings >= 1
    if lim.max_gather_bytes >= emb:
        assert plan.block_bytes <= lim.max_gather_bytes
    # Blocks are as large as the budget allows (no needless splitting of what fits).
    whole = (b * c if per_row else c) * emb
    if whole <= lim.max_gather_bytes:
        assert plan.num_blocks == 1
    # The scoring's working set (a block, a normalised copy, the [B, C] scores) within the budget.
    assert 2 * plan.block_bytes + 4 * b * c <= lim.scoring_bytes(emb)
    _walk(plan)


def test_at_the_default_limits_a_300d_teacher_gathers_64_mib_not_9_gib():
    lim = ServiceLimits()
    b, c, emb = lim.max_batch_rows, lim.max_score_cells // lim.max_batch_rows, 300 * 4
    plan = GatherPlan.make(b, c, True, emb, lim.max_gather_bytes)
    assert b * c * emb == 9600 * 1024 * 1024  # what one gather of the whole request needed before
    assert plan.block_bytes <= 64 * 1024 * 1024 and plan.num_blocks == 152
    assert lim.scoring_bytes(emb) == (2 * 64 + 32) * 1024 * 1024
    assert lim.scoring_bytes(emb, "bfloat16") == (2 * 64 + 32 + 32) * 1024 * 1024  # + a half-size block copy


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 24), c=st.integers(1, 40), per_row=st.booleans(), cosine=st.booleans(),
       budget=st.integers(1, 24 * 40 * DIM * 4 + 64), seed=st.integers(0, 2**31))
def test_blocked_scoring_equals_the_one_block_product(b, c, per_row, cosine, budget, seed):
    t = _teacher(cosine)
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randn(b, DIM, generator=gen)
    cands = torch.randint(1, N_ITEMS, (b, c) if per_row else (c,), generator=gen)
    whole = t.score_candidates(seq, cands, max_gather_bytes=1 << 40)
    t.gathered.clear()
    got = t.score_candidates(seq, cands, max_gather_bytes=budget)
    plan = t.gather_plan(seq, cands, budget)
    assert len(t.gathered) == plan.num_blocks  # one gather per block, each within the budget
    assert max(t.gathered) <= max(budget, DIM * 4) and max(t.gathered) == plan.block_bytes
    if plan.block_cols == c:
        # Blocks of whole rows: every score is the same product on the same numbers, bit for bit.
        assert torch.equal(got, whole)
    else:
        # Column blocks change the matrix-product kernel's shape: equal to float32 rounding.
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-6)


def _req(items, lengths, cands, rid=1):
    return teacher_pb2.ScoreRequest(request_id=rid, history_items=encode(np.asarray(items, np.int64)),
                                    lengths=encode(np.asarray(lengths, np.int64)),
                                    candidates=encode(np.asarray(cands, np.int64)))


@pytest.fixture(scope="module")
def small_budget_server():
    """A real server whose gather budget holds 3 rows of 10 per-row candidates."""
    teacher = _teacher()
    lim = ServiceLimits(max_batch_rows=64, max_candidates=64, max_score_cells=64 * 64,
                        max_gather_bytes=3 * 10 * DIM * 4)
    srv = start_server(teacher, name="lim", limits=lim)
    ch = grpc.insecure_channel(srv.address)
    yield srv, teacher_pb2_grpc.TeacherStub(ch), teacher, lim
    ch.close()
    srv.stop(0)


def test_server_scores_per_row_candidates_in_blocks_within_its_budget(small_budget_server):
    srv, stub, teacher, lim = small_budget_server
    rng = np.random.default_rng(5)
    b, c = 20, 10
    lengths = rng.integers(1, 9, size=b)
    items = rng.integers(1, N_ITEMS, size=int(lengths.sum()))
    cands = rng.integers(1, N_ITEMS, size=(b, c))
    teacher.gathered.clear()
    rep = stub.Score(_req(items, lengths, cands, rid=41), timeout=30)
    got = np.frombuffer(rep.scores.data, np.float32).reshape(b, c)
    # 20 rows, 3 per block: 7 gathers, none over the budget the server was given.
    assert len(teacher.gathered) == 7 and max(teacher.gathered) <= lim.max_gather_bytes
    # The same rows scored by hand in one block (histories cut to the last 6 items, as served).
    hist = np.zeros((b, 6), np.int64)
    ends = np.cumsum(lengths)
    for i in range(b):
        row = items[ends[i] - lengths[i]: ends[i]][-6:]
        hist[i, : len(row)] = row
    seq = teacher.encode_histories(torch.from_numpy(hist), torch.from_numpy(np.minimum(lengths, 6)))
    want = teacher.score_candidates(seq, torch.from_numpy(cands), max_gather_bytes=1 << 40).numpy()
    assert np.array_equal(got, want)


def test_describe_advertises_the_limits_and_the_history_cut(small_budget_server):
    srv, stub, teacher, lim = small_budget_server
    d = stub.Describe(teacher_pb2.DescribeRequest(), timeout=10)
    assert (d.max_batch_rows, d.max_candidates, d.max_score_cells, d.max_message_bytes, d.max_gather_bytes) == \
        (lim.max_batch_rows, lim.max_candidates, lim.max_score_cells, lim.max_message_bytes, lim.max_gather_bytes)
    assert d.max_history == 6 and d.cuts_long_histories
    info = TeacherInfo.from_proto(d, replicas=1)
    assert (info.max_score_cells, info.max_gather_bytes, info.cuts_long_histories) == \
        (lim.max_score_cells, lim.max_gather_bytes, True)


def test_a_history_longer_than_max_history_is_cut_to_its_last_items_not_refused(small_budget_server):
    srv, stub, teacher, lim = small_budget_server
    long_row = np.arange(1, 31)  # 30 items, max_history 6
    rep = stub.Score(_req(long_row, [30], [7, 8, 9]), timeout=10)
    last = stub.Score(_req(long_row[-6:], [6], [7, 8, 9]), timeout=10)
    assert rep.scores.data == last.scores.data  # exactly the scores of its last 6 items
    other = stub.Score(_req(long_row[:6], [6], [7, 8, 9]), timeout=10)
    assert other.scores.data != rep.scores.data  # (the first 6 would score differently)
