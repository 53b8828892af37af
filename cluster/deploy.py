"""Deploy teacher replicas on Ray from a YAML spec; scale one teacher while students run.

Spec (strict keys, see configs/serve_example.yaml)::

    namespace: ckd
    teachers:
      - {name: unisrec, checkpoint: runs/teachers/unisrec, replicas: 2}

``TeacherDeployment`` owns the replica actors: ``deploy()``, ``scale(name, n)``, ``reconcile()``
(apply targets set in the directory by launch/scale.py), ``shutdown()``. Replicas are placed with
the SPREAD strategy so losing one node does not take every replica of a teacher.
``start_embedded(spec)`` starts a local Ray and deploys: the default when no cluster is given.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray

from ckd.config import ConfigError, from_dict, load_yaml
from cluster.directory import get_or_create_directory
from cluster.replica import TeacherReplicaActor
from protos.contract import DIRECTORY_NAME, ServiceLimits

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TLSSpec:
    cert_chain: str = ""
    private_key: str = ""
    client_ca: str | None = None


@dataclass
class TeacherSpec:
    name: str = ""
    checkpoint: str = ""
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = -1.0  # -1: 1 GPU per replica when the cluster has GPUs, else 0
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {teacher: 1}
    torch_threads: int = 1
    expected_vocab_hash: str | None = None
    build: str = ""  # the command that (re)builds the checkpoint, named when it is missing

    def checkpoint_missing(self) -> str | None:
        """Why the checkpoint cannot be served (a missing file), or None when it is complete."""
        for part in ("config.json", "model.safetensors"):
            if not (Path(self.checkpoint) / part).is_file():
                return f"{Path(self.checkpoint) / part} not found"
        return None

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("teachers[].name is required")
        if not self.checkpoint:
            raise ConfigError(f"teachers[{self.name}].checkpoint is required")
        if self.replicas < 0:
            raise ConfigError(f"teachers[{self.name}].replicas must be >= 0, got {self.replicas}")


@dataclass
class DeploySpec:
    namespace: str = "ckd"
    directory: str = DIRECTORY_NAME
    detached_directory: bool = False
    directory_ttl_s: float = 15.0
    max_restarts: int = 3
    placement: str = "SPREAD"  # or DEFAULT
    bind_host: str = "127.0.0.1"  # 0.0.0.0 on a multi-node cluster (then use TLS + token)
    token_env: str | None = None  # name of an environment variable holding the shared token
    tls: TLSSpec | None = None
    heartbeat_s: float = 2.0
    drain_linger_s: float = 1.5  # scale-down: keep serving while clients refresh their replica list
    service: ServiceLimits = field(default_factory=ServiceLimits)
    # Modules each replica imports before loading its checkpoint: teacher kinds defined outside the
    # built-in ``teachers`` package (e.g. benchmarks.fixture_teacher) register themselves on import.
    teacher_modules: list[str] = field(default_factory=list)
    teachers: list[TeacherSpec] = field(default_factory=list)

    def validate(self) -> None:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teacher names must be unique, got {names}")
        if self.placement not in ("SPREAD", "DEFAULT"):
            raise ConfigError(f"placement must be SPREAD or DEFAULT, got {self.placement!r}")
        if self.token_env and not os.environ.get(self.token_env):
            raise ConfigError(f"token_env={self.token_env} is set but that environment variable is empty")
        try:
            self.service.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for t in self.teachers:
            t.validate()

    def check_checkpoints(self) -> None:
        """Refuse, before any Ray process starts, a spec whose checkpoints are not all there; the
        error names each missing one and the command that builds it."""
        problems = []
        for t in self.teachers:
            why = t.checkpoint_missing()
            if why:
                how = f"build it with: {t.build}" if t.build else \
                    "train it with ckd-train-teacher --config configs/teachers/<kind>.yaml --run-dir <dir>"
                problems.append(f"teacher {t.name}: {why}; {how}")
        if problems:
            raise ConfigError("teacher checkpoint(s) missing:\n  " + "\n  ".join(problems))

    def teacher(self, name: str) -> TeacherSpec:
        for t in self.teachers:
            if t.name == name:
                return t
        raise ConfigError(f"no teacher {name!r} in the spec; known: {[t.name for t in self.teachers]}")

    @property
    def token(self) -> str | None:
        return os.environ.get(self.token_env) if self.token_env else None


def load_spec(spec: str | os.PathLike[str] | dict[str, Any] | DeploySpec, check_checkpoints: bool = True
              ) -> DeploySpec:
    """A validated DeploySpec from a YAML path, a mapping or a DeploySpec, checkpoints resolved to
    absolute paths; with ``check_checkpoints`` every checkpoint must exist (ConfigError otherwise)."""
    if isinstance(spec, DeploySpec):
        out = spec
    else:
        data = load_yaml(spec) if not isinstance(spec, dict) else spec
        out = from_dict(DeploySpec, data)
    for t in out.teachers:
        t.checkpoint = str(Path(t.checkpoint).expanduser().resolve())
    out.validate()
    if check_checkpoints:
        out.check_checkpoints()
    return out


class TeacherDeployment:
    """Replica actors of every teacher in a spec, on the Ray cluster this process is connected to."""

    def __init__(self, spec: str | os.PathLike[str] | dict[str, Any] | DeploySpec):
        if not ray.is_initialized():
            raise RuntimeError("TeacherDeployment needs ray.init(...) first (or use start_embedded)")
        self.spec = load_spec(spec)
        self.namespace = self.spec.namespace
        self.directory = get_or_create_directory(self.namespace, self.spec.directory,
                                                 self.spec.detached_directory, self.spec.directory_ttl_s)
        self._replicas: dict[str, list[tuple[str, Any]]] = {t.name: [] for t in self.spec.teachers}
        self._serial: dict[str, int] = {t.name: 0 for t in self.spec.teachers}
        self._owns_ray = False
        gpus = ray.cluster_resources().get("GPU", 0)
        self._has_gpus = gpus > 0

    # -- lifecycle -----------------------------------------------------------------------------
    def deploy(self, timeout: float = 300.0) -> dict[str, list[str]]:
        """Start every teacher's replicas; returns {teacher: [address]} once all are SERVING."""
        for t in self.spec.teachers:
            ray.get(self.directory.set_target.remote(t.name, t.replicas))
        self.reconcile(timeout=timeout)
        return self.endpoints()

    def _start_replica(self, t: TeacherSpec) -> tuple[str, Any]:
        rid = f"{t.name}-{self._serial[t.name]}"
        self._serial[t.name] += 1
        num_gpus = (1.0 if self._has_gpus else 0.0) if t.num_gpus < 0 else t.num_gpus
        opts: dict[str, Any] = dict(num_cpus=t.num_cpus, num_gpus=num_gpus, resources=dict(t.resources),
                                    max_restarts=self.spec.max_restarts, max_task_retries=0,
                                    name=f"ckd-replica/{rid}", namespace=self.namespace)
        if self.spec.placement == "SPREAD":
            opts["scheduling_strategy"] = "SPREAD"
        tls = None
        if self.spec.tls is not None:
            tls = {"cert_chain": self.spec.tls.cert_chain, "private_key": self.spec.tls.private_key,
                   "client_ca": self.spec.tls.client_ca}
        actor = TeacherReplicaActor.options(**opts).remote(
            t.name, t.checkpoint, rid, self.namespace, directory=self.spec.directory,
            service=asdict(self.spec.service), teacher_modules=list(self.spec.teacher_modules), bind_host=self.spec.bind_host, token=self.spec.token,
            tls=tls, heartbeat_s=self.spec.heartbeat_s, torch_threads=t.torch_threads,
            expected_vocab_hash=t.expected_vocab_hash)
        return rid, actor

    def scale(self, name: str, replicas: int, timeout: float = 300.0) -> list[str]:
        """Set a teacher's replica count (up: start and wait SERVING; down: drain, then kill)."""
        self.spec.teacher(name)
        ray.get(self.directory.set_target.remote(name, replicas))
        self.reconcile(timeout=timeout)
        return self.endpoints()[name]

    def reconcile(self, timeout: float = 300.0) -> bool:
        """Bring each teacher to its target count from the directory; True if anything changed."""
        targets = ray.get(self.directory.targets.remote())
        changed = False
        starting = []
        for t in self.spec.teachers:
            want = targets.get(t.name, t.replicas)
            have = self._replicas[t.name]
            while len(have) < want:
                rid, actor = self._start_replica(t)
                have.append((rid, actor))
                starting.append((rid, actor))
                changed = True
            victims = []
            while len(have) > want:
                victims.append(have.pop())
                changed = True
            if victims:
                # Drain concurrently: each stops taking new work, finishes what it has, then dies.
                drains = [a.drain.remote(30.0, self.spec.drain_linger_s) for _, a in victims]
                try:
                    ray.get(drains, timeout=60)
                except Exception as exc:  # noqa: BLE001 — a dead replica cannot drain; kill it anyway
                    log.warning("drain of %s failed: %r", [r for r, _ in victims], exc)
                for rid, a in victims:
                    ray.kill(a, no_restart=True)
                    log.info("replica %s removed", rid)
        if starting:
            ray.get([a.info.remote() for _, a in starting], timeout=timeout)
        if changed:
            t_end = time.monotonic() + 30
            # The directory lists exactly the kept replicas once new ones registered.
            while time.monotonic() < t_end:
                snap = ray.get(self.directory.snapshot.remote(list(self._replicas)))
                if all(len(snap[n]) == len(self._replicas[n]) for n in self._replicas):
                    break
                time.sleep(0.1)
        return changed

    def endpoints(self) -> dict[str, list[str]]:
        return ray.get(self.directory.snapshot.remote(list(self._replicas)))

    def replica_handles(self, name: str) -> list[tuple[str, Any]]:
        """(replica_id, actor handle) of a teacher's replicas (tests kill them to check recovery)."""
        return list(self._replicas[name])

    def infos(self, name: str) -> list[dict[str, Any]]:
        return ray.get([a.info.remote() for _, a in self._replicas[name]], timeout=60)

    def shutdown(self) -> None:
        """Kill every replica (and the directory unless detached); stop Ray if start_embedded started it."""
        for reps in self._replicas.values():
            for _, a in reps:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 — already gone
                    pass
            reps.clear()
        if not self.spec.detached_directory:
            try:
                ray.kill(self.directory, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


def start_embedded(spec_path_or_dict: str | os.PathLike[str] | dict[str, Any] | DeploySpec,
                   num_cpus: int | None = None) -> tuple[str, TeacherDeployment]:
    """Start a local Ray (no dashboard) and deploy the spec; returns (GCS address, deployment).

    Other processes connect with ``ray.init(address=...)`` or ``TeacherPool.from_ray(address, ...)``.
    """
    spec = load_spec(spec_path_or_dict)
    owns = False
    if not ray.is_initialized():
        # Workers import the project from this checkout even when it is not pip-installed.
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=spec.namespace, logging_level="WARNING",
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        owns = True
    try:
        dep = TeacherDeployment(spec)
        dep._owns_ray = owns
        dep.deploy()
    except BaseException:
        if owns:
            ray.shutdown()
        raise
    return ray.get_runtime_context().gcs_address, dep
