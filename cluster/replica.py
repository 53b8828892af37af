"""TeacherReplica: a Ray actor that owns one device and one teacher gRPC server.

It loads the checkpoint (teachers.base.load_teacher), puts the model on its GPU when Ray gave it one
(CPU otherwise), starts the gRPC server on port 0 (warm-up included, so it is SERVING), registers
its address with the directory and heartbeats. Ray restarts a crashed replica (``max_restarts`` is
set by the deployment): ``__init__`` runs again and the replica registers its new address under the
same replica id.
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
                 expected_vocab_hash: str | None = None, teacher_modules: list[str] | None = None):
        import importlib

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
        self.server = start_server(model, name=teacher, host=bind_host, port=0,
                                   limits=ServiceLimits.from_mapping(service), token=token,
                                   tls=TLSFiles(**tls) if tls else None)
        if advertise_host is None:
            # Bound to every interface (a cluster): advertise this node's address, else the bind host.
            advertise_host = ray.util.get_node_ip_address() if bind_host in ("0.0.0.0", "::") else bind_host
        self.address = f"{advertise_host}:{self.server.port}"
        self._directory = ray.get_actor(directory, namespace=namespace)
        ctx = ray.get_runtime_context()
        with warnings.catch_warnings():  # Ray 2.60 deprecates an attribute this property reads internally
            warnings.simplefilter("ignore")
            restarted = bool(ctx.was_current_actor_reconstructed)
        self.meta = {"pid": os.getpid(), "node_id": ctx.get_node_id(), "device": self.device,
                     "restarted": restarted,
                     "checkpoint_sha256": model.checkpoint_sha256}
        ray.get(self._directory.register.remote(teacher, replica_id, self.address, self.meta))
        self._stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True)
        self._hb.start()

    def _heartbeat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                if not ray.get(self._directory.heartbeat.remote(self.teacher_name, self.replica_id, self.address),
                               timeout=10):
                    ray.get(self._directory.register.remote(self.teacher_name, self.replica_id, self.address,
                                                            self.meta), timeout=10)
            except Exception as exc:  # noqa: BLE001 — the directory may be restarting; try again next beat
                log.warning("replica %s/%s heartbeat failed: %r", self.teacher_name, self.replica_id, exc)

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


# The Ray actor class; resources and max_restarts are set per replica by cluster.deploy.
TeacherReplicaActor = ray.remote(TeacherReplica)
