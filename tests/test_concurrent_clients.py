"""Many concurrent clients against one real teacher server on 127.0.0.1: every request comes back,
once, to the caller that sent it.

One gRPC server (a real fixture-teacher checkpoint, coalescing requests across callers for up to
20 ms, so replies of different callers leave the model in one batch and must be split back), and
at the same time:
  * 4 threads sharing one TeacherPool,
  * 3 threads each with a raw gRPC stub (they read the reply's request_id and teacher_name),
  * 2 processes, each with 2 threads on its own TeacherPool and 1 raw-stub thread.
Every request has a globally unique id and content of its own (rows, lengths, candidates, shape),
and every caller checks each reply against the scores the teacher gives for its own request, so a
reply delivered to the wrong caller fails twice: by id and by value. Counted: requests sent,
replies received per caller (none lost, none duplicated), and the requests the server's model ran.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from benchmarks.fixture_teacher import make_fixture_checkpoint
from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import ServiceLimits
from protos.tensor_codec import decode, encode
from student.teacher_pool import TeacherPool, flatten_histories
from teachers.base import load_teacher
from teachers.server import start_server

pytestmark = pytest.mark.integration

N_ITEMS = 300
MAX_HIST = 12
VOCAB = "c" * 64
PER_CALLER = 25  # requests per calling thread


def make_request(rid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The request with id ``rid``: padded histories [B, L], lengths [B], candidates [C] or [B, C],
    all drawn from a generator seeded with the id (so its content and shape are its own)."""
    rng = np.random.default_rng(rid)
    b = int(rng.integers(1, 7))
    lengths = rng.integers(1, MAX_HIST + 1, size=b)
    hist = rng.integers(1, N_ITEMS, size=(b, int(lengths.max())))
    hist[np.arange(hist.shape[1])[None, :] >= lengths[:, None]] = 0
    c = int(rng.integers(2, 40))
    cands = rng.integers(1, N_ITEMS, size=(b, c) if rid % 3 == 0 else (c,))
    return hist, lengths, cands


def expected(teacher, rid: int) -> np.ndarray:
    h, n, c = make_request(rid)
    return teacher.score(torch.from_numpy(h), torch.from_numpy(n), torch.from_numpy(c)).numpy()


def pool_caller(pool: TeacherPool, teacher, rids: list[int], out: dict[int, int], errors: list[str]) -> None:
    """Send ``rids`` through a TeacherPool; count each reply that is this request's exact scores."""
    for rid in rids:
        try:
            got = pool.score(*make_request(rid), request_id=rid)["fx"]
            if got.shape == expected(teacher, rid).shape and np.allclose(got, expected(teacher, rid), rtol=1e-5,
                                                                         atol=1e-6):
                out[rid] = out.get(rid, 0) + 1
            else:
                errors.append(f"request {rid}: scores of another request")
        except Exception as exc:  # noqa: BLE001 — reported and counted by the test
            errors.append(f"request {rid}: {exc!r}")


def stub_caller(address: str, teacher, rids: list[int], out: dict[int, int], errors: list[str]) -> None:
    """Send ``rids`` with a raw stub; check the reply's request_id and teacher name, then its scores."""
    ch = grpc.insecure_channel(address)
    stub = teacher_pb2_grpc.TeacherStub(ch)
    try:
        for rid in rids:
            h, n, c = make_request(rid)
            req = teacher_pb2.ScoreRequest(request_id=rid, history_items=encode(flatten_histories(h, n)),
                                           lengths=encode(n.astype(np.int64)), candidates=encode(c.astype(np.int64)),
                                           vocab_hash=VOCAB)
            try:
                rep = stub.Score(req, timeout=120)
            except grpc.RpcError as exc:
                errors.append(f"request {rid}: {exc.code().name}")
                continue
            if rep.request_id != rid or rep.teacher_name != "fx":
                errors.append(f"request {rid}: reply for request {rep.request_id} of {rep.teacher_name!r}")
                continue
            if np.allclose(decode(rep.scores), expected(teacher, rid), rtol=1e-5, atol=1e-6):
                out[rid] = out.get(rid, 0) + 1
            else:
                errors.append(f"request {rid}: scores of another request")
    finally:
        ch.close()


def run_callers(address: str, ckpt: str, plan: dict[str, list[list[int]]]) -> tuple[dict[str, dict[int, int]],
                                                                                     list[str], dict[str, float]]:
    """Run the callers of ``plan`` ({"shared_pool": [rids per thread], "own_pool": ..., "stub": ...})
    at once in this process; returns ({caller: {rid: replies}}, errors, shared pool stats)."""
    teacher = load_teacher(ckpt)
    results: dict[str, dict[int, int]] = {}
    errors: list[str] = []
    threads = []
    shared = TeacherPool({"fx": [address]}, timeout_s=120.0)
    own: list[TeacherPool] = []
    for kind, groups in plan.items():
        for i, rids in enumerate(groups):
            name = f"{kind}{i}"
            results[name] = {}
            if kind == "shared_pool":
                args = (pool_caller, (shared, teacher, rids, results[name], errors))
            elif kind == "own_pool":
                own.append(TeacherPool({"fx": [address]}, timeout_s=120.0))
                args = (pool_caller, (own[-1], teacher, rids, results[name], errors))
            else:
                args = (stub_caller, (address, teacher, rids, results[name], errors))
            threads.append(threading.Thread(target=args[0], args=args[1]))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stats = {"shared_calls": shared.stats().get("calls", 0.0),
             "retries": sum(p.stats().get("retries", 0.0) for p in [shared, *own])}
    for p in [shared, *own]:
        p.close()
    return results, errors, stats


def process_main(index: int, address: str, ckpt: str, plan: dict[str, list[list[int]]], queue) -> None:
    """Client process ``index``: its callers; (index, results) sent back to the test."""
    torch.set_num_threads(1)
    queue.put((index, run_callers(address, ckpt, plan)))


def _ids(caller: int, n: int = PER_CALLER) -> list[int]:
    return [caller * 1000 + k for k in range(n)]


def test_concurrent_threads_and_processes_each_get_their_own_replies(tmp_path: Path):
    ckpt = make_fixture_checkpoint(tmp_path / "fx", num_items=N_ITEMS, vocab_hash=VOCAB, dim=16, seed=7,
                                   max_history=MAX_HIST)
    teacher = load_teacher(ckpt)
    srv = start_server(teacher, name="fx", limits=ServiceLimits(coalesce_wait_ms=20.0, coalesce_max_rows=512,
                                                                max_workers=16))
    try:
        batcher = srv.servicer.batcher
        requests_before, batches_before = batcher.requests, batcher.batches
        caller = iter(range(1, 100))
        local_plan = {"shared_pool": [_ids(next(caller)) for _ in range(4)],
                      "stub": [_ids(next(caller)) for _ in range(3)]}
        proc_plans = [{"own_pool": [_ids(next(caller)) for _ in range(2)], "stub": [_ids(next(caller))]}
                      for _ in range(2)]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=process_main, args=(i, srv.address, str(ckpt), plan, queue))
                 for i, plan in enumerate(proc_plans)]
        for p in procs:
            p.start()
        local = run_callers(srv.address, str(ckpt), local_plan)
        remote = [r for _, r in sorted((queue.get(timeout=300) for _ in procs), key=lambda x: x[0])]
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        plans = [local_plan, *proc_plans]
        outcomes = [local, *remote]
        sent = 0
        for plan, (results, errors, stats) in zip(plans, outcomes):
            assert errors == [], errors[:5]
            assert stats["retries"] == 0
            for kind, groups in plan.items():
                for i, rids in enumerate(groups):
                    got = results[f"{kind}{i}"]
                    # Each caller: exactly its own ids, each once, each with its own scores.
                    assert sorted(got) == sorted(rids), f"{kind}{i}: lost {sorted(set(rids) - set(got))[:5]}"
                    assert set(got.values()) == {1}
                    sent += len(rids)
            if "shared_pool" in plan:  # one pool shared by 4 threads made exactly their calls
                assert stats["shared_calls"] == sum(len(r) for r in plan["shared_pool"])
        callers = 4 + 3 + 2 * 3
        assert sent == callers * PER_CALLER == 325
        all_ids = [rid for plan in plans for groups in plan.values() for rids in groups for rid in rids]
        assert len(all_ids) == len(set(all_ids)) == sent
        # The server's model ran each request exactly once (none lost, none run twice), ...
        assert batcher.requests - requests_before == sent
        assert srv.servicer.bad_requests == 0 and srv.servicer.internal_errors == 0
        # ... and requests of different callers did share model batches (the path where a reply
        # could go astray was exercised).
        assert batcher.batches - batches_before < sent
        print(f"{sent} requests from {callers} callers in 3 processes: {batcher.requests - requests_before} run by "
              f"the model in {batcher.batches - batches_before} coalesced batches; 0 lost, 0 duplicated")
    finally:
        srv.stop(0)
