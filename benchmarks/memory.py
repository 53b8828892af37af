"""Peak memory of a real teacher server for one request at the advertised limits.

    python -m benchmarks.memory                        # prints a table, writes runs/bench_memory.json
    python -m benchmarks.memory --dims 32 --out results/bench_memory.json

Every case starts a fresh server process (``--serve``: a fixture teacher behind ``start_server`` on
127.0.0.1, one torch thread), warms it up with a small request, resets the process's peak-RSS mark
(``/proc/<pid>/clear_refs``), sends the request twice over real gRPC and reads the new peak
(``VmHWM``): the table shows peak - baseline in MiB. Cases: per-row candidates ([B, C]) and shared
ones ([C]) at B*C = max_score_cells, shared ones at max_candidates, and the request of issue 23
(per-row int64, 16 MB), each scored in one block ("unchunked": max_gather_bytes above the whole
gather, the code path before the budget) and under the default budget ("chunked"). A case whose
unchunked gather alone would exceed --max-unchunked-gib is skipped and listed as such. The bound
column is the budget of ``ServiceLimits`` for one call: call_bytes() + scoring_bytes(D * 4).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
NUM_ITEMS = 100_000
HISTORY = 10  # items per row


def _serve(checkpoint: str, max_gather_bytes: int) -> int:
    """Child process: serve the checkpoint on 127.0.0.1 and print {"port", "pid"}; stop on stdin EOF."""
    import torch

    torch.set_num_threads(1)
    import benchmarks.fixture_teacher  # noqa: F401  (registers the fixture kind)
    from protos.contract import ServiceLimits
    from teachers.base import load_teacher
    from teachers.server import start_server

    srv = start_server(load_teacher(checkpoint), name="mem", limits=ServiceLimits(max_gather_bytes=max_gather_bytes))
    print(json.dumps({"port": srv.port, "pid": os.getpid()}), flush=True)
    sys.stdin.read()
    srv.stop(0)
    return 0


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _request(b: int, c: int, per_row: bool, dtype: str, seed: int = 0):
    from protos import teacher_pb2
    from protos.tensor_codec import encode

    rng = np.random.default_rng(seed)
    items = rng.integers(1, NUM_ITEMS, size=b * HISTORY).astype(dtype)
    lengths = np.full(b, HISTORY, dtype=dtype)
    cands = rng.integers(1, NUM_ITEMS, size=(b, c) if per_row else c).astype(dtype)
    return teacher_pb2.ScoreRequest(request_id=1, history_items=encode(items), lengths=encode(lengths),
                                    candidates=encode(cands))


def measure(checkpoint: str, b: int, c: int, per_row: bool, dtype: str, max_gather_bytes: int,
            repeats: int = 2) -> dict[str, Any]:
    """Peak RSS increase of a fresh server process for ``repeats`` identical requests."""
    import grpc

    from protos import teacher_pb2_grpc
    from protos.contract import ServiceLimits

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memory", "--serve", checkpoint,
                             "--max-gather-bytes", str(max_gather_bytes)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        pid, port = first["pid"], first["port"]
        limits = ServiceLimits()
        ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=limits.grpc_options())
        stub = teacher_pb2_grpc.TeacherStub(ch)
        stub.Score(_request(8, 16, per_row, dtype), timeout=60)  # warm: thread pools, buffers
        req = _request(b, c, per_row, dtype, seed=1)
        base_kib = _status_kib(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            rep = stub.Score(req, timeout=600)
            times.append(time.perf_counter() - t0)
            assert list(rep.scores.shape) == [b, c], rep.scores.shape
        peak_kib = _status_kib(pid, "VmHWM")
        ch.close()
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"baseline_mib": base_kib / 1024, "peak_mib": peak_kib / 1024, "increase_mib": (peak_kib - base_kib) / 1024,
            "request_mib": req.ByteSize() / MiB, "seconds": min(times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", metavar="CHECKPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--max-gather-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dims", default="32,300", help="teacher embedding sizes D (comma list)")
    ap.add_argument("--max-unchunked-gib", type=float, default=3.0,
                    help="skip an unchunked case whose gather alone would exceed this (GiB)")
    ap.add_argument("--out", default="runs/bench_memory.json", help="JSON results (default runs/bench_memory.json)")
    args = ap.parse_args(argv)
    if args.serve:
        return _serve(args.serve, args.max_gather_bytes)

    from benchmarks.fixture_teacher import make_fixture_checkpoint
    from protos.contract import ServiceLimits
    from teachers.base import GatherPlan

    lim = ServiceLimits()
    at_limit_b = lim.max_batch_rows
    at_limit_c = lim.max_score_cells // at_limit_b
    cases = [  # name, B, C, per_row, dtype
        ("per-row at max_score_cells", at_limit_b, at_limit_c, True, "int32"),
        ("shared at max_score_cells", at_limit_b, at_limit_c, False, "int32"),
        ("shared at max_candidates", lim.max_score_cells // lim.max_candidates, lim.max_candidates, False, "int32"),
        ("per-row 16 MB (issue 23)", 1024, 2048, True, "int64"),
    ]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for dim in (int(d) for d in args.dims.split(",")):
            ckpt = make_fixture_checkpoint(Path(tmp) / f"d{dim}", num_items=NUM_ITEMS, vocab_hash="mem", dim=dim)
            emb = dim * 4
            for name, b, c, per_row, dtype in cases:
                whole = (b * c if per_row else c) * emb
                for mode, budget in (("unchunked", max(whole, lim.max_gather_bytes) + 1), ("chunked", lim.max_gather_bytes)):
                    plan = GatherPlan.make(b, c, per_row, emb, budget)
                    row: dict[str, Any] = {"dim": dim, "case": name, "B": b, "C": c, "candidates": "[B, C]" if per_row
                                           else "[C]", "dtype": dtype, "mode": mode, "max_gather_bytes": budget,
                                           "blocks": plan.num_blocks, "block_mib": plan.block_bytes / MiB,
                                           "bound_mib": (lim.call_bytes() + lim.scoring_bytes(emb)) / MiB}
                    if mode == "unchunked" and whole > args.max_unchunked_gib * 1024 * MiB:
                        row["skipped"] = f"the unchunked gather alone is {whole / MiB / 1024:.1f} GiB"
                    else:
                        row.update(measure(str(ckpt), b, c, per_row, dtype, budget))
                    rows.append(row)
                    _print_row(row, header=len(rows) == 1)
    out = {"host": platform.node(), "python": platform.python_version(), "num_items": NUM_ITEMS,
           "history": HISTORY, "limits": lim.__dict__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _print_row(r: dict[str, Any], header: bool) -> None:
    if header:
        print(f"{'D':>4} {'case':<28} {'cands':<6} {'dtype':<5} {'mode':<9} {'blocks':>6} {'block MiB':>9} "
              f"{'req MiB':>7} {'peak+ MiB':>9} {'bound MiB':>9} {'s':>6}")
    if "skipped" in r:
        print(f"{r['dim']:>4} {r['case']:<28} {r['candidates']:<6} {r['dtype']:<5} {r['mode']:<9} {r['blocks']:>6} "
              f"{r['block_mib']:>9.0f}  skipped: {r['skipped']}")
        return
    print(f"{r['dim']:>4} {r['case']:<28} {r['candidates']:<6} {r['dtype']:<5} {r['mode']:<9} {r['blocks']:>6} "
          f"{r['block_mib']:>9.0f} {r['request_mib']:>7.1f} {r['increase_mib']:>9.0f} {r['bound_mib']:>9.0f} "
          f"{r['seconds']:>6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
