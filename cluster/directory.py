"""The directory of live teacher replicas: a named Ray actor, one per deployment namespace.

Replicas register ``(teacher, replica_id) -> address`` after their server is SERVING and heartbeat
every few seconds; an entry not refreshed within ``ttl_s`` is dropped (a replica lost with its
node), and a heartbeat for an unknown entry returns False so the replica registers again. Clients
read ``view`` (or ``snapshot``); ``targets`` hold desired replica counts that ``launch/scale.py``
sets and the deployment owner reconciles.

The actor restarts forever, and its state outlives it: targets and registered entries are written
through to Ray's GCS key-value store (``ray.experimental.internal_kv``) on every change and read back
when the actor (re)starts, so an operator's scale-down survives a directory restart and the
restarted directory lists the replicas it knew instead of an empty list. Restored entries count as
fresh until ``ttl_s`` passes without a heartbeat. For ``warmup_s`` after a restart the directory
reports ``settled: False``; clients then add replicas but never drop the ones they know.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import ray

from protos.contract import DIRECTORY_NAME

log = logging.getLogger(__name__)
KV_NAMESPACE = b"ckd-directory"


def state_key(namespace: str, name: str = DIRECTORY_NAME) -> bytes:
    """The GCS key-value key holding the persisted state of directory ``name`` in ``namespace``."""
    return f"{namespace}/{name}".encode()


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def read_state(key: bytes) -> dict[str, Any] | None:
    """The persisted directory state under ``key`` (None when absent or unreadable)."""
    try:
        raw = _kv()._internal_kv_get(key, namespace=KV_NAMESPACE)
        return json.loads(raw) if raw else None
    except Exception as exc:  # noqa: BLE001 — a corrupt or unreachable record must not stop the directory
        log.warning("directory state %r unreadable: %r", key, exc)
        return None


def delete_state(key: bytes) -> None:
    """Forget a directory's persisted state (its deployment shut down)."""
    try:
        _kv()._internal_kv_del(key, namespace=KV_NAMESPACE)
    except Exception as exc:  # noqa: BLE001 — Ray may already be going down
        log.debug("directory state %r not deleted: %r", key, exc)


class TeacherDirectory:
    def __init__(self, ttl_s: float = 15.0, key: bytes | None = None, owner: str = "", warmup_s: float = 0.0):
        """``key``: where the state persists (None: memory only); ``owner``: the deployment that
        created this directory, so a new deployment never inherits a dead one's replicas;
        ``warmup_s``: how long after a restart the directory calls itself unsettled."""
        self.ttl_s = float(ttl_s)
        self.key, self.owner, self.warmup_s = key, owner, float(warmup_s)
        self._entries: dict[str, dict[str, dict[str, Any]]] = {}
        self._targets: dict[str, int] = {}
        self._version = 0
        self._generation = 1
        self._last_targets_read: float | None = None
        self._born = time.monotonic()
        state = read_state(key) if key is not None else None
        if state is not None and state.get("owner") == owner:
            now = time.monotonic()
            self._targets = {t: int(n) for t, n in state.get("targets", {}).items()}
            self._entries = {t: {r: {"address": e["address"], "meta": dict(e.get("meta", {})), "seen": now}
                                 for r, e in reps.items()} for t, reps in state.get("entries", {}).items()}
            self._generation = int(state.get("generation", 1)) + 1
            log.warning("teacher directory restarted (generation %d): restored targets %s and %d replica(s)",
                        self._generation, self._targets, sum(len(r) for r in self._entries.values()))
        self._persist()

    # -- persistence ---------------------------------------------------------------------------
    def _persist(self) -> None:
        if self.key is None:
            return
        state = {"owner": self.owner, "generation": self._generation, "targets": self._targets,
                 "entries": {t: {r: {"address": e["address"], "meta": e["meta"]} for r, e in reps.items()}
                             for t, reps in self._entries.items()}}
        try:
            _kv()._internal_kv_put(self.key, json.dumps(state), overwrite=True, namespace=KV_NAMESPACE)
        except Exception as exc:  # noqa: BLE001 — keep serving from memory; the next change retries
            log.warning("directory state not persisted: %r", exc)

    def _expire(self) -> None:
        if self.ttl_s <= 0:
            return
        now = time.monotonic()
        gone = False
        for t, reps in self._entries.items():
            for rid in [r for r, e in reps.items() if now - e["seen"] > self.ttl_s]:
                del reps[rid]
                self._version += 1
                gone = True
        if gone:
            self._persist()

    # -- replicas ------------------------------------------------------------------------------
    def register(self, teacher: str, replica_id: str, address: str, meta: dict[str, Any] | None = None) -> int:
        """Add or replace a replica's entry (a restarted replica comes back with a new port)."""
        self._entries.setdefault(teacher, {})[replica_id] = {"address": address, "meta": dict(meta or {}),
                                                             "seen": time.monotonic()}
        self._version += 1
        self._persist()
        return self._version

    def deregister(self, teacher: str, replica_id: str) -> bool:
        gone = self._entries.get(teacher, {}).pop(replica_id, None) is not None
        if gone:
            self._version += 1
            self._persist()
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

    def settled(self) -> bool:
        """False for ``warmup_s`` after a restart: replicas may still be re-registering."""
        return self._generation == 1 or time.monotonic() - self._born >= self.warmup_s

    def view(self, teachers: list[str] | None = None) -> dict[str, Any]:
        """What clients read: {"endpoints": snapshot, "generation": restarts + 1, "settled": bool}."""
        return {"endpoints": self.snapshot(teachers), "generation": self._generation, "settled": self.settled()}

    def replicas(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Full view: {teacher: {replica_id: {address, meta, age_s}}}."""
        self._expire()
        now = time.monotonic()
        return {t: {r: {"address": e["address"], "meta": e["meta"], "age_s": now - e["seen"]}
                    for r, e in reps.items()} for t, reps in self._entries.items()}

    # -- targets -------------------------------------------------------------------------------
    def set_target(self, teacher: str, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"replica count must be >= 0, got {replicas}")
        self._targets[teacher] = int(replicas)
        self._persist()  # written through before the caller hears it is set

    def targets(self) -> dict[str, int]:
        """Desired replica counts; reading them marks a reconcile (see ``reconciled_age``)."""
        self._last_targets_read = time.monotonic()
        return dict(self._targets)

    def teachers(self) -> list[str]:
        """Every teacher this directory knows (targets set at deploy, or registered replicas)."""
        return sorted(set(self._targets) | {t for t, reps in self._entries.items() if reps})

    def reconciled_age(self) -> float | None:
        """Seconds since an owner last read the targets (None: never since this directory started)."""
        return None if self._last_targets_read is None else time.monotonic() - self._last_targets_read

    def version(self) -> int:
        return self._version

    def generation(self) -> int:
        return self._generation


def get_or_create_directory(namespace: str, name: str = DIRECTORY_NAME, detached: bool = False,
                            ttl_s: float = 15.0, owner: str = "", warmup_s: float = 0.0,
                            persist: bool = True) -> "ray.actor.ActorHandle":
    """The named directory actor in ``namespace``, created if it does not exist yet.

    A detached directory outlives the driver that created it (a long-lived cluster); otherwise it
    dies with its creator (embedded mode, tests). It restarts forever, restoring its targets and
    entries from the GCS key-value store (``persist``); replicas heartbeat or re-register.
    """
    opts: dict[str, Any] = dict(name=name, namespace=namespace, get_if_exists=True, num_cpus=0, max_restarts=-1)
    if detached:
        opts["lifetime"] = "detached"
    key = state_key(namespace, name) if persist else None
    return ray.remote(TeacherDirectory).options(**opts).remote(ttl_s, key, owner, warmup_s)
