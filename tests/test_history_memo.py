"""The served teacher's memo of history representations (teachers/history_memo.py, issue 21): a
history already encoded is read back instead of encoded again, the scores are the ones the
teacher computes without it, the memo keeps to its byte budget, and a new weight state empties it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.fixture_teacher import MeanPoolEmbeddingTeacher
from protos.contract import ServiceLimits
from student.teacher_pool import TeacherPool
from teachers.history_memo import ENTRY_OVERHEAD_BYTES, HistoryMemo
from teachers.server import start_server
from teachers.unisrec import UniSRecTeacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingEncoder:
    """A real teacher's ``encode_histories``, counting the rows it is asked to encode."""

    def __init__(self, teacher):
        self.teacher, self.rows, self.calls = teacher, 0, 0

    def __call__(self, hist: np.ndarray, lens: np.ndarray) -> torch.Tensor:
        self.rows += int(hist.shape[0])
        self.calls += 1
        return self.teacher.encode_histories(torch.as_tensor(hist), torch.as_tensor(lens))


@pytest.fixture()
def pool_teacher():
    return MeanPoolEmbeddingTeacher(vocab_hash="v", num_items=50, dim=8, seed=3).eval()


def _rows(*rows: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    hist = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        hist[i, : len(r)] = r
    return hist, np.array([len(r) for r in rows], dtype=np.int64)


@pytest.mark.unit
def test_a_seen_history_is_not_encoded_again_and_keeps_its_representation(pool_teacher):
    memo, enc = HistoryMemo(1 << 20), CountingEncoder(pool_teacher)
    hist, lens = _rows([1, 2, 3], [4, 5], [1, 2, 3], [7], width=4)  # row 2 repeats row 0
    first = memo.encode(hist, lens, enc, version=0)
    assert enc.rows == 3 and enc.calls == 1  # three distinct histories, one encoder call
    direct = pool_teacher.encode_histories(torch.as_tensor(hist), torch.as_tensor(lens))
    assert torch.equal(first, direct)
    # The same histories in another order and padded wider (another batch, next epoch).
    hist2, lens2 = _rows([7], [4, 5], [1, 2, 3], width=9)
    second = memo.encode(hist2, lens2, enc, version=0)
    assert enc.rows == 3 and enc.calls == 1  # nothing new was encoded
    assert torch.equal(second, direct[[3, 1, 0]])
    assert memo.stats()["hits"] == 1 + 3 and memo.stats()["misses"] == 3  # row 2 of the first batch hit row 0
    # A longer history with the same prefix is a different history.
    hist3, lens3 = _rows([1, 2, 3, 9], width=4)
    memo.encode(hist3, lens3, enc, version=0)
    assert enc.rows == 4


@pytest.mark.unit
def test_the_memo_keeps_to_its_byte_budget_least_recently_used_first(pool_teacher):
    one = len(np.array([1], dtype=np.int64).tobytes()) + 8 * 4 + ENTRY_OVERHEAD_BYTES  # 1-id key, 8 float32
    memo, enc = HistoryMemo(2 * one), CountingEncoder(pool_teacher)
    for ids in ([1], [2]):
        memo.encode(*_rows(ids, width=1), enc, version=0)
    assert len(memo) == 2 and memo.bytes == 2 * one
    memo.encode(*_rows([1], width=1), enc, version=0)  # touch [1]: [2] is now the oldest
    memo.encode(*_rows([3], width=1), enc, version=0)
    assert len(memo) == 2 and memo.bytes == 2 * one and memo.evictions == 1
    rows_before = enc.rows
    memo.encode(*_rows([1], [3], width=1), enc, version=0)
    assert enc.rows == rows_before  # [1] and [3] stayed
    memo.encode(*_rows([2], width=1), enc, version=0)
    assert enc.rows == rows_before + 1  # [2] was the one evicted
    with pytest.raises(ValueError, match="byte budget"):
        HistoryMemo(0)


@pytest.mark.unit
def test_a_new_weight_state_empties_the_memo(pool_teacher):
    memo, enc = HistoryMemo(1 << 20), CountingEncoder(pool_teacher)
    hist, lens = _rows([1, 2], [3], width=2)
    v0 = pool_teacher.inference_version()
    before = memo.encode(hist, lens, enc, v0)
    with torch.no_grad():
        pool_teacher.item_table.weight.mul_(2.0)  # an in-place write bumps the version counter
    v1 = pool_teacher.inference_version()
    assert v1 != v0
    after = memo.encode(hist, lens, enc, v1)
    assert enc.rows == 4 and torch.allclose(after, 2 * before)
    pool_teacher.invalidate_tables()  # a write the counters cannot see: the version still moves
    assert pool_teacher.inference_version() != v1
    assert pool_teacher.set_inference_precision("bfloat16").inference_version() != v1


@pytest.mark.unit
def test_memo_setting_is_validated():
    with pytest.raises(ValueError, match="history_memo_bytes"):
        ServiceLimits(history_memo_bytes=-1).validate()
    ServiceLimits(history_memo_bytes=0).validate()  # off, the default
    on = ServiceLimits(history_memo_bytes=1 << 20)
    assert on.replica_bytes(256) == ServiceLimits().replica_bytes(256) + (1 << 20)


@pytest.mark.integration
def test_served_teacher_with_memo_answers_the_scores_it_answers_without(scientific):
    """A real UniSRec (text+ID) over real gRPC: the same requests twice, with and without the memo;
    the second pass is served from the memo and its scores are the teacher's own."""
    torch.manual_seed(0)
    model = UniSRecTeacher.from_dataset(scientific, item_mode="text+id", hidden=32, inner=64, layers=1, heads=2,
                                        dropout=0.1, attn_dropout=0.1).eval()
    tr = scientific.splits["train"]
    rows = np.arange(200)
    width = int(tr.lengths[rows].max())
    hist, lens = tr.histories[rows, :width].copy(), tr.lengths[rows].copy()
    start, _ = scientific.domain_range(0)
    gen = np.random.default_rng(0)
    cands = [start + gen.choice(4000, size=(200, 64)).astype(np.int64) for _ in range(2)]  # per-row, per pass
    plain = start_server(model, name="plain")
    memo_srv = start_server(model, name="memo", limits=ServiceLimits(history_memo_bytes=64 << 20))
    memo = memo_srv.servicer.batcher.memo
    warm = memo.stats()  # start_server's warm-up batch went through the memo too
    try:
        pool = TeacherPool({"plain": [plain.address], "memo": [memo_srv.address]})
        for c in cands:  # pass 1 fills the memo, pass 2 (new candidates, reversed rows) reads it
            order = np.arange(200) if c is cands[0] else np.arange(200)[::-1]
            got = pool.score(hist[order], lens[order], c[order])
            np.testing.assert_allclose(got["memo"], got["plain"], rtol=0, atol=1e-5)
        pool.close()
        stats = {k: memo.stats()[k] - warm[k] for k in ("hits", "misses")}
    finally:
        plain.stop(0)
        memo_srv.stop(0)
    key = lambda ids: np.asarray(ids, dtype=np.int64).tobytes()  # noqa: E731 (the memo's key)
    warm_ids = np.arange(1, 9)  # TeacherServicer.warm_up's two histories, already in the memo
    distinct = {key(hist[i, : lens[i]]) for i in range(200)} - {key(warm_ids), key(warm_ids[::-1])}
    assert stats["misses"] == len(distinct)  # each distinct history encoded once, in pass 1
    assert stats["hits"] == 400 - len(distinct)  # everything else, all of pass 2 included, from the memo


@pytest.mark.unit
def test_a_student_turns_the_memo_on_for_the_teachers_it_starts(tmp_path, two_teacher_spec):
    """service.embedded_history_memo_bytes reaches the deploy spec the run starts, without editing it.
    Fixture teachers stand in for configs/union/serve.yaml: a clean checkout (CI) has no union
    checkpoints, and a spec's checkpoints are checked when it is loaded."""
    from launch.distill import embedded_spec, parse_args, resolve_config

    argv = ["--set", f"service.spec={two_teacher_spec}", "--run-dir", str(tmp_path / "run")]
    plain = embedded_spec(resolve_config(parse_args(argv)))
    memo = embedded_spec(resolve_config(parse_args(argv + ["--set", "service.embedded_history_memo_bytes=1048576"])))
    assert plain is not None and memo is not None
    assert plain[0].service.history_memo_bytes == 0  # the spec leaves it off
    assert memo[0].service.history_memo_bytes == 1 << 20 and memo[1] == plain[1] == ["a", "b"]
