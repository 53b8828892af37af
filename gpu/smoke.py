"""GPU path check of the teacher service: a teacher placed on CUDA behind the real gRPC server,
scored through the real TeacherPool client, compared with in-process scores on the same device.

    python -m gpu.smoke [--checkpoint DIR] [--data-dir D] [--domain Scientific] [--out F.json]

Without --checkpoint it serves the small deterministic fixture teacher sized to the data.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--domain", default="Scientific")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from ckd.config import default_data_dir
    from ckd.data.multidomain import load_multidomain
    from student.teacher_pool import TeacherPool
    from teachers.base import load_teacher
    from benchmarks.fixture_teacher import make_fixture_checkpoint
    from teachers.server import start_server

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ds = load_multidomain(args.data_dir or default_data_dir(), [args.domain])
    ckpt = args.checkpoint
    if not ckpt:
        ckpt = "/tmp/ckd_gpu_fixture"
        make_fixture_checkpoint(ckpt, num_items=ds.vocab_size, vocab_hash=ds.vocab_hash(), dim=256)
    teacher = load_teacher(ckpt, expected_vocab_hash=ds.vocab_hash(), device=device)
    param_device = str(next(teacher.parameters()).device) if any(True for _ in teacher.parameters()) else device
    server = start_server(teacher, name="gpu-teacher")
    pool = TeacherPool({"gpu-teacher": [server.address]}, timeout_s=60)
    info = pool.check_contract(ds.vocab_hash(), ds.vocab_size)["gpu-teacher"]

    ex = ds.splits["test"]
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ex), size=args.batch, replace=False)
    hist, lens = ex.histories[rows], ex.lengths[rows]
    start, stop = ds.domain_range(0)
    cands = rng.choice(np.arange(start, stop), size=args.candidates, replace=False)
    remote = pool.score(hist, lens, cands)["gpu-teacher"]
    with torch.no_grad():
        local = teacher.score(torch.as_tensor(hist, device=device), torch.as_tensor(lens, device=device),
                              torch.as_tensor(cands, device=device)).cpu().numpy()
    max_diff = float(np.abs(remote - local).max())

    def timed(fn) -> list[float]:
        out = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    th, tl, tc = (torch.as_tensor(x, device=device) for x in (hist, lens, cands))
    inproc = timed(lambda: teacher.score(th, tl, tc).cpu())
    grpc_ms = timed(lambda: pool.score(hist, lens, cands))
    pool.close()
    server.stop(1.0)
    result = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "",
              "torch": torch.__version__, "teacher": info.kind, "teacher_param_device": param_device,
              "batch": args.batch, "candidates": args.candidates, "max_abs_diff_grpc_vs_inprocess": max_diff,
              "inprocess_p50_ms": float(np.median(inproc)), "grpc_p50_ms": float(np.median(grpc_ms)),
              "inprocess_p95_ms": float(np.percentile(inproc, 95)), "grpc_p95_ms": float(np.percentile(grpc_ms, 95))}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    ok = max_diff < 1e-4 and (device != "cuda" or param_device.startswith("cuda"))
    print("GPU TEACHER CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
