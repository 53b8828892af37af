"""Inference cost of a teacher checkpoint: ms per 1,000 scored rows and per 1,000 (history,
candidate) pairs, parameters and peak memory, in each inference precision.

    python -m benchmarks.teacher runs/teachers/unisrec_textid/best [more checkpoint dirs ...] \
        [--data-dir D] [--domain Scientific] [--batch 1000] [--candidates 256] [--repeats 5] \
        [--threads 2] [--precisions float32,bfloat16] [--ndcg] [--memo-mib 256] [--out runs/bench/teachers.json]

Each precision (teachers.base.INFERENCE_PRECISIONS; TeacherSpec.precision serves it) is timed on
the same rows and candidates, one after the other in one process, so their ratio is measured side
by side. A reduced precision is compared with float32 on those rows: the largest absolute score
difference and the mean overlap of the top-10 candidates; with --ndcg also the test NDCG@10 over
the whole catalogue of --domain (full ranking), the number a student distilled from it inherits.

Each checkpoint scores B real test histories (of --domain, which must be a domain the checkpoint
was trained on, in its order) against C candidate ids; the time is the median of --repeats calls
after one warm-up, divided by B*C/1000. Peak memory is the process's peak resident set (ru_maxrss)
growth over the loaded-model baseline during scoring, and CUDA's peak allocation on a GPU.

With --memo-mib M the same rows also go through the server's batcher (teachers.servicer.Batcher,
what a replica runs) with a history memo of M MiB (ServiceLimits.history_memo_bytes): the first
call encodes and keeps every history (cold), the next --repeats calls find them all in the memo
(warm: what a student's second and later epochs cost the teacher, since its rows come back with
other candidates). Both are reported per 1,000 rows with the largest score difference from the
teacher's own ``score``.
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


def top_k_overlap(a, b, k: int) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k (1.0: the same k candidates in every row)."""
    import torch

    k = min(k, int(a.shape[1]))
    ia, ib = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    hits = (ia.unsqueeze(2) == ib.unsqueeze(1)).any(dim=2).sum(dim=1).to(torch.float64)
    return float(hits.mean() / k)


def bench_memo(model, hist, lens, cands, reference, repeats: int, memo_bytes: int) -> dict:
    """The served path with a history memo: one cold call (encodes, fills the memo), then the
    median of ``repeats`` warm calls (every history read back), in ms per 1,000 rows."""
    import numpy as np

    from protos.contract import ServiceLimits
    from teachers.servicer import Batcher, ParsedRequest

    batcher = Batcher(model, ServiceLimits(history_memo_bytes=memo_bytes))
    req = ParsedRequest(hist.cpu().numpy(), lens.cpu().numpy(), cands.cpu().numpy())
    try:
        t0 = time.perf_counter()
        cold = batcher.submit(req).result()
        cold_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            warm = batcher.submit(req).result()
            times.append(time.perf_counter() - t0)
        stats = batcher.memo.stats() if batcher.memo is not None else {}
    finally:
        batcher.stop()
    per_1k = 1e3 / (len(req.lengths) / 1000)
    ref = reference.cpu().numpy()
    return {"memo_bytes": memo_bytes, "ms_per_1k_rows_cold": round(cold_s * per_1k, 2),
            "ms_per_1k_rows_warm": round(float(np.median(times)) * per_1k, 2),
            "max_abs_diff_cold": float(np.abs(cold - ref).max()),
            "max_abs_diff_warm": float(np.abs(warm - ref).max()), "memo": stats}


def bench_checkpoint(ckpt: str, data_dir: str, domains: list[str], batch: int, n_cand: int, repeats: int,
                     device: str, precisions: tuple[str, ...] = ("float32",), ndcg: bool = False,
                     memo_bytes: int = 0) -> dict:
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
    by_precision: dict[str, dict] = {}
    reference = None
    for precision in precisions:
        model.set_inference_precision(precision)
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
        entry = {"ms_per_call": round(med * 1e3, 2),
                 "ms_per_1k_rows": round(med * 1e3 / (len(rows) / 1000), 2),
                 "ms_per_1k_pairs": round(med * 1e3 / (len(rows) * len(cands) / 1000), 4)}
        if reference is None:
            reference = out
        else:
            entry["max_abs_diff_vs_first"] = float((out - reference).abs().max())
            entry["top10_overlap_vs_first"] = top_k_overlap(reference, out, 10)
        if memo_bytes:
            entry["served_with_memo"] = bench_memo(model, hist, lens, cands, out, repeats, memo_bytes)
        if ndcg:
            from ckd.metrics import evaluate_model

            entry["test"] = evaluate_model(model, ds, "test", domains=[domains[0]])[domains[0]]
        by_precision[precision] = entry
    model.set_inference_precision("float32")
    first = by_precision[precisions[0]]
    res = {"checkpoint": str(ckpt), "kind": cfg["kind"], "device": device, "threads": torch.get_num_threads(),
           "batch": int(len(rows)), "candidates": int(len(cands)),
           "ms_per_call": first["ms_per_call"], "ms_per_1k_rows": first["ms_per_1k_rows"],
           "ms_per_1k_pairs": first["ms_per_1k_pairs"], "precisions": by_precision,
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
    p.add_argument("--precisions", default="float32",
                   help="comma list of inference precisions, timed in this order (the first is the reference)")
    p.add_argument("--ndcg", action="store_true", help="also the test NDCG@10 of the domain in each precision")
    p.add_argument("--memo-mib", type=int, default=0,
                   help="also time the served path with a history memo of this many MiB, cold and warm")
    p.add_argument("--out", default="runs/bench/teachers.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ckd.config import default_data_dir

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or default_data_dir()
    from ckd.run_dir import git_sha
    from research.experiments import machine_description

    precisions = tuple(x.strip() for x in args.precisions.split(",") if x.strip())
    results = [bench_checkpoint(c, data_dir, args.domain or ["Scientific"], args.batch, args.candidates,
                                args.repeats, args.device, precisions, args.ndcg, args.memo_mib << 20)
               for c in args.checkpoints]
    where = {"git_sha": git_sha(), "machine": machine_description(args.device),
             "command": " ".join(["python -m benchmarks.teacher", *(argv or sys.argv[1:])])}
    results = [{**r, **where} for r in results]
    hdr = (f"{'checkpoint':<40} {'kind':<9} {'precision':<9} {'ms/1k rows':>10} {'ms/1k pairs':>11} "
           f"{'top10 same':>10} {'test N@10':>9} {'params':>10} {'peak MiB':>8} {'memo cold':>9} {'memo warm':>9}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in results:
        for precision, e in r["precisions"].items():
            overlap = e.get("top10_overlap_vs_first")
            n10 = e.get("test", {}).get("ndcg@10")
            memo = e.get("served_with_memo", {})
            cold, warm = (f"{memo[k]:.1f}" if k in memo else "-" for k in ("ms_per_1k_rows_cold", "ms_per_1k_rows_warm"))
            print(f"{r['checkpoint'][-40:]:<40} {r['kind']:<9} {precision:<9} {e['ms_per_1k_rows']:>10.1f} "
                  f"{e['ms_per_1k_pairs']:>11.3f} {'-' if overlap is None else f'{overlap:.3f}':>10} "
                  f"{'-' if n10 is None else f'{n10:.4f}':>9} {r['params']:>10,} {r['peak_rss_total_mib']:>8.0f} "
                  f"{cold:>9} {warm:>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
