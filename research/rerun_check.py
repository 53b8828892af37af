"""Do the recorded seeds of a mechanisms row come out the same when trained again elsewhere?

    python -m research.rerun_check --recorded results/mechanisms_scientific.json \
        --plan configs/mechanisms/scientific.yaml --rows curriculum_off clean_both \
        --rerun-root runs/repro/mechanisms --out results/repro/mechanisms_rerun_amd.json

The recorded seeds are those of a research.mechanisms results JSON (their run directories may be on
another machine); each rerun is ``<rerun-root>/<row>/seed<N>``, trained by the row's own command
with ``--runs-root <rerun-root>/<row>``. A rerun must hold the settings its row's command sets (the
same check as collect's), else it is an error naming the key. Per seed: the recorded and rerun test
and valid metrics and their differences (research.retrain_check.compare_tests, with its 0.002 rule
on test NDCG@10), whether every one is the same float (bit for bit), and the commits and machines
of both. Prints a table and writes the JSON (an existing --out, or one under
results/, is replaced only with --overwrite).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ckd.reporting import METRICS, results_out_path, write_results_json
from research.plan_schema import PlanError

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("test", "valid")


class RerunCheckError(ValueError):
    """A row or run directory that cannot be compared."""


def compare_seed(recorded: dict[str, Any], rerun_dir: Path, domain: str, tolerance: float) -> dict[str, Any]:
    """One seed: the recorded entry (a mechanisms JSON seed record) against its rerun directory, each
    split compared by research.retrain_check.compare_tests (the teachers' retrain rule)."""
    from research.retrain_check import RetrainCheckError, commit_fields, compare_tests

    metrics_path = rerun_dir / "metrics.json"
    if recorded.get("status") != "done":
        raise RerunCheckError(f"seed {recorded.get('seed')}: not a finished recorded seed")
    if not metrics_path.is_file():
        raise RerunCheckError(f"{rerun_dir}: no metrics.json (has the rerun finished?)")
    got = json.loads(metrics_path.read_text())
    run = json.loads((rerun_dir / "run.json").read_text()) if (rerun_dir / "run.json").is_file() else {}
    out: dict[str, Any] = {"seed": recorded["seed"], "rerun_dir": str(rerun_dir),
                           **commit_fields("recorded", recorded.get("git_sha")),
                           **commit_fields("rerun", run.get("git_sha")), "recorded_machine": recorded.get("machine")}
    try:
        for split in SPLITS:  # {domain: {metric: recorded, retrained, abs_diff}, within_tolerance}
            out[split] = compare_tests({domain: recorded[split]}, got[split], tolerance)[domain]
    except RetrainCheckError as exc:
        raise RerunCheckError(f"{rerun_dir}: {exc}") from exc
    out["bit_for_bit"] = all(out[s][m]["abs_diff"] == 0 for s in SPLITS for m in METRICS)
    out["within_tolerance"] = out["test"]["within_tolerance"]
    return out


def check(recorded_json: dict[str, Any], plan_path: Path, rows: list[str], rerun_root: Path,
          root: Path = REPO, tolerance: float = 0.002) -> dict[str, Any]:
    """Every finished recorded seed of ``rows`` that has a rerun under ``rerun_root``."""
    from research import mechanisms

    plan = mechanisms.load_plan(root / plan_path, str(plan_path))
    by_name = {r.name: r for r in plan.rows}
    domain = plan.domain
    result: dict[str, Any] = {}
    for name in rows:
        if name not in by_name or name not in recorded_json.get("rows", {}):
            raise RerunCheckError(f"row {name!r} is not in both the plan and the recorded results")
        row = by_name[name]
        seeds = []
        for rec in recorded_json["rows"][name]["seeds"]:
            d = rerun_root / name / f"seed{rec['seed']}"
            if not (d / "metrics.json").is_file():
                continue
            try:
                mechanisms.check_run_config(row, rec["seed"], d)  # the row's settings and this seed
            except PlanError as exc:
                raise RerunCheckError(str(exc)) from exc
            seeds.append(compare_seed(rec, d, domain, tolerance))
        if not seeds:
            raise RerunCheckError(f"row {name}: no finished rerun under {rerun_root / name}")
        result[name] = {"command": row.command, "seeds": seeds,
                        "bit_for_bit": all(s["bit_for_bit"] for s in seeds),
                        "within_tolerance": all(s["within_tolerance"] for s in seeds)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recorded", required=True, help="a research.mechanisms results JSON")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--rows", nargs="+", required=True)
    ap.add_argument("--rerun-root", required=True)
    ap.add_argument("--tolerance", type=float, default=0.002, help="on test NDCG@10, as research.retrain_check")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    from ckd.run_dir import git_sha
    from research.union import machine_for

    out = results_out_path(args.out, REPO, args.overwrite)
    if out is None:
        return 2
    try:
        rows = check(json.loads(Path(args.recorded).read_text()), Path(args.plan), args.rows, Path(args.rerun_root),
                     REPO, args.tolerance)
    except (RerunCheckError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = {"kind": "rerun_check", "recorded": args.recorded, "plan": args.plan, "rerun_root": args.rerun_root,
           "rerun_machine": machine_for("cpu"), "commit": git_sha(),
           "command": " ".join(["python -m research.rerun_check", *(argv if argv is not None else sys.argv[1:])]),
           "rows": rows}
    write_results_json(out, doc)
    for name, r in rows.items():
        print(f"{name}: {'bit for bit' if r['bit_for_bit'] else 'not bit for bit'}; test NDCG@10 within "
              f"{args.tolerance} on every seed: {'yes' if r['within_tolerance'] else 'NO'}")
        for s in r["seeds"]:
            t = s["test"]["ndcg@10"]
            print(f"  seed {s['seed']}: test NDCG@10 recorded {t['recorded']:.6f} rerun {t['retrained']:.6f} "
                  f"(|diff| {t['abs_diff']:.2e}); {'same' if s['bit_for_bit'] else 'different'} floats")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
