"""Errors on the teacher wire, both ways, over real gRPC on 127.0.0.1.

- Every malformed request is INVALID_ARGUMENT with the field named (never UNKNOWN), and the server
  keeps serving: hand-picked shapes (empty tensors declaring huge dimensions, negative and
  out-of-range ids, uint64 ids past int64, mismatched lengths) and a hypothesis fuzz.
- A failure inside the teacher is INTERNAL with a generic message and an error id; the exception
  text is in the server log under that id, never in the reply.
- Drain and admission share one lock: every call either finishes before drain returns or is
  refused with UNAVAILABLE (counts of sent, scored, refused, lost).
- The client raises TeacherContractError naming the field for malformed Score and Describe replies
  (served by a deliberately broken server).
"""
from __future__ import annotations

import logging
import re
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fixture_teacher import MeanPoolEmbeddingTeacher
from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import ServiceLimits, TeacherContractError
from protos.tensor_codec import DTYPES, encode
from student.teacher_pool import TeacherPool
from teachers.server import start_server

pytestmark = pytest.mark.integration

N_ITEMS = 101
VOCAB = "e" * 64
FIELDS = ("history_items", "lengths", "candidates", "vocab_hash")
POISON = 13  # while armed, a history holding this item makes the faulty teacher raise


class FaultyTeacher(MeanPoolEmbeddingTeacher):
    """The fixture teacher, failing with a recognisable message on histories that hold POISON."""

    kind = "faulty_mean_pool"
    armed = False

    def encode_histories(self, histories: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.armed and bool((histories == POISON).any()):
            raise RuntimeError("secret-internal-detail /home/teacher/model.py line 99")
        return super().encode_histories(histories, lengths)


@pytest.fixture(scope="module")
def server():
    teacher = FaultyTeacher(VOCAB, N_ITEMS, dim=8, max_history=5).eval()
    srv = start_server(teacher, name="err", limits=ServiceLimits(max_batch_rows=64, max_candidates=50,
                                                                 max_score_cells=1000, max_workers=8))
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address)
    yield teacher_pb2_grpc.TeacherStub(ch)
    ch.close()


def _t(dtype: str, shape: list[int], data: bytes = b"") -> teacher_pb2.Tensor:
    return teacher_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def _tensor_of(values) -> teacher_pb2.Tensor:
    """A Tensor given as is, else the values encoded as int64 (unless already an ndarray)."""
    if isinstance(values, teacher_pb2.Tensor):
        return values
    return encode(values if isinstance(values, np.ndarray) else np.asarray(values, np.int64))


def _req(items=(1, 2, 3), lengths=(2, 1), cands=(4, 5), rid=7, vocab="") -> teacher_pb2.ScoreRequest:
    return teacher_pb2.ScoreRequest(request_id=rid, vocab_hash=vocab, history_items=_tensor_of(items),
                                    lengths=_tensor_of(lengths), candidates=_tensor_of(cands))


def _good(stub) -> None:
    rep = stub.Score(_req(), timeout=10)
    assert list(rep.scores.shape) == [2, 2]


BIG = 2**63 - 1
MALFORMED = [  # (field to be named, request)
    ("history_items", _req(items=_t("int64", [BIG, 0]))),  # empty, huge declared dim
    ("candidates", _req(cands=_t("int64", [BIG, 0]))),
    ("lengths", _req(lengths=_t("int64", [0, BIG]))),
    ("candidates", _req(cands=_t("int64", [2**40, 2**40]))),  # declares 2^83 bytes, sends none
    ("history_items", _req(items=_t("int64", [-1]))),  # negative dimension
    ("candidates", _req(cands=_t("int64", [1] * 9, b"\0" * 8))),  # too many dims
    ("candidates", _req(cands=_t("complex64", [1], b"\0" * 8))),  # not a wire dtype
    ("history_items", _req(items=_t("int64", [3], b"\0" * 7))),  # byte count off by one
    ("history_items", _req(items=[1, -2, 3])),  # negative id
    ("candidates", _req(cands=[4, -(2**63)])),
    ("candidates", _req(cands=[4, N_ITEMS])),  # first id past the vocabulary
    ("history_items", _req(items=encode(np.array([1, 2, 2**64 - 1], np.uint64)))),  # past int64
    ("candidates", _req(cands=encode(np.array([4, 2**63], np.uint64)))),
    ("history_items", _req(items=[1, 0, 3])),  # padding sent as an id
    ("lengths", _req(lengths=[2, 2])),  # sum(lengths) != len(history_items)
    ("lengths", _req(lengths=[3, 0])),
    ("lengths", _req(lengths=[2**62, 2**62])),  # sums past int64
    ("lengths", _req(lengths=encode(np.array([2**64 - 1, 1], np.uint64)))),
    ("lengths", _req(items=[], lengths=[])),  # no rows
    ("candidates", _req(cands=[[4, 5]])),  # per-row candidates for 1 of 2 rows
    ("candidates", _req(cands=np.zeros((2, 0), np.int64))),  # no candidates
    ("candidates", _req(cands=encode(np.ones((1, 1, 1), np.int64)))),
    ("lengths", _req(lengths=encode(np.array([2.0, 1.0], np.float32)))),  # not integers
    ("lengths", _req(lengths=encode(np.array([True, True])))),
    ("lengths", _req(items=[1] * 65, lengths=[1] * 65)),  # over max_batch_rows
    ("candidates", _req(cands=list(range(1, 52)))),  # over max_candidates
    ("candidates", _req(items=[1] * 40, lengths=[1] * 40, cands=list(range(1, 31)))),  # over max_score_cells
    ("vocab_hash", _req(vocab="x" * 64)),
]


@pytest.mark.parametrize("field,req", MALFORMED, ids=[f"{i}-{f}" for i, (f, _) in enumerate(MALFORMED)])
def test_malformed_request_is_invalid_argument_naming_the_field(stub, field, req):
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert f"field {field}:" in e.value.details() and "request 7" in e.value.details()
    _good(stub)


@st.composite
def _tensor(draw):
    dtype = draw(st.sampled_from(DTYPES + ("complex64", "", "object")))
    shape = draw(st.lists(st.one_of(st.integers(-3, 6), st.sampled_from([0, 2**31, 2**62, 2**63 - 1])),
                          max_size=3))
    if draw(st.booleans()) and dtype in DTYPES and all(0 <= s <= 6 for s in shape):
        n = int(np.prod(shape)) if shape else 1
        vals = draw(st.lists(st.integers(-2**63, 2**64 - 1) | st.integers(-3, N_ITEMS + 2), min_size=n, max_size=n))
        with np.errstate(all="ignore"):
            arr = np.array([v % 2**64 if dtype.startswith("u") else v for v in vals], dtype=object)
            try:
                arr = arr.astype(dtype)
            except (OverflowError, ValueError):
                arr = np.zeros(n, dtype)
        return encode(arr.reshape(shape))
    return _t(dtype, shape, draw(st.binary(max_size=48)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(items=_tensor(), lengths=_tensor(), cands=_tensor(), vocab=st.sampled_from(["", VOCAB, "y"]))
def test_fuzzed_requests_are_scored_or_invalid_argument_naming_a_field(stub, items, lengths, cands, vocab):
    req = teacher_pb2.ScoreRequest(request_id=7, history_items=items, lengths=lengths, candidates=cands,
                                   vocab_hash=vocab)
    try:
        rep = stub.Score(req, timeout=10)
        assert rep.request_id == 7 and rep.scores.dtype == "float32"
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        named = re.search(r"field (\w+):", e.details())
        assert named and named.group(1) in FIELDS, e.details()
    _good(stub)


# -- INTERNAL --------------------------------------------------------------------------------------

def test_internal_error_carries_an_id_not_the_exception_text(server, stub, caplog):
    caplog.set_level(logging.ERROR, logger="teachers.servicer")
    before = server.servicer.internal_errors
    server.servicer.teacher.armed = True
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(_req(items=[1, POISON, 3]), timeout=10)
    finally:
        server.servicer.teacher.armed = False
    assert e.value.code() == grpc.StatusCode.INTERNAL
    details = e.value.details()
    assert "secret" not in details and "RuntimeError" not in details and "model.py" not in details
    eid = re.search(r"error id ([0-9a-f]{12})", details)
    assert eid, details
    # The server log has the id with the exception and its traceback.
    logged = [r for r in caplog.records if eid.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info and "secret-internal-detail" in str(logged[0].exc_info[1])
    assert server.servicer.internal_errors == before + 1
    _good(stub)


# -- drain -----------------------------------------------------------------------------------------

def test_drain_admits_nothing_after_it_began_and_loses_nothing():
    teacher = MeanPoolEmbeddingTeacher(VOCAB, N_ITEMS, dim=8, max_history=5).eval()
    srv = start_server(teacher, name="drain", limits=ServiceLimits(max_workers=8))
    ch = grpc.insecure_channel(srv.address)
    stub = teacher_pb2_grpc.TeacherStub(ch)
    warm = srv.servicer.batcher.requests  # the warm-up batch
    outcomes: list[str] = []
    lock = threading.Lock()
    started = threading.Barrier(9)
    stop = threading.Event()

    def client() -> None:
        started.wait()
        while not stop.is_set():
            try:
                stub.Score(_req(), timeout=30)
                out = "ok"
            except grpc.RpcError as exc:
                out = exc.code().name
            with lock:
                outcomes.append(out)
            if out == "UNAVAILABLE":
                return

    threads = [threading.Thread(target=client) for _ in range(8)]
    for th in threads:
        th.start()
    started.wait()
    while True:  # let traffic flow first
        with lock:
            if len(outcomes) >= 40:
                break
        time.sleep(0.01)
    assert srv.drain(timeout=30) is True
    scored_at_drain = srv.servicer.batcher.requests - warm
    for th in threads:
        th.join(30)
    stop.set()
    ch.close()
    srv.stop(0)
    sent, ok, refused = len(outcomes), outcomes.count("ok"), outcomes.count("UNAVAILABLE")
    assert ok + refused == sent, f"lost: {sent - ok - refused} of {sent}: {set(outcomes)}"
    assert refused == 8  # each client ends on its first refusal
    # Every call that was answered OK had been scored by the time drain returned: nothing admitted after.
    assert ok == scored_at_drain == srv.servicer.batcher.requests - warm


# -- client side: malformed replies ----------------------------------------------------------------

class BrokenServer(teacher_pb2_grpc.TeacherServicer):
    """Answers Score and Describe with whatever reply the test sets."""

    def __init__(self):
        self.scores: teacher_pb2.Tensor | None = None
        self.request_id_offset = 0
        self.description = teacher_pb2.TeacherDescription(name="broken", version="1", vocab_hash=VOCAB,
                                                          num_items=N_ITEMS, temperature=1.0, max_history=5)

    def Score(self, request, context):  # noqa: N802
        return teacher_pb2.ScoreReply(request_id=request.request_id + self.request_id_offset, scores=self.scores,
                                      teacher_name="broken", teacher_version="1")

    def Describe(self, request, context):  # noqa: N802
        return self.description


@pytest.fixture()
def broken():
    svc = BrokenServer()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    teacher_pb2_grpc.add_TeacherServicer_to_server(svc, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    pool = TeacherPool({"broken": [f"127.0.0.1:{port}"]}, max_attempts=1)
    yield svc, pool
    pool.close()
    srv.stop(0)


BAD_SCORES = [
    ("scores", _t("float32", [BIG, 0]), 0),
    ("scores", _t("complex64", [2, 3], b"\0" * 48), 0),
    ("scores", _t("float32", [2, 3], b"\0" * 20), 0),
    ("scores", encode(np.zeros((2, 4), np.float32)), 0),
    ("scores", encode(np.zeros((2, 3), np.float64)), 0),
    ("scores", encode(np.zeros((3, 2), np.float32)), 0),
    ("request_id", encode(np.zeros((2, 3), np.float32)), 1),
]


@pytest.mark.parametrize("field,scores,offset", BAD_SCORES, ids=[f"{i}-{f}" for i, (f, _, _) in enumerate(BAD_SCORES)])
def test_client_names_the_field_of_a_malformed_score_reply(broken, field, scores, offset):
    svc, pool = broken
    svc.scores, svc.request_id_offset = scores, offset
    with pytest.raises(TeacherContractError) as e:
        pool.score(np.array([[1, 2], [3, 0]]), np.array([2, 1]), np.array([4, 5, 6]))
    assert e.value.field == field and f"field {field}:" in str(e.value), str(e.value)
    svc.scores, svc.request_id_offset = encode(np.ones((2, 3), np.float32)), 0  # a good reply is taken
    assert pool.score(np.array([[1, 2], [3, 0]]), np.array([2, 1]), np.array([4, 5, 6]))["broken"].shape == (2, 3)


@pytest.mark.parametrize("field,value", [("num_items", 0), ("num_items", -5), ("max_history", 0),
                                         ("temperature", float("nan")), ("temperature", 0.0),
                                         ("max_batch_rows", -1), ("max_gather_bytes", -1)])
def test_client_names_the_field_of_a_malformed_describe_reply(broken, field, value):
    svc, pool = broken
    setattr(svc.description, field, value)
    with pytest.raises(TeacherContractError) as e:
        pool.describe()
    assert e.value.field == field and f"field {field}:" in str(e.value), str(e.value)
