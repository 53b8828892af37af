"""The one Python home of the teacher-service contract, imported by server, client and deployment.

``teacher.proto`` fixes the bytes on the wire; this module fixes everything both sides must agree
on around them, so neither keeps a copy that can drift:

- names: the gRPC service name (health checks use it), the directory actor's default name, the
  metadata key that carries the shared token;
- errors: ``TeacherContractError`` (a request or a teacher does not fit: fail fast) and
  ``TeacherUnavailable`` (no replica answered: retry, skip or wait by policy);
- ``TeacherInfo``: what a teacher says about itself (``Describe``), on both sides of the wire;
- ``ServiceLimits``: the limits a server enforces and advertises, plus its batching budget.

It imports nothing from ``teachers``, ``cluster`` or ``student``: the student reaches the teachers
only through ``protos``.
"""
from __future__ import annotations

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
    size, a malformed request or reply, or a request the server refused as invalid."""


class TeacherUnavailable(RuntimeError):
    """No replica of a teacher answered within the retry / wait budget."""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the shared token (empty when no token is set)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


@dataclass(frozen=True)
class ServiceLimits:
    """Limits of one teacher server and its batching budget.

    The first four are enforced on every Score call (INVALID_ARGUMENT beyond them) and advertised
    by Describe, so clients size requests before sending; the message limit is set explicitly and
    equally on both ends (gRPC's 4 MB default is easy to hit with score matrices). The rest is the
    server's own queue and batching budget.
    """

    max_batch_rows: int = 4096
    max_candidates: int = 65536
    max_score_cells: int = 8 * 1024 * 1024  # B*C; 32 MiB of float32 scores
    max_message_bytes: int = 64 * 1024 * 1024
    coalesce_max_rows: int = 1024  # stop collecting requests once this many rows are queued
    coalesce_wait_ms: float = 0.0  # ... or once the first has waited this long (0: take what is queued)
    max_queue_rows: int = 65536  # beyond this many waiting rows: RESOURCE_EXHAUSTED
    max_workers: int = 16  # gRPC handler threads (they mostly wait on the batcher)

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        for f in fields(self):
            if f.name != "coalesce_wait_ms" and getattr(self, f.name) < 1:
                raise ValueError(f"service.{f.name} must be >= 1, got {getattr(self, f.name)}")
        if self.coalesce_wait_ms < 0:
            raise ValueError(f"service.coalesce_wait_ms must be >= 0, got {self.coalesce_wait_ms}")
        if self.max_score_cells * 4 + 4096 > self.max_message_bytes:
            raise ValueError(f"service.max_score_cells={self.max_score_cells} float32 scores do not fit "
                             f"in service.max_message_bytes={self.max_message_bytes}")

    def grpc_options(self) -> list[tuple[str, int]]:
        """The message limits as gRPC channel/server options (the same on both ends)."""
        return grpc_message_options(self.max_message_bytes)

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

    ``num_items`` counts PAD (valid ids are 1..num_items-1). ``replicas`` and the ``max_*`` limits
    are filled in on the client side from the replicas' Describe replies (0 = unknown).
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

    def to_proto(self, name: str | None = None, limits: ServiceLimits | None = None
                 ) -> teacher_pb2.TeacherDescription:
        """The Describe reply of a server serving this teacher as ``name`` under ``limits``."""
        lim = limits or ServiceLimits()
        return teacher_pb2.TeacherDescription(
            name=name or self.name, version=self.version, vocab_hash=self.vocab_hash, num_items=self.num_items,
            temperature=self.temperature, max_history=self.max_history,
            checkpoint_sha256=self.checkpoint_sha256, kind=self.kind, max_batch_rows=lim.max_batch_rows,
            max_candidates=lim.max_candidates, max_message_bytes=lim.max_message_bytes)

    @classmethod
    def from_proto(cls, d: teacher_pb2.TeacherDescription, replicas: int = 0) -> "TeacherInfo":
        """The client's view of a Describe reply (``replicas``: how many replicas agreed on it)."""
        return cls(d.name, d.version, d.vocab_hash, int(d.num_items), float(d.temperature), int(d.max_history),
                   d.checkpoint_sha256, d.kind, int(replicas), int(d.max_batch_rows), int(d.max_candidates),
                   int(d.max_message_bytes))
