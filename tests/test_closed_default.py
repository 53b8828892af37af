"""The embedded default is closed: every socket its Ray and its replicas listen on is loopback.

A process starts the embedded default exactly as ``launch/distill.py`` does (``start_embedded`` on
a spec, no environment prepared for it: Ray's loopback mode is removed from its environment), then
this test reads the listening TCP sockets of that process and of every process under it from the
OS (psutil, i.e. /proc/net/tcp*) and checks each address is loopback; connecting to the GCS port on
the host's other addresses is refused. A second process, also unprepared, joins through
``TeacherPool.from_ray`` (what another rank does) and scores a batch: sent 1, lost 0.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from benchmarks import fixture_teacher
from benchmarks.fixture_teacher import make_fixture_checkpoint
from ckd.ray_loopback import RAY_LOOPBACK_ENV, is_loopback_address
from teachers.base import load_teacher

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
NS = "ckd-closed-test"
N_ITEMS = 300

EMBEDDED = textwrap.dedent("""
    import json, sys, ray
    from cluster.deploy import start_embedded
    spec = json.loads(sys.argv[1])
    address, dep = start_embedded(spec, num_cpus=2)
    node = ray._private.worker._global_node
    print(json.dumps({"address": address, "session": node.get_session_dir_path(),
                      "replica_pids": [i["pid"] for i in dep.infos("fx")],
                      "endpoints": dep.endpoints()["fx"]}), flush=True)
    sys.stdin.read()  # until the test closes stdin
    dep.shutdown()
""")

JOIN = textwrap.dedent("""
    import json, sys
    import numpy as np
    from student.teacher_pool import TeacherPool
    address, ns = sys.argv[1], sys.argv[2]
    with TeacherPool.from_ray(address, ns, ["fx"], timeout_s=30) as pool:
        pool.wait_ready(timeout=60)
        out = pool.score(np.array([[1, 2, 3], [4, 5, 0]]), np.array([3, 2]), np.array([7, 8, 9, 10]))["fx"]
        print(json.dumps({"scores": out.tolist(), "calls": pool.stats().get("calls", 0)}), flush=True)
""")


def _unprepared_env() -> dict[str, str]:
    """This environment without Ray's loopback mode (the test suite's conftest sets it)."""
    env = {k: v for k, v in os.environ.items() if k != RAY_LOOPBACK_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _is_loopback_ip(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


def _ray_processes(root: psutil.Process, session: str) -> dict[int, psutil.Process]:
    """The embedded process, everything under it, and any process naming its Ray session."""
    procs = {root.pid: root, **{p.pid: p for p in root.children(recursive=True)}}
    for p in psutil.process_iter(["cmdline"]):
        if session in " ".join(p.info["cmdline"] or ()):
            procs[p.pid] = p
    return procs


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    ck = make_fixture_checkpoint(tmp_path_factory.mktemp("closed") / "fx", num_items=N_ITEMS, vocab_hash="closed",
                                 dim=8, seed=4)
    spec = {"namespace": NS, "teacher_modules": [fixture_teacher.__name__], "heartbeat_s": 0.5,
            "teachers": [{"name": "fx", "checkpoint": str(ck), "replicas": 1, "num_cpus": 0.5}]}
    proc = subprocess.Popen([sys.executable, "-c", EMBEDDED, json.dumps(spec)], cwd=REPO, env=_unprepared_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the embedded default did not start: {proc.stderr.read()[-3000:]}")
        yield proc, json.loads(line), ck
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_every_listening_socket_of_the_embedded_default_is_loopback(embedded):
    proc, info, _ = embedded
    assert is_loopback_address(info["address"]), info["address"]
    gcs_port = int(info["address"].rsplit(":", 1)[1])
    procs = _ray_processes(psutil.Process(proc.pid), Path(info["session"]).name)
    listening: list[tuple[str, int, int, str]] = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.Error:
                name = "?"
            listening.append((c.laddr.ip, c.laddr.port, c.pid, name))
    names = {n for *_, n in listening}
    # Not vacuous: the GCS, the raylet and the teacher replica are among the listeners read.
    assert any(n.startswith("gcs_server") for n in names) and any(n.startswith("raylet") for n in names), listening
    assert any(port == gcs_port for _, port, _, _ in listening), (gcs_port, listening)
    replica_ports = {int(e.rsplit(":", 1)[1]) for e in info["endpoints"]}
    assert {port for _, port, pid, _ in listening if pid in info["replica_pids"]} >= replica_ports, listening
    open_ = [x for x in listening if not _is_loopback_ip(x[0])]
    assert not open_, f"listening beyond loopback (ip, port, pid, process): {open_}"


def test_the_gcs_port_refuses_the_hosts_other_addresses(embedded):
    _, info, _ = embedded
    gcs_port = int(info["address"].rsplit(":", 1)[1])
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback]
    for ip in others:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            assert s.connect_ex((ip, gcs_port)) != 0, f"GCS port {gcs_port} accepts connections on {ip}"


def test_another_process_joins_the_loopback_ray_and_scores(embedded):
    _, info, ck = embedded
    out = subprocess.run([sys.executable, "-c", JOIN, info["address"], NS], cwd=REPO, env=_unprepared_env(),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["calls"] == 1  # sent 1, answered 1, lost 0
    model = load_teacher(ck)
    h = torch.tensor([[1, 2, 3], [4, 5, 0]])
    want = model.score(h, torch.tensor([3, 2]), torch.tensor([7, 8, 9, 10])).numpy()
    np.testing.assert_allclose(np.asarray(got["scores"], np.float32), want, rtol=1e-6, atol=1e-7)
