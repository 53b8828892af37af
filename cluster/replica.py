"""TeacherReplica: a Ray actor that owns one device and one teacher gRPC server.

It loads the checkpoint (teachers.base.load_teacher), puts the model on its GPU when Ray gave it one
(CPU otherwise), starts the gRPC server on port 0 (warm-up included, so it is SERVING), registers
its address with the directory (retrying while the directory restarts) and heartbeats. Ray
restarts a crashed replica (``max_restarts`` is set by the deployment): ``__init__`` runs again and
the replica registers its new address under the same replica id.

Liveness: before each heartbeat the replica health-checks its own gRPC server over loopback. A
server that stopped answering while the process lives on (its polling thread died of a
MemoryError, say) would otherwise keep heartbeating an address nobody can use; after
``liveness_failures`` checks in a row without an answer the replica leaves the directory and exits,
and Ray restarts it. The check needs a plaintext port, so it is off when the server uses TLS.

Cores: given ``cpus`` (TeacherSpec.cpus / cpus_per_replica), the replica pins every thread of its
process to them before loading anything (ckd.affinity.pin_process), so on a CPU host it scores on
its own cores and leaves the student's alone; ``info()["cpus"]`` reports the set it runs on.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

import ray

from protos.contract import DIRECTORY_NAME, ServiceLimits

log = logging.getLogger(__name__)


def _serve_at_normal_priority() -> None:
    """Ray starts workers at niceness 15; a replica is a latency-critical server that students
    wait on, so on a shared CPU host it must not yield to every training process. Raising the
    priority back needs CAP_SYS_NICE; without it the replica keeps Ray's niceness."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
    except (PermissionError, OSError):
        pass


class TeacherReplica:
    def __init__(self, teacher: str, checkpoint: str, replica_id: str, namespace: str,
                 directory: str = DIRECTORY_NAME, service: dict[str, Any] | None = None,
                 bind_host: str = "127.0.0.1", advertise_host: str | None = None, token: str | None = None,
                 tls: dict[str, str] | None = None, heartbeat_s: float = 2.0, torch_threads: int | None = None,
                 expected_vocab_hash: str | None = None, teacher_modules: list[str] | None = None,
                 liveness_timeout_s: float = 10.0, liveness_failures: int = 3, cpus: list[int] | None = None,
                 precision: str = "float32"):
        import importlib

        if cpus:
            # First, before torch starts its thread pool: every thread of this process (Ray's own
            # included) runs on these cores only; a restart by Ray pins again with the same cores.
            from ckd.affinity import pin_process

            pin_process(cpus)
        import torch

        from teachers.base import load_teacher
        from teachers.server import TLSFiles, start_server

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        _serve_at_normal_priority()
        for module in teacher_modules or []:
            importlib.import_module(module)  # registers teacher kinds defined outside `teachers`
        gpus = ray.get_gpu_ids()
        self.device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
        self.teacher_name, self.replica_id = teacher, replica_id
        model = load_teacher(checkpoint, expected_vocab_hash=expected_vocab_hash, device=self.device)
        model.set_inference_precision(precision)
        self.server = start_server(model, name=teacher, host=bind_host, port=0,
                                   limits=ServiceLimits.from_mapping(service), token=token,
                                   tls=TLSFiles(**tls) if tls else None)
        if advertise_host is None:
            # Bound to every interface (a cluster): advertise this node's address, else the bind host.
            advertise_host = ray.util.get_node_ip_address() if bind_host in ("0.0.0.0", "::") else bind_host
        self.address = f"{advertise_host}:{self.server.port}"
        self._directory_name, self._namespace = directory, namespace
        self._directory = ray.get_actor(directory, namespace=namespace)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 deprecates an attribute this property reads internally
            warnings.simplefilter("ignore")
            restarted = bool(ctx.was_current_actor_reconstructed)
        self.meta = {"pid": os.getpid(), "node_id": ctx.get_node_id(), "device": self.device,
                     "restarted": restarted, "cpus": sorted(os.sched_getaffinity(0)),
                     "checkpoint_sha256": model.checkpoint_sha256, "precision": precision}
        self._register_at_start()
        self._liveness = None
        if liveness_failures > 0 and not tls:
            self._liveness = _SelfProbe(bind_host, self.server.port, token, liveness_timeout_s, liveness_failures)
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
        self._hb.start()

    def _call_directory(self, method: str, *args: Any) -> Any:
        """One directory call; if the directory died for good, look up the one the deployment
        created again under the same name (for the next call) and re-raise."""
        try:
            return ray.get(getattr(self._directory, method).remote(*args), timeout=10)
        except ray.exceptions.ActorDiedError:
            try:
                self._directory = ray.get_actor(self._directory_name, namespace=self._namespace)
            except ValueError:
                pass  # not created again yet
            raise

    def _register_at_start(self, budget_s: float = 60.0) -> None:
        """Register, riding out a directory restart (calls in flight then fail with a RayActorError);
        failing here would make Ray restart this replica, spending one of its ``max_restarts``."""
        end, attempt = time.monotonic() + budget_s, 0
        while True:
            try:
                self._call_directory("register", self.teacher_name, self.replica_id, self.address, self.meta)
                return
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                attempt += 1
                if time.monotonic() >= end:
                    raise
                log.warning("replica %s/%s: directory unavailable at registration (%r), retrying",
                            self.teacher_name, self.replica_id, exc)
                time.sleep(min(2.0, 0.05 * 2 ** attempt))

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            if self._liveness is not None and not self._liveness.alive():
                if self._stop.is_set():
                    return  # draining: the server is meant to stop answering
                if self._liveness.failed_out():
                    self._exit_for_restart()
                continue  # no heartbeat for a server that does not answer: the directory may expire it
            try:
                if not self._call_directory("heartbeat", self.teacher_name, self.replica_id, self.address):
                    self._call_directory("register", self.teacher_name, self.replica_id, self.address, self.meta)
            except Exception as exc:  # noqa: BLE001 — the directory may be restarting; try again next beat
                log.warning("replica %s/%s heartbeat failed: %r", self.teacher_name, self.replica_id, exc)

    def _exit_for_restart(self) -> None:
        log.error("replica %s/%s: its gRPC server at %s has not answered %d health checks in a row; leaving the "
                  "directory and exiting so that Ray restarts it", self.teacher_name, self.replica_id,
                  self.address, self._liveness.failures)
        try:
            self._call_directory("deregister", self.teacher_name, self.replica_id)
        except Exception:  # noqa: BLE001 — it expires from the directory anyway
            pass
        os._exit(70)  # EX_SOFTWARE; a Ray actor that exits unexpectedly is restarted (max_restarts)

    def info(self) -> dict[str, Any]:
        return {"teacher": self.teacher_name, "replica_id": self.replica_id, "address": self.address, **self.meta}

    def drain(self, timeout: float = 30.0, linger_s: float = 0.0) -> bool:
        """Leave the directory, keep serving ``linger_s`` (clients refresh their lists meanwhile),
        then report NOT_SERVING, finish in-flight calls and stop the server."""
        self._stop.set()
        try:
            ray.get(self._directory.deregister.remote(self.teacher_name, self.replica_id), timeout=10)
        except Exception as exc:  # noqa: BLE001
            log.warning("replica %s/%s could not deregister: %r", self.teacher_name, self.replica_id, exc)
        if linger_s > 0:
            time.sleep(linger_s)
        done = self.server.drain(timeout)
        self.server.stop(grace=1.0)
        return done


class _SelfProbe:
    """Health checks of this process's own gRPC server over loopback (see the module docstring)."""

    def __init__(self, bind_host: str, port: int, token: str | None, timeout_s: float, limit: int):
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from protos.contract import auth_metadata

        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(bind_host, bind_host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        self._channel = grpc.insecure_channel(f"{host}:{port}")
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = auth_metadata(token)
        self.timeout_s, self.limit, self.failures = float(timeout_s), int(limit), 0

    def alive(self) -> bool:
        """One check: any answer (SERVING, NOT_SERVING while draining, even UNAUTHENTICATED) means the
        server is alive; only silence (deadline, connection refused) counts as a failure."""
        import grpc
        from grpc_health.v1 import health_pb2

        from protos.contract import SERVICE_NAME

        try:
            self._stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=self.timeout_s,
                             metadata=self._metadata)
            ok = True
        except grpc.RpcError as exc:
            ok = exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
        self.failures = 0 if ok else self.failures + 1
        if not ok:
            log.warning("own gRPC server did not answer a health check (%d in a row)", self.failures)
        return ok

    def failed_out(self) -> bool:
        return self.failures >= self.limit


# The Ray actor class; resources and max_restarts are set per replica by cluster.deploy.
TeacherReplicaActor = ray.remote(TeacherReplica)
