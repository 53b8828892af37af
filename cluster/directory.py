"""The directory of live teacher replicas: a named Ray actor, one per deployment namespace.

Replicas register ``(teacher, replica_id) -> address`` after their server is SERVING and heartbeat
every few seconds; an entry not refreshed within ``ttl_s`` is dropped (a replica lost with its
node), and a heartbeat for an unknown entry returns False so the replica registers again (after a
directory restart). Clients read ``snapshot``; ``targets`` hold desired replica counts that
``launch/scale.py`` sets and the deployment owner reconciles.
"""
from __future__ import annotations

import time
from typing import Any

import ray

from protos.contract import DIRECTORY_NAME


class TeacherDirectory:
    def __init__(self, ttl_s: float = 15.0):
        self.ttl_s = float(ttl_s)
        self._entries: dict[str, dict[str, dict[str, Any]]] = {}
        self._targets: dict[str, int] = {}
        self._version = 0

    def _expire(self) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        for t, reps in self._entries.items():
            for rid in [r for r, e in reps.items() if now - e["seen"] > self.ttl_s]:
                del reps[rid]
                self._version += 1

    def register(self, teacher: str, replica_id: str, address: str, meta: dict[str, Any] | None = None) -> int:
        """Add or replace a replica's entry (a restarted replica comes back with a new port)."""
        self._entries.setdefault(teacher, {})[replica_id] = {"address": address, "meta": dict(meta or {}),
                                                             "seen": time.monotonic()}
        self._version += 1
        return self._version

    def deregister(self, teacher: str, replica_id: str) -> bool:
        gone = self._entries.get(teacher, {}).pop(replica_id, None) is not None
        if gone:
            self._version += 1
        return gone

    def heartbeat(self, teacher: str, replica_id: str, address: str) -> bool:
        """Refresh an entry; False means the directory does not know it (re-register)."""
        e = self._entries.get(teacher, {}).get(replica_id)
        if e is None or e["address"] != address:
            return False
        e["seen"] = time.monotonic()
        return True

    def endpoints(self, teacher: str) -> list[str]:
        self._expire()
        reps = self._entries.get(teacher, {})
        return [reps[r]["address"] for r in sorted(reps)]

    def snapshot(self, teachers: list[str] | None = None) -> dict[str, list[str]]:
        """{teacher: [address, ...]} for the named teachers (all when None)."""
        self._expire()
        names = teachers if teachers is not None else sorted(self._entries)
        return {t: self.endpoints(t) for t in names}

    def replicas(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Full view: {teacher: {replica_id: {address, meta, age_s}}}."""
        self._expire()
        now = time.monotonic()
        return {t: {r: {"address": e["address"], "meta": e["meta"], "age_s": now - e["seen"]}
                    for r, e in reps.items()} for t, reps in self._entries.items()}

    def set_target(self, teacher: str, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replica count must be >= 0, got {replicas}")
        self._targets[teacher] = int(replicas)

    def targets(self) -> dict[str, int]:
        return dict(self._targets)

    def version(self) -> int:
        return self._version


def get_or_create_directory(namespace: str, name: str = DIRECTORY_NAME, detached: bool = False,
                            ttl_s: float = 15.0) -> "ray.actor.ActorHandle":
    """The named directory actor in ``namespace``, created if it does not exist yet.

    A detached directory outlives the driver that created it (a long-lived cluster); otherwise it
    dies with its creator (embedded mode, tests). It restarts forever; replicas re-register.
    """
    opts: dict[str, Any] = dict(name=name, namespace=namespace, get_if_exists=True, num_cpus=0, max_restarts=-1)
    if detached:
        opts["lifetime"] = "detached"
    return ray.remote(TeacherDirectory).options(**opts).remote(ttl_s)
