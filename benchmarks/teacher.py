"""Inference cost of a teacher checkpoint: ms per 1,000 scored (history, candidate) pairs,
parameters and peak memory.

    python -m benchmarks.teacher runs/teachers/unisrec_textid/best [more checkpoint dirs ...] \
        [--data-dir D] [--domain Scientific] [--batch 1000] [--candidates 256] [--repeats 5] \
        [--threads 2] [--out runs/bench/teachers.json]

Each checkpoint scores B real test histories (of --domain, which must be a domain the checkpoint
was trained on, in its order) against C candidate ids; the time is the median of --repeats calls
after one warm-up, divided by B*C/1000. Peak memory is the process's peak resident set (ru_maxrss)
growth over the loaded-model baseline during scoring, and CUDA's peak allocation on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path



def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_checkpoint(ckpt: str, data_dir: str, domains: list[str], batch: int, n_cand: int, repeats: int,
                     device: str) -> dict:
    import numpy as np
    import torch

    from ckd.data.multidomain import load_multidomain
    from teachers.base import load_teacher

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    ds = load_multidomain(data_dir, domains, max_len=int(cfg.get("max_history", 50)))
    rss0 = _rss_mib()
    model = load_teacher(ckpt, expected_vocab_hash=ds.vocab_hash(), device=device)
    rss_model = _rss_mib()
    te = ds.splits["test"]
    rows = np.arange(min(batch, len(te)))
    hist = torch.as_tensor(te.histories[rows], device=device)
    lens = torch.as_tensor(te.lengths[rows], device=device)
    start, stop = ds.domain_range(0)
    gen = torch.Generator().manual_seed(0)
    cands = (torch.randperm(stop - start, generator=gen)[:n_cand] + start).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = model.score(hist, lens, cands)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    assert out.shape == (len(rows), len(cands)) and out.dtype == torch.float32
    med = float(np.median(times))
    res = {"checkpoint": str(ckpt), "kind": cfg["kind"], "device": device, "threads": torch.get_num_threads(),
           "batch": int(len(rows)), "candidates": int(len(cands)),
           "ms_per_call": round(med * 1e3, 2),
           "ms_per_1k_pairs": round(med * 1e3 / (len(rows) * len(cands) / 1000), 4),
           "params": int(sum(p.numel() for p in model.parameters())),
           "buffers": int(sum(b.numel() for b in model.buffers())),
           "rss_model_mib": round(rss_model - rss0, 1),
           "peak_rss_scoring_mib": round(_rss_mib() - rss_model, 1),
           "peak_rss_total_mib": round(_rss_mib(), 1)}
    if device.startswith("cuda"):
        res["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--domain", action="append", default=None,
                   help="domain(s) the checkpoint was trained on, in order (default Scientific)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench/teachers.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ckd.config import default_data_dir

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or default_data_dir()
    results = [bench_checkpoint(c, data_dir, args.domain or ["Scientific"], args.batch, args.candidates,
                                args.repeats, args.device) for c in args.checkpoints]
    hdr = f"{'checkpoint':<44} {'kind':<10} {'ms/1k pairs':>11} {'ms/call':>9} {'params':>10} {'peak MiB':>9}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in results:
        print(f"{r['checkpoint'][-44:]:<44} {r['kind']:<10} {r['ms_per_1k_pairs']:>11.3f} {r['ms_per_call']:>9.1f} "
              f"{r['params']:>10,} {r['peak_rss_total_mib']:>9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
