"""Evaluate a saved student checkpoint (full ranking, Recall/NDCG@10/50 per domain).

    ckd-evaluate runs/<run>/best [--data-dir D] [--out DIR] [--ci N]

Writes <out>/metrics.json ({"valid": {...}, "test": {...}, "best_epoch": n}) and prints the table.
With --ci N it also prints and writes ("test_ci") a 95% bootstrap interval of each test metric over
N resamples of the users: how much of a difference to a published number is sampling luck.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from ckd.config import default_data_dir, json_dump


CI_LEVEL = 0.95


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a student checkpoint folder (model.safetensors + config.json)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="where to write metrics.json (default: the checkpoint's run dir)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--ci", type=int, default=0, metavar="N",
                    help="also a 95%% bootstrap interval of each test metric from N user resamples")
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    import torch

    from ckd.data.multidomain import load_multidomain
    from ckd.metrics import bootstrap_ci, format_ci_table, format_table, metrics_by_domain
    from student.checkpoint import StudentCheckpointError, load_student, read_student_config
    from ckd.metrics import evaluate_ranks

    ckpt = Path(args.checkpoint)
    try:
        cfg = read_student_config(ckpt)
        dataset = load_multidomain(args.data_dir or default_data_dir(), cfg["domains"], max_len=cfg["max_len"])
        model = load_student(ckpt, dataset, args.device)
    except (StudentCheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    ranks = {s: evaluate_ranks(model, dataset, s, args.batch_size, device) for s in ("valid", "test")}
    results = {s: metrics_by_domain(r) for s, r in ranks.items()}
    extra = {}
    if args.ci > 0:
        extra["test_ci"] = {d: {m: list(v) for m, v in bootstrap_ci(r, n_boot=args.ci, level=CI_LEVEL).items()}
                            for d, r in ranks["test"].items()}
        extra["ci"] = {"level": CI_LEVEL, "resamples": args.ci, "method": "percentile bootstrap over users"}
    out_dir = Path(args.out) if args.out else ckpt.parent
    best_epoch = -1
    state = ckpt.parent / "metrics.json"
    if state.is_file():
        best_epoch = json.loads(state.read_text()).get("best_epoch", -1)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ("metrics.json" if args.out else "eval_metrics.json")
    json_dump({**results, "best_epoch": best_epoch, "checkpoint": str(ckpt), **extra}, target)
    print(format_table(results))
    if extra:
        print(f"\ntest, {CI_LEVEL:.0%} bootstrap interval over users ({args.ci} resamples)")
        print(format_ci_table(results["test"], extra["test_ci"]))
    print(f"\nwritten: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
