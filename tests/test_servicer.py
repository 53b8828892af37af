"""The teacher gRPC service on real loopback gRPC with a real (fixture) teacher checkpoint.

Covers validation (each bad request kind -> INVALID_ARGUMENT naming the problem, then a good one
still works), coalescing, health transitions, drain, message limits / splitting, back-pressure,
the TeacherPool's retry / quarantine / policies, the reorder buffer, and a hypothesis property
test that random malformed requests never crash the server.
"""
from __future__ import annotations

import random
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fixture_teacher import make_fixture_checkpoint
from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import ServiceLimits, TeacherContractError, TeacherUnavailable
from protos.tensor_codec import DTYPES, encode
from student.soft_labels import ReorderBuffer, SoftLabelReader
from student.teacher_pool import TeacherPool, backoff_delay, flatten_histories
from teachers.base import load_teacher
from teachers.server import start_server

pytestmark = pytest.mark.integration

N_ITEMS = 101
VOCAB = "v" * 64


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    ckpt = make_fixture_checkpoint(tmp_path_factory.mktemp("fx"), num_items=N_ITEMS, vocab_hash=VOCAB, dim=8,
                                   max_history=5)
    return load_teacher(ckpt)


@pytest.fixture(scope="module")
def server(teacher):
    srv = start_server(teacher, name="fx", limits=ServiceLimits(max_batch_rows=64, max_candidates=50,
                                                                max_score_cells=1000, max_workers=8))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address)
    yield teacher_pb2_grpc.TeacherStub(ch)
    ch.close()


def _req(items, lengths, cands, rid=1, vocab=""):
    return teacher_pb2.ScoreRequest(request_id=rid, history_items=encode(np.asarray(items)),
                                    lengths=encode(np.asarray(lengths)), candidates=encode(np.asarray(cands)),
                                    vocab_hash=vocab)


def _good(stub):
    rep = stub.Score(_req(np.array([1, 2, 3], np.int64), np.array([2, 1], np.int64), np.array([4, 5], np.int64)),
                     timeout=10)
    assert list(rep.scores.shape) == [2, 2]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# -- correctness -------------------------------------------------------------------------------

def test_scores_match_hand_computed_mean_pool(stub, teacher):
    w = teacher.item_table.weight.detach().numpy()
    rep = stub.Score(_req(np.array([3, 7, 9], np.int64), np.array([2, 1], np.int64), np.array([4, 5, 6], np.int64),
                          rid=77, vocab=VOCAB), timeout=10)
    got = np.frombuffer(rep.scores.data, np.float32).reshape(2, 3)
    want = np.stack([(w[3] + w[7]) / 2, w[9]]) @ w[[4, 5, 6]].T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert rep.request_id == 77 and rep.teacher_name == "fx" and rep.teacher_version == "1"


def test_per_row_candidates_and_history_cap(stub, teacher):
    w = teacher.item_table.weight.detach().numpy()
    # Row 0 has 7 items, the teacher keeps the 5 most recent (max_history=5).
    items = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.int64)
    rep = stub.Score(_req(items, np.array([7, 1]), np.array([[10, 11], [12, 13]])), timeout=10)
    got = np.frombuffer(rep.scores.data, np.float32).reshape(2, 2)
    want0 = w[[3, 4, 5, 6, 7]].mean(0) @ w[[10, 11]].T
    want1 = w[8] @ w[[12, 13]].T
    np.testing.assert_allclose(got, np.stack([want0, want1]), rtol=1e-5, atol=1e-6)


def test_describe(stub, teacher):
    d = stub.Describe(teacher_pb2.DescribeRequest(), timeout=10)
    assert (d.name, d.kind, d.version, d.vocab_hash, d.num_items, d.max_history) == \
        ("fx", "mean_pool_embedding", "1", VOCAB, N_ITEMS, 5)
    assert d.checkpoint_sha256 == teacher.checkpoint_sha256 and len(d.checkpoint_sha256) == 64
    assert (d.max_batch_rows, d.max_candidates, d.max_message_bytes) == (64, 50, 64 * 1024 * 1024)


# -- validation --------------------------------------------------------------------------------

BAD = [
    ("length mismatch", dict(items=[1, 2, 3], lengths=[2, 2], cands=[4])),
    ("length mismatch", dict(items=[1, 2], lengths=[2, 0], cands=[4])),
    ("length mismatch", dict(items=[1, 2], lengths=[1, 1], cands=[[4, 5]])),
    ("item id out of range in history_items: 101", dict(items=[1, 101], lengths=[2], cands=[4])),
    ("item id out of range in history_items: 0", dict(items=[0, 1], lengths=[2], cands=[4])),
    ("item id out of range in candidates: -3", dict(items=[1], lengths=[1], cands=[-3])),
    ("empty batch", dict(items=np.zeros(0, np.int64), lengths=np.zeros(0, np.int64), cands=[4])),
    ("empty batch: 0 candidates", dict(items=[1], lengths=[1], cands=np.zeros(0, np.int64))),
    ("oversized batch: 65 rows", dict(items=[1] * 65, lengths=[1] * 65, cands=[4])),
    ("oversized batch: 51 candidates", dict(items=[1], lengths=[1], cands=list(range(1, 52)))),
    ("oversized batch: 40x30", dict(items=[1] * 40, lengths=[1] * 40, cands=list(range(1, 31)))),
    ("wrong vocabulary hash", dict(items=[1], lengths=[1], cands=[4], vocab="w" * 64)),
    ("must be an integer tensor", dict(items=np.array([1.0], np.float32), lengths=[1], cands=[4])),
    ("must have 1 or 2 dims", dict(items=[1], lengths=[1], cands=np.ones((1, 1, 1), np.int64))),
]


@pytest.mark.parametrize("needle,kw", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_request_invalid_argument_then_good_works(stub, needle, kw):
    kw = dict(kw)
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(_req(kw.pop("items"), kw.pop("lengths"), kw.pop("cands"), rid=9, **kw), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in e.value.details() and "request 9" in e.value.details()
    _good(stub)


def test_malformed_tensor_bytes(stub):
    req = _req([1], [1], [4])
    req.history_items.data = b"\x01\x02"
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed tensor history_items" in e.value.details()
    _good(stub)


_dtype = st.sampled_from(DTYPES + ("complex64", "", "int64 "))


@st.composite
def _tensor(draw):
    dtype = draw(_dtype)
    shape = draw(st.lists(st.integers(-2, 70), max_size=3))
    if draw(st.booleans()) and dtype in DTYPES and all(s >= 0 for s in shape):
        n = int(np.prod(shape)) if shape else 1
        n = min(n, 5000)
        raw = draw(st.lists(st.integers(-5, 120), min_size=n, max_size=n))
        arr = np.array(raw).astype(dtype).reshape(-1)
        if arr.size == int(np.prod(shape) if shape else 1):
            arr = arr.reshape(shape)
        return encode(arr)
    return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=64)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(items=_tensor(), lengths=_tensor(), cands=_tensor(), vocab=st.sampled_from(["", VOCAB, "x"]),
       rid=st.integers(0, 2**64 - 1))
def test_random_malformed_requests_never_crash(stub, items, lengths, cands, vocab, rid):
    req = teacher_pb2.ScoreRequest(request_id=rid, history_items=items, lengths=lengths, candidates=cands,
                                   vocab_hash=vocab)
    try:
        rep = stub.Score(req, timeout=10)
        b = int(np.prod(list(lengths.shape)))
        assert rep.request_id == rid and list(rep.scores.shape)[0] == b
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    _good(stub)


# -- coalescing, health, drain, limits --------------------------------------------------------

def test_concurrent_clients_are_coalesced_and_exact(teacher):
    srv = start_server(teacher, limits=ServiceLimits(coalesce_wait_ms=30.0, coalesce_max_rows=1000))
    try:
        rng = np.random.default_rng(1)
        reqs = []
        for i in range(16):
            b = int(rng.integers(1, 6))
            lens = rng.integers(1, 8, size=b)
            reqs.append((rng.integers(1, N_ITEMS, size=int(lens.sum())), lens,
                         rng.integers(1, N_ITEMS, size=(b, 3) if i % 2 else (4,))))
        results: dict[int, np.ndarray] = {}
        before = srv.servicer.batcher.batches

        def call(i):
            ch = grpc.insecure_channel(srv.address)
            rep = teacher_pb2_grpc.TeacherStub(ch).Score(_req(*reqs[i], rid=i), timeout=20)
            results[i] = np.frombuffer(rep.scores.data, np.float32).reshape(tuple(rep.scores.shape))
            ch.close()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        batches = srv.servicer.batcher.batches - before
        assert len(results) == 16 and batches < 16, f"{batches} model batches for 16 concurrent requests"
        for i, (items, lens, cands) in enumerate(reqs):
            hist = np.zeros((len(lens), 8), np.int64)
            pos = 0
            for r, n in enumerate(lens):
                keep = items[pos:pos + n][-5:]
                hist[r, :len(keep)] = keep
                pos += n
            want = teacher.score(torch.from_numpy(hist), torch.from_numpy(np.minimum(lens, 5)),
                                 torch.from_numpy(cands)).numpy()
            np.testing.assert_allclose(results[i], want, rtol=1e-5, atol=1e-6)
    finally:
        srv.stop(0)


def test_health_not_serving_until_warm_up_then_drain(teacher):
    srv = start_server(teacher, warm_up=False)
    ch = grpc.insecure_channel(srv.address)
    health = health_pb2_grpc.HealthStub(ch)
    check = lambda svc: health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status  # noqa: E731
    try:
        assert check("ckd.teacher.v1.Teacher") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert check("") == health_pb2.HealthCheckResponse.NOT_SERVING
        srv.servicer.warm_up()
        assert check("ckd.teacher.v1.Teacher") == health_pb2.HealthCheckResponse.SERVING
        _good(teacher_pb2_grpc.TeacherStub(ch))
        assert srv.drain(5) is True
        assert check("ckd.teacher.v1.Teacher") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            _good(teacher_pb2_grpc.TeacherStub(ch))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
    finally:
        ch.close()
        srv.stop(0)


def test_message_limit_equal_both_sides_client_splits(teacher):
    limit = 64 * 1024
    cfg = ServiceLimits(max_message_bytes=limit, max_score_cells=limit // 4 - 2048)
    srv = start_server(teacher, limits=cfg)
    try:
        rng = np.random.default_rng(2)
        h = rng.integers(1, N_ITEMS, size=(64, 5))
        n = np.full(64, 5)
        c = rng.integers(1, N_ITEMS, size=(64, 90))  # 64*90*4 = 23 KB scores, but 46 KB of int64 candidates
        h2, n2, c2 = np.repeat(h, 2, 0), np.repeat(n, 2), np.repeat(c, 2, 0)  # ~92 KB request: over the limit
        # The raw server refuses an over-limit message ...
        ch = grpc.insecure_channel(srv.address, options=cfg.grpc_options())
        with pytest.raises(grpc.RpcError) as e:
            teacher_pb2_grpc.TeacherStub(ch).Score(_req(flatten_histories(h2, n2), n2, c2), timeout=10)
        assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED,)
        ch.close()
        # ... the pool (same limit) splits it before sending and stitches rows back in order.
        with TeacherPool({"fx": [srv.address]}, max_message_bytes=limit) as pool:
            got = pool.score(h2, n2, c2)["fx"]
            assert pool.stats()["splits"] >= 1
        want = teacher.score(torch.from_numpy(h2), torch.from_numpy(n2), torch.from_numpy(c2)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    finally:
        srv.stop(0)


def test_resource_exhausted_backs_off_and_splits(teacher):
    srv = start_server(teacher, limits=ServiceLimits(max_queue_rows=8))
    try:
        h = np.arange(1, 33).reshape(16, 2)
        n = np.full(16, 2)
        c = np.arange(40, 50)
        sleeps = []
        with TeacherPool({"fx": [srv.address]}, sleep=sleeps.append) as pool:
            got = pool.score(h, n, c)["fx"]
            st_ = pool.stats()
        assert st_["splits"] >= 1 and st_["retries"] >= 1 and sleeps, st_
        want = teacher.score(torch.from_numpy(h), torch.from_numpy(n), torch.from_numpy(c)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    finally:
        srv.stop(0)


# -- TeacherPool behaviour ---------------------------------------------------------------------

def test_pool_fails_over_dead_replica_and_quarantines(server, teacher):
    dead = f"127.0.0.1:{_free_port()}"
    with TeacherPool({"fx": [dead, server.address]}, timeout_s=5, backoff_base_s=0.01, probe_interval_s=60) as pool:
        h = np.array([[1, 2], [3, 0]])
        n = np.array([2, 1])
        for _ in range(4):
            got = pool.score(h, n, np.array([5, 6]))["fx"]
        st_ = pool.stats()
    want = teacher.score(torch.from_numpy(h), torch.from_numpy(n), torch.tensor([5, 6])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert st_["quarantines"] == 1 and st_["healthy/fx"] == 1 and st_["calls"] == 4 and st_["retries"] == 1


def test_policies_when_every_replica_is_gone():
    dead = [f"127.0.0.1:{_free_port()}"]
    h, n, c = np.array([[1]]), np.array([1]), np.array([2])
    with TeacherPool({"gone": dead}, on_unavailable="fail", backoff_base_s=0.001, max_attempts=3) as pool:
        with pytest.raises(TeacherUnavailable, match="teacher gone"):
            pool.score(h, n, c)
    with TeacherPool({"gone": dead}, on_unavailable="skip", backoff_base_s=0.001, max_attempts=2) as pool:
        assert pool.score(h, n, c) == {"gone": None}
        assert pool.score(h, n, c) == {"gone": None}
        assert pool.stats()["skipped/gone"] == 2
    # "wait" keeps backing off within its budget (fake clock), then gives up clearly.
    now = [0.0]
    slept: list[float] = []

    def fake_sleep(s):
        slept.append(s)
        now[0] += s

    with TeacherPool({"gone": dead}, on_unavailable="wait", wait_budget_s=5.0, backoff_base_s=0.1,
                     backoff_max_s=1.0, max_attempts=2, sleep=fake_sleep, clock=lambda: now[0]) as pool:
        with pytest.raises(TeacherUnavailable):
            pool.score(h, n, c)
    assert len(slept) > 2 and 5.0 <= now[0] <= 7.0 and max(slept) <= 1.0


def test_backoff_delay_doubles_with_jitter_and_cap():
    rng = random.Random(3)
    d = [backoff_delay(a, 0.1, 1.0, rng) for a in range(6)]
    for a, x in enumerate(d):
        full = min(1.0, 0.1 * 2 ** a)
        assert full / 2 <= x <= full
    assert d[5] <= 1.0


def test_invalid_argument_is_contract_error_no_retry(server):
    with TeacherPool({"fx": [server.address]}) as pool:
        with pytest.raises(TeacherContractError, match="INVALID_ARGUMENT.*out of range"):
            pool.score(np.array([[1, 500]]), np.array([2]), np.array([3]))
        assert pool.stats().get("retries", 0) == 0


def test_check_contract(server):
    with TeacherPool({"fx": [server.address]}) as pool:
        with pytest.raises(TeacherContractError, match="item vocabulary"):
            pool.check_contract("z" * 64, N_ITEMS)
        with pytest.raises(TeacherContractError, match="item ids"):
            pool.check_contract(VOCAB, N_ITEMS + 1)
        info = pool.check_contract(VOCAB, N_ITEMS)["fx"]
        assert info.num_items == N_ITEMS and info.replicas == 1
        pool.score(np.array([[1]]), np.array([1]), np.array([2]))  # carries the hash, server accepts it


def test_reorder_buffer_out_of_order():
    buf = ReorderBuffer()
    out = []
    t = threading.Thread(target=lambda: out.extend(buf.pop(i, timeout=5) for i in range(4)))
    t.start()
    for i in (2, 0, 3, 1):
        buf.put(i, f"r{i}")
        time.sleep(0.01)
    t.join()
    assert out == ["r0", "r1", "r2", "r3"] and len(buf) == 0
    with pytest.raises(KeyError):
        buf.put(5, 1)
        buf.put(5, 2)


class _SlowPool:
    """A pool whose replies come back in reverse order of submission (real threads, real timing)."""

    def __init__(self):
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()

    def score(self, h, n, c, request_id=None):
        with self.lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        time.sleep(0.05 * (4 - request_id % 4))
        with self.lock:
            self.inflight -= 1
        return {"t": np.full((1, 1), request_id, np.float32)}


def test_soft_label_reader_orders_and_bounds_window():
    pool = _SlowPool()
    reader = SoftLabelReader(range(10), pool, lambda b: (np.array([[1]]), np.array([1]), np.array([1])), window=3)
    got = [(b, int(lab["t"][0, 0])) for b, lab in reader]
    assert got == [(i, i) for i in range(10)]
    assert pool.max_inflight <= 3


def test_soft_label_reader_real_service(server, teacher):
    rng = np.random.default_rng(5)
    batches = [(rng.integers(1, N_ITEMS, size=(4, 3)), rng.integers(1, 4, size=4), rng.integers(1, N_ITEMS, 6))
               for _ in range(6)]

    def make(b):
        h, n, c = b
        h = h.copy()
        h[np.arange(3)[None, :] >= n[:, None]] = 0
        return h, n, c

    with TeacherPool({"fx": [server.address]}) as pool:
        out = list(SoftLabelReader(batches, pool, make, window=2))
        assert "label_wait_ms_p50" in pool.stats()
    assert len(out) == 6
    for b, labels in out:
        h, n, c = make(b)
        want = teacher.score(torch.from_numpy(h), torch.from_numpy(n), torch.from_numpy(c)).numpy()
        np.testing.assert_allclose(labels["fx"], want, rtol=1e-5, atol=1e-6)


def test_soft_label_reader_finishes_each_batch_in_its_prefetch_threads_on_their_own_cores(server):
    """``finish`` runs once per batch in a prefetch thread, after the real scores came back, and its
    value is what the batch arrives with; ``thread_cpus`` pins those threads (read back from /proc)
    and only them: the consumer's thread keeps its cores."""
    import os

    from ckd.affinity import thread_cpus

    own = set(os.sched_getaffinity(0))
    core = max(own)
    seen: list[tuple[int, int, set[int], set[int]]] = []

    def finish(b, labels):
        tid = threading.get_native_id()
        seen.append((b, tid, set(os.sched_getaffinity(0)), thread_cpus(os.getpid())[tid]))
        return {"scores": labels["fx"], "batch": b}

    with TeacherPool({"fx": [server.address]}) as pool:
        reader = SoftLabelReader(range(5), pool, lambda i: (np.array([[1]]), np.array([1]), np.array([3, 4])),
                                 window=2, finish=finish, thread_cpus=[core])
        out = [(b, lab) for b, lab in reader]
    assert [b for b, _ in out] == list(range(5)) and all(lab["batch"] == b for b, lab in out)
    assert all(lab["scores"].shape == (1, 2) for _, lab in out)
    assert sorted(b for b, *_ in seen) == list(range(5))
    assert all(mine == {core} and proc == {core} and tid != threading.get_native_id() for _, tid, mine, proc in seen)
    assert set(os.sched_getaffinity(0)) == own


def test_soft_label_reader_raises_in_order(server):
    with TeacherPool({"fx": [server.address]}) as pool:
        bad = {2}
        reader = SoftLabelReader(range(4), pool, lambda i: (np.array([[1]]), np.array([1]),
                                                            np.array([999 if i in bad else 3])), window=3)
        seen = []
        with pytest.raises(TeacherContractError):
            for b, _ in reader:
                seen.append(b)
        assert seen == [0, 1]
