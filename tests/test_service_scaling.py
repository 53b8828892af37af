"""benchmarks/service_scaling.py end to end, small: a real embedded Ray (loopback), a fixture teacher
on Scientific's vocabulary scaled 1 -> 2 replicas, 1 and 2 real client processes each with its own
TeacherPool, real Scientific histories. Asserted on the JSON and on the OS: every (R, N) cell,
every request answered (sent == received per client, errors 0), every answered request counted on
one replica, each replica's cores read back equal to the requested slots, and nothing left running.
No timing asserts (speed belongs to the benchmark's own runs).
"""
from __future__ import annotations

import json
import os

import pytest
import ray

from benchmarks import service_scaling
from tests.polling import wait_until

pytestmark = pytest.mark.integration

TWO_CORES = {0, 1} <= set(os.sched_getaffinity(0))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A zombie still answers kill(0); it no longer runs.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_small_load_run_answers_every_request_on_the_requested_cores(tmp_path, data_dir):
    out = tmp_path / "scaling.json"
    argv = ["--fixture", "--replicas", "1,2", "--clients", "1,2", "--duration", "1.0", "--warmup", "2",
            "--ramp", "0.2", "--batch", "16", "--candidates", "100", "--data-dir", str(data_dir),
            "--teacher-cpus", "0,1" if TWO_CORES else "none", "--out", str(out)]
    assert service_scaling.main(argv) == 0
    res = json.loads(out.read_text())

    cells = {(c["replicas"], c["clients"]): c for c in res["cells"]}
    assert set(cells) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    deployments = {d["replicas"]: d for d in res["deployments"]}
    assert set(deployments) == {1, 2}
    for (r, n), c in cells.items():
        assert c["errors"] == 0, c["per_client"]
        assert c["sent"] == c["received"] > 0
        assert len(c["per_client"]) == n
        for pc in c["per_client"]:
            assert pc["warmup_sent"] == pc["warmup_received"] == 2
            assert pc["sent"] == pc["received"] > 0 and pc["errors"] == 0, pc
            assert pc["in_window"] > 0
        assert c["latency"]["n"] > 0 and c["requests_in_window"] > 0
        # Every answered request of the timed loop was served by exactly one replica of this R.
        ids = {x["replica_id"] for x in deployments[r]["replica_info"]}
        assert set(c["requests_per_replica"]) == ids
        assert c["splits"] == 0
        assert sum(c["requests_per_replica"].values()) == sum(pc["received"] for pc in c["per_client"])
        if r == 2:  # round-robin reaches both replicas
            assert all(v > 0 for v in c["requests_per_replica"].values()), c["requests_per_replica"]
    assert set(res["speedup_vs_1_replica"]) == {"1", "2"}
    assert res["best_speedup_1_to_2"] is not None and res["best_speedup_1_to_2"]["clients"] in (1, 2)
    assert res["machine"]["cpus"] == os.cpu_count() and res["git_sha"]
    assert res["settings"]["replicas"] == [1, 2] and res["settings"]["clients"] == [1, 2]

    # Affinity as read back from /proc while the replicas ran: one core slot each, in slot order.
    if TWO_CORES:
        assert deployments[1]["requested_core_sets"] == [[0]]
        assert deployments[2]["requested_core_sets"] == [[0], [1]]
        for d in deployments.values():
            assert d["affinity_matches_request"] is True and d["shared_cores"] is False
            for x in d["replica_info"]:
                assert x["cpus_os"] == x["cpus_reported"] and x["threads_on_other_cores"] == 0, x
        assert sorted(x["cpus_os"] for x in deployments[2]["replica_info"]) == [[0], [1]]

    # Everything it started is stopped: the client processes exited cleanly, the replicas are gone,
    # and this process is no longer connected to a Ray.
    assert res["client_exit_codes"] == [0, 0]
    assert not ray.is_initialized()
    pids = [x["pid"] for x in res["client_info"]] + [x["pid"] for d in res["deployments"] for x in d["replica_info"]]
    wait_until(lambda: all(_gone(p) for p in pids), timeout=30, what="client and replica processes to exit")


def test_refuses_bad_settings_and_existing_output(tmp_path, monkeypatch, capsys):
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    assert service_scaling.main(["--fixture", "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "{}"
    assert service_scaling.main(["--fixture", "--out", "results/bench_service_scaling_test.json"]) == 2
    assert "under results/" in capsys.readouterr().err
    assert not (service_scaling.REPO / "results" / "bench_service_scaling_test.json").exists()
    assert service_scaling.main(["--fixture", "--replicas", "1,x", "--out", str(tmp_path / "a.json")]) == 2
    assert "--replicas" in capsys.readouterr().err
    # The default checkpoint, when it is not built yet, is refused with the command that builds it.
    monkeypatch.setattr(service_scaling, "DEFAULT_CHECKPOINT", "runs/no-such-run/unisrec/best")
    assert service_scaling.main(["--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "not complete" in err and service_scaling.DEMO_BUILD in err
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_requests_of_a_union_vocabulary_carry_one_domains_rows_and_items(tmp_path, data_dir):
    """--domains / --request-domain: a union teacher's vocabulary, requests from one of its domains.
    Every history item and every candidate lies in that domain's global id range; the rows are its
    training rows; the facts name the vocabulary the teacher must serve."""
    import numpy as np

    from ckd.data.multidomain import load_multidomain

    path = tmp_path / "req.npz"
    facts = service_scaling.build_requests(str(data_dir), 8, 50, 50, 0, path,
                                           domains=("Scientific", "Office14"), request_domain="Office14")
    ds = load_multidomain(str(data_dir), ["Scientific", "Office14"], max_len=50)
    start, stop = ds.domain_range(1)
    assert start == 4386  # Office14's ids follow Scientific's 4,385 items (and padding 0)
    got = np.load(path)
    hist, cands = got["histories"], got["candidates"]
    items = hist[hist > 0]
    assert items.size > 0 and items.min() >= start and items.max() < stop
    assert cands.size == 50 and cands.min() >= start and cands.max() < stop and len(set(cands.tolist())) == 50
    train = ds.splits["train"]
    assert facts["train_rows"] == int((train.domains == 1).sum()) < len(train)
    assert facts["domain"] == "Office14" and facts["domains"] == ["Scientific", "Office14"]
    assert facts["vocab_hash"] == ds.vocab_hash() and facts["catalogue_items"] == stop - start


def test_refuses_a_request_domain_outside_the_vocabulary(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert service_scaling.main(["--fixture", "--domains", "Scientific+Office14", "--request-domain", "Games",
                                 "--out", str(out)]) == 2
    assert "--request-domain 'Games'" in capsys.readouterr().err and not out.exists()
