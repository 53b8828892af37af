"""Core affinity: a teacher replica started with a core set runs only on it; the student's --cpus.

Every affinity is read back from the OS (/proc/<pid>/status Cpus_allowed_list and each thread's
sched_getaffinity), not from what the process says about itself. This box may have only 2 cores,
so replicas are pinned to core 1 (and, with cpus_per_replica, to 0 and 1).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import ray

from benchmarks import fixture_teacher
from benchmarks.fixture_teacher import make_fixture_checkpoint
from ckd.affinity import AffinityError, format_cpus, parse_cpus, pin_process, process_cpus, thread_cpus
from ckd.config import ConfigError, from_dict
from cluster.deploy import TeacherSpec, start_embedded
from tests.conftest import REPO_ROOT
from tests.polling import wait_until

pytestmark = pytest.mark.integration

NS = "ckd-test-affinity"
ALL = set(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(not {0, 1} <= ALL, reason="needs cores 0 and 1")


def test_parse_and_format_core_lists():
    assert parse_cpus("0,2-3, 5") == [0, 2, 3, 5] and parse_cpus([3, 1, 1]) == [1, 3]
    assert format_cpus([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    for bad in ("", "a", "3-1", "-1", [-2]):
        with pytest.raises(AffinityError):
            parse_cpus(bad)
    with pytest.raises(AffinityError, match="do not exist"):
        pin_process([os.cpu_count() + 3])


def test_teacher_spec_core_fields_are_checked():
    ok = from_dict(TeacherSpec, {"name": "t", "checkpoint": "x", "cpus": [2, 3, 4, 5], "cpus_per_replica": 2})
    ok.validate()
    assert ok.cpu_slots == 2 and ok.replica_cpus(0) == [2, 3] and ok.replica_cpus(1) == [4, 5]
    whole = TeacherSpec(name="t", checkpoint="x", cpus=[1])
    assert whole.cpu_slots == 1 and whole.replica_cpus(0) == [1]
    assert TeacherSpec(name="t", checkpoint="x").cpu_slots == 0
    for bad, match in (({"cpus": [1, 1]}, "twice"), ({"cpus": [0, 1, 2], "cpus_per_replica": 2}, "divide"),
                       ({"cpus": [-1]}, ">= 0"), ({"cpus_per_replica": 1}, "empty")):
        with pytest.raises(ConfigError, match=match):
            TeacherSpec(name="t", checkpoint="x", **bad).validate()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    ck = tmp_path_factory.mktemp("ckpt")
    fx = make_fixture_checkpoint(ck / "fx", num_items=200, vocab_hash="fxhash", dim=8, seed=1)
    spec = {"namespace": NS, "teacher_modules": [fixture_teacher.__name__], "heartbeat_s": 0.5,
            "drain_linger_s": 0.2, "max_restarts": 2,
            "teachers": [
                # one replica on core 1 only
                {"name": "pinned", "checkpoint": str(fx), "replicas": 1, "num_cpus": 0.25, "cpus": [1]},
                # two replicas, one core each, in slot order: 0 then 1
                {"name": "split", "checkpoint": str(fx), "replicas": 2, "num_cpus": 0.25, "cpus": [0, 1],
                 "cpus_per_replica": 1},
                # the control: no cores given, so not pinned
                {"name": "free", "checkpoint": str(fx), "replicas": 1, "num_cpus": 0.25}]}
    address, dep = start_embedded(spec, num_cpus=2)
    yield address, dep
    dep.shutdown()


def _replica_cores(dep, name):
    """{replica_id: (pid, cores of the process, cores of each of its threads)} read from /proc."""
    out = {}
    for info in dep.infos(name):
        pid = info["pid"]
        out[info["replica_id"]] = (pid, process_cpus(pid), thread_cpus(pid), info["cpus"])
    return out


@needs_two
def test_replica_runs_only_on_its_cores(deployed):
    _, dep = deployed
    (rid, (pid, cores, threads, reported)), = _replica_cores(dep, "pinned").items()
    assert pid != os.getpid()
    assert cores == {1}
    assert len(threads) > 1  # a real Ray worker: core worker, gRPC server, batcher... all of them
    assert all(c == {1} for c in threads.values()), threads
    assert reported == [1]
    # cpus_per_replica: each replica its own core, in slot order.
    split = _replica_cores(dep, "split")
    assert {r: c for r, (_, c, _, _) in split.items()} == {"split-0": {0}, "split-1": {1}}
    for _, _, threads, _ in split.values():
        assert len({frozenset(c) for c in threads.values()}) == 1
    # The control runs wherever the OS likes.
    (_, (_, free, _, _)), = _replica_cores(dep, "free").items()
    assert free == ALL


@needs_two
def test_restarted_and_rescaled_replicas_keep_their_cores(deployed):
    _, dep = deployed
    (rid, actor), = dep.replica_handles("pinned")
    old_pid = dep.infos("pinned")[0]["pid"]
    ray.kill(actor, no_restart=False)  # a crash: Ray runs __init__ again in a new process
    # generous: the restarted replica loads its model on core 1 alone, which a busy box (a training
    # pinned there) can slow past a minute; what is asserted is the restart and its cores, not speed
    wait_until(lambda: _alive_pid(dep, "pinned") not in (None, old_pid), timeout=240, what="restart")
    new_pid = dep.infos("pinned")[0]["pid"]
    assert process_cpus(new_pid) == {1} and all(c == {1} for c in thread_cpus(new_pid).values())
    # Scale split 2 -> 1 -> 2: the replica started again takes the core the removed one left.
    dep.scale("split", 1)
    assert {r: c for r, (_, c, _, _) in _replica_cores(dep, "split").items()} == {"split-0": {0}}
    dep.scale("split", 2)
    assert {r: c for r, (_, c, _, _) in _replica_cores(dep, "split").items()} == {"split-0": {0}, "split-2": {1}}


def _alive_pid(dep, name):
    try:
        return dep.infos(name)[0]["pid"]
    except Exception:  # noqa: BLE001 — restarting
        return None


def test_student_pins_every_thread_and_refuses_bad_lists(tmp_path):
    """launch.distill's --cpus: a process that already runs threads (like a rank with torch, gRPC
    and Ray threads) has every one of them moved, read back from outside the process."""
    code = textwrap.dedent("""
        import sys, threading, time
        from launch.distill import parse_student_cpus, pin_student
        stop = threading.Event()
        threads = [threading.Thread(target=stop.wait) for _ in range(3)]
        for t in threads:
            t.start()
        pin_student(parse_student_cpus(sys.argv[1]))
        late = threading.Thread(target=stop.wait)   # started after pinning: inherits the set
        late.start()
        print("ready", flush=True)
        sys.stdin.readline()
        stop.set()
    """)
    target = "1" if 1 in ALL else str(min(ALL))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, target], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO_ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        threads = thread_cpus(proc.pid)
        assert len(threads) >= 5  # main + 3 before + 1 after
        assert all(c == {int(target)} for c in threads.values()), threads
        assert process_cpus(proc.pid) == {int(target)}
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    # Bad lists are config errors (exit 2 with the reason), before anything starts.
    for bad, why in (("x", "not a core id"), (str(os.cpu_count() + 1), "this machine has cores")):
        run = subprocess.run([sys.executable, "-m", "launch.distill", "--cpus", bad, "--teachers", "none",
                              "--run-dir", str(tmp_path / "r")], capture_output=True, text=True, env=env,
                             cwd=REPO_ROOT, timeout=120)
        assert run.returncode == 2 and why in run.stderr, run.stderr


@pytest.mark.unit
def test_default_gpu_share_is_one_device_per_replica_where_there_are_enough():
    from cluster.deploy import default_gpu_share

    assert default_gpu_share(0, 3) == 0.0  # a CPU cluster
    assert default_gpu_share(4, 3) == default_gpu_share(3, 3) == 1.0  # one GPU per teacher
    assert default_gpu_share(1, 3) == 0.33 and 3 * default_gpu_share(1, 3) <= 1.0  # packed onto one lent GPU
    assert default_gpu_share(2, 3) == 0.66 and default_gpu_share(8, 0) == 0.0


@needs_two
def test_a_run_started_on_fewer_cores_records_them_in_its_machine():
    """A process started under taskset (as a run beside another is) says so in its machine line, so a
    wall time measured on one core is not read as the whole box's; unpinned, the line is unchanged."""
    code = "from research.experiments import machine_description as m; print(m('cpu'))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                            preexec_fn=lambda: os.sched_setaffinity(0, {1}), check=True).stdout.strip()
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          preexec_fn=lambda: os.sched_setaffinity(0, ALL), check=True).stdout.strip()
    n = os.cpu_count()
    assert pinned.startswith(f"{n} cores (") and pinned.endswith(f", pinned to 1 of them (cpus 1)")
    if len(ALL) == n:  # this test may use every core: unpinned, nothing is added
        assert "pinned" not in free and pinned == free + ", pinned to 1 of them (cpus 1)"


@needs_two
def test_pin_process_catches_threads_started_while_it_pins():
    """Threads that still-unpinned threads start during the pinning pass inherit the old set;
    pin_process passes again until none is left outside (the race a loaded box showed in a Ray worker)."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import threading, time
        def sleeper():
            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
        def spawn():  # start long-lived threads as fast as possible for a while
            end = time.monotonic() + 5.0
            while time.monotonic() < end:
                sleeper()
        for _ in range(500):  # older threads (lower ids) that a pass pins before it reaches the spawners
            sleeper()
        for _ in range(4):
            threading.Thread(target=spawn, daemon=True).start()
        print("ready", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        pin_process([1], pid=child.pid)
        threads = thread_cpus(child.pid)
        assert len(threads) > 20
        stray = {tid: c for tid, c in threads.items() if c != {1}}
        assert not stray, f"{len(stray)} of {len(threads)} threads outside core 1"
    finally:
        child.kill()
        child.wait()
