"""The one Python home of the teacher-service contract, imported by server, client and deployment.

``teacher.proto`` fixes the bytes on the wire; this module fixes everything both sides must agree
on around them, so neither keeps a copy that can drift:

- names: the gRPC service name (health checks use it), the directory actor's default name, the
  metadata key that carries the shared token;
- errors: ``TeacherContractError`` (a request or a teacher does not fit: fail fast) and
  ``TeacherUnavailable`` (no replica answered: retry, skip or wait by policy);
- ``TeacherInfo``: what a teacher says about itself (``Describe``), on both sides of the wire;
- ``ServiceLimits``: the limits a server enforces and advertises, its memory budget (the formula is
  in its docstring) and its batching budget;
- how a process reaches a Ray that listens on loopback only (``use_ray_loopback_mode``,
  ``join_ray``): the embedded default starts one, and every process that joins it must agree.

It imports nothing from ``teachers``, ``cluster`` or ``student``: the student reaches the teachers
only through ``protos``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from protos import teacher_pb2

# The fully qualified service name, as generated from teacher.proto (package ckd.teacher.v1).
SERVICE_NAME: str = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"].full_name
# Default name of the Ray actor that lists live replicas (one per deployment namespace).
DIRECTORY_NAME = "ckd_teacher_directory"
# Call metadata key of the shared token: ``authorization: Bearer <token>``.
AUTH_METADATA_KEY = "authorization"


class TeacherContractError(ValueError):
    """A teacher, checkpoint or request does not fit the other side: another item vocabulary or
    size, a malformed request or reply, or a request the server refused as invalid. ``field`` names
    the offending message field when one is to blame (e.g. ``"scores"`` of a ScoreReply)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class TeacherUnavailable(RuntimeError):
    """No replica of a teacher answered within the retry / wait budget."""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the shared token (empty when no token is set)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class ServiceLimits:
    """Limits of one teacher server, its memory budget and its batching budget.

    The first four are enforced on every Score call (INVALID_ARGUMENT beyond them) and advertised
    by Describe, so clients size requests before sending; the message limit is set explicitly and
    equally on both ends (gRPC's 4 MB default is easy to hit with score matrices).
    ``max_gather_bytes`` bounds the candidate embeddings the scoring gathers at once: per-row
    candidates ([B, C]) are scored in blocks of rows (of columns, when one row alone is over the
    budget) and shared ones ([C]) in blocks of columns, so a request never gathers its whole
    [B, C, D] tensor; Describe advertises it too. The rest is the server's own queue and batching budget.

    Memory budget of one replica (an upper bound; ``replica_bytes`` computes it), with
    R = max_message_bytes, S = 4 * max_score_cells (one float32 [B, C] reply),
    G = max(max_gather_bytes, E) and E = D * itemsize (one item embedding)::

        replica  <=  resident + max_workers * (3R + 3S) + (2G + S) + encoder + M

    - resident: interpreter, torch, the weights and the item tables (num_items * E each; UniSRec
      keeps two, its adapted text and its item representation);
    - 3R + 3S per Score call in flight (at most max_workers run at once: a gRPC handler thread
      starts receiving a message only when it takes the call; calls still waiting hold only what
      HTTP/2 flow control lets gRPC buffer): the received message, its bytes and its ids widened to
      int64, then the scores, their encoded bytes and the serialised reply;
    - 2G + S for the scoring, which one batcher thread runs one request at a time: one gathered
      block, one copy of it (the cosine teachers normalise it) and the [B, C] scores it fills;
      + G/2 for a teacher served in bfloat16/float16, whose autocast product takes a 16-bit copy of
      the block;
    - encoder: the teacher's own activations for one coalesced batch of histories (model-specific;
      the text teachers encode 128 rows at a time);
    - M = history_memo_bytes, the memo of history representations (0 when off).
    """

    max_batch_rows: int = 4096
    max_candidates: int = 65536
    max_score_cells: int = 8 * 1024 * 1024  # B*C; 32 MiB of float32 scores
    max_message_bytes: int = 64 * 1024 * 1024
    max_gather_bytes: int = 64 * 1024 * 1024  # candidate embeddings gathered at once while scoring
    coalesce_max_rows: int = 1024  # stop collecting requests once this many rows are queued
    coalesce_wait_ms: float = 0.0  # ... or once the first has waited this long (0: take what is queued)
    max_queue_rows: int = 65536  # beyond this many waiting rows: RESOURCE_EXHAUSTED
    max_workers: int = 16  # gRPC handler threads (they mostly wait on the batcher)
    # Bytes of history representations a replica may keep (teachers/history_memo.py): a history
    # seen before (the same training row, next epoch) is not encoded again. 0: off.
    history_memo_bytes: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for f in fields(self):
            if f.name not in ("coalesce_wait_ms", "history_memo_bytes") and getattr(self, f.name) < 1:
                raise ValueError(f"service.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.coalesce_wait_ms < 0:
            raise ValueError(f"service.coalesce_wait_ms must be >= 0, got {self.coalesce_wait_ms}")
        if self.history_memo_bytes < 0:
            raise ValueError(f"service.history_memo_bytes must be >= 0 (0: off), got {self.history_memo_bytes}")
        if self.max_score_cells * 4 + 4096 > self.max_message_bytes:
            raise ValueError(f"service.max_score_cells={self.max_score_cells} float32 scores do not fit "
                             f"in service.max_message_bytes={self.max_message_bytes}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The message limits as gRPC channel/server options (the same on both ends)."""
        return grpc_message_options(self.max_message_bytes)

    def gather_bytes(self, embedding_bytes: int) -> int:
        """G: the most bytes one gathered block takes (a block holds at least one embedding)."""
        return max(self.max_gather_bytes, embedding_bytes)

    def scoring_bytes(self, embedding_bytes: int, precision: str = "float32") -> int:
        """2G + S: the scoring's working set for one request inside these limits; 2G + G/2 + S when
        the teacher serves in a 16-bit precision (autocast adds a half-size copy of the block)."""
        g = self.gather_bytes(embedding_bytes)
        return 2 * g + (g // 2 if precision != "float32" else 0) + 4 * self.max_score_cells

    def call_bytes(self) -> int:
        """3R + 3S: what one Score call in flight holds outside the scoring."""
        return 3 * self.max_message_bytes + 3 * 4 * self.max_score_cells

    def replica_bytes(self, embedding_bytes: int, resident_bytes: int = 0, encoder_bytes: int = 0,
                      precision: str = "float32") -> int:
        """The memory budget of one replica (formula in the class docstring)."""
        return resident_bytes + self.max_workers * self.call_bytes() \
            + self.scoring_bytes(embedding_bytes, precision) + encoder_bytes + self.history_memo_bytes

    @classmethod
    def from_mapping(cls, values: dict[str, Any] | None) -> "ServiceLimits":
        """From a plain mapping (e.g. handed to a Ray actor); unknown keys are a ValueError."""
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown service setting(s) {unknown}; known: {sorted(known)}")
        return replace(cls(), **values)


def grpc_message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """gRPC options that set both message-size limits explicitly."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


@dataclass(frozen=True)
class TeacherInfo:
    """What a teacher says about itself: checked by the student against its own data at start-up.

    ``num_items`` counts PAD (valid ids are 1..num_items-1). A history longer than ``max_history``
    is cut by the server to its last ``max_history`` items (the most recent), never refused:
    ``cuts_long_histories`` says so on the wire. ``replicas`` and the ``max_*`` limits are filled
    in on the client side from the replicas' Describe replies (0 = unknown).
    """

    name: str
    version: str
    vocab_hash: str
    num_items: int
    temperature: float
    max_history: int
    checkpoint_sha256: str = ""
    kind: str = ""
    replicas: int = 0
    max_batch_rows: int = 0
    max_candidates: int = 0
    max_message_bytes: int = 0
    max_score_cells: int = 0
    max_gather_bytes: int = 0
    cuts_long_histories: bool = False

    def to_proto(self, name: str | None = None, limits: ServiceLimits | None = None
                 ) -> teacher_pb2.TeacherDescription:
        """The Describe reply of a server serving this teacher as ``name`` under ``limits``."""
        lim = limits or ServiceLimits()
        return teacher_pb2.TeacherDescription(
            name=name or self.name, version=self.version, vocab_hash=self.vocab_hash, num_items=self.num_items,
            temperature=self.temperature, max_history=self.max_history,
            checkpoint_sha256=self.checkpoint_sha256, kind=self.kind, max_batch_rows=lim.max_batch_rows,
            max_candidates=lim.max_candidates, max_message_bytes=lim.max_message_bytes,
            max_score_cells=lim.max_score_cells, max_gather_bytes=lim.max_gather_bytes,
            cuts_long_histories=True)  # the server keeps the last max_history items of a longer row

    @classmethod
    def from_proto(cls, d: teacher_pb2.TeacherDescription, replicas: int = 0) -> "TeacherInfo":
        """The client's view of a Describe reply (``replicas``: how many replicas agreed on it).

        A reply no teacher could have sent is a TeacherContractError naming the field."""
        def bad(field: str, why: str) -> TeacherContractError:
            return TeacherContractError(f"malformed Describe reply from teacher {d.name!r}: field {field}: {why}",
                                        field=field)

        if int(d.num_items) < 2:
            raise bad("num_items", f"{d.num_items} (a teacher needs PAD and at least one item)")
        if int(d.max_history) < 1:
            raise bad("max_history", f"{d.max_history} (must be >= 1)")
        if not math.isfinite(d.temperature) or d.temperature <= 0:
            raise bad("temperature", f"{d.temperature} (must be finite and > 0)")
        for f in ("max_batch_rows", "max_candidates", "max_message_bytes", "max_score_cells", "max_gather_bytes"):
            if int(getattr(d, f)) < 0:
                raise bad(f, f"{getattr(d, f)} (must be >= 0; 0 = not advertised)")
        return cls(d.name, d.version, d.vocab_hash, int(d.num_items), float(d.temperature), int(d.max_history),
                   d.checkpoint_sha256, d.kind, int(replicas), int(d.max_batch_rows), int(d.max_candidates),
                   int(d.max_message_bytes), int(d.max_score_cells), int(d.max_gather_bytes),
                   bool(d.cuts_long_histories))
