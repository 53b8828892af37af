"""Service scaling under load: Score throughput of the served teacher pool against replicas and clients.

    python -m benchmarks.service_scaling                                  # demo UniSRec, R 1,2,4 x N 1,2,4,8
    python -m benchmarks.service_scaling --teacher-cpus 0,1 --client-cpus 2,3 --duration 20
    python -m benchmarks.service_scaling --fixture --replicas 1,2 --clients 1,2 --duration 2   # smoke

The teacher is deployed as the system deploys it: an embedded local Ray in loopback mode
(cluster.deploy.start_embedded, as launch/distill.py starts it) serving one teacher from a
TeacherSpec, scaled to each replica count R of --replicas (TeacherDeployment.scale). Each replica is
pinned to its own core set (TeacherSpec.cpus / cpus_per_replica): --teacher-cpus split into slots of
--cpus-per-replica cores (default: as many cores as the largest R leaves each replica, at least 1);
with more replicas than slots, replicas share slots and the JSON says so (``shared_cores``). Every
replica's affinity is read back from the OS (/proc/<pid>/status) and compared with the request.

Clients: N concurrent client *processes* (N in --clients), each with its own
student.teacher_pool.TeacherPool joined to the deployment through the directory actor
(TeacherPool.from_ray, as a student process connects: wait_ready, then check_contract against the
data's vocabulary). They are the "K students sharing one teacher pool" view too: N student
processes, one deployment. Each sends Score requests of --batch real histories (rows of the
training split of --request-domain, default Scientific, from load_multidomain(CKD_DATA_DIR,
--domains), the teacher's vocabulary: Scientific+Office14+Games for a union teacher) x --candidates
shared candidates of that domain (default: its whole catalogue, 4385 items on Scientific: the
whole-catalogue KD request; the in-batch KD request is about --batch candidates) in a closed loop.
Per (R, N) cell: --warmup requests per client, then all clients run together; the window opens
--ramp seconds after they start and lasts --duration seconds. Throughput counts the requests
completed inside the window; latency is that of the requests sent inside it. Client processes are
pinned to --client-cpus when given (all of them to that set).

Per cell: batches/s, rows/s, p50/p99 latency, requests per replica (the clients' TeacherPool
counters by replica address), errors (must be 0), requests sent and answered per client, the CPU
seconds the replicas and the clients used in the window (/proc/<pid>/stat) and the teacher cores'
utilisation (near 1: the clients saturated the replicas). Speed-up: batches/s at R against R = 1 at
the same N; the JSON keeps the best 1 -> 2 replica speed-up over N.

Cores: the clean measurement gives the clients cores of their own besides the replicas', e.g. on
4 cores --teacher-cpus 0,1 --client-cpus 2,3 (R=1 on core 0, R=2 on cores 0 and 1, R=4 two per
core). On 2 cores the clients cannot have their own: --teacher-cpus 0,1 with the clients unpinned;
each cell's client_cpu_share says how much of the CPU of the scoring path the clients took (at R=2,
from the replicas' cores). Ray's own daemons are never pinned.

Teacher: --checkpoint (default the CPU demo UniSRec, runs/demo/teachers/unisrec/best; a missing one
is refused with its build command), or --fixture for a generated mean-pool teacher on the data's
vocabulary (benchmarks/fixture_teacher.py: tiny compute, for smoke tests). --precision sets
TeacherSpec.precision.

Writes JSON (default runs/bench_service_scaling.json; an existing file, and anything under
results/, only with --overwrite) and prints a table. Everything it starts (client processes, Ray) is
stopped at the end, on error and on Ctrl-C / SIGTERM too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "runs/bench_service_scaling.json"
DEFAULT_CHECKPOINT = "runs/demo/teachers/unisrec/best"
DEMO_BUILD = "ckd-train-teacher --config configs/demo/unisrec.yaml --run-dir runs/demo/teachers/unisrec"
DOMAIN = "Scientific"  # the default data, and the domain whose rows the requests carry
TEACHER = "teacher"  # the served teacher's name in the deploy spec
N_BATCHES = 16  # distinct request batches each client cycles through


class BenchError(RuntimeError):
    """The benchmark could not be set up or a client failed (the message says which and why)."""


# ----------------------------------------------------------------------------- small helpers


def parse_int_list(text: str, what: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4] (distinct, order kept); BenchError for anything else or values < 1."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise BenchError(f"{what}: {part!r} is not an integer (in {text!r})") from None
        if v < 1:
            raise BenchError(f"{what}: values must be >= 1, got {v}")
        if v not in out:
            out.append(v)
    if not out:
        raise BenchError(f"{what}: empty list {text!r}")
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (every thread), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def percentiles(lat_s: list[float]) -> dict[str, float | None]:
    if not lat_s:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "n": 0}
    a = np.asarray(lat_s, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": int(a.size)}


def machine() -> dict[str, Any]:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        ram = None
    return {"cpus": os.cpu_count(), "available_cpus": sorted(os.sched_getaffinity(0)),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "ram_gib": ram, "loadavg_start": list(os.getloadavg())}


def refuse_out(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` may not be written (None: it may): anything under results/, or an existing
    file, needs --overwrite (ckd.reporting.overwrite_refusal)."""
    from ckd.reporting import overwrite_refusal

    results = (REPO / "results").resolve()
    resolved = out.resolve()
    if (resolved == results or results in resolved.parents) and not overwrite:
        return f"{out} is under results/ (committed evidence): pass --overwrite to write there"
    return overwrite_refusal(out, overwrite)


def _repo_path(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO / path


# ----------------------------------------------------------------------------- core plan


def plan_cores(teacher_cpus: list[int] | None, per_replica: int | None, replicas: list[int]
               ) -> tuple[list[int], int]:
    """(the cores handed to TeacherSpec.cpus, cpus_per_replica): slots of ``per_replica`` cores
    (default: len(cores) // max(replicas), at least 1), the cores beyond the last whole slot left out."""
    if not teacher_cpus:
        return [], 0
    k = per_replica or max(1, len(teacher_cpus) // max(replicas))
    if k > len(teacher_cpus):
        raise BenchError(f"--cpus-per-replica {k} is more than the {len(teacher_cpus)} teacher cores")
    slots = len(teacher_cpus) // k
    return list(teacher_cpus[:slots * k]), k


def requested_core_sets(cpus: list[int], k: int, r: int) -> list[list[int]] | None:
    """The core sets ``r`` replicas are given (TeacherDeployment fills the least-used slot first,
    so slots are shared round-robin), sorted; None when the teacher is not pinned."""
    if not cpus:
        return None
    slots = len(cpus) // k
    return sorted(sorted(cpus[(i % slots) * k:(i % slots + 1) * k]) for i in range(r))


# ----------------------------------------------------------------------------- the request data


def build_requests(data_dir: str, batch: int, candidates: int, max_len: int, seed: int, path: Path,
                   domains: tuple[str, ...] = (DOMAIN,), request_domain: str = DOMAIN) -> dict[str, Any]:
    """Draw N_BATCHES batches of ``batch`` real training rows of ``request_domain`` and the candidate
    list (items of that domain), save them to ``path`` (.npz, read by every client) and return the
    data's facts. ``domains`` is the vocabulary the teacher serves (a union teacher's, in its order)."""
    from ckd.data.multidomain import load_multidomain

    ds = load_multidomain(data_dir, list(domains), max_len=max_len)
    d = ds.domain_index(request_domain)
    train = ds.splits["train"]
    train = train.subset(np.flatnonzero(train.domains == d))
    start, stop = ds.domain_range(d)
    catalogue = np.arange(start, stop, dtype=np.int64)
    if candidates <= 0 or candidates >= catalogue.size:
        cands = catalogue
    else:
        cands = np.sort(np.random.default_rng(seed + 1).choice(catalogue, size=candidates, replace=False))
    rng = np.random.default_rng(seed)
    need = N_BATCHES * batch
    rows = rng.choice(len(train), size=need, replace=need > len(train)).reshape(N_BATCHES, batch)
    hist = train.histories[rows]  # [N_BATCHES, B, L]
    lengths = train.lengths[rows]
    np.savez(path, histories=hist, lengths=lengths, candidates=cands)
    return {"domain": request_domain, "domains": list(domains), "vocab_hash": ds.vocab_hash(),
            "vocab_size": ds.vocab_size, "catalogue_items": int(catalogue.size), "candidates": int(cands.size),
            "whole_catalogue": bool(cands.size == catalogue.size), "train_rows": len(train),
            "mean_history_length": float(lengths.mean()), "max_len": max_len}


# ----------------------------------------------------------------------------- client process


def client_main(conn: Any, index: int, address: str, namespace: str, data_path: str, vocab_hash: str,
                vocab_size: int, cpus: list[int] | None, pool_settings: dict[str, Any]) -> None:
    """One client process (a student): pin, join the deployment through the directory, then obey
    the parent's commands on ``conn`` until "stop". Every answer is a (kind, payload) tuple."""
    pool = None
    try:
        if cpus:
            from ckd.affinity import pin_process

            pin_process(cpus)  # first, so every thread started later (gRPC, Ray) inherits the set
        from student.teacher_pool import TeacherPool

        data = np.load(data_path)
        hist, lengths, cands = data["histories"], data["lengths"], data["candidates"]
        pool = TeacherPool.from_ray(address, namespace, [TEACHER], **pool_settings)
        pool.wait_ready(timeout=120)
        pool.check_contract(vocab_hash, vocab_size)  # as a student does; requests then carry the hash
        # After ray.init (which installs an aborting SIGTERM handler): terminate() closes the pool cleanly.
        signal.signal(signal.SIGTERM, _raise_interrupt)
        conn.send(("ready", {"pid": os.getpid()}))
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                break
            if cmd == "refresh":
                conn.send(("refreshed", _refresh(pool, int(arg))))
            elif cmd == "warm":
                conn.send(("warm", _loop(pool, hist, lengths, cands, index, n_requests=int(arg))))
            elif cmd == "go":
                t_start, t_end = arg
                conn.send(("done", _loop(pool, hist, lengths, cands, index, t_start=t_start, t_end=t_end)))
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass  # Ctrl-C reaches the whole process group; a vanished parent closes the pipe
    except BaseException:  # noqa: BLE001 — reported to the parent, which stops the benchmark
        try:
            conn.send(("error", traceback.format_exc()[-4000:]))
        except Exception:  # noqa: BLE001
            pass
    finally:
        if pool is not None:
            pool.close()  # also shuts down this process's Ray driver (from_ray joined it)


def _refresh(pool: Any, want: int, timeout: float = 60.0) -> int:
    """Re-read the directory until the pool knows exactly ``want`` healthy replicas."""
    end = time.monotonic() + timeout
    while True:
        pool.refresh()
        st = pool.stats()
        n = int(st.get(f"healthy/{TEACHER}", 0))
        if n == want and int(st.get(f"replicas/{TEACHER}", 0)) == want:
            return n
        if time.monotonic() > end:
            raise BenchError(f"client pool sees {n} healthy replica(s), expected {want}")
        time.sleep(0.1)


def _loop(pool: Any, hist: np.ndarray, lengths: np.ndarray, cands: np.ndarray, index: int,
          n_requests: int | None = None, t_start: float = 0.0, t_end: float = 0.0) -> dict[str, Any]:
    """Closed loop: ``n_requests`` requests (warm-up), or requests until ``t_end`` (time.monotonic,
    the same clock in every process). A reply counts as received only when it is a finite float32
    [B, C] matrix for the teacher; anything else is an error."""
    before = pool.stats()
    b, c = lengths.shape[1], cands.shape[0]
    sent = received = errors = in_window = 0
    latencies: list[float] = []
    messages: list[str] = []
    nxt = index  # clients start at different batches
    while (sent < n_requests) if n_requests is not None else (time.monotonic() < t_end):
        i = nxt % hist.shape[0]
        nxt += 1
        sent += 1
        t0 = time.monotonic()
        try:
            scores = pool.score(hist[i], lengths[i], cands)[TEACHER]
            if scores is None or scores.shape != (b, c) or scores.dtype != np.float32:
                raise ValueError(f"reply {None if scores is None else (scores.dtype, scores.shape)}, "
                                 f"expected float32 {(b, c)}")
            if not np.isfinite(scores).all():
                raise ValueError("reply holds non-finite scores")
        except Exception as exc:  # noqa: BLE001 — counted; the benchmark must report errors, not die
            errors += 1
            if len(messages) < 5:
                messages.append(repr(exc)[:500])
            continue
        t1 = time.monotonic()
        received += 1
        if n_requests is None:
            if t0 >= t_start:
                latencies.append(t1 - t0)
            if t_start <= t1 <= t_end:
                in_window += 1
    after = pool.stats()
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after
             if key.startswith("calls/") or key in ("retries", "quarantines", "splits", "calls")}
    per_replica = {key.split("@", 1)[1]: int(v) for key, v in delta.items()
                   if key.startswith(f"calls/{TEACHER}@") and v}
    return {"sent": sent, "received": received, "errors": errors, "error_messages": messages,
            "in_window": in_window, "latencies_s": latencies, "per_replica_calls": per_replica,
            "retries": int(delta.get("retries", 0)), "quarantines": int(delta.get("quarantines", 0)),
            "splits": int(delta.get("splits", 0))}


# ----------------------------------------------------------------------------- parent side


class Clients:
    """The client processes (spawned, so no Ray or gRPC state is forked) and their pipes."""

    def __init__(self, n: int, address: str, namespace: str, data_path: Path, facts: dict[str, Any],
                 cpus: list[int] | None, pool_settings: dict[str, Any], ready_timeout: float = 300.0):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, name=f"bench-client-{i}", daemon=True,
                            args=(child, i, address, namespace, str(data_path), facts["vocab_hash"],
                                  facts["vocab_size"], cpus, pool_settings))
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        try:
            self.pids = [int(x["pid"]) for x in self.ask(range(n), None, "ready", ready_timeout)]
        except BaseException:
            self.close()  # the caller never gets this object, so nothing else would stop them
            raise

    def ask(self, which: Any, cmd: tuple[str, Any] | None, expect: str, timeout: float) -> list[Any]:
        """Send ``cmd`` to the clients ``which`` (None: only wait), then collect one ``expect`` answer each."""
        which = list(which)
        if cmd is not None:
            for i in which:
                self.conns[i].send(cmd)
        out = []
        end = time.monotonic() + timeout
        for i in which:
            if not self.conns[i].poll(max(0.0, end - time.monotonic())):
                alive = self.procs[i].is_alive()
                raise BenchError(f"client {i} did not answer {expect!r} within {timeout:.0f} s "
                                 f"({'still running' if alive else f'exited with {self.procs[i].exitcode}'})")
            try:
                kind, payload = self.conns[i].recv()
            except EOFError:
                raise BenchError(f"client {i} exited (code {self.procs[i].exitcode}) before {expect!r}") from None
            if kind != expect:
                raise BenchError(f"client {i} answered {kind!r} instead of {expect!r}: {payload}")
            out.append(payload)
        return out

    def close(self) -> list[int | None]:
        """Ask every client to stop, join them; terminate (then kill) any that does not. Exit codes."""
        for c in self.conns:
            try:
                c.send(("stop", None))
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 30
        for p in self.procs:
            p.join(max(0.1, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in self.conns:
            c.close()
        return [p.exitcode for p in self.procs]


def read_replicas(dep: Any) -> list[dict[str, Any]]:
    """Every replica: id, pid, address, the cores it reports and those the OS gives it."""
    from ckd.affinity import process_cpus, thread_cpus

    out = []
    for info in sorted(dep.infos(TEACHER), key=lambda i: i["replica_id"]):
        pid = int(info["pid"])
        os_cpus = sorted(process_cpus(pid))
        threads = thread_cpus(pid)
        out.append({"replica_id": info["replica_id"], "pid": pid, "address": info["address"],
                    "cpus_reported": sorted(info.get("cpus", [])), "cpus_os": os_cpus,
                    "threads": len(threads),
                    "threads_on_other_cores": sum(sorted(c) != os_cpus for c in threads.values()),
                    "precision": info.get("precision")})
    return out


def run_cell(clients: Clients, n: int, r: int, replicas: list[dict[str, Any]], args: argparse.Namespace,
             facts: dict[str, Any]) -> dict[str, Any]:
    """One (R, N) cell: refresh, warm up, then the timed closed loop of the first ``n`` clients."""
    which = range(n)
    clients.ask(which, ("refresh", r), "refreshed", 90)
    warm = clients.ask(which, ("warm", args.warmup), "warm", args.request_timeout * (args.warmup + 1) + 60)
    load_start = list(os.getloadavg())
    t_start = time.monotonic() + args.ramp
    t_end = t_start + args.duration
    for i in which:
        clients.conns[i].send(("go", (t_start, t_end)))
    rep_pids = [x["pid"] for x in replicas]
    cli_pids = clients.pids[:n]
    time.sleep(max(0.0, t_start - time.monotonic()))
    cpu0 = {p: cpu_seconds(p) for p in rep_pids + cli_pids}
    w0 = time.monotonic()
    time.sleep(max(0.0, t_end - time.monotonic()))
    cpu1 = {p: cpu_seconds(p) for p in rep_pids + cli_pids}
    window = time.monotonic() - w0
    done = clients.ask(which, None, "done", args.request_timeout + 120)

    def used(pids: list[int]) -> float | None:
        xs = [cpu1[p] - cpu0[p] for p in pids if cpu0.get(p) is not None and cpu1.get(p) is not None]
        return float(sum(xs)) if len(xs) == len(pids) else None

    by_addr = {x["address"]: x["replica_id"] for x in replicas}
    per_replica: dict[str, int] = {x["replica_id"]: 0 for x in replicas}
    for d in done:
        for addr, calls in d["per_replica_calls"].items():
            per_replica[by_addr.get(addr, addr)] = per_replica.get(by_addr.get(addr, addr), 0) + calls
    completed = sum(d["in_window"] for d in done)
    bps = completed / args.duration
    rep_cpu, cli_cpu = used(rep_pids), used(cli_pids)
    teacher_cores = sorted({c for x in replicas for c in x["cpus_os"]})
    lat = percentiles([s for d in done for s in d["latencies_s"]])
    return {
        "replicas": r, "clients": n, "duration_s": args.duration, "window_measured_s": window,
        "requests_in_window": completed, "batches_per_s": bps, "rows_per_s": bps * args.batch,
        "scores_per_s": bps * args.batch * facts["candidates"], "latency": lat,
        "sent": sum(d["sent"] for d in done) + sum(w["sent"] for w in warm),
        "received": sum(d["received"] for d in done) + sum(w["received"] for w in warm),
        "errors": sum(d["errors"] for d in done) + sum(w["errors"] for w in warm),
        "retries": sum(d["retries"] for d in done), "quarantines": sum(d["quarantines"] for d in done),
        "splits": sum(d["splits"] for d in done),
        "requests_per_replica": per_replica,  # the whole cell (warm-up excluded), by replica id
        "replica_cpu_s": rep_cpu, "client_cpu_s": cli_cpu,
        # Near 1: the replicas kept their cores busy (the clients saturated them).
        "teacher_core_utilisation": (rep_cpu / (window * len(teacher_cores))
                                     if rep_cpu is not None and teacher_cores and window > 0 else None),
        "client_cpu_ms_per_request": (1e3 * cli_cpu / completed if cli_cpu is not None and completed else None),
        "replica_cpu_ms_per_request": (1e3 * rep_cpu / completed if rep_cpu is not None and completed else None),
        # The clients' part of the CPU the service path used: what they take from the replicas'
        # cores when they are not on cores of their own.
        "client_cpu_share": (cli_cpu / (cli_cpu + rep_cpu) if cli_cpu is not None and rep_cpu else None),
        "loadavg_start": load_start, "loadavg_end": list(os.getloadavg()),
        "per_client": [{"index": i, "pid": clients.pids[i], "warmup_sent": w["sent"], "warmup_received": w["received"],
                        "sent": d["sent"], "received": d["received"], "errors": d["errors"] + w["errors"],
                        "error_messages": w["error_messages"] + d["error_messages"], "in_window": d["in_window"],
                        "p50_ms": percentiles(d["latencies_s"])["p50_ms"]}
                       for i, (w, d) in enumerate(zip(warm, done))],
    }


def speedups(cells: list[dict[str, Any]]) -> tuple[dict[str, dict[str, float | None]], dict[str, Any] | None]:
    """{N: {R: batches/s at R / at R=1}} and the best 1 -> 2 replica speed-up over N (None without both)."""
    bps = {(c["replicas"], c["clients"]): c["batches_per_s"] for c in cells}
    table: dict[str, dict[str, float | None]] = {}
    for (r, n), v in sorted(bps.items()):
        base = bps.get((1, n))
        table.setdefault(str(n), {})[str(r)] = (v / base) if base else None
    best = None
    for n, row in table.items():
        x = row.get("2")
        if x is not None and (best is None or x > best["speedup"]):
            best = {"speedup": x, "clients": int(n), "batches_per_s_1": bps[(1, int(n))],
                    "batches_per_s_2": bps[(2, int(n))]}
    return table, best


def print_table(res: dict[str, Any]) -> None:
    def f(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    s, t = res["settings"], res["teacher"]
    print(f"\nScore load: teacher {t['kind']} ({t['checkpoint']}), precision {s['precision']}, "
          f"B={s['batch']} x C={res['data']['candidates']}, {s['duration']} s per cell; "
          f"{res['machine']['cpus']} CPUs, teacher cores {s['teacher_cpus'] or 'not pinned'}, "
          f"client cores {s['client_cpus'] or 'not pinned'}")
    cores = {d["replicas"]: d for d in res["deployments"]}
    print(f"{'R':>2s} {'N':>2s} {'replica cores':>16s} {'batches/s':>10s} {'rows/s':>9s} {'p50 ms':>8s} "
          f"{'p99 ms':>8s} {'n':>5s} {'x R=1':>6s} {'t.util':>6s} {'err':>4s}")
    for c in res["cells"]:
        d = cores[c["replicas"]]
        rc = "/".join(",".join(map(str, x["cpus_os"])) for x in d["replica_info"])
        if d["shared_cores"]:
            rc += "*"
        sp = res["speedup_vs_1_replica"].get(str(c["clients"]), {}).get(str(c["replicas"]))
        print(f"{c['replicas']:2d} {c['clients']:2d} {rc[-16:]:>16s} {c['batches_per_s']:10.2f} "
              f"{c['rows_per_s']:9.0f} {f(c['latency']['p50_ms'])!s:>8s} {f(c['latency']['p99_ms'])!s:>8s} "
              f"{c['latency']['n']:5d} {f(sp, '.2f')!s:>6s} {f(c['teacher_core_utilisation'], '.2f')!s:>6s} {c['errors']:4d}")
    print("n: requests timed in the cell (with fewer than ~100, p99 is close to the slowest one)")
    if any(d["shared_cores"] for d in res["deployments"]):
        print("* more replicas than core slots: replicas share cores")
    best = res["best_speedup_1_to_2"]
    if best:
        print(f"best speed-up 1 -> 2 replicas: {best['speedup']:.2f}x at N={best['clients']} "
              f"({best['batches_per_s_1']:.2f} -> {best['batches_per_s_2']:.2f} batches/s)")


# ----------------------------------------------------------------------------- main


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2,4", help="replica counts R (default 1,2,4)")
    ap.add_argument("--clients", default="1,2,4,8", help="concurrent client processes N (default 1,2,4,8)")
    ap.add_argument("--batch", type=int, default=256, help="histories per request (default 256)")
    ap.add_argument("--candidates", type=int, default=0,
                    help="candidates per request; 0 (default) = the request domain's whole catalogue "
                         "(Scientific: 4385)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per (R, N) cell")
    ap.add_argument("--warmup", type=int, default=3, help="requests per client before each cell's window")
    ap.add_argument("--ramp", type=float, default=1.0,
                    help="seconds the clients run together before the window opens")
    ap.add_argument("--domains", default=DOMAIN,
                    help="the teacher's vocabulary: its domains in order, joined by '+' (default Scientific; "
                         "a union teacher: Scientific+Office14+Games)")
    ap.add_argument("--request-domain", default="",
                    help="the domain whose training rows and items the requests carry "
                         "(default: the first of --domains)")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                    help=f"teacher checkpoint (default {DEFAULT_CHECKPOINT})")
    ap.add_argument("--fixture", action="store_true",
                    help="serve a generated mean-pool teacher on Scientific's vocabulary instead (smoke tests)")
    ap.add_argument("--precision", default="float32", help="TeacherSpec.precision (float32, bfloat16, float16)")
    ap.add_argument("--teacher-cpus", default="auto",
                    help="cores of the replicas, e.g. 0,1 or 0-3; 'auto' (default): every available core not "
                         "in --client-cpus; 'none': not pinned")
    ap.add_argument("--cpus-per-replica", type=int, default=0,
                    help="cores of each replica slot (default: teacher cores // max R, at least 1)")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch threads per replica (default: its cores)")
    ap.add_argument("--client-cpus", default="", help="pin every client process to these cores (default: not pinned)")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="TeacherPool deadline per Score call")
    ap.add_argument("--data-dir", default="", help="data root (default $CKD_DATA_DIR or ../shared/data/amazon)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output (a relative path is relative to the repository)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (required under results/)")
    return ap.parse_args(argv)


def resolve_cpus(args: argparse.Namespace) -> tuple[list[int] | None, list[int]]:
    """(client cores or None, teacher cores; [] = not pinned), checked against this machine."""
    from ckd.affinity import AffinityError, parse_cpus

    avail = sorted(os.sched_getaffinity(0))

    def check(text: str, flag: str) -> list[int]:
        try:
            cpus = parse_cpus(text)
        except AffinityError as exc:
            raise BenchError(f"{flag}: {exc}") from None
        missing = sorted(set(cpus) - set(avail))
        if missing:
            raise BenchError(f"{flag} {text}: cores {missing} are not available here (this process may use {avail})")
        return cpus

    client = check(args.client_cpus, "--client-cpus") if args.client_cpus else None
    t = args.teacher_cpus.strip().lower()
    if t == "none":
        teacher: list[int] = []
    elif t == "auto":
        teacher = [c for c in avail if not client or c not in client] or avail
    else:
        teacher = check(args.teacher_cpus, "--teacher-cpus")
    return client, teacher


def refuse_missing_checkpoint(path: Path) -> None:
    """BenchError naming the missing files of a checkpoint and how to build it."""
    missing = [p for p in ("config.json", "model.safetensors") if not (path / p).is_file()]
    if missing:
        how = (f"build it with: {DEMO_BUILD}" if path.resolve() == (REPO / DEFAULT_CHECKPOINT).resolve()
               else "train one with ckd-train-teacher, or pass --fixture")
        raise BenchError(f"teacher checkpoint {path} is not complete ({', '.join(missing)} missing); {how}")


def check_checkpoint(path: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config.json; BenchError when it is missing (with the build command) or
    serves another vocabulary than the data's (--domains)."""
    refuse_missing_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("vocab_hash") != facts["vocab_hash"] or int(cfg.get("num_items", -1)) != facts["vocab_size"]:
        raise BenchError(f"teacher checkpoint {path} serves another item vocabulary ({cfg.get('num_items')} items, "
                         f"hash {str(cfg.get('vocab_hash'))[:12]}...) than {'+'.join(facts['domains'])} "
                         f"({facts['vocab_size']} items, "
                         f"hash {facts['vocab_hash'][:12]}...)")
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 2 for bad settings or a refused output, 1 when a run fails."""
    args = parse_cli(argv)
    out = _repo_path(args.out)
    why = refuse_out(out, args.overwrite)
    if why:
        print(why, file=sys.stderr)
        return 2
    try:
        replicas = parse_int_list(args.replicas, "--replicas")
        clients_n = parse_int_list(args.clients, "--clients")
        client_cpus, teacher_cpus = resolve_cpus(args)
        cpus, k = plan_cores(teacher_cpus, args.cpus_per_replica or None, replicas)
        from teachers.base import INFERENCE_PRECISIONS

        if args.precision not in INFERENCE_PRECISIONS:
            raise BenchError(f"--precision must be one of {sorted(INFERENCE_PRECISIONS)}, got {args.precision!r}")
        if args.batch < 1 or args.duration <= 0 or args.warmup < 0 or args.ramp < 0:
            raise BenchError("--batch >= 1, --duration > 0, --warmup >= 0 and --ramp >= 0 are required")
        from benchmarks.distill_throughput import entry_domains  # the one parser of "A+B+C"

        domains = tuple(entry_domains(args.domains))
        request_domain = args.request_domain or (domains[0] if domains else "")
        if not domains or request_domain not in domains:
            raise BenchError(f"--request-domain {request_domain!r} must be one of --domains {args.domains!r}")
        ckpt = None if args.fixture else _repo_path(args.checkpoint)
        if ckpt is not None:
            refuse_missing_checkpoint(ckpt)  # before loading anything (names the build command)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Ray's environment as the tests and launch.distill use it (no usage stats, no auth prompt).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # SIGTERM ends the run like Ctrl-C, so the finally below stops the clients and Ray.
    old_term = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp = tempfile.TemporaryDirectory(prefix="bench_service_scaling_")
    clients: Clients | None = None
    dep = None
    try:
        from ckd.config import default_data_dir

        data_dir = args.data_dir or default_data_dir()
        if not Path(data_dir).is_absolute() and not Path(data_dir).exists():
            data_dir = str(REPO / data_dir)
        max_len = 50
        if ckpt is not None:
            max_len = int(json.loads((ckpt / "config.json").read_text()).get("max_history", 50))
        data_path = Path(tmp.name) / "requests.npz"
        facts = build_requests(data_dir, args.batch, args.candidates, max_len, args.seed, data_path,
                               domains=domains, request_domain=request_domain)
        if ckpt is None:
            from benchmarks.fixture_teacher import make_fixture_checkpoint

            ckpt = make_fixture_checkpoint(Path(tmp.name) / "fixture", num_items=facts["vocab_size"],
                                           vocab_hash=facts["vocab_hash"], dim=64, max_history=max_len)
            tcfg = json.loads((ckpt / "config.json").read_text())
        else:
            tcfg = check_checkpoint(ckpt, facts)
        threads = args.torch_threads or (k if cpus else 1)
        namespace = f"ckd-bench-scaling-{os.getpid()}"
        spec: dict[str, Any] = {
            "namespace": namespace, "heartbeat_s": 1.0, "drain_linger_s": 0.5,
            "teacher_modules": ["benchmarks.fixture_teacher"] if args.fixture else [],
            "teachers": [{"name": TEACHER, "checkpoint": str(ckpt), "replicas": replicas[0], "num_cpus": 1,
                          "num_gpus": 0, "torch_threads": threads, "cpus": cpus, "cpus_per_replica": k,
                          "precision": args.precision, "build": "" if args.fixture else DEMO_BUILD}]}
        pool_settings = {"timeout_s": args.request_timeout, "refresh_interval_s": 1.0}
        res: dict[str, Any] = {
            "benchmark": "service_scaling",
            "command": "python -m benchmarks.service_scaling " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "git_sha": _git_sha(), "machine": machine(),
            "settings": {"replicas": replicas, "clients": clients_n, "batch": args.batch,
                         "candidates_arg": args.candidates, "duration": args.duration, "warmup": args.warmup,
                         "ramp": args.ramp, "teacher_cpus": cpus, "cpus_per_replica": k,
                         "replica_core_slots": len(cpus) // k if cpus else 0, "torch_threads": threads,
                         "client_cpus": client_cpus, "precision": args.precision,
                         "request_timeout_s": args.request_timeout, "seed": args.seed, "data_dir": data_dir,
                         "connect": "TeacherPool.from_ray (the directory actor), one pool per client process",
                         "students_sharing_one_pool": "the N client processes: N students, one deployment"},
            "teacher": {"kind": tcfg.get("kind"), "checkpoint": "(generated fixture)" if args.fixture else str(ckpt),
                        "num_items": tcfg.get("num_items"), "max_history": max_len},
            "data": facts, "deployments": [], "cells": []}
        print(f"data: {facts['train_rows']} {facts['domain']} training rows, requests of {args.batch} x "
              f"{facts['candidates']} candidates; starting the embedded Ray and {replicas[0]} replica(s)", flush=True)
        from cluster.deploy import start_embedded

        address, dep = start_embedded(spec, num_cpus=max(2, max(replicas) + 1))
        if old_term is not None:
            # Ray's core worker installs its own SIGTERM handler at ray.init (it aborts the process,
            # leaving Ray's daemons behind): take SIGTERM back so the finally below runs.
            signal.signal(signal.SIGTERM, _raise_interrupt)
        clients = Clients(max(clients_n), address, namespace, data_path, facts, client_cpus, pool_settings)
        from ckd.affinity import process_cpus

        res["client_info"] = [{"index": i, "pid": p, "cpus_os": sorted(process_cpus(p))}
                              for i, p in enumerate(clients.pids)]
        for r in replicas:
            t0 = time.perf_counter()
            dep.scale(TEACHER, r)
            info = read_replicas(dep)
            want = requested_core_sets(cpus, k, r)
            got = sorted(x["cpus_os"] for x in info)
            res["deployments"].append({
                "replicas": r, "scale_s": time.perf_counter() - t0, "replica_info": info,
                "requested_core_sets": want, "shared_cores": bool(cpus) and r > len(cpus) // k,
                "affinity_matches_request": (got == want) if want is not None else None})
            for n in clients_n:
                print(f"R={r} N={n} ...", flush=True)
                cell = run_cell(clients, n, r, info, args, facts)
                res["cells"].append(cell)
                print(f"        {cell['batches_per_s']:.2f} batches/s, p50 {cell['latency']['p50_ms'] or 0:.0f} ms, "
                      f"p99 {cell['latency']['p99_ms'] or 0:.0f} ms, errors {cell['errors']}", flush=True)
        res["teacher"]["sha256"] = (dep.infos(TEACHER) or [{}])[0].get("checkpoint_sha256")
        res["speedup_vs_1_replica"], res["best_speedup_1_to_2"] = speedups(res["cells"])
        res["machine"]["loadavg_end"] = list(os.getloadavg())
        res["client_exit_codes"] = clients.close()
        clients = None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        print_table(res)
        print(f"wrote {out}")
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopping the clients and the teacher service; no JSON written", file=sys.stderr)
        return 130
    finally:
        if clients is not None:
            clients.close()
        if dep is not None:
            dep.shutdown()  # kills the replicas and the directory, and stops the Ray it started
        tmp.cleanup()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _git_sha() -> str:
    from ckd.run_dir import git_sha

    return git_sha()


if __name__ == "__main__":
    raise SystemExit(main())
