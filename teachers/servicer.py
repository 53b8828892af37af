"""gRPC servicer around any ``teachers.base.Teacher``: validated, coalesced, health-reporting.

* Every request is validated before it reaches the model; a bad one is answered with
  INVALID_ARGUMENT and a message naming the field and the problem ("field lengths: ..."), and the
  server goes on serving. A history longer than the teacher's ``max_history`` is cut to its last
  ``max_history`` items (Describe says so: ``cuts_long_histories``), not refused.
* Requests from many clients are coalesced by one batcher thread up to a row / latency budget:
  their histories are encoded in one forward pass, then each request is scored against its own
  candidates, gathering at most ``max_gather_bytes`` of candidate embeddings at once
  (``Teacher.score_candidates``). (A teacher that overrides ``score`` is scored request by request
  instead, and its own ``score`` decides its memory.) With ``history_memo_bytes`` set, a history
  already encoded is read back from the memo instead (``teachers.history_memo``).
* A failure inside the teacher is answered INTERNAL with a generic message and an error id; the
  exception and its traceback go to the server log under that id, never to the caller.
* ``grpc.health.v1`` reports NOT_SERVING until ``warm_up`` has pushed a batch through the same
  path; ``drain`` flips it back to NOT_SERVING and refuses new work with UNAVAILABLE. The drain
  flag and the in-flight count share one lock, so no call is admitted after ``drain`` has begun.
* An optional shared token is checked on every call (``authorization: Bearer <token>`` metadata).
"""
from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2

from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import AUTH_METADATA_KEY, SERVICE_NAME, ServiceLimits
from protos.tensor_codec import TensorCodecError, decode, encode
from teachers.base import Teacher
from teachers.history_memo import HistoryMemo

log = logging.getLogger(__name__)

class RequestError(ValueError):
    """A Score request is malformed (-> INVALID_ARGUMENT); ``field`` names the ScoreRequest field to
    blame and the message starts with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field}: {problem}")
        self.field = field


class ServerBusy(RuntimeError):
    """Too many rows are queued (-> RESOURCE_EXHAUSTED)."""


@dataclass
class ParsedRequest:
    histories: np.ndarray  # int64 [B, L], right-padded with 0, at most max_history most recent items
    lengths: np.ndarray  # int64 [B]
    candidates: np.ndarray  # int64 [C] or [B, C]


def _int_tensor(msg: teacher_pb2.Tensor, field: str, ndims: tuple[int, ...]) -> np.ndarray:
    try:
        arr = decode(msg)
    except TensorCodecError as exc:
        raise RequestError(field, f"malformed tensor {field}: {exc}") from None
    if arr.dtype.kind not in "iu":
        raise RequestError(field, f"{field} must be an integer tensor, got dtype {arr.dtype.name}")
    if arr.ndim not in ndims:
        raise RequestError(field, f"{field} must have {' or '.join(map(str, ndims))} dims, got shape "
                                  f"{list(arr.shape)}")
    return arr


def _check_ids(arr: np.ndarray, field: str, num_items: int) -> None:
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 1 or hi >= num_items:
        bad = lo if lo < 1 else hi
        raise RequestError(field, f"item id out of range in {field}: {bad} (valid ids are 1..{num_items - 1}; "
                                  f"0 is padding and is not sent)")


def parse_request(req: teacher_pb2.ScoreRequest, info_vocab_hash: str, num_items: int, max_history: int,
                  cfg: ServiceLimits) -> ParsedRequest:
    """Validate a ScoreRequest and turn it into padded int64 arrays; raises RequestError naming the field.

    Rows longer than ``max_history`` keep their last ``max_history`` items (the contract says so)."""
    if req.vocab_hash and req.vocab_hash != info_vocab_hash:
        raise RequestError("vocab_hash", f"wrong vocabulary hash: request ids belong to {req.vocab_hash[:16]}..., "
                                         f"this teacher serves {info_vocab_hash[:16]}...")
    items = _int_tensor(req.history_items, "history_items", (1,))
    lengths = _int_tensor(req.lengths, "lengths", (1,))
    cands = _int_tensor(req.candidates, "candidates", (1, 2))
    b, c = int(lengths.shape[0]), int(cands.shape[-1])
    if b == 0:
        raise RequestError("lengths", "empty batch: lengths has 0 rows")
    if b > cfg.max_batch_rows:
        raise RequestError("lengths", f"oversized batch: {b} rows > max_batch_rows={cfg.max_batch_rows}")
    if c == 0:
        raise RequestError("candidates", "empty batch: 0 candidates")
    if c > cfg.max_candidates:
        raise RequestError("candidates", f"oversized batch: {c} candidates > max_candidates={cfg.max_candidates}")
    if b * c > cfg.max_score_cells:
        raise RequestError("candidates", f"oversized batch: {b}x{c} scores > max_score_cells={cfg.max_score_cells}")
    if int(lengths.min()) < 1:
        raise RequestError("lengths", f"length mismatch: every history needs >= 1 item, row "
                                      f"{int(np.argmin(lengths))} has length {int(lengths.min())}")
    total = int(lengths.astype(np.int64).sum()) if int(lengths.max()) <= 2**40 else -1
    if total != items.shape[0]:
        raise RequestError("lengths", f"length mismatch: sum(lengths)={total} but history_items has "
                                      f"{items.shape[0]} ids")
    if cands.ndim == 2 and cands.shape[0] != b:
        raise RequestError("candidates", f"length mismatch: candidates has {cands.shape[0]} rows, the batch has {b}")
    _check_ids(items, "history_items", num_items)
    _check_ids(cands, "candidates", num_items)
    # copy=False: int64 ids (what the client sends) are used as decoded, not copied once more.
    lengths = lengths.astype(np.int64, copy=False)
    items = items.astype(np.int64, copy=False)
    # Keep the most recent max_history items of each row (teachers are trained on capped histories).
    take = np.minimum(lengths, max_history)
    width = int(take.max())
    ends = np.cumsum(lengths)
    pos = (ends - take)[:, None] + np.arange(width)[None, :]
    mask = np.arange(width)[None, :] < take[:, None]
    hist = np.where(mask, items[np.minimum(pos, items.shape[0] - 1)], 0)
    return ParsedRequest(hist, take, cands.astype(np.int64, copy=False))


@dataclass
class _Job:
    req: ParsedRequest
    future: Future
    enqueued: float


class Batcher:
    """One thread runs the model; it coalesces queued requests up to a row / latency budget."""

    def __init__(self, teacher: Teacher, cfg: ServiceLimits):
        self.teacher, self.cfg = teacher, cfg
        self.device = next(iter(teacher.parameters()), torch.empty(0)).device
        # Joint history encoding is only valid when score == similarity(encode, item_embeddings).
        self.coalescable = type(teacher).score is Teacher.score
        # The memo needs the same split (a history's representation reused across requests).
        self.memo = HistoryMemo(cfg.history_memo_bytes) if cfg.history_memo_bytes and self.coalescable else None
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._rows = 0
        self._lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="teacher-batcher", daemon=True)
        self._thread.start()

    def submit(self, req: ParsedRequest) -> Future:
        rows = int(req.lengths.shape[0])
        with self._lock:
            if self._rows + rows > self.cfg.max_queue_rows:
                raise ServerBusy(f"server busy: {self._rows} rows queued, limit {self.cfg.max_queue_rows}")
            self._rows += rows
        fut: Future = Future()
        self._q.put(_Job(req, fut, time.perf_counter()))
        return fut

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            jobs, rows = [job], int(job.req.lengths.shape[0])
            deadline = job.enqueued + self.cfg.coalesce_wait_ms / 1000.0
            stop = False
            while rows < self.cfg.coalesce_max_rows:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                jobs.append(nxt)
                rows += int(nxt.req.lengths.shape[0])
            self._execute(jobs)
            with self._lock:
                self._rows -= rows
            if stop:
                return

    @torch.no_grad()
    def _execute(self, jobs: list[_Job]) -> None:
        self.batches += 1
        self.requests += len(jobs)
        try:
            with self.teacher.precision_context():
                self._execute_in_precision(jobs)
        except Exception as exc:  # noqa: BLE001 — reported to each waiting caller, the thread lives on
            log.exception("teacher batch of %d request(s) failed", len(jobs))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(exc)

    def _execute_in_precision(self, jobs: list[_Job]) -> None:
        """The batch of ``_execute``, inside the teacher's precision context."""
        if len(jobs) == 1 or not self.coalescable:
            for j in jobs:
                self._finish(j, self._score_one(j.req))
            return
        width = max(j.req.histories.shape[1] for j in jobs)
        hist = np.zeros((sum(j.req.histories.shape[0] for j in jobs), width), dtype=np.int64)
        r = 0
        for j in jobs:
            h = j.req.histories
            hist[r:r + h.shape[0], : h.shape[1]] = h
            r += h.shape[0]
        lengths = np.concatenate([j.req.lengths for j in jobs])
        seq = self._encode(hist, lengths)
        r = 0
        for j in jobs:
            b = j.req.lengths.shape[0]
            self._finish(j, self.teacher.score_candidates(seq[r:r + b], self._t(j.req.candidates),
                                                          self.cfg.max_gather_bytes))
            r += b

    def _t(self, a: np.ndarray) -> torch.Tensor:
        # Decoded ids are read-only views of the request bytes; the model only reads them, so they
        # are not copied (torch would warn that it cannot protect a read-only array from writes).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(a).to(self.device)

    def _score_one(self, req: ParsedRequest) -> torch.Tensor:
        if not self.coalescable:  # the teacher's own score (and its own memory)
            return self.teacher.score(self._t(req.histories), self._t(req.lengths), self._t(req.candidates))
        seq = self._encode(req.histories, req.lengths)
        return self.teacher.score_candidates(seq, self._t(req.candidates), self.cfg.max_gather_bytes)

    def _encode(self, histories: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """[B, D] history representations, through the memo when the server keeps one."""
        def encode(h: np.ndarray, n: np.ndarray) -> torch.Tensor:
            return self.teacher.encode_histories(self._t(h), self._t(n))

        if self.memo is None:
            return encode(histories, lengths)
        # A new weight state or precision empties the memo (the teacher's own table check).
        return self.memo.encode(histories, lengths, encode, self.teacher.inference_version())

    @staticmethod
    def _finish(job: _Job, scores: torch.Tensor) -> None:
        job.future.set_result(np.ascontiguousarray(scores.detach().float().cpu().numpy()))


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
    """Score / Describe for one teacher, plus its health status."""

    def __init__(self, teacher: Teacher, name: str | None = None, limits: ServiceLimits | None = None):
        self.cfg = limits or ServiceLimits()
        self.cfg.validate()
        self.teacher = teacher
        self.info = teacher.describe()
        self.name = name or self.info.name
        self.batcher = Batcher(teacher, self.cfg)
        self.health = health.HealthServicer()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # One lock for the drain flag and the in-flight count: a call is admitted (counted) only
        # while the flag is down, so once drain() has set it, the count can only fall.
        self._draining = False
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self.bad_requests = 0
        self.internal_errors = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def _set_health(self, status: int) -> None:
        for svc in ("", SERVICE_NAME):
            self.health.set(svc, status)

    def warm_up(self) -> None:
        """Push one small batch through the full path; only then report SERVING."""
        n = self.info.num_items
        if n < 2:
            raise RuntimeError(f"teacher {self.name} has num_items={n}: nothing to score")
        ids = np.arange(1, min(n, 9), dtype=np.int64)
        req = ParsedRequest(np.stack([ids, ids[::-1]]), np.array([len(ids)] * 2, dtype=np.int64), ids)
        scores = self.batcher.submit(req).result(timeout=300)
        if scores.shape != (2, len(ids)) or not np.isfinite(scores).all():
            raise RuntimeError(f"teacher {self.name} warm-up produced bad scores of shape {scores.shape}")
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self, timeout: float = 30.0) -> bool:
        """Report NOT_SERVING, refuse new Score calls, wait for those in flight; True if all finished."""
        with self._inflight_cv:
            self._draining = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        end = time.monotonic() + timeout
        with self._inflight_cv:
            while self._inflight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._inflight_cv.wait(left)
        return True

    def close(self) -> None:
        self.health.enter_graceful_shutdown()
        self.batcher.stop()

    # -- RPCs -----------------------------------------------------------------------------------
    def Describe(self, request, context):  # noqa: N802 (gRPC method name)
        return self.info.to_proto(name=self.name, limits=self.cfg)

    def Score(self, request, context):  # noqa: N802
        with self._inflight_cv:
            admitted = not self._draining
            if admitted:
                self._inflight += 1
        if not admitted:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"teacher {self.name} is draining; retry another replica")
        try:
            code, msg, reply = self._score(request)
        except Exception:  # noqa: BLE001 — never UNKNOWN with a Python message: log it, answer INTERNAL
            code, msg, reply = self._internal(request.request_id, "scoring the request")
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._inflight_cv.notify_all()
        if code is not None:
            context.abort(code, msg)
        return reply

    def _internal(self, rid: int, what: str) -> tuple[grpc.StatusCode, str, None]:
        """Log the current exception under a fresh error id; the caller gets the id, not the text."""
        eid = uuid.uuid4().hex[:12]
        self.internal_errors += 1
        log.exception("request %d to %s failed (%s) [error id %s]", rid, self.name, what, eid)
        return (grpc.StatusCode.INTERNAL,
                f"request {rid}: teacher {self.name} failed internally; error id {eid} (see the server log)", None)

    def _score(self, request) -> tuple[grpc.StatusCode | None, str, teacher_pb2.ScoreReply | None]:
        rid = request.request_id
        try:
            parsed = parse_request(request, self.info.vocab_hash, self.info.num_items, self.info.max_history,
                                   self.cfg)
        except RequestError as exc:
            self.bad_requests += 1
            log.info("request %d to %s refused: %s", rid, self.name, exc)
            return grpc.StatusCode.INVALID_ARGUMENT, f"request {rid}: {exc}", None
        try:
            scores = self.batcher.submit(parsed).result()
        except ServerBusy as exc:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, f"request {rid}: {exc}", None
        except Exception:  # noqa: BLE001 — a model failure must not take the server down
            return self._internal(rid, "in the model")
        return None, "", teacher_pb2.ScoreReply(request_id=rid, scores=encode(scores), teacher_name=self.name,
                                                teacher_version=self.info.version)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call (health checks included) without ``authorization: Bearer <token>``."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("auth token must be a non-empty string")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get(AUTH_METADATA_KEY, "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if handler is None or hmac.compare_digest(got_b, self._expected):
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong teacher auth token")

        def deny_stream(request, context):
            deny(request, context)
            yield  # pragma: no cover  (abort raises)

        kw = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
