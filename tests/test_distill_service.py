"""On-the-fly distillation against a real teacher service: real local Ray, real gRPC on loopback,
two real student processes under accelerate; one teacher replica is killed mid-run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

ACCELERATE_2P = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "0"]


@pytest.fixture(scope="module")
def service(scientific_mm, tmp_path_factory):
    """Two replicas of one teacher and one replica of another, on a local Ray started here."""
    import ray

    from cluster.deploy import start_embedded
    from teachers.fixture_teacher import make_fixture_checkpoint

    root = tmp_path_factory.mktemp("teachers")
    ds = scientific_mm
    for seed in (1, 2):
        make_fixture_checkpoint(root / f"t{seed}", num_items=ds.vocab_size, vocab_hash=ds.vocab_hash(), seed=seed,
                                temperature=0.5)
    spec = {"namespace": "ckd-distill-test", "teachers": [
        {"name": "alpha", "checkpoint": str(root / "t1"), "replicas": 2},
        {"name": "beta", "checkpoint": str(root / "t2"), "replicas": 1}]}
    address, dep = start_embedded(spec, num_cpus=4)
    yield address, dep
    dep.shutdown()
    if ray.is_initialized():
        ray.shutdown()


def test_replica_killed_during_two_process_distillation(service, data_dir, tmp_path):
    import ray

    address, dep = service
    run = tmp_path / "run"
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    steps_per_epoch = 12
    cmd = ACCELERATE_2P + [str(REPO / "launch" / "distill.py"), "--run-dir", str(run), "--ray-address", address,
                           "--set", "service.namespace=ckd-distill-test", "--set", "service.teachers=alpha,beta",
                           "--set", "service.failure_policy=fail", "--set", "data.domains=ScientificMM",
                           "--set", "train.epochs=2", "--set", f"train.max_steps_per_epoch={steps_per_epoch}",
                           "--set", "train.batch_size=64", "--set", "train.progress=false",
                           "--set", "train.threads=1", "--set", "kd.num_sampled=32"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim_id, victim = dep.replica_handles("alpha")[0]
    log_file = run / "train.log"
    deadline = time.monotonic() + 300
    # Kill once the first epoch is done, so the second one runs against a dead replica.
    while time.monotonic() < deadline and proc.poll() is None:
        if log_file.is_file() and "epoch 0" in log_file.read_text():
            ray.kill(victim, no_restart=True)
            break
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(victim.info.remote(), timeout=30)  # the replica really died
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # no step skipped: every rank ran all its steps, and the replicas stayed in sync
    assert [r["global_step"] for r in ranks] == [2 * steps_per_epoch] * 2
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    metrics = json.loads((run / "metrics.json").read_text())
    client = metrics["teacher_client"]
    assert client["kd_skipped_batches"] == 0 and not any(k.startswith("skipped/") for k in client)
    assert metrics["history"][-1]["kd"] > 0  # soft labels were used in the last epoch too
    run_info = json.loads((run / "run.json").read_text())
    assert set(run_info["teachers"]) == {"alpha", "beta"}
