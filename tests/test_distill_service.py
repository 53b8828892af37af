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
    from benchmarks.fixture_teacher import make_fixture_checkpoint

    root = tmp_path_factory.mktemp("teachers")
    ds = scientific_mm
    for seed in (1, 2):
        make_fixture_checkpoint(root / f"t{seed}", num_items=ds.vocab_size, vocab_hash=ds.vocab_hash(), seed=seed,
                                temperature=0.5)
    spec = {"namespace": "ckd-distill-test", "teacher_modules": ["benchmarks.fixture_teacher"], "teachers": [
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
    cmd = ACCELERATE_2P + ["-m", "launch.distill", "--run-dir", str(run), "--ray-address", address,
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


def test_entry_point_starts_the_embedded_service_for_both_ranks(scientific_mm, data_dir, tmp_path):
    """No --ray-address: rank 0 of launch/distill.py starts a local Ray with the spec's replicas cut
    to --teachers, hands its address to rank 1, both distil from it, and the service is shut down
    once both have finished (the job exits cleanly)."""
    from benchmarks.fixture_teacher import make_fixture_checkpoint

    ds = scientific_mm
    for name, seed in (("alpha", 1), ("beta", 2)):
        make_fixture_checkpoint(tmp_path / name, num_items=ds.vocab_size, vocab_hash=ds.vocab_hash(), seed=seed)
    spec = tmp_path / "serve.yaml"
    spec.write_text("namespace: ckd-embedded-test\nteacher_modules: [benchmarks.fixture_teacher]\nteachers:\n"
                    f"  - {{name: alpha, checkpoint: {tmp_path / 'alpha'}, replicas: 1}}\n"
                    f"  - {{name: beta, checkpoint: {tmp_path / 'beta'}, replicas: 1}}\n")
    run = tmp_path / "run"
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = ACCELERATE_2P + ["-m", "launch.distill", "--run-dir", str(run), "--teachers", "beta",
                           "--set", f"service.spec={spec}", "--set", "service.namespace=ckd-embedded-test",
                           "--set", "data.domains=ScientificMM", "--set", "train.epochs=1",
                           "--set", "train.max_steps_per_epoch=4", "--set", "train.batch_size=64",
                           "--set", "train.progress=false", "--set", "train.threads=1", "--set", "kd.num_sampled=16"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "starting embedded Ray with 1 teacher replica(s): beta" in (run / "train.log").read_text()
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [4, 4] and ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["history"][0]["kd"] > 0 and metrics["history"][0]["kd_teachers"] == 1
    assert set(json.loads((run / "run.json").read_text())["teachers"]) == {"beta"}


def test_kd_targets_in_the_prefetch_threads_train_the_same_student(service, data_dir, tmp_path):
    """kd.targets_on=prefetch (the teachers' side of the KD term computed in the label-prefetch
    threads, here pinned to a core of their own) trains the same parameters as computing it in the
    step: same seed, same teachers, same steps, the same parameter hash and loss history."""
    address, _ = service
    env = {**os.environ, "CKD_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1"}
    core = max(os.sched_getaffinity(0))
    out = {}
    for mode in ("step", "prefetch"):
        run = tmp_path / mode
        cmd = [sys.executable, "-m", "launch.distill", "--run-dir", str(run), "--ray-address", address,
               "--set", "service.namespace=ckd-distill-test", "--set", "service.teachers=alpha,beta",
               "--set", "data.domains=ScientificMM", "--set", "train.epochs=1",
               "--set", "train.max_steps_per_epoch=6", "--set", "train.batch_size=64",
               "--set", "train.progress=false", "--set", "train.threads=1", "--set", "kd.num_sampled=32",
               "--set", f"kd.targets_on={mode}"]
        if mode == "prefetch":
            cmd += ["--set", f"service.prefetch_cpus={core}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
        rank = json.loads((run / "ranks" / "rank0.json").read_text())
        out[mode] = (rank, json.loads((run / "metrics.json").read_text()))
    (rank_s, m_s), (rank_p, m_p) = out["step"], out["prefetch"]
    assert rank_s["global_step"] == rank_p["global_step"] == 6
    assert rank_s["param_sha256"] == rank_p["param_sha256"]
    assert m_s["history"][0]["kd"] == m_p["history"][0]["kd"] > 0
    # The targets really were built in the prefetch threads (their timing stage), and not in the step run's.
    assert "kd_targets_ms_mean" in m_p["teacher_client"] and "kd_targets_ms_mean" not in m_s["teacher_client"]
