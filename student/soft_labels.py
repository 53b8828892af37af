"""Prefetching soft-label reader: teacher latency overlaps student compute.

``SoftLabelReader`` wraps an iterable of student batches. It submits Score requests for the next
``window`` batches in the background through a TeacherPool (at most ``window`` in flight), puts
replies into a reorder buffer keyed by request id, and yields ``(batch, {teacher: scores | None})``
strictly in input order. A failed request re-raises its error when its batch comes up.

``finish(batch, labels)``, when given, runs in the same prefetch thread once a batch's scores have
arrived, and its return value is what the batch is yielded with: work that depends on the scores but
not on the student (the teachers' side of the KD term) then overlaps the student's steps.
``thread_cpus`` pins the prefetch threads (only them) to a core set of their own.
"""
from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Generic, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from ckd.affinity import pin_thread

T = TypeVar("T")
Request = tuple[np.ndarray, np.ndarray, np.ndarray]
Labels = dict[str, "np.ndarray | None"]


class ReorderBuffer:
    """Holds results that arrive in any order; ``pop(i)`` waits for request id ``i``."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[bool, Any]] = {}
        self._cv = threading.Condition()

    def put(self, rid: int, value: Any, ok: bool = True) -> None:
        with self._cv:
            if rid in self._items:
                raise KeyError(f"request id {rid} delivered twice")
            self._items[rid] = (ok, value)
            self._cv.notify_all()

    def pop(self, rid: int, timeout: float | None = None) -> Any:
        with self._cv:
            if not self._cv.wait_for(lambda: rid in self._items, timeout=timeout):
                raise TimeoutError(f"request id {rid} not delivered within {timeout} s")
            ok, value = self._items.pop(rid)
        if not ok:
            raise value
        return value

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)


class SoftLabelReader(Generic[T]):
    """Iterable of ``(batch, {teacher_name: float32 [B, C] or None})`` in input order."""

    def __init__(self, batches: Iterable[T], pool: Any, make_request: Callable[[T], Request | None], window: int = 4,
                 first_request_id: int = 0, finish: Callable[[T, Labels], Any] | None = None,
                 thread_cpus: Sequence[int] | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.batches, self.pool, self.make_request, self.window = batches, pool, make_request, window
        self.first_request_id = first_request_id
        self.finish = finish
        self.thread_cpus = list(thread_cpus) if thread_cpus else None
        self.wait_ms: list[float] = []  # time the consumer waited for each batch's labels

    def __iter__(self) -> Iterator[tuple[T, Labels]]:
        src = iter(self.batches)
        buf = ReorderBuffer()
        pending: dict[int, T] = {}
        futures: list[Future] = []
        next_submit = next_yield = self.first_request_id
        exhausted = False
        pin = functools.partial(pin_thread, self.thread_cpus) if self.thread_cpus else None
        with ThreadPoolExecutor(max_workers=self.window, thread_name_prefix="soft-labels", initializer=pin) as ex:
            try:
                while True:
                    # Keep `window` requests in flight (bounded: the window is the only queue).
                    while not exhausted and next_submit - next_yield < self.window:
                        try:
                            batch = next(src)
                        except StopIteration:
                            exhausted = True
                            break
                        pending[next_submit] = batch
                        futures.append(ex.submit(self._fetch, buf, next_submit, batch))
                        next_submit += 1
                    if next_yield == next_submit:
                        return
                    t0 = time.perf_counter()
                    labels = buf.pop(next_yield)
                    waited = (time.perf_counter() - t0) * 1e3
                    self.wait_ms.append(waited)
                    add = getattr(self.pool, "add_timing", None)
                    if add is not None:
                        add("label_wait", waited)
                    batch = pending.pop(next_yield)
                    next_yield += 1
                    yield batch, labels
            finally:
                for f in futures:
                    f.cancel()

    def _fetch(self, buf: ReorderBuffer, rid: int, batch: T) -> None:
        try:
            req = self.make_request(batch)
            # None: no row of this batch is covered by the teachers, so there is nothing to ask.
            labels = {} if req is None else self.pool.score(*req, request_id=rid)
            buf.put(rid, labels if self.finish is None else self.finish(batch, labels))
        except BaseException as exc:  # noqa: BLE001 — delivered to the consumer in order
            buf.put(rid, exc, ok=False)
