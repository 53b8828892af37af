"""Benchmark the teacher service: gRPC vs in-process, 1 vs 2 replicas, recovery after a kill.

    python -m benchmarks.service --checkpoint runs/teachers/unisrec --out runs/bench/service.json

Without --checkpoint a fixture teacher (mean-pool embeddings) is generated and benchmarked; its
compute is tiny, so its overhead ratio is an upper bound on what a real teacher sees. Requests are
B histories (random lengths 1..max_history, random real ids) x C shared candidates.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "n": int(a.size)}


def _throughput(fn: Callable[[], Any], threads: int, duration: float) -> float:
    """Batches/s with ``threads`` concurrent callers for ``duration`` seconds."""
    stop = threading.Event()
    counts = [0] * threads
    errors: list[BaseException] = []

    def work(i):
        while not stop.is_set():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            counts[i] += 1

    ths = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    time.sleep(duration)
    stop.set()
    for th in ths:
        th.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="", help="teacher checkpoint folder; empty = generated fixture")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=4, help="client threads in the throughput runs")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs offered to the embedded Ray")
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--out", default="runs/bench/service.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    import torch

    from cluster.deploy import start_embedded
    from student.teacher_pool import TeacherPool
    from teachers.base import load_teacher
    from benchmarks.fixture_teacher import make_fixture_checkpoint
    from teachers.server import start_server

    torch.set_num_threads(args.torch_threads)
    tmp = tempfile.TemporaryDirectory()
    ckpt = args.checkpoint
    if not ckpt:
        ckpt = str(make_fixture_checkpoint(Path(tmp.name) / "fixture", num_items=10000, dim=128, max_history=50))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_teacher(ckpt, device=device)
    info = model.describe()
    rng = np.random.default_rng(0)
    L = min(50, info.max_history)
    lengths = rng.integers(1, L + 1, size=args.batch)
    hist = rng.integers(1, info.num_items, size=(args.batch, L))
    hist[np.arange(L)[None, :] >= lengths[:, None]] = 0
    cands = rng.integers(1, info.num_items, size=args.candidates)
    res: dict[str, Any] = {
        "teacher": {"kind": info.name, "checkpoint": args.checkpoint or "(generated fixture)",
                    "num_items": info.num_items, "sha256": info.checkpoint_sha256},
        "shape": {"B": args.batch, "C": args.candidates, "L": L}, "device": device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "torch_threads": args.torch_threads}

    def inproc():
        s = model.score(torch.from_numpy(hist).to(device), torch.from_numpy(lengths).to(device),
                        torch.from_numpy(cands).to(device))
        return s.cpu().numpy()

    want = inproc()
    # The same model behind a gRPC server in this process (loopback), and the real path: a Ray
    # replica actor in its own process. The three paths are timed interleaved, call by call, so
    # load from other processes on a shared machine hits them alike.
    srv = start_server(model, name="bench")
    local = TeacherPool({"bench": [srv.address]})
    spec = {"namespace": "ckd-bench", "heartbeat_s": 0.5, "drain_linger_s": 1.0,
            "teacher_modules": ["benchmarks.fixture_teacher"],
            "teachers": [{"name": "bench", "checkpoint": ckpt, "replicas": 1, "num_cpus": args.replica_cpus,
                          "torch_threads": args.torch_threads}]}
    address, dep = start_embedded(spec, num_cpus=args.num_cpus)
    try:
        with TeacherPool.from_ray(address, "ckd-bench", ["bench"], refresh_interval_s=0.2,
                                  probe_interval_s=0.1, backoff_base_s=0.01) as pool:
            call = lambda: pool.score(hist, lengths, cands)  # noqa: E731
            paths = {"in_process": inproc, "grpc_same_process": lambda: local.score(hist, lengths, cands),
                     "grpc_ray_replica": call}
            np.testing.assert_allclose(local.score(hist, lengths, cands)["bench"], want, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(call()["bench"], want, rtol=1e-4, atol=1e-5)
            times: dict[str, list[float]] = {k: [] for k in paths}
            for i in range(args.warmup + args.iters):
                for k, fn in paths.items():
                    t = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        times[k].append(time.perf_counter() - t)
            for k, v in times.items():
                res[k] = _pct(v)
            # Per-iteration ratios (neighbouring calls) are robust to load drifting over the run.
            ratios = np.asarray(times["grpc_ray_replica"]) / np.asarray(times["in_process"])
            res["overhead_ratio_paired_median"] = float(np.median(ratios))
            local.close()
            srv.stop(0)
            res["throughput_1_replica_batches_s"] = _throughput(call, args.threads, args.duration)
            dep.scale("bench", 2)
            t_end = time.monotonic() + 30
            while pool.stats().get("healthy/bench", 0) < 2 and time.monotonic() < t_end:
                time.sleep(0.1)
            res["throughput_2_replicas_batches_s"] = _throughput(call, args.threads, args.duration)
            res["in_process_batches_s_1_thread"] = 1e3 / res["in_process"]["mean_ms"]
            res["recovery"] = _recovery(dep, pool, call, ray)
            res["client_stats"] = {k: v for k, v in pool.stats().items() if "@" not in k}
    finally:
        dep.shutdown()
        tmp.cleanup()
    res["overhead_ratio_p50"] = res["grpc_ray_replica"]["p50_ms"] / res["in_process"]["p50_ms"]
    res["overhead_ratio_p50_same_process"] = res["grpc_same_process"]["p50_ms"] / res["in_process"]["p50_ms"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    _print_table(res)
    print(f"wrote {out}")
    return 0


def _recovery(dep, pool, call, ray) -> dict[str, float]:
    """Kill a replica while a client streams batches; measure the stall and the restart time."""
    done: list[float] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream():
        while not stop.is_set():
            try:
                call()
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            done.append(time.perf_counter())

    th = threading.Thread(target=stream)
    th.start()
    t_end = time.monotonic() + 120
    while len(done) < 3 and not errors and time.monotonic() < t_end:  # a few results before the kill
        time.sleep(0.05)
    rid, actor = dep.replica_handles("bench")[0]
    old = dict(dep.endpoints())["bench"]
    t_kill = time.perf_counter()
    ray.kill(actor, no_restart=False)
    restarted = None
    t_end = time.monotonic() + 120
    while time.monotonic() < t_end:
        eps = dep.endpoints()["bench"]
        if len(eps) == 2 and eps != old:
            restarted = time.perf_counter() - t_kill
            break
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    th.join()
    after = [t for t in done if t > t_kill]
    before = [t for t in done if t <= t_kill]
    gaps = np.diff([before[-1]] + after) if before and after else np.array([np.nan])
    return {"client_errors": float(len(errors)), "first_result_after_kill_ms": (after[0] - t_kill) * 1e3 if after
            else float("nan"), "max_client_gap_ms": float(np.max(gaps) * 1e3),
            "replica_back_in_directory_s": float(restarted) if restarted is not None else float("nan")}


def _print_table(r: dict[str, Any]) -> None:
    rows = [("in-process score", r["in_process"]), ("gRPC, server in same process", r["grpc_same_process"]),
            ("gRPC, Ray replica actor", r["grpc_ray_replica"])]
    print(f"\nTeacher {r['teacher']['kind']} B={r['shape']['B']} C={r['shape']['C']} L={r['shape']['L']} "
          f"device={r['device']} cpus={r['machine']['cpus']}")
    print(f"{'path':34s} {'p50 ms':>9s} {'p95 ms':>9s} {'batches/s':>10s}")
    for name, s in rows:
        print(f"{name:34s} {s['p50_ms']:9.2f} {s['p95_ms']:9.2f} {1e3 / s['mean_ms']:10.1f}")
    print(f"overhead ratio p50 (Ray replica / in-process): {r['overhead_ratio_p50']:.2f}x "
          f"(paired median {r['overhead_ratio_paired_median']:.2f}x); "
          f"same-process server: {r['overhead_ratio_p50_same_process']:.2f}x")
    print(f"throughput, 1 replica: {r['throughput_1_replica_batches_s']:.1f} batches/s; "
          f"2 replicas: {r['throughput_2_replicas_batches_s']:.1f} batches/s")
    rec = r["recovery"]
    print(f"kill 1 of 2 replicas: client errors {rec['client_errors']:.0f}, first result after kill "
          f"{rec['first_result_after_kill_ms']:.0f} ms, longest client gap {rec['max_client_gap_ms']:.0f} ms, "
          f"replica restarted and re-registered in {rec['replica_back_in_directory_s']:.2f} s")


if __name__ == "__main__":
    raise SystemExit(main())
