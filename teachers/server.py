"""Start a teacher gRPC server (Teacher service + grpc.health.v1) on a port, 0 = any free one."""
from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from protos import teacher_pb2_grpc
from teachers.base import Teacher
from protos.contract import ServiceLimits
from teachers.servicer import TeacherServicer, TokenAuthInterceptor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for a TLS server; with client_ca set, clients must present a certificate (mTLS)."""

    cert_chain: str
    private_key: str
    client_ca: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        read = lambda p: Path(p).read_bytes()  # noqa: E731
        ca = read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials([(read(self.private_key), read(self.cert_chain))],
                                           root_certificates=ca, require_client_auth=ca is not None)


class TeacherServer:
    """A running server: ``port`` / ``address``; ``drain`` then ``stop`` for a graceful exit."""

    def __init__(self, server: grpc.Server, servicer: TeacherServicer, host: str, port: int):
        self.server, self.servicer, self.host, self.port = server, servicer, host, port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def drain(self, timeout: float = 30.0) -> bool:
        """NOT_SERVING + refuse new Score calls, wait for in-flight ones (True if all finished)."""
        return self.servicer.drain(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Drain, then stop the gRPC server (in-flight RPCs get ``grace`` seconds) and the batcher."""
        self.servicer.drain(grace)
        self.server.stop(grace).wait(grace + 1)
        self.servicer.close()


def start_server(teacher: Teacher, *, name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 limits: ServiceLimits | None = None, token: str | None = None, tls: TLSFiles | None = None,
                 warm_up: bool = True) -> TeacherServer:
    """Serve ``teacher``; binds loopback by default. Returns once bound (and warmed up: SERVING)."""
    cfg = limits or ServiceLimits()
    servicer = TeacherServicer(teacher, name=name, limits=cfg)
    interceptors = [TokenAuthInterceptor(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="teacher-rpc"),
                         options=cfg.grpc_options() + [("grpc.so_reuseport", 0)], interceptors=interceptors)
    teacher_pb2_grpc.add_TeacherServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer.health, server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(target, tls.credentials()) if tls else server.add_insecure_port(target)
    if bound == 0:
        raise RuntimeError(f"could not bind teacher server to {target}")
    server.start()
    handle = TeacherServer(server, servicer, host, bound)
    if warm_up:
        try:
            servicer.warm_up()
        except Exception:
            handle.stop(0)
            raise
    log.info("teacher %s serving on %s", servicer.name, handle.address)
    return handle
