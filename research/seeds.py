"""Train one setting over several seeds and report each seed, the mean and the spread.

    python -m research.seeds --config configs/sasrec_scientific_scaled.yaml --teachers none \
        --seeds 2024 7 11 42 1 3 5 13 --parallel 2 --runs-root runs/seeds/scaled \
        --reference recall@10=0.1080 --reference ndcg@10=0.0553 --out results/sasrec_scaled_seeds.json

Every seed is ``launch/distill.py`` with the same config and overrides plus ``train.seed=N``, in
``<runs-root>/seed<N>``. A seed whose run directory already holds metrics.json is read, not
retrained, but only when its resolved config is this setting's (else the script stops and names
the keys that differ), so an interrupted sweep picks up where it left off and a table never mixes
settings. The numbers are the test split of one domain (``--domain``, default the first). An
existing --out (e.g. the committed results/sasrec_scaled_seeds.json) is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]  # the checkout: configs and runs/ are relative to it

from ckd.config import to_dict
from ckd.run_dir import git_sha

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
# Keys that say where or how loudly a run ran, not what it trained (service.namespace: the run
# adopts its deploy spec's, launch/distill.embedded_spec).
IGNORED = {("run_dir",), ("data", "data_dir"), ("train", "progress"), ("service", "namespace")}


def distill_argv(args: argparse.Namespace, seed: int) -> list[str]:
    """The launch/distill.py arguments of one seed."""
    argv = ["--run-dir", str(Path(args.runs_root) / f"seed{seed}")]
    if args.config:
        argv += ["--config", args.config]
    if args.teachers:
        argv += ["--teachers", args.teachers]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    for o in [*args.overrides, f"train.seed={seed}"]:
        argv += ["--set", o]
    return argv


def resolved(argv: list[str]) -> dict[str, Any]:
    """The config launch/distill.py resolves from ``argv``, as the dict its run directory stores."""
    from launch.distill import parse_args, resolve_config

    return to_dict(resolve_config(parse_args(argv)))


def config_differences(want: dict[str, Any], have: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (IGNORED keys skipped)."""
    out = []
    for k in sorted(set(want) | set(have)):
        key = (*prefix, k)
        if key in IGNORED:
            continue
        a, b = want.get(k), have.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, key)
        elif a != b:
            out.append(f"{'.'.join(key)}: wanted {a!r}, run has {b!r}")
    return out


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train one seed (or reuse its finished run directory) and return its record."""
    argv = distill_argv(args, seed)
    run_dir = Path(args.runs_root) / f"seed{seed}"
    record: dict[str, Any] = {"seed": seed, "run_dir": str(run_dir),
                              "command": "ckd-distill " + " ".join(argv)}
    if (run_dir / "metrics.json").is_file():
        diff = config_differences(resolved(argv), yaml.safe_load((run_dir / "config.yaml").read_text()))
        if diff:
            raise SystemExit(f"{run_dir} holds another setting, not reused: " + "; ".join(diff))
        record["reused"] = True
    else:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(run_dir.parent / f"seed{seed}.out", "w") as log:
            proc = subprocess.run([sys.executable, "-m", "launch.distill", *argv], cwd=REPO,
                                  stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"seed {seed} failed (exit {proc.returncode}): see {log.name}")
        record.update(reused=False, wall_s=round(time.time() - t0, 1))
    record["metrics"] = json.loads((run_dir / "metrics.json").read_text())
    return record


def parse_reference(items: list[str]) -> dict[str, float]:
    ref = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in METRICS or not value:
            raise SystemExit(f"--reference {item!r}: expected one of {', '.join(METRICS)}=<number>")
        ref[name] = float(value)
    return ref


def summarize(records: list[dict[str, Any]], domain: str, reference: dict[str, float]) -> dict[str, Any]:
    """Per-metric mean and sample sd of the test numbers, what clears the reference, and the run valid picks."""
    tests = [r["metrics"]["test"][domain] for r in records]
    mean = {m: statistics.fmean(t[m] for t in tests) for m in METRICS}
    sd = {m: statistics.stdev(t[m] for t in tests) if len(tests) > 1 else 0.0 for m in METRICS}
    clearing = [r["seed"] for r, t in zip(records, tests) if all(t[m] >= v for m, v in reference.items())]
    # One model picked without looking at test: the highest valid NDCG@10 (first seed listed on a tie).
    pick = max(range(len(records)), key=lambda i: (records[i]["metrics"]["valid"][domain]["ndcg@10"], -i))
    selected = {"seed": records[pick]["seed"], "valid_ndcg@10": records[pick]["metrics"]["valid"][domain]["ndcg@10"],
                "test": tests[pick], "clears_reference": records[pick]["seed"] in clearing}
    return {"mean": mean, "sd": sd, "seeds_clearing_reference": clearing,
            "mean_clears_reference": all(mean[m] >= v for m, v in reference.items()), "selected_by_valid": selected}


def table(records: list[dict[str, Any]], domain: str, summary: dict[str, Any], reference: dict[str, float]) -> str:
    head = f"{'seed':>8} {'best ep':>7} {'s/epoch':>7} {'valid N@10':>10} " + " ".join(f"{m:>10}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for r in records:
        m = r["metrics"]
        epoch_s = m.get("timing", {}).get("epoch_s", float("nan"))
        lines.append(f"{r['seed']:>8} {m['best_epoch']:>7} {epoch_s:>7.1f} {m['valid'][domain]['ndcg@10']:>10.4f} "
                     + " ".join(f"{m['test'][domain][k]:>10.4f}" for k in METRICS))
    lines.append("-" * len(head))
    pad = f"{'':>7} {'':>7} {'':>10}"
    lines.append(f"{'mean':>8} {pad} " + " ".join(f"{summary['mean'][k]:>10.4f}" for k in METRICS))
    lines.append(f"{'sd':>8} {pad} " + " ".join(f"{summary['sd'][k]:>10.4f}" for k in METRICS))
    params = {r["metrics"].get("num_parameters") for r in records}
    rss = max(r["metrics"].get("peak_memory_mb", {}).get("rss", 0.0) for r in records)
    lines.append(f"parameters {', '.join(f'{p:,}' for p in params if p)}; peak RSS {rss:,.0f} MB "
                 "(largest of the runs); s/epoch: training only, mean over the run's epochs")
    if reference:
        lines.append(f"{'ref':>8} {pad} "
                     + " ".join(f"{reference[k]:>10.4f}" if k in reference else f"{'':>10}" for k in METRICS))
        lines.append(f"test {domain}: the mean {'clears' if summary['mean_clears_reference'] else 'misses'} the "
                     f"reference; seeds clearing it: {summary['seeds_clearing_reference'] or 'none'} "
                     f"of {len(records)}")
    sel = summary["selected_by_valid"]
    lines.append(f"selected on valid NDCG@10: seed {sel['seed']} (valid {sel['valid_ndcg@10']:.4f}), test "
                 + ", ".join(f"{k} {sel['test'][k]:.4f}" for k in METRICS)
                 + (f"; {'clears' if sel['clears_reference'] else 'misses'} the reference" if reference else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--teachers", help="passed to launch/distill.py ('none': no distillation)")
    ap.add_argument("--data-dir")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--parallel", type=int, default=1, help="seeds trained at once")
    ap.add_argument("--runs-root", default="runs/seeds")
    ap.add_argument("--domain", help="domain whose test numbers are reported (default: the first)")
    ap.add_argument("--reference", action="append", default=[], metavar="METRIC=VALUE",
                    help="a number each seed and the mean are checked against, e.g. recall@10=0.108")
    ap.add_argument("--out", help="JSON file for the records and the summary")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    if args.out:
        # Refused before anything trains: a rerun must not silently replace committed results.
        from ckd.reporting import overwrite_refusal

        refusal = overwrite_refusal(args.out, args.overwrite)
        if refusal:
            raise SystemExit(f"error: {refusal}")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds repeats a seed: {args.seeds}")
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in args.overrides):
        raise SystemExit("--set train.seed=...: the seeds come from --seeds")
    reference = parse_reference(args.reference)
    domains = resolved(distill_argv(args, args.seeds[0]))["data"]["domains"]
    domain = args.domain or domains[0]
    if domain not in domains:
        raise SystemExit(f"--domain {domain}: not one of this setting's domains {domains}")

    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        records = list(pool.map(lambda s: run_seed(args, s), args.seeds))
    summary = summarize(records, domain, reference)
    print(table(records, domain, summary, reference))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "command": "python -m research.seeds " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": git_sha(), "domain": domain, "reference": reference, **summary, "records": records,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
