"""protos.contract is the one home of the service contract: server, client and deployment share it."""
from __future__ import annotations

import pytest
import ray

from benchmarks.fixture_teacher import make_fixture_checkpoint
from ckd.config import ConfigError
from cluster import deploy
from protos import contract, teacher_pb2
from protos.contract import ServiceLimits, TeacherInfo

pytestmark = pytest.mark.unit


def test_service_name_is_the_generated_one():
    assert contract.SERVICE_NAME == "ckd.teacher.v1.Teacher"


def test_teacher_info_survives_describe_both_ways():
    info = TeacherInfo("unisrec", "2", "h" * 64, 4386, 0.07, 50, "s" * 64, kind="unisrec")
    limits = ServiceLimits(max_batch_rows=7, max_candidates=9, max_score_cells=63, max_message_bytes=8192)
    wire = teacher_pb2.TeacherDescription.FromString(info.to_proto(name="served", limits=limits).SerializeToString())
    back = TeacherInfo.from_proto(wire, replicas=3)
    assert (back.name, back.kind, back.vocab_hash, back.num_items, back.max_history) == \
        ("served", "unisrec", "h" * 64, 4386, 50)
    assert back.temperature == pytest.approx(0.07)
    assert (back.replicas, back.max_batch_rows, back.max_candidates, back.max_message_bytes) == (3, 7, 9, 8192)


def test_limits_from_a_mapping_refuse_unknown_keys_and_impossible_values():
    assert ServiceLimits.from_mapping({"max_batch_rows": 5}).max_batch_rows == 5
    with pytest.raises(ValueError, match="max_batch_row"):
        ServiceLimits.from_mapping({"max_batch_row": 5})
    with pytest.raises(ValueError, match="do not fit"):
        ServiceLimits(max_score_cells=1 << 30).validate()


def test_deploy_spec_uses_the_contract_limits(tmp_path):
    ck = make_fixture_checkpoint(tmp_path / "fx", num_items=20, vocab_hash="h", dim=4)
    spec = deploy.load_spec({"service": {"max_candidates": 77}, "teachers": [{"name": "fx", "checkpoint": str(ck)}]})
    assert isinstance(spec.service, ServiceLimits) and spec.service.max_candidates == 77
    assert spec.directory == contract.DIRECTORY_NAME


def test_missing_checkpoint_refused_before_ray_starts_naming_the_build_command(tmp_path):
    assert not ray.is_initialized()
    ok = make_fixture_checkpoint(tmp_path / "ok", num_items=20, vocab_hash="h", dim=4)
    spec = {"teachers": [{"name": "ok", "checkpoint": str(ok)},
                         {"name": "recformer", "checkpoint": str(tmp_path / "nope"),
                          "build": "ckd-train-teacher --config configs/teachers/recformer_scientific.yaml"}]}
    with pytest.raises(ConfigError) as err:
        deploy.start_embedded(spec)
    msg = str(err.value)
    assert "teacher recformer" in msg and "nope/config.json not found" in msg
    assert "build it with: ckd-train-teacher --config configs/teachers/recformer_scientific.yaml" in msg
    assert "teacher ok" not in msg
    assert not ray.is_initialized()  # refused before any Ray process started
