"""Deploy teacher replicas on Ray from a YAML spec; scale one teacher while students run.

Spec (strict keys, see configs/serve_example.yaml)::

    namespace: ckd
    teachers:
      - {name: unisrec, checkpoint: runs/teachers/unisrec, replicas: 2}

``TeacherDeployment`` owns the replica actors: ``deploy()``, ``scale(name, n)``, ``reconcile()``
(apply targets set in the directory by launch/scale.py), ``serve_forever()`` (the reconcile loop of
launch/serve.py), ``shutdown()``. Replicas are placed with the SPREAD strategy so losing one node
does not take every replica of a teacher. ``start_embedded(spec)`` starts a local Ray and deploys:
the default when no cluster is given.

The directory actor may restart at any time (it restarts forever and restores its state from the
GCS key-value store, see cluster/directory.py). Every call the deployment makes to it goes through
``_dir_call``, which retries with backoff while the actor is unavailable, so a directory restart
costs the reconcile loop a logged retry, never the replicas.

A spec that binds the teacher servers beyond loopback must set both ``token_env`` and ``tls``; the
only way around that is ``allow_insecure_bind: true``, which logs a warning at every load.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

from ckd.config import ConfigError, from_dict, load_yaml
from cluster.directory import delete_state, get_or_create_directory, state_key
from cluster.replica import TeacherReplicaActor
from protos.contract import DIRECTORY_NAME, ServiceLimits

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
# What a directory restart looks like to a caller: calls in flight fail with ActorUnavailableError
# (a RayActorError), calls to an actor that is not back yet may time out.
DIRECTORY_TRANSIENT = (RayActorError, GetTimeoutError)


class DirectoryUnavailable(RuntimeError):
    """The directory actor did not answer within the retry budget (it is restarting or gone)."""


def call_directory(handle: Any, method: str, *args: Any, budget_s: float = 30.0, timeout: float = 10.0,
                   reconnect: Callable[[], Any] | None = None,
                   on_retry: Callable[[BaseException], None] | None = None) -> Any:
    """``handle.method(*args)``, riding out a directory restart: retry with backoff for ``budget_s``
    (then DirectoryUnavailable). When the actor died for good, ``reconnect()`` returns the handle to
    use next (the one by that name, created again if need be)."""
    end = time.monotonic() + budget_s
    attempt = 0
    while True:
        try:
            return ray.get(getattr(handle, method).remote(*args), timeout=timeout)
        except DIRECTORY_TRANSIENT as exc:
            attempt += 1
            if on_retry is not None:
                on_retry(exc)
            if time.monotonic() >= end:
                raise DirectoryUnavailable(f"teacher directory did not answer {method} in {budget_s:.0f} s: "
                                           f"{exc!r}") from exc
            log.warning("teacher directory unavailable (%s, attempt %d): %s; retrying", method, attempt,
                        type(exc).__name__)
            if isinstance(exc, ActorDiedError) and reconnect is not None:
                try:
                    handle = reconnect()
                except Exception as again:  # noqa: BLE001 — e.g. the old name is still being released
                    log.warning("teacher directory not reachable by name yet: %r", again)
            time.sleep(min(2.0, 0.05 * 2 ** attempt))


def is_loopback(host: str) -> bool:
    """True for an address only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or interface address: reachable from elsewhere


@dataclass
class TLSSpec:
    cert_chain: str = ""
    private_key: str = ""
    client_ca: str | None = None


def default_gpu_share(cluster_gpus: float, replicas: int) -> float:
    """GPUs per replica when a teacher does not set ``num_gpus``: one each where the cluster has a GPU
    for every replica of the spec (the design: one device per teacher); with fewer, the GPUs shared
    evenly, rounded down to 1/100 so that Ray packs the replicas onto the devices (three teachers on
    one lent GPU get 0.33 each); none without GPUs."""
    if cluster_gpus <= 0 or replicas <= 0:
        return 0.0
    return min(1.0, math.floor(100 * cluster_gpus / replicas) / 100)


@dataclass
class TeacherSpec:
    name: str = ""
    checkpoint: str = ""
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = -1.0  # -1: default_gpu_share (one GPU per replica where there are enough)
    resources: dict[str, float] = field(default_factory=dict)  # custom resources, e.g. {teacher: 1}
    torch_threads: int = 1
    expected_vocab_hash: str | None = None
    build: str = ""  # the command that (re)builds the checkpoint, named when it is missing
    # CPU affinity (the CPU form of one device per replica): the cores this teacher's replicas run
    # on, e.g. [2, 3]; each replica process pins itself (every thread) at start. Empty: not pinned.
    # cpus_per_replica 0: every replica gets all of `cpus`; k > 0: each replica gets its own k of
    # them (replica slots of k cores in list order; more replicas than slots share the least-used).
    # Match torch_threads to the cores a replica gets.
    cpus: list[int] = field(default_factory=list)
    cpus_per_replica: int = 0
    # Inference precision of the replicas (teachers.base.INFERENCE_PRECISIONS): float32 (exact) or
    # bfloat16/float16 under autocast, faster where the hardware has reduced-precision matrix units;
    # the rankings it keeps are measured by `python -m benchmarks.teacher --precisions ...`.
    precision: str = "float32"

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
        from teachers.base import INFERENCE_PRECISIONS

        if self.precision not in INFERENCE_PRECISIONS:
            raise ConfigError(f"teachers[{self.name}].precision must be one of {sorted(INFERENCE_PRECISIONS)}, "
                              f"got {self.precision!r}")
        if self.cpus or self.cpus_per_replica:
            from ckd.affinity import AffinityError, parse_cpus

            try:
                cpus = parse_cpus(self.cpus)
            except AffinityError as exc:
                raise ConfigError(f"teachers[{self.name}].cpus: {exc}") from None
            if len(cpus) != len(self.cpus):
                raise ConfigError(f"teachers[{self.name}].cpus lists a core twice: {self.cpus}")
            k = self.cpus_per_replica
            if k < 0 or (k and len(cpus) % k):
                raise ConfigError(f"teachers[{self.name}].cpus_per_replica={k} must be >= 0 and divide the "
                                  f"{len(cpus)} cores of cpus={self.cpus}")

    def replica_cpus(self, slot: int) -> list[int]:
        """The cores of replica slot ``slot`` (``cpus_per_replica`` cores each), or all of ``cpus``."""
        k = self.cpus_per_replica
        if not k:
            return list(self.cpus)
        return list(self.cpus[slot * k:(slot + 1) * k])

    @property
    def cpu_slots(self) -> int:
        """How many replicas can have cores of their own (0 when the teacher is not pinned)."""
        if not self.cpus:
            return 0
        return len(self.cpus) // self.cpus_per_replica if self.cpus_per_replica else 1


@dataclass
class DeploySpec:
    namespace: str = "ckd"
    directory: str = DIRECTORY_NAME
    detached_directory: bool = False
    directory_ttl_s: float = 15.0
    max_restarts: int = 3
    placement: str = "SPREAD"  # or DEFAULT
    bind_host: str = "127.0.0.1"  # 0.0.0.0 on a multi-node cluster: then token_env and tls are required
    token_env: str | None = None  # name of an environment variable holding the shared token
    tls: TLSSpec | None = None
    # Serve beyond loopback without a token and TLS anyway (a trusted, isolated network only): loud.
    allow_insecure_bind: bool = False
    heartbeat_s: float = 2.0
    # A replica whose own server misses this many health checks in a row (each waiting this long)
    # exits so Ray restarts it; 0 turns the check off (it is off under TLS anyway).
    liveness_failures: int = 3
    liveness_timeout_s: float = 10.0
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
        self._check_bind()
        if self.liveness_failures < 0 or self.liveness_timeout_s <= 0:
            raise ConfigError(f"liveness_failures must be >= 0 and liveness_timeout_s > 0, got "
                              f"{self.liveness_failures} and {self.liveness_timeout_s}")
        try:
            self.service.validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for t in self.teachers:
            t.validate()

    def _check_bind(self) -> None:
        """Closed by default: beyond loopback, anyone who reaches the port could score (and, without
        TLS, read the traffic), so both a token and TLS are required unless explicitly waived."""
        if is_loopback(self.bind_host):
            return
        missing = []
        if not self.token_env:
            missing.append("token_env (a shared token)")
        if self.tls is None or not (self.tls.cert_chain and self.tls.private_key):
            missing.append("tls (cert_chain and private_key)")
        if not missing:
            return
        if not self.allow_insecure_bind:
            raise ConfigError(
                f"bind_host={self.bind_host!r} serves the teachers beyond this host, but the spec has no "
                f"{' and no '.join(missing)}. Set both token_env and tls, or bind_host: 127.0.0.1; "
                f"only on a trusted, isolated network: allow_insecure_bind: true")
        log.warning("INSECURE: teacher servers bind %s without %s (allow_insecure_bind: true); anyone who "
                    "can reach these ports can use them", self.bind_host, " and ".join(missing))

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

    def __init__(self, spec: str | os.PathLike[str] | dict[str, Any] | DeploySpec,
                 directory_retry_s: float = 30.0):
        if not ray.is_initialized():
            raise RuntimeError("TeacherDeployment needs ray.init(...) first (or use start_embedded)")
        self.spec = load_spec(spec)
        self.namespace = self.spec.namespace
        self.directory_retry_s = float(directory_retry_s)
        # A new deployment never inherits the replicas a dead one persisted under the same name.
        self._owner = uuid.uuid4().hex
        self.directory = self._connect_directory()
        self._replicas: dict[str, list[tuple[str, Any]]] = {t.name: [] for t in self.spec.teachers}
        self._serial: dict[str, int] = {t.name: 0 for t in self.spec.teachers}
        self._cpu_slot: dict[str, int] = {}  # replica id -> its core slot (TeacherSpec.replica_cpus)
        self._owns_ray = False
        self.counters: dict[str, int] = {"directory_retries": 0, "reconcile_failures": 0}
        gpus = ray.cluster_resources().get("GPU", 0)
        self._has_gpus = gpus > 0
        self._gpu_share = default_gpu_share(gpus, sum(t.replicas for t in self.spec.teachers))

    # -- the directory -------------------------------------------------------------------------
    def _connect_directory(self) -> Any:
        # Replicas re-register within a heartbeat of a restart; until then clients keep what they know.
        return get_or_create_directory(self.namespace, self.spec.directory, self.spec.detached_directory,
                                       self.spec.directory_ttl_s, owner=self._owner,
                                       warmup_s=2 * self.spec.heartbeat_s + 1.0)

    def _reconnect_directory(self) -> Any:
        # Dead for good: create it again; it restores targets and replicas from the GCS key-value store.
        self.directory = self._connect_directory()
        return self.directory

    def _dir_call(self, method: str, *args: Any, timeout: float = 10.0, budget_s: float | None = None) -> Any:
        """A directory call that rides out a restart (``call_directory``; DirectoryUnavailable after
        ``budget_s``, default ``directory_retry_s``)."""
        def count(_: BaseException) -> None:
            self.counters["directory_retries"] += 1

        return call_directory(self.directory, method, *args, budget_s=budget_s or self.directory_retry_s,
                              timeout=timeout, reconnect=self._reconnect_directory, on_retry=count)

    # -- lifecycle -----------------------------------------------------------------------------
    def deploy(self, timeout: float = 300.0) -> dict[str, list[str]]:
        """Start every teacher's replicas; returns {teacher: [address]} once all are SERVING."""
        for t in self.spec.teachers:
            # The directory actor may have just been created: on a loaded machine its worker process
            # can take longer than a restart's budget to start (seen: over 30 s with two trainings on
            # 2 cores), so the first calls get the deploy's own timeout.
            self._dir_call("set_target", t.name, t.replicas, budget_s=max(self.directory_retry_s, timeout))
        self.reconcile(timeout=timeout)
        return self.endpoints()

    def _start_replica(self, t: TeacherSpec) -> tuple[str, Any]:
        rid = f"{t.name}-{self._serial[t.name]}"
        self._serial[t.name] += 1
        cpus = None
        if t.cpus:
            # The least-used slot among this teacher's live replicas: after a scale-down and up the
            # new replica takes the cores the removed one left.
            live = [self._cpu_slot.get(r) for r, _ in self._replicas[t.name]]
            slot = min(range(t.cpu_slots), key=lambda s: (live.count(s), s))
            self._cpu_slot[rid] = slot
            cpus = t.replica_cpus(slot)
        num_gpus = self._gpu_share if t.num_gpus < 0 else t.num_gpus
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
            service=asdict(self.spec.service), teacher_modules=list(self.spec.teacher_modules),
            bind_host=self.spec.bind_host, token=self.spec.token,
            tls=tls, heartbeat_s=self.spec.heartbeat_s, torch_threads=t.torch_threads,
            expected_vocab_hash=t.expected_vocab_hash, liveness_timeout_s=self.spec.liveness_timeout_s,
            liveness_failures=self.spec.liveness_failures, cpus=cpus, precision=t.precision)
        return rid, actor

    def scale(self, name: str, replicas: int, timeout: float = 300.0) -> list[str]:
        """Set a teacher's replica count (up: start and wait SERVING; down: drain, then kill)."""
        self.spec.teacher(name)
        self._dir_call("set_target", name, replicas)
        self.reconcile(timeout=timeout)
        return self.endpoints()[name]

    def _await_started(self, starting: list[tuple[str, str, Any]], timeout: float) -> None:
        """Wait until new replicas answer; one that died or hung is removed (so the next reconcile
        starts another) and reported in a RuntimeError."""
        refs = {a.info.remote(): (name, rid, a) for name, rid, a in starting}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        failed: list[str] = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 — a replica that could not load its checkpoint
                failed.append(f"{refs[ref][1]}: {exc!r}"[:500])
                self._remove(*refs[ref])
        for ref in pending:
            failed.append(f"{refs[ref][1]}: not SERVING after {timeout:.0f} s")
            self._remove(*refs[ref])
        if failed:
            raise RuntimeError("teacher replica(s) failed to start:\n  " + "\n  ".join(failed))

    def _remove(self, name: str, rid: str, actor: Any) -> None:
        self._replicas[name] = [(r, a) for r, a in self._replicas[name] if r != rid]
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 — already gone
            pass

    def reconcile(self, timeout: float = 300.0) -> bool:
        """Bring each teacher to its target count from the directory; True if anything changed."""
        targets = self._dir_call("targets")
        changed = False
        starting = []
        for t in self.spec.teachers:
            want = targets.get(t.name, t.replicas)
            have = self._replicas[t.name]
            while len(have) < want:
                rid, actor = self._start_replica(t)
                have.append((rid, actor))
                starting.append((t.name, rid, actor))
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
            self._await_started(starting, timeout)
        if changed:
            t_end = time.monotonic() + 30
            # The directory lists exactly the kept replicas once new ones registered.
            while time.monotonic() < t_end:
                snap = self._dir_call("snapshot", list(self._replicas))
                if all(len(snap[n]) == len(self._replicas[n]) for n in self._replicas):
                    break
                time.sleep(0.1)
        return changed

    def serve_forever(self, stop: Callable[[], bool], every: float = 1.0,
                      on_change: Callable[[dict[str, list[str]]], None] | None = None,
                      max_backoff_s: float = 10.0) -> None:
        """Reconcile every ``every`` seconds until ``stop()`` is true. A failed round (the directory
        restarting past the retry budget, a replica that would not start) is logged and retried
        with backoff; it never ends the loop, so the replicas keep serving meanwhile."""
        failures = 0
        while not stop():
            delay = every if failures == 0 else min(max_backoff_s, every * 2 ** failures)
            end = time.monotonic() + delay
            while not stop() and time.monotonic() < end:
                time.sleep(min(0.1, max(0.0, end - time.monotonic())))
            if stop():
                break
            try:
                if self.reconcile() and on_change is not None:
                    on_change(self.endpoints())
                if failures:
                    log.info("reconcile recovered after %d failed round(s)", failures)
                failures = 0
            except (DirectoryUnavailable, *DIRECTORY_TRANSIENT) as exc:
                failures += 1
                self.counters["reconcile_failures"] += 1
                log.warning("reconcile round failed (directory unavailable, %d in a row): %r; replicas keep "
                            "serving, retrying", failures, exc)
            except Exception:  # noqa: BLE001 — a controller logs and retries; stopping would drop the service
                failures += 1
                self.counters["reconcile_failures"] += 1
                log.exception("reconcile round failed (%d in a row); replicas keep serving, retrying", failures)

    def endpoints(self) -> dict[str, list[str]]:
        return self._dir_call("snapshot", list(self._replicas))

    def replica_handles(self, name: str) -> list[tuple[str, Any]]:
        """(replica_id, actor handle) of a teacher's replicas (tests kill them to check recovery)."""
        return list(self._replicas[name])

    def infos(self, name: str, budget_s: float = 60.0) -> list[dict[str, Any]]:
        """Each replica's ``info()``. A replica registers its address from its constructor, so a
        restarted one is in the directory before Ray marks it alive; calls in that window fail with
        ActorUnavailableError, which is waited out (``budget_s``). A replica dead for good raises."""
        end = time.monotonic() + budget_s
        out = []
        for _, actor in self._replicas[name]:
            while True:
                try:
                    out.append(ray.get(actor.info.remote(), timeout=max(1.0, end - time.monotonic())))
                    break
                except ActorUnavailableError:
                    if time.monotonic() >= end:
                        raise
                    time.sleep(0.2)
        return out

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
            delete_state(state_key(self.namespace, self.spec.directory))
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
        # Closed by default: every Ray server of this head (GCS, raylet, object manager, workers,
        # agents) listens on 127.0.0.1 only, and there is no dashboard. Ray keeps a 127.0.0.1 node IP
        # only in its loopback mode (ckd.ray_loopback.use_ray_loopback_mode); joiners use join_ray.
        from ckd.ray_loopback import use_ray_loopback_mode

        use_ray_loopback_mode()
        # address="local": always a new head. Without it Ray joins whatever /tmp/ray/ray_current_cluster
        # names, and a stale file left by a killed head fails the start ("When connecting to an
        # existing cluster, num_cpus ... must not be provided"), as two service tests did once.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=spec.namespace,
                 logging_level="WARNING", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 _node_ip_address="127.0.0.1")
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
