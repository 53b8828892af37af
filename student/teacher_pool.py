"""TeacherPool: the student's client for the teacher service.

Discovers replicas from the directory actor (``from_ray``) or a static endpoint list, keeps one gRPC
channel per replica per process (created lazily, re-created after a fork), round-robins over healthy
replicas, puts a deadline on every call, retries another replica with exponential backoff on
UNAVAILABLE / DEADLINE_EXCEEDED, quarantines failing replicas until a background health probe finds
them SERVING again (a replica quarantined again and again waits longer between probes, so a slow
one that keeps missing its deadline is mostly routed around), splits a batch on RESOURCE_EXHAUSTED
or when it would exceed the message limit, and fails fast (TeacherContractError) on
INVALID_ARGUMENT / FAILED_PRECONDITION.

A directory that has just restarted says so (``Discovery.settled`` False): until it settles, the
pool adds the replicas it lists but drops none it knows, so it never adopts an empty or partial
list while replicas are still re-registering.

A teacher with no live replica is handled by ``on_unavailable``: "fail" raises TeacherUnavailable,
"skip" returns None for that teacher for the batch (counted in ``stats()['skipped/<name>']``),
"wait" keeps retrying with backoff for ``wait_budget_s`` and then raises. Stale labels are never
substituted. This module talks to the teacher side only through the proto (and the directory's
actor methods, by name), so it imports nothing from ``teachers`` or ``cluster``.
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ckd.ray_loopback import join_ray
from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import (DIRECTORY_NAME, SERVICE_NAME, ServiceLimits, TeacherContractError, TeacherInfo,
                             TeacherUnavailable, auth_metadata, grpc_message_options)
from protos.tensor_codec import TensorCodecError, decode, encode

log = logging.getLogger(__name__)

@dataclass
class PoolSettings:
    timeout_s: float = 30.0  # deadline of every Score call
    describe_timeout_s: float = 10.0
    max_attempts: int = 6  # per batch and teacher, before the policy applies
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    on_unavailable: Literal["fail", "skip", "wait"] = "fail"
    wait_budget_s: float = 60.0  # "wait": give up (TeacherUnavailable) after this long
    probe_interval_s: float = 0.5  # health probes of quarantined replicas
    quarantine_max_s: float = 5.0  # a replica quarantined k times in a row waits min(this, probe * 2**(k-1))
    refresh_interval_s: float = 1.0  # directory refresh
    max_message_bytes: int = ServiceLimits.max_message_bytes  # must equal the server's limit
    token: str | None = None  # shared token, sent on every call
    tls_ca: str | None = None  # PEM root certificate -> TLS channels
    tls_server_name: str | None = None  # override the name checked in the server certificate
    directory: str = DIRECTORY_NAME
    parallel_teachers: bool = True  # call the teachers of one batch concurrently

    def validate(self) -> None:
        if self.on_unavailable not in ("fail", "skip", "wait"):
            raise ValueError(f"on_unavailable must be fail|skip|wait, got {self.on_unavailable!r}")
        for k in ("timeout_s", "max_attempts", "max_message_bytes"):
            if getattr(self, k) <= 0:
                raise ValueError(f"PoolSettings.{k} must be > 0, got {getattr(self, k)}")


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base * 2**attempt)."""
    d = min(cap, base * (2 ** attempt))
    return d * (0.5 + 0.5 * rng.random())


class _Exhausted(Exception):
    pass


@dataclass(frozen=True)
class Discovery:
    """A discovery source's answer when it knows more than the endpoints: ``settled`` False means
    the directory has just restarted and replicas may still be re-registering (so a missing
    replica is not evidence that it is gone); ``generation`` counts directory (re)starts."""
    endpoints: dict[str, list[str]]
    settled: bool = True
    generation: int = 0


@dataclass
class _Replica:
    address: str
    quarantined: bool = False
    failures: int = 0  # quarantines in a row without a successful call in between
    probe_after: float = 0.0  # clock time before which the probe leaves it quarantined


class _Conn:
    def __init__(self, address: str, s: PoolSettings):
        opts = grpc_message_options(s.max_message_bytes)
        if s.tls_ca:
            if s.tls_server_name:
                opts.append(("grpc.ssl_target_name_override", s.tls_server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=Path(s.tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.stub = teacher_pb2_grpc.TeacherStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


class _Timings:
    """Recent samples per stage (ms), bounded."""

    def __init__(self, keep: int = 20000):
        self._d: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._d[stage].append(ms)

    def summary(self) -> dict[str, float]:
        out = {}
        with self._lock:
            for k, v in self._d.items():
                a = np.fromiter(v, dtype=np.float64)
                if a.size:
                    out[f"{k}_ms_mean"] = float(a.mean())
                    out[f"{k}_ms_p50"] = float(np.percentile(a, 50))
                    out[f"{k}_ms_p95"] = float(np.percentile(a, 95))
        return out


def flatten_histories(histories: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Padded [B, L] (oldest first, right-padded) -> the first ``lengths[i]`` ids of every row, concatenated."""
    h, n = np.asarray(histories), np.asarray(lengths)
    if h.ndim != 2 or n.ndim != 1 or h.shape[0] != n.shape[0]:
        raise TeacherContractError(f"histories {h.shape} and lengths {n.shape} do not describe one batch")
    if n.size and (n.min() < 1 or n.max() > h.shape[1]):
        raise TeacherContractError(f"lengths must lie in 1..{h.shape[1]}, got {int(n.min())}..{int(n.max())}")
    return h[np.arange(h.shape[1])[None, :] < n[:, None]].astype(np.int64, copy=False)


class TeacherPool:
    """Soft-label client over every replica of the named teachers."""

    def __init__(self, endpoints: dict[str, list[str]] | None = None, *,
                 source: Callable[[], dict[str, list[str]] | Discovery] | None = None,
                 teachers: list[str] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 **settings: Any):
        known = {f.name for f in fields(PoolSettings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown TeacherPool setting(s) {unknown}; valid: {sorted(known)}")
        self.settings = PoolSettings(**settings)
        self.settings.validate()
        if (endpoints is None) == (source is None):
            raise ValueError("give exactly one of endpoints (static) or source (discovery)")
        if endpoints is not None:
            static = {k: list(v) for k, v in endpoints.items()}
            source = lambda: static  # noqa: E731
            teachers = teachers or list(static)
        if not teachers:
            raise ValueError("TeacherPool needs at least one teacher name")
        self.teachers = list(teachers)
        self._source = source
        self._sleep, self._clock = sleep, clock
        self._rng = random.Random(0x5EED ^ os.getpid())
        self._lock = threading.RLock()
        self._replicas: dict[str, list[_Replica]] = {t: [] for t in self.teachers}
        self._rr = {t: itertools.count() for t in self.teachers}
        self._rid = itertools.count(1)
        self._vocab_hash = ""
        self._counters: dict[str, float] = defaultdict(float)
        self._timings = _Timings()
        self._metadata = auth_metadata(self.settings.token)
        self._pid = -1
        self._conns: dict[str, _Conn] = {}
        self._stop = threading.Event()
        self._bg: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._on_close: list[Callable[[], None]] = []
        self.refresh()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_ray(cls, address: str, namespace: str, teachers: list[str], **settings: Any) -> "TeacherPool":
        """Discover replicas through the directory actor of a running Ray cluster (GCS ``address``)."""
        import ray

        owns = False
        if not ray.is_initialized():
            # join_ray: the embedded default listens on loopback only, which needs Ray's loopback mode.
            join_ray(address, namespace=namespace, logging_level="WARNING", log_to_driver=False)
            owns = True
        name = settings.get("directory", DIRECTORY_NAME)
        try:
            handle = [ray.get_actor(name, namespace=namespace)]
        except ValueError:
            if owns:
                ray.shutdown()
            raise TeacherUnavailable(f"no teacher directory {name!r} in Ray namespace {namespace!r} at {address}; "
                                     f"is launch/serve.py running?") from None

        def fetch() -> Discovery:
            try:
                view = ray.get(handle[0].view.remote(list(teachers)), timeout=10)
            except ray.exceptions.ActorDiedError:
                # Dead for good: its deployment creates it again under the same name; look it up.
                handle[0] = ray.get_actor(name, namespace=namespace)
                raise
            return Discovery(view["endpoints"], bool(view["settled"]), int(view["generation"]))

        pool = cls(source=fetch, teachers=list(teachers), **settings)
        if owns:
            pool._on_close.append(ray.shutdown)
        return pool

    # -- replicas -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the replica list: new replicas join healthy, vanished ones are dropped (but none
        while the directory is unsettled after a restart)."""
        try:
            current = self._source()
        except Exception as exc:  # noqa: BLE001 — keep the last known list; probes still run
            with self._lock:
                self._counters["refresh_failures"] += 1
            log.warning("teacher directory refresh failed: %r", exc)
            return
        found = current if isinstance(current, Discovery) else Discovery(dict(current))
        with self._lock:
            self._counters["directory_generation"] = float(found.generation)
            for t in self.teachers:
                addrs = list(dict.fromkeys(found.endpoints.get(t, [])))
                old = {r.address: r for r in self._replicas[t]}
                if not found.settled:
                    held = [a for a in old if a not in addrs]
                    if held:
                        self._counters["refresh_held"] += 1
                        log.info("teacher directory restarted and unsettled: keeping %d known replica(s) of %s",
                                 len(held), t)
                    addrs = list(old) + [a for a in addrs if a not in old]
                self._replicas[t] = [old.get(a) or _Replica(a) for a in addrs]
            live = {r.address for rs in self._replicas.values() for r in rs}
            for a in [a for a in self._conns if a not in live]:
                self._conns.pop(a).channel.close()

    def _ensure_process(self) -> None:
        # Channels and threads do not survive fork: rebuild them lazily in each process.
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._conns = {}
            self._stop = threading.Event()
            self._executor = ThreadPoolExecutor(max_workers=max(1, len(self.teachers)),
                                                thread_name_prefix="teacher-pool")
            self._bg = threading.Thread(target=self._background, name="teacher-pool-probe", daemon=True)
            self._bg.start()

    def _conn(self, address: str) -> _Conn:
        with self._lock:
            c = self._conns.get(address)
            if c is None:
                c = self._conns[address] = _Conn(address, self.settings)
            return c

    def _pick(self, teacher: str) -> _Replica | None:
        with self._lock:
            healthy = [r for r in self._replicas[teacher] if not r.quarantined]
            if not healthy:
                return None
            return healthy[next(self._rr[teacher]) % len(healthy)]

    def _quarantine(self, teacher: str, rep: _Replica, why: str) -> None:
        with self._lock:
            if not rep.quarantined:
                rep.quarantined = True
                rep.failures += 1
                # Health says SERVING for a replica that is merely slow: back off its re-admission.
                hold = min(self.settings.quarantine_max_s, self.settings.probe_interval_s * 2 ** (rep.failures - 1))
                rep.probe_after = self._clock() + hold
                self._counters["quarantines"] += 1
                log.warning("teacher %s replica %s quarantined (%d in a row, next probe in %.1f s): %s", teacher,
                            rep.address, rep.failures, hold, why)

    def probe(self) -> None:
        """Health-check quarantined replicas whose hold has passed; SERVING ones rejoin."""
        now = self._clock()
        with self._lock:
            todo = [(t, r) for t, rs in self._replicas.items() for r in rs if r.quarantined and now >= r.probe_after]
        for t, r in todo:
            try:
                resp = self._conn(r.address).health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                          timeout=1.0, metadata=self._metadata)
                ok = resp.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
            if ok:
                with self._lock:
                    r.quarantined = False
                log.info("teacher %s replica %s healthy again", t, r.address)

    def _background(self) -> None:
        last_refresh = self._clock()
        step = min(self.settings.probe_interval_s, self.settings.refresh_interval_s)
        while not self._stop.wait(step):
            if self._clock() - last_refresh >= self.settings.refresh_interval_s:
                self.refresh()
                last_refresh = self._clock()
            self.probe()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until every teacher has a healthy replica (TeacherUnavailable after ``timeout``)."""
        self._ensure_process()
        end = self._clock() + timeout
        while True:
            self.refresh()
            missing = [t for t in self.teachers if not any(not r.quarantined for r in self._replicas[t])]
            if not missing:
                return
            if self._clock() > end:
                raise TeacherUnavailable(f"no live replica of teacher(s) {missing} after {timeout:.0f} s")
            self._sleep(0.2)

    # -- contract -----------------------------------------------------------------------------
    def describe(self) -> dict[str, TeacherInfo]:
        """Describe every teacher (all its replicas must agree on checkpoint and vocabulary)."""
        self._ensure_process()
        out = {}
        for t in self.teachers:
            with self._lock:
                reps = [r for r in self._replicas[t] if not r.quarantined]
            descs = []
            for r in reps:
                try:
                    descs.append(self._conn(r.address).stub.Describe(
                        teacher_pb2.DescribeRequest(), timeout=self.settings.describe_timeout_s,
                        metadata=self._metadata))
                except grpc.RpcError as exc:
                    self._quarantine(t, r, f"Describe failed: {exc.code().name}")
            if not descs:
                raise TeacherUnavailable(f"teacher {t}: no replica answered Describe "
                                         f"({len(self._replicas[t])} known)")
            keys = {(d.vocab_hash, d.checkpoint_sha256, d.version) for d in descs}
            if len(keys) > 1:
                raise TeacherContractError(f"teacher {t}: replicas serve different checkpoints/vocabularies: {keys}")
            out[t] = TeacherInfo.from_proto(descs[0], replicas=len(descs))
        return out

    def check_contract(self, vocab_hash: str, vocab_size: int) -> dict[str, TeacherInfo]:
        """Refuse teachers trained on another item vocabulary; later requests carry the hash."""
        infos, _ = self.check_coverage([(vocab_hash, vocab_size)], require_all=True)
        return infos

    def check_coverage(self, vocabularies: Sequence[tuple[str, int]], require_all: bool = False,
                       ) -> tuple[dict[str, TeacherInfo], int]:
        """Match every teacher to a prefix of the student's domains: ``vocabularies[k-1]`` is the
        (hash, size with PAD) of the first k domains. Returns (infos, k) with k shared by all teachers;
        a teacher of no prefix (or, with ``require_all``, of a shorter one) is refused."""
        infos = self.describe()
        full_hash, full_size = vocabularies[-1]
        by_hash = {h: (k + 1, size) for k, (h, size) in enumerate(vocabularies)}
        covered: dict[str, int] = {}
        for t, i in infos.items():
            if i.vocab_hash not in by_hash or (require_all and i.vocab_hash != full_hash):
                raise TeacherContractError(f"teacher {t} serves item vocabulary {i.vocab_hash[:16]}..., the student "
                                           f"data has {full_hash[:16]}...: different domains or item ids")
            k, size = by_hash[i.vocab_hash]
            if i.num_items != size:
                raise TeacherContractError(f"teacher {t} has {i.num_items} item ids, the student data has "
                                           f"{size} (both counting PAD)")
            covered[t] = k
        if len(set(covered.values())) > 1:
            raise TeacherContractError(f"teachers cover different numbers of the student's domains: {covered}; "
                                       "serve teachers of the same domains together")
        k = next(iter(covered.values()))
        self._vocab_hash = vocabularies[k - 1][0]
        return infos, k

    # -- scoring ------------------------------------------------------------------------------
    def score(self, histories: np.ndarray, lengths: np.ndarray, candidates: np.ndarray,
              request_id: int | None = None) -> dict[str, np.ndarray | None]:
        """Scores of every teacher: {name: float32 [B, C]} (None = skipped under on_unavailable="skip")."""
        self._ensure_process()
        t0 = time.perf_counter()
        rid = next(self._rid) if request_id is None else int(request_id)
        lengths = np.asarray(lengths).astype(np.int64, copy=False)
        flat = flatten_histories(histories, lengths)
        cands = np.asarray(candidates).astype(np.int64, copy=False)
        if cands.ndim not in (1, 2) or (cands.ndim == 2 and cands.shape[0] != lengths.shape[0]):
            raise TeacherContractError(f"candidates must be [C] or [B, C] with B={lengths.shape[0]}, "
                                       f"got {cands.shape}")
        self._timings.add("encode", (time.perf_counter() - t0) * 1e3)

        def one(t: str) -> np.ndarray | None:
            try:
                return self._score_split(t, flat, lengths, cands, rid)
            except TeacherUnavailable:
                if self.settings.on_unavailable == "skip":
                    with self._lock:
                        self._counters[f"skipped/{t}"] += 1
                    log.warning("request %d: teacher %s unavailable, skipped for this batch", rid, t)
                    return None
                raise

        if self.settings.parallel_teachers and len(self.teachers) > 1:
            out = dict(zip(self.teachers, self._executor.map(one, self.teachers)))
        else:
            out = {t: one(t) for t in self.teachers}
        self._counters["batches"] += 1
        self._timings.add("score", (time.perf_counter() - t0) * 1e3)
        return out

    def _score_split(self, t: str, flat: np.ndarray, lengths: np.ndarray, cands: np.ndarray,
                     rid: int) -> np.ndarray:
        b = lengths.shape[0]
        c = cands.shape[-1]
        req = teacher_pb2.ScoreRequest(request_id=rid, history_items=encode(flat), lengths=encode(lengths),
                                       candidates=encode(cands), vocab_hash=self._vocab_hash)
        limit = self.settings.max_message_bytes
        too_big = req.ByteSize() > limit - 1024 or b * c * 4 > limit - 4096
        if not too_big:
            try:
                return self._call(t, req, b, c)
            except _Exhausted:
                if b == 1:
                    raise TeacherUnavailable(f"request {rid}: teacher {t} stays RESOURCE_EXHAUSTED "
                                             f"for a single row") from None
        elif b == 1:
            raise TeacherContractError(f"request {rid}: one row with {c} candidates exceeds the "
                                       f"{limit}-byte message limit")
        # Split rows in two halves (message limit or server back-pressure), keep row order.
        self._counters["splits"] += 1
        h = b // 2
        ends = np.cumsum(lengths)
        cut = int(ends[h - 1])
        parts = [(flat[:cut], lengths[:h], cands if cands.ndim == 1 else cands[:h]),
                 (flat[cut:], lengths[h:], cands if cands.ndim == 1 else cands[h:])]
        return np.concatenate([self._score_split(t, *p, rid) for p in parts], axis=0)

    def _call(self, t: str, req: teacher_pb2.ScoreRequest, b: int, c: int) -> np.ndarray:
        s = self.settings
        start, attempt, rid = self._clock(), 0, req.request_id
        while True:
            rep = self._pick(t)
            if rep is None:
                self.refresh()
                rep = self._pick(t)
            if rep is None:
                waited = self._clock() - start
                if s.on_unavailable == "wait" and waited < s.wait_budget_s:
                    pass
                elif attempt >= s.max_attempts - 1 or s.on_unavailable == "wait":
                    with self._lock:
                        self._counters[f"unavailable/{t}"] += 1
                    raise TeacherUnavailable(f"request {rid}: teacher {t} has no live replica "
                                             f"({len(self._replicas[t])} known, all quarantined or gone) "
                                             f"after {attempt + 1} attempt(s) / {waited:.1f} s")
                self._backoff(attempt)
                attempt += 1
                continue
            t_rpc = time.perf_counter()
            try:
                reply = self._conn(rep.address).stub.Score(req, timeout=s.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code, detail = exc.code(), exc.details()
                tag = f"request {rid} teacher {t} replica {rep.address}: {code.name}: {detail}"
                if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("%s", tag)
                    raise TeacherContractError(tag) from None
                self._counters["retries"] += 1
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    log.warning("%s (backing off, splitting)", tag)
                    self._backoff(attempt)
                    raise _Exhausted(tag) from None
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self._quarantine(t, rep, tag)
                else:
                    log.warning("%s (retrying elsewhere)", tag)
                attempt += 1
                if attempt >= s.max_attempts and not (s.on_unavailable == "wait"
                                                      and self._clock() - start < s.wait_budget_s):
                    with self._lock:
                        self._counters[f"unavailable/{t}"] += 1
                    raise TeacherUnavailable(f"{tag}; gave up after {attempt} attempt(s)") from None
                self._backoff(attempt - 1)
                continue
            t_dec = time.perf_counter()
            self._timings.add("rpc", (t_dec - t_rpc) * 1e3)
            try:
                scores = decode(reply.scores)
            except TensorCodecError as exc:
                raise TeacherContractError(f"request {rid} teacher {t} replica {rep.address}: malformed reply: "
                                           f"field scores: {exc}", field="scores") from None
            if reply.request_id != rid:
                raise TeacherContractError(f"request {rid} teacher {t} replica {rep.address}: malformed reply: "
                                           f"field request_id: {reply.request_id}, expected {rid}", field="request_id")
            if scores.shape != (b, c) or scores.dtype != np.float32:
                raise TeacherContractError(f"request {rid} teacher {t} replica {rep.address}: malformed reply: "
                                           f"field scores: {scores.dtype} {list(scores.shape)}, expected float32 "
                                           f"{[b, c]}", field="scores")
            self._timings.add("decode", (time.perf_counter() - t_dec) * 1e3)
            with self._lock:
                rep.failures = 0
                self._counters["calls"] += 1
                self._counters[f"calls/{t}@{rep.address}"] += 1
            return scores

    def _backoff(self, attempt: int) -> None:
        self._sleep(backoff_delay(attempt, self.settings.backoff_base_s, self.settings.backoff_max_s, self._rng))

    # -- reporting / teardown -------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Counters (calls, retries, quarantines, splits, skipped/<t>, unavailable/<t>, refresh_failures,
        refresh_held, directory_generation), replica counts and per-stage timings (encode, rpc,
        decode, score: mean/p50/p95 in ms)."""
        with self._lock:
            out = dict(self._counters)
            for t, rs in self._replicas.items():
                out[f"replicas/{t}"] = float(len(rs))
                out[f"healthy/{t}"] = float(sum(not r.quarantined for r in rs))
        out.update(self._timings.summary())
        return out

    def reset_timings(self) -> None:
        """Forget the per-stage timings so far (a benchmark's untimed warm-up); counters stay."""
        self._timings = _Timings()

    def add_timing(self, stage: str, ms: float) -> None:
        """Record a stage timing measured outside the pool (e.g. the reader's queue wait)."""
        self._timings.add(stage, ms)

    def close(self) -> None:
        self._stop.set()
        if self._bg is not None and self._pid == os.getpid():
            self._bg.join(timeout=5)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for c in self._conns.values():
            c.channel.close()
        self._conns = {}
        self._pid = -1
        for fn in self._on_close:
            fn()
        self._on_close = []

    def __enter__(self) -> "TeacherPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
