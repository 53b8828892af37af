"""Fault injection against the teacher service as it runs: ``ckd-serve`` (launch/serve.py) in its own
process on an embedded local Ray, students as real TeacherPool clients over loopback gRPC.

Each fault runs under traffic and counts requests sent and lost (a lost request is one the pool
raised for, or answered with wrong scores). One serve process is shared by the module; this test
process joins its Ray as a second driver to inject faults (kill the directory, SIGKILL a replica,
slow one down through the fixture teacher's ``fault_dir``, scale). The measured numbers are
printed as ``FAULT {...}`` lines (run with ``-s``) for docs/service.md's failure model.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch

from benchmarks import fixture_teacher
from benchmarks.fixture_teacher import make_fixture_checkpoint, set_replica_delay
from ckd.config import ConfigError
from cluster.deploy import call_directory, load_spec
from launch.scale import ScaleError, reconciler_problem, request_scale
from ckd.ray_loopback import join_ray
from protos.contract import DIRECTORY_NAME
from student.teacher_pool import Discovery, TeacherPool
from teachers.base import load_teacher
from tests.polling import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
NS = "ckd-faults"
N_ITEMS = 400
POOL = dict(refresh_interval_s=0.2, probe_interval_s=0.2, backoff_base_s=0.02, timeout_s=5.0)
MEASURED: list[dict[str, Any]] = []


def _record(fault: str, **numbers: Any) -> None:
    row = {"fault": fault, **numbers}
    MEASURED.append(row)
    print("FAULT " + json.dumps(row, sort_keys=True), flush=True)


def _wait(cond, timeout: float = 60.0, what: str = "", every: float = 0.05) -> float:
    """Poll ``cond`` until true; returns the seconds it took. A directory that is restarting (or not
    created again yet) answers with an error: that counts as "not yet"."""
    return wait_until(cond, timeout, what, every,
                      retry_on=(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError))


def _batches(model: Any, n: int = 8) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(histories, lengths, candidates, expected scores) for small batches (B=8, L<=10, C=16)."""
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        lens = rng.integers(1, 11, size=8)
        h = rng.integers(1, N_ITEMS, size=(8, 10))
        h[np.arange(10)[None, :] >= lens[:, None]] = 0
        c = rng.integers(1, N_ITEMS, size=16)
        want = model.score(torch.from_numpy(h), torch.from_numpy(lens), torch.from_numpy(c)).numpy()
        out.append((h, lens, c, want))
    return out


class Traffic:
    """One student thread scoring batches back to back; counts sent / ok / lost, checks every score."""

    def __init__(self, pool: TeacherPool, model: Any, teacher: str = "fx", pause_s: float = 0.005):
        self.batches = _batches(model)
        self.pool, self.teacher, self.pause_s = pool, teacher, pause_s
        self.sent = self.ok = self.lost = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.done_at: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            h, n, c, want = self.batches[i % len(self.batches)]
            i += 1
            self.sent += 1
            t0 = time.monotonic()
            try:
                got = self.pool.score(h, n, c)[self.teacher]
                if got is None or got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    raise AssertionError("wrong scores")
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 — every failure is a lost request, counted
                self.lost += 1
                self.errors.append(repr(exc)[:300])
            t1 = time.monotonic()
            self.latencies.append(t1 - t0)
            self.done_at.append(t1)
            time.sleep(self.pause_s)

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ok(self, n: int, timeout: float = 60.0) -> None:
        target = self.ok + n
        _wait(lambda: self.ok >= target or self.lost > 0, timeout, f"{n} more scored batches")

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(30)
        lat = np.array(self.latencies or [0.0])
        gaps = np.diff(np.array(self.done_at)) if len(self.done_at) > 1 else np.array([0.0])
        return {"sent": self.sent, "ok": self.ok, "lost": self.lost, "p50_ms": round(float(np.median(lat)) * 1e3, 1),
                "max_ms": round(float(lat.max()) * 1e3, 1), "max_gap_ms": round(float(gaps.max()) * 1e3, 1)}


class Service:
    def __init__(self, address: str, proc: subprocess.Popen, log_path: Path, fault_dir: Path, model: Any):
        self.address, self.proc, self.log_path, self.fault_dir, self.model = address, proc, log_path, fault_dir, model

    @property
    def directory(self) -> Any:
        return ray.get_actor(DIRECTORY_NAME, namespace=NS)

    def dir(self, method: str, *args: Any) -> Any:
        return call_directory(self.directory, method, *args, budget_s=30.0, timeout=10.0)

    def replicas(self) -> dict[str, dict[str, Any]]:
        return self.dir("replicas").get("fx", {})

    def scale_to(self, n: int) -> float:
        """Ask for ``n`` replicas the way an operator does; seconds until the directory lists them."""
        request_scale(NS, "fx", n)
        return _wait(lambda: len(self.dir("endpoints", "fx")) == n and len(self.replicas()) == n,
                     90, f"{n} replicas")

    def pool(self, **overrides: Any) -> TeacherPool:
        return TeacherPool.from_ray(self.address, NS, ["fx"], **{**POOL, **overrides})

    def log_count(self, needle: str) -> int:
        return self.log_path.read_text(errors="replace").count(needle)


def _start_serve(spec_path: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "launch.serve", "--spec", str(spec_path), "--num-cpus", "4",
                                 "--reconcile-every", "0.1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=log, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        first = json.loads(lines.get(timeout=120))
    except queue.Empty:
        proc.kill()
        raise AssertionError(f"ckd-serve printed nothing in 120 s; log:\n{log_path.read_text()[-3000:]}") from None
    return proc, first["ray_address"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    assert not ray.is_initialized()
    root = tmp_path_factory.mktemp("faults")
    fault_dir = root / "faults"
    fault_dir.mkdir()
    ck = make_fixture_checkpoint(root / "fx", num_items=N_ITEMS, vocab_hash="fxhash", dim=16, seed=1,
                                 fault_dir=fault_dir)
    spec = {"namespace": NS, "teacher_modules": [fixture_teacher.__name__], "max_restarts": 5,
            "heartbeat_s": 0.5, "directory_ttl_s": 3.0, "drain_linger_s": 1.0,
            "liveness_timeout_s": 2.0, "liveness_failures": 2,
            "teachers": [{"name": "fx", "checkpoint": str(ck), "replicas": 2, "num_cpus": 0.25}]}
    spec_path = root / "serve.yaml"
    spec_path.write_text(json.dumps(spec))  # JSON is YAML
    log_path = root / "serve.log"
    proc, address = _start_serve(spec_path, log_path)
    try:
        join_ray(address, namespace=NS, logging_level="WARNING", log_to_driver=False)
        yield Service(address, proc, log_path, fault_dir, load_teacher(ck))
    finally:
        ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
        print(f"ckd-serve log: {log_path}; measured: {json.dumps(MEASURED)}", flush=True)
    assert rc == 0, f"ckd-serve exited {rc}; log:\n{log_path.read_text()[-3000:]}"


# -- the control plane ---------------------------------------------------------------------------

def test_directory_restart_under_serve_loop_keeps_targets_and_traffic(service):
    """The directory actor crashes and restarts (ray.kill, no_restart=False) while ckd-serve reconciles
    every 0.1 s and a student scores: the serve loop survives, the operator's scale-down to 1 stays 1,
    the restarted directory lists the replica at once, and no request is lost."""
    service.scale_to(1)
    only = next(iter(service.replicas().values()))["address"]
    gen0 = service.dir("generation")
    hammer = {"calls": 0, "retries": 0, "wrong": 0}
    stop = threading.Event()

    def read_targets() -> None:  # the reconcile loop's directory read, flat out, so some are in flight at the kill
        while not stop.is_set():
            got = call_directory(service.directory, "targets", budget_s=30.0,
                                 on_retry=lambda _: hammer.__setitem__("retries", hammer["retries"] + 1))
            hammer["calls"] += 1
            hammer["wrong"] += got.get("fx") != 1

    with service.pool() as pool, Traffic(pool, service.model) as tr:
        tr.wait_ok(20)
        readers = [threading.Thread(target=read_targets, daemon=True) for _ in range(3)]
        for th in readers:
            th.start()
        time.sleep(0.2)
        t_kill = time.monotonic()
        ray.kill(service.directory, no_restart=False)
        back_s = _wait(lambda: service.dir("generation") > gen0, 60, "directory restart")
        first_view = service.dir("view", ["fx"])
        _wait(lambda: service.dir("view", ["fx"])["settled"], 30, "directory settled")
        settled_s = time.monotonic() - t_kill
        stop.set()
        for th in readers:
            th.join(30)
        time.sleep(2.0)  # 20 reconcile rounds after the restart: a lost target would start a 2nd replica
        tr.wait_ok(20)
        counts = tr.stop()
        pool_stats = pool.stats()
    after = service.replicas()
    _record("directory restart", **counts, directory_back_s=round(back_s, 2),
            settled_s=round(settled_s, 2),
            reader_calls=hammer["calls"], reader_retries=hammer["retries"],
            serve_retries_logged=service.log_count("teacher directory unavailable"),
            reconcile_failures_logged=service.log_count("reconcile round failed"),
            pool_refresh_failures=pool_stats.get("refresh_failures", 0))
    assert counts["lost"] == 0 and counts["sent"] == counts["ok"] >= 40, (counts, tr.errors[:3])
    assert service.proc.poll() is None, "ckd-serve exited"
    assert first_view["generation"] > gen0 and first_view["endpoints"]["fx"] == [only]  # never an empty list
    assert hammer["wrong"] == 0 and hammer["calls"] > 0
    assert service.dir("targets")["fx"] == 1
    assert [e["address"] for e in after.values()] == [only]  # still exactly the one replica
    assert pool_stats["replicas/fx"] == 1


def test_directory_killed_for_good_is_recreated_with_its_state(service):
    """A directory killed without restart: the serve loop creates it again, restored from the GCS
    key-value store; replicas and clients find the new actor by name; nothing is lost."""
    service.scale_to(2)
    addrs = sorted(e["address"] for e in service.replicas().values())
    old = service.directory
    with service.pool() as pool, Traffic(pool, service.model) as tr:
        tr.wait_ok(20)
        ray.kill(old, no_restart=True)
        back_s = _wait(lambda: ray.get_actor(DIRECTORY_NAME, namespace=NS)._actor_id != old._actor_id, 60,
                       "a new directory actor")
        _wait(lambda: service.dir("view", ["fx"])["settled"], 30, "new directory settled")
        time.sleep(3.0)  # directory_ttl_s: restored entries that nobody heartbeats have expired by now
        tr.wait_ok(20)
        counts = tr.stop()
    _record("directory killed for good", **counts, recreated_s=round(back_s, 2))
    assert counts["lost"] == 0 and counts["sent"] == counts["ok"], (counts, tr.errors[:3])
    assert service.dir("targets")["fx"] == 2
    assert sorted(service.dir("endpoints", "fx")) == addrs
    assert service.proc.poll() is None


# -- replicas ------------------------------------------------------------------------------------

def test_replica_sigkill_under_traffic(service):
    """SIGKILL one of two replica processes: Ray restarts it (new port, same replica id), the pool
    fails over meanwhile and uses the restarted replica again; no request is lost."""
    service.scale_to(2)
    rid, entry = sorted(service.replicas().items())[0]
    with service.pool() as pool, Traffic(pool, service.model) as tr:
        tr.wait_ok(20)
        os.kill(int(entry["meta"]["pid"]), signal.SIGKILL)
        back_s = _wait(lambda: service.replicas().get(rid, entry)["address"] != entry["address"], 60,
                       "the killed replica to re-register")
        new = service.replicas()[rid]["address"]
        _wait(lambda: pool.stats().get(f"calls/fx@{new}", 0) > 0, 30, "traffic on the restarted replica")
        tr.wait_ok(10)
        counts = tr.stop()
        st = pool.stats()
    _record("replica SIGKILL", **counts, reregistered_s=round(back_s, 2), retries=st.get("retries", 0),
            quarantines=st.get("quarantines", 0))
    assert counts["lost"] == 0 and counts["sent"] == counts["ok"], (counts, tr.errors[:3])
    assert service.replicas()[rid]["meta"]["restarted"] is True


def test_slow_replica_is_routed_around_within_the_deadline(service):
    """One replica answers 3 s late (injected latency); with a 0.5 s deadline the pool quarantines it,
    serves from the other, and probes it back less and less often; no request is lost."""
    service.scale_to(2)
    (slow_rid, slow), (_, fast) = sorted(service.replicas().items())
    deadline_s = 0.5
    with service.pool(timeout_s=deadline_s) as pool, Traffic(pool, service.model) as tr:
        tr.wait_ok(10)
        base = pool.stats()
        set_replica_delay(service.fault_dir, int(slow["meta"]["pid"]), 3000)
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 6.0 and tr.lost == 0:
                time.sleep(0.1)
            counts = tr.stop()
            st = pool.stats()
        finally:
            set_replica_delay(service.fault_dir, int(slow["meta"]["pid"]), None)
    slow_calls = st.get(f"calls/fx@{slow['address']}", 0) - base.get(f"calls/fx@{slow['address']}", 0)
    fast_calls = st.get(f"calls/fx@{fast['address']}", 0) - base.get(f"calls/fx@{fast['address']}", 0)
    deadline_hits = st.get("retries", 0) - base.get("retries", 0)
    _record("slow replica (3 s, deadline 0.5 s)", **counts, deadline_hits=deadline_hits,
            quarantines=st.get("quarantines", 0) - base.get("quarantines", 0),
            slow_replica_calls=slow_calls, fast_replica_calls=fast_calls)
    assert counts["lost"] == 0 and counts["sent"] == counts["ok"], (counts, tr.errors[:3])
    assert deadline_hits >= 1 and fast_calls > 10 * max(1, slow_calls)
    # Healed, it serves again.
    with service.pool() as pool:
        _wait(lambda: pool.stats()["healthy/fx"] == 2, 30, "both healthy")
        for h, n, c, want in _batches(service.model):
            np.testing.assert_allclose(pool.score(h, n, c)["fx"], want, rtol=1e-5, atol=1e-6)
        assert pool.stats().get(f"calls/fx@{slow['address']}", 0) >= 1


def _vm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for pid {pid}")


def test_replica_out_of_memory_is_routed_around_and_replaced(service):
    """Out of memory, provoked safely: one replica's address space is capped (RLIMIT_AS, set from here
    with prlimit) 16 MiB above what it has mapped, so a 16 MiB request fails to allocate inside
    that process only; the host's memory is never at stake. Whatever part of the replica the
    failure hits, no request may be lost, and the teacher must end with two working replicas: a
    replica whose gRPC server died exits on its failed self-checks and Ray restarts it (no limit)."""
    service.scale_to(2)
    (rid, victim), _ = sorted(service.replicas().items())
    pid = int(victim["meta"]["pid"])
    cap = _vm_bytes(pid) + 16 * 2**20
    rng = np.random.default_rng(5)
    b, c = 1024, 2048  # per-row candidates: a 16 MiB request, 8 MiB of scores (inside the limits)
    h = rng.integers(1, N_ITEMS, size=(b, 10))
    n = np.full(b, 10)
    cands = rng.integers(1, N_ITEMS, size=(b, c))
    want = service.model.score(torch.from_numpy(h[:4]), torch.from_numpy(n[:4]), torch.from_numpy(cands[:4])).numpy()
    big = {"sent": 0, "ok": 0, "lost": 0}
    try:
        resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))
    except PermissionError:
        pytest.skip("this user may not cap another process's address space (prlimit)")
    try:
        with service.pool() as pool, service.pool(timeout_s=5.0) as big_pool, Traffic(pool, service.model) as tr:
            tr.wait_ok(10)
            t0 = time.monotonic()
            for _ in range(4):  # round-robin: at least two reach the capped replica
                big["sent"] += 1
                try:
                    got = big_pool.score(h, n, cands)["fx"]
                    assert got.shape == (b, c)
                    np.testing.assert_allclose(got[:4], want, rtol=1e-5, atol=1e-6)
                    big["ok"] += 1
                except Exception as exc:  # noqa: BLE001 — counted
                    big["lost"] += 1
                    tr.errors.append(repr(exc)[:300])
            try:
                replaced_s = _wait(lambda: service.replicas().get(rid, victim)["meta"]["pid"] != pid, 30,
                                   "the capped replica to be replaced")
                outcome = "server died; replica exited on failed self-checks and Ray restarted it"
            except AssertionError:
                replaced_s = None
                outcome = "replica survived (allocation failed inside a call, answered with an error)"
            tr.wait_ok(10)
            counts = tr.stop()
            st = big_pool.stats()
    finally:
        if Path(f"/proc/{pid}").exists():  # still the capped process: lift the cap
            resource.prlimit(pid, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    _record("replica out of memory (RLIMIT_AS)", **counts, big_sent=big["sent"], big_lost=big["lost"],
            big_retries=st.get("retries", 0), big_quarantines=st.get("quarantines", 0),
            replaced_s=None if replaced_s is None else round(replaced_s, 2),
            seconds_from_cap=round(time.monotonic() - t0, 2), outcome=outcome)
    assert big["lost"] == 0 and big["ok"] == big["sent"], tr.errors[:3]
    assert counts["lost"] == 0 and counts["sent"] == counts["ok"], (counts, tr.errors[:3])
    with service.pool() as pool:  # two working replicas again
        _wait(lambda: pool.stats()["healthy/fx"] == 2, 30, "both healthy")
        for hb, nb, cb, wb in _batches(service.model):
            np.testing.assert_allclose(pool.score(hb, nb, cb)["fx"], wb, rtol=1e-5, atol=1e-6)
        assert len({k for k, v in pool.stats().items() if k.startswith("calls/fx@") and v > 0}) == 2


def test_scaling_during_traffic_loses_nothing(service):
    """2 -> 3 -> 1 -> 2 replicas through the directory (what ckd-scale does) while a student scores."""
    service.scale_to(2)
    steps = {}
    with service.pool() as pool, Traffic(pool, service.model) as tr:
        tr.wait_ok(10)
        for n in (3, 1, 2):
            steps[n] = round(service.scale_to(n), 2)
            _wait(lambda: pool.stats()["replicas/fx"] == n, 30, f"the pool to see {n} replicas")
            tr.wait_ok(15)
        counts = tr.stop()
    _record("scale 2-3-1-2 under traffic", **counts, **{f"to_{n}_s": s for n, s in steps.items()})
    assert counts["lost"] == 0 and counts["sent"] == counts["ok"], (counts, tr.errors[:3])


# -- operator errors -------------------------------------------------------------------------------

def test_scale_refuses_an_unknown_teacher_naming_the_known_ones(service):
    with pytest.raises(ScaleError, match=r"no teacher 'fxx'.*known teachers: fx"):
        request_scale(NS, "fxx", 1)
    assert "fxx" not in service.dir("targets")
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-m", "launch.scale", "--address", service.address, "--namespace", NS,
                          "--teacher", "fxx", "--replicas", "1", "--wait", "0"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "known teachers: fx" in out.stderr, out.stderr[-2000:]
    assert reconciler_problem(service.directory) is None  # ckd-serve reconciles: a target would be applied


# -- no Ray needed -------------------------------------------------------------------------------

def test_pool_keeps_known_replicas_while_the_directory_is_unsettled():
    """A directory that has just restarted may list fewer replicas (none) than exist: the pool adds,
    never drops, until the directory settles; then it follows the directory again."""
    answers = [Discovery({"fx": ["127.0.0.1:1", "127.0.0.1:2"]}, True, 1),
               Discovery({"fx": []}, False, 2),
               Discovery({"fx": ["127.0.0.1:3"]}, False, 2),
               Discovery({"fx": ["127.0.0.1:3"]}, True, 2)]
    it = iter(answers)
    pool = TeacherPool(source=lambda: next(it), teachers=["fx"])
    seen = [pool.stats()["replicas/fx"]]
    for _ in range(3):
        pool.refresh()
        seen.append(pool.stats()["replicas/fx"])
    assert seen == [2, 2, 3, 1]
    assert pool.stats()["refresh_held"] == 2
    pool.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "teacher-host", "::"])
def test_spec_refuses_binding_beyond_loopback_without_token_and_tls(host, tmp_path, monkeypatch, caplog):
    base = {"bind_host": host, "teachers": [{"name": "t", "checkpoint": str(tmp_path)}]}
    with pytest.raises(ConfigError, match="no token_env .* and no tls .*allow_insecure_bind: true"):
        load_spec(base, check_checkpoints=False)
    monkeypatch.setenv("CKD_T_TOKEN", "s3cret")
    with pytest.raises(ConfigError, match="no tls"):
        load_spec({**base, "token_env": "CKD_T_TOKEN"}, check_checkpoints=False)
    tls = {"cert_chain": "c.pem", "private_key": "k.pem"}
    with pytest.raises(ConfigError, match="no token_env"):
        load_spec({**base, "tls": tls}, check_checkpoints=False)
    assert load_spec({**base, "tls": tls, "token_env": "CKD_T_TOKEN"}, check_checkpoints=False).bind_host == host
    with caplog.at_level(logging.WARNING, logger="cluster.deploy"):
        assert load_spec({**base, "allow_insecure_bind": True}, check_checkpoints=False).allow_insecure_bind
    assert "INSECURE" in caplog.text


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_binds_need_neither(host, tmp_path):
    spec = load_spec({"bind_host": host, "teachers": [{"name": "t", "checkpoint": str(tmp_path)}]},
                     check_checkpoints=False)
    assert spec.bind_host == host and not spec.allow_insecure_bind
