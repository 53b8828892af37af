"""Does a teacher retrained from its committed config land where the recorded one did?

    python -m research.retrain_check --recorded runs/demo/teachers/unisrec \
        --retrained runs/repro/demo_unisrec --out results/repro/demo_unisrec_retrain.json
    python -m research.retrain_check --recorded-entry results/experiments_union.json#unisrec_text \
        --retrained runs/union/teachers/unisrec_text --out results/repro/union_unisrec_text_retrain.json

(--recorded-entry: the recorded run is a finished teacher entry of a research.union results JSON,
for when its run directory is on another machine; ``compare_to_entry``.)

Reads the two teacher run directories (``ckd-train-teacher`` writes config.yaml, run.json and
metrics.json into each): the resolved configs must be the same recipe (only the execution settings
of ``ckd.run_dir.EXECUTION_KEYS`` may differ: data location, threads, device, ...), then per domain of the run the recorded and retrained test metrics,
their absolute differences, and whether NDCG@10 lands within ``--tolerance`` (default 0.002, the
"every domain" issue's rule) on every domain; also whether the two checkpoints are the same bytes
(sha256), the commits both ran at and the retrain's wall time. Prints a table and writes the JSON
(an existing --out, or one under results/, is replaced only with --overwrite).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ckd.reporting import METRICS, results_out_path, write_results_json
from ckd.run_dir import EXECUTION_KEYS  # where or how a run ran, not its recipe
from ckd.union_report import SELECT  # the "every domain" page's metric, which the 0.002 rule is on

REPO = Path(__file__).resolve().parents[1]


class RetrainCheckError(ValueError):
    """A run directory that cannot be compared (missing files, a different recipe)."""


def _read(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, loader in (("config.yaml", yaml.safe_load), ("metrics.json", json.loads), ("run.json", json.loads)):
        path = run_dir / name
        if not path.is_file():
            raise RetrainCheckError(f"{run_dir}: no {name} (is it a finished ckd-train-teacher run directory?)")
        out[name] = loader(path.read_text())
    return out


def recipe(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config without the EXECUTION_KEYS."""
    out = json.loads(json.dumps(config))
    for section, key in (k.split(".", 1) for k in EXECUTION_KEYS):
        (out.get(section) or {}).pop(key, None)
    return out


def commit_fields(which: str, sha: str | None) -> dict[str, Any]:
    """run.json's git_sha as ``<which>_commit`` and ``<which>_uncommitted_changes`` (the '-dirty' suffix)."""
    sha = sha or "unknown"
    return {f"{which}_commit": sha.removesuffix("-dirty"), f"{which}_uncommitted_changes": sha.endswith("-dirty")}


def compare_tests(ta: dict[str, Any], tb: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """Per domain (the recorded run's, without "mean"): each metric recorded, retrained and their
    absolute difference, and whether NDCG@10 lands within ``tolerance``."""
    domains = [d for d in ta if d != "mean"]
    missing = [d for d in domains if d not in tb]
    if missing:  # order and extra domains of the retrain do not matter
        raise RetrainCheckError(f"the retrained run has no test results for {missing} (it has {list(tb)})")
    per_domain: dict[str, Any] = {}
    for d in domains:
        per_domain[d] = {m: {"recorded": ta[d][m], "retrained": tb[d][m], "abs_diff": abs(ta[d][m] - tb[d][m])}
                         for m in METRICS}
        per_domain[d]["within_tolerance"] = per_domain[d][SELECT]["abs_diff"] <= tolerance
    return per_domain


def compare(recorded: Path, retrained: Path, tolerance: float = 0.002) -> dict[str, Any]:
    """The comparison (see the module docstring) as a JSON-able dict."""
    a, b = _read(recorded), _read(retrained)
    if recipe(a["config.yaml"]) != recipe(b["config.yaml"]):
        raise RetrainCheckError(f"{retrained}/config.yaml is not the recipe of {recorded}/config.yaml: "
                                "a retrain must use the same config")
    return _comparison(a, str(recorded), b, retrained, tolerance)


def compare_to_entry(entry: dict[str, Any], retrained: Path, root: Path, tolerance: float = 0.002) -> dict[str, Any]:
    """``compare`` for a recorded run whose directory is not on this machine: ``entry`` is its finished
    teacher entry of a results JSON (research.union: its config, test metrics, checkpoint sha256, the
    commit it trained at, its machine). The recipe check is the union collect's own: the retrained
    run's config.yaml must hold every setting of the committed config file, which research.carry found
    unchanged since the entry was recorded (research.union.check_run_config)."""
    from research.plan_schema import PlanError
    from research.union import check_run_config, machine_for

    b = _read(retrained)
    try:
        check_run_config(entry["config"], str(retrained), root)  # root / an absolute path is that path
    except PlanError as exc:
        raise RetrainCheckError(f"{exc}: a retrain must use the same config") from exc
    # the recorded run, as far as its entry keeps it (older JSON: the collect's commit, not the training's)
    a = {"config.yaml": b["config.yaml"],
         "metrics.json": {k: entry.get(k) for k in ("test", "checkpoint_sha256", "best_epoch")},
         "run.json": {"git_sha": entry.get("trained_commit") or (entry.get("carried") or {}).get("from_commit")}}
    r = _comparison(a, f"{entry['run_dir']} (recorded entry; run directory not on this machine)", b, retrained,
                    tolerance)
    return {**r, "recorded_machine": entry.get("machine"),
            "retrained_machine": "; ".join(r["retrained_machines"]) or machine_for("cpu") + " (the machine collect ran on)"}


def _comparison(a: dict[str, Any], recorded: str, b: dict[str, Any], retrained: Path, tolerance: float) -> dict[str, Any]:
    """The JSON of a comparison from the recorded (``a``) and retrained (``b``) run's files, as ``_read``
    returns them."""
    from research.union import measured_time

    per_domain = compare_tests(a["metrics.json"]["test"], b["metrics.json"]["test"], tolerance)
    timing = measured_time(retrained, b["metrics.json"])
    return {
        "kind": "retrain_check", "recorded": recorded, "retrained": str(retrained),
        "config": a["config.yaml"], "tolerance": tolerance, "metric": f"test {SELECT}",
        **commit_fields("recorded", a["run.json"].get("git_sha")),
        **commit_fields("retrained", b["run.json"].get("git_sha")),
        "retrained_command": " ".join(b["run.json"].get("argv") or []),
        "recorded_sha256": a["metrics.json"].get("checkpoint_sha256"),
        "retrained_sha256": b["metrics.json"].get("checkpoint_sha256"),
        "same_checkpoint_bytes": a["metrics.json"].get("checkpoint_sha256") == b["metrics.json"].get("checkpoint_sha256"),
        "best_epoch": {"recorded": a["metrics.json"].get("best_epoch"), "retrained": b["metrics.json"].get("best_epoch")},
        "retrain_time_s": timing["seconds"], "retrain_time_source": timing["source"],
        "retrained_machines": timing["machines"],  # as its invocations.jsonl recorded them (none without one)
        "per_domain": per_domain, "within_tolerance": all(v["within_tolerance"] for v in per_domain.values()),
    }


def recorded_entry(ref: str) -> dict[str, Any]:
    """The finished teacher entry ``JSON#TEACHER`` of a research.union results JSON."""
    path, sep, name = ref.partition("#")
    if not sep or not name:
        raise RetrainCheckError(f"--recorded-entry {ref!r}: expected JSON#TEACHER")
    try:
        teachers = json.loads(Path(path).read_text()).get("teachers") or {}
    except (OSError, ValueError) as exc:
        raise RetrainCheckError(f"--recorded-entry {ref!r}: cannot read {path}: {exc}") from exc
    entry = teachers.get(name)
    if not entry or entry.get("status") != "done":
        raise RetrainCheckError(f"--recorded-entry {ref!r}: no finished teacher {name!r} in {path} "
                                f"(teachers: {sorted(teachers)})")
    return entry


def print_table(r: dict[str, Any]) -> None:
    for k in ("recorded", "retrained"):
        extra = " plus uncommitted changes" if r[f"{k}_uncommitted_changes"] else ""
        print(f"{k:9s} {r[k]} (commit {r[f'{k}_commit']}{extra})")
    print(f"{'domain':12s} {'metric':10s} {'recorded':>9s} {'retrained':>9s} {'|diff|':>9s}")
    for d, v in r["per_domain"].items():
        for m in METRICS:
            print(f"{d:12s} {m:10s} {v[m]['recorded']:9.4f} {v[m]['retrained']:9.4f} {v[m]['abs_diff']:9.2e}")
    print(f"test {SELECT} within {r['tolerance']} on every domain: {'yes' if r['within_tolerance'] else 'NO'}; "
          f"same checkpoint bytes: {'yes' if r['same_checkpoint_bytes'] else 'no'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--recorded", help="the run directory whose numbers are on a page")
    which.add_argument("--recorded-entry", metavar="JSON#TEACHER",
                       help="a teacher entry of a research.union results JSON (its run directory is elsewhere)")
    ap.add_argument("--retrained", required=True, help="the same config trained again")
    ap.add_argument("--tolerance", type=float, default=0.002)
    ap.add_argument("--out", default=None, help="JSON to write (optional)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = results_out_path(args.out, REPO, args.overwrite) if args.out else None
    if args.out and out is None:
        return 2
    try:
        if args.recorded_entry:
            r = compare_to_entry(recorded_entry(args.recorded_entry), Path(args.retrained), REPO, args.tolerance)
        else:
            r = compare(Path(args.recorded), Path(args.retrained), args.tolerance)
    except RetrainCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r["command"] = " ".join(["python -m research.retrain_check", *(argv if argv is not None else sys.argv[1:])])
    print_table(r)
    if out is not None:
        write_results_json(out, r)
        print(f"wrote {out}")
    return 0 if r["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
