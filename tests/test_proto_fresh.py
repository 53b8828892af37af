"""The checked-in generated gRPC code is what grpc_tools makes of teacher.proto today."""
from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import GENERATED, PROTO_DIR, generate

pytestmark = pytest.mark.unit


def test_generated_code_is_fresh(tmp_path: Path):
    written = generate(tmp_path)
    assert [p.name for p in written] == list(GENERATED)
    for name in GENERATED:
        fresh, checked_in = (tmp_path / name).read_text(), (PROTO_DIR / name).read_text()
        assert fresh == checked_in, (f"protos/{name} is stale: run `python -m protos.generate` "
                                     f"and commit the result")


def test_package_and_services():
    from protos import teacher_pb2

    svc = teacher_pb2.DESCRIPTOR.services_by_name["Teacher"]
    assert svc.full_name == "ckd.teacher.v1.Teacher"
    assert sorted(m.name for m in svc.methods) == ["Describe", "Score"]
    assert teacher_pb2.DESCRIPTOR.package == "ckd.teacher.v1"
