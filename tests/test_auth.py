"""Shared-token auth on every call (health included) and TLS credentials, on real loopback gRPC."""
from __future__ import annotations

import shutil
import subprocess

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import teacher_pb2, teacher_pb2_grpc
from protos.contract import TeacherContractError
from student.teacher_pool import TeacherPool
from teachers.base import load_teacher
from benchmarks.fixture_teacher import make_fixture_checkpoint
from teachers.server import TLSFiles, start_server

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher(make_fixture_checkpoint(tmp_path_factory.mktemp("fx"), num_items=50, dim=4))


def _score(pool):
    return pool.score(np.array([[1, 2]]), np.array([2]), np.array([3, 4]))


def test_call_without_token_refused(teacher):
    srv = start_server(teacher, name="fx", token=TOKEN)
    ch = grpc.insecure_channel(srv.address)
    try:
        stub = teacher_pb2_grpc.TeacherStub(ch)
        for md in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                stub.Describe(teacher_pb2.DescribeRequest(), timeout=5, metadata=md)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Describe(teacher_pb2.DescribeRequest(), timeout=5,
                           metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert ok.name == "fx"
        # Through the pool: no token = contract error, fail fast; with the token it scores.
        with TeacherPool({"fx": [srv.address]}) as pool:
            with pytest.raises(TeacherContractError, match="UNAUTHENTICATED"):
                _score(pool)
        with TeacherPool({"fx": [srv.address]}, token=TOKEN) as pool:
            assert _score(pool)["fx"].shape == (1, 2)
    finally:
        ch.close()
        srv.stop(0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_tls_with_token(teacher, tmp_path):
    key, crt = tmp_path / "key.pem", tmp_path / "crt.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(crt), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    srv = start_server(teacher, name="fx", token=TOKEN, tls=TLSFiles(str(crt), str(key)))
    try:
        with TeacherPool({"fx": [srv.address]}, token=TOKEN, tls_ca=str(crt), tls_server_name="localhost") as pool:
            assert _score(pool)["fx"].shape == (1, 2)
        # A plaintext client cannot talk to the TLS server at all.
        with TeacherPool({"fx": [srv.address]}, token=TOKEN, max_attempts=1, timeout_s=2) as pool:
            with pytest.raises(Exception):
                _score(pool)
    finally:
        srv.stop(0)


def test_binds_loopback_by_default(teacher):
    srv = start_server(teacher)
    try:
        assert srv.address.startswith("127.0.0.1:") and srv.port > 0
    finally:
        srv.stop(0)
