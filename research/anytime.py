"""Anytime curves: test NDCG@10 against training steps, for runs trained with
``train.record_test_curve=true`` (e.g. curriculum on and off), as a PNG and its JSON.

    python -m research.anytime --run "curriculum=runs/x/on/seed2024" --run "no curriculum=runs/x/off/seed2024" \
        --out runs/anytime.json --png runs/anytime.png

Per run: the points (global step at the end of each epoch, test metric, mean over domains); its
final value (the test metric of the epoch selected on valid, i.e. the checkpoint the run keeps); the
steps it needs to reach 95% of that final value; and, against the first run named (the reference),
the steps it needs to reach the reference's final value and how many fewer steps that is, in %.
An existing --out or --png is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ckd.reporting import draw_curves, overwrite_refusal


class CurveError(ValueError):
    """A run directory that has no anytime curve."""


def read_curve(run_dir: str | Path, metric: str = "ndcg@10") -> dict[str, Any]:
    """The curve of one run: {"steps", "values", "final", "best_epoch"} from its metrics.json."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise CurveError(f"{path} not found: the run has not finished")
    m = json.loads(path.read_text())
    key = f"test_{metric}"
    hist = [h for h in m.get("history", []) if key in h]
    if not hist:
        raise CurveError(f"{path}: no {key} in its history; train it with --set train.record_test_curve=true")
    if any("global_step" not in h for h in hist):
        raise CurveError(f"{path}: history without global_step (trained before curves were recorded)")
    best = int(m["best_epoch"])
    final = next((h[key] for h in hist if h["epoch"] == best), None)
    if final is None:
        raise CurveError(f"{path}: the selected epoch {best} has no {key}")
    return {"steps": [int(h["global_step"]) for h in hist], "values": [float(h[key]) for h in hist],
            "final": float(final), "best_epoch": best}


def steps_to_reach(curve: dict[str, Any], level: float) -> int | None:
    """The first recorded step at which the curve is at or above ``level`` (None: never)."""
    for s, v in zip(curve["steps"], curve["values"]):
        if v >= level:
            return s
    return None


def compare(curves: dict[str, dict[str, Any]], fraction: float = 0.95) -> dict[str, Any]:
    """Per run: steps to ``fraction`` of its own final value, and to the reference's (first run's)
    final value with the saving in % against the reference's own steps to it."""
    names = list(curves)
    ref = curves[names[0]]
    ref_steps = steps_to_reach(ref, ref["final"])
    out = {}
    for n in names:
        c = curves[n]
        to_ref = steps_to_reach(c, ref["final"])
        saving = (None if to_ref is None or not ref_steps else round(100.0 * (ref_steps - to_ref) / ref_steps, 2))
        out[n] = {"final": c["final"], "best_epoch": c["best_epoch"],
                  f"steps_to_{int(round(fraction * 100))}pct_of_final": steps_to_reach(c, fraction * c["final"]),
                  "steps_to_reference_final": to_ref, "fewer_steps_than_reference_pct": saving}
    return {"reference": names[0], "fraction": fraction, "runs": out}


def draw(curves: dict[str, dict[str, Any]], metric: str, path: str | Path) -> None:
    """Test ``metric`` (mean over domains) against training steps, one line per run."""
    draw_curves({f"{name} (final {c['final']:.4f})": c for name, c in curves.items()}, "training steps",
                f"test {metric.upper()} (mean over domains)", path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR",
                    help="a finished run (repeatable); the first is the reference")
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--fraction", type=float, default=0.95)
    ap.add_argument("--out", default="runs/anytime.json")
    ap.add_argument("--png", default="runs/anytime.png")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    for p in (args.out, args.png):
        refusal = overwrite_refusal(p, args.overwrite)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
    runs = dict(r.split("=", 1) for r in args.run)
    try:
        curves = {label: read_curve(d, args.metric) for label, d in runs.items()}
    except CurveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"metric": f"test {args.metric}", "runs": runs, "curves": curves, **compare(curves, args.fraction),
              "command": "python -m research.anytime " + " ".join(f"--run '{r}'" for r in args.run)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    draw(curves, args.metric, args.png)
    for n, r in result["runs"].items():
        print(f"{n:<24} final {r['final']:.4f}  steps to {int(args.fraction * 100)}%: "
              f"{r[f'steps_to_{int(round(args.fraction * 100))}pct_of_final']}  to the reference's final: "
              f"{r['steps_to_reference_final']} ({r['fewer_steps_than_reference_pct']}% fewer)")
    print(f"written {args.out}, {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
