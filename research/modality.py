"""UniM2Rec's image modality (issue 22): does the multimodal teacher use its images?

A plan (configs/modality/scientificmm.yaml) names one domain, the seeds and a few teacher variants,
each a committed teacher config plus ``--set`` items (text only, text + image, text + image with a
variant meant to make the image pay). Every variant is trained at every seed by the teacher entry
point, in ``<runs_root>/<row>/seed<N>``:

    python -m research.modality run --plan configs/modality/scientificmm.yaml [--only text,text_image]
        [--seeds 7 11] [--set train.threads=1]     # execution keys only: ckd.run_dir.EXECUTION_KEYS

A finished seed (metrics.json) is skipped, a stopped one resumes from its ``last`` checkpoint. The
mechanisms study reads the results (``modality:`` in its plan; ``python -m research.mechanisms
collect``): per variant the test metrics of each seed, mean, sd and 95% interval, and each variant
against the plan's reference row (Welch interval, ckd.mechanisms_report.VERDICT_RULE).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ckd.mechanisms_report import LEVEL, SELECT, mean_interval, welch
from ckd.reporting import DASH, METRICS, fmt_duration, markdown_table
from research.plan_schema import PlanError, distinct_ints, entry_mapping, need

REPO = Path(__file__).resolve().parents[1]  # the checkout: the plan's paths are relative to it
PLAN = "configs/modality/scientificmm.yaml"
TOP_KEYS = {"title", "description", "domain", "seeds", "runs_root", "reference", "rows"}
ROW_KEYS = {"name", "label", "config", "set", "note"}


@dataclass(frozen=True)
class ModalityRow:
    name: str
    label: str
    config: str  # a committed teacher config (ckd-train-teacher --config)
    settings: tuple[str, ...] = ()  # its --set items (KEY=VALUE), part of the recipe
    note: str = ""


@dataclass(frozen=True)
class ModalityPlan:
    domain: str
    seeds: tuple[int, ...]
    runs_root: str
    reference: str  # the row every other row is compared with
    rows: tuple[ModalityRow, ...]
    title: str = ""
    description: str = ""
    source: str = PLAN

    def run_dir(self, row: str, seed: int) -> str:
        return f"{self.runs_root}/{row}/seed{seed}"


def parse_plan(raw: Any, source: str = PLAN) -> ModalityPlan:
    """Validate the plan's parsed YAML; every error names the entry."""
    entry_mapping(raw, TOP_KEYS, source)
    seeds = distinct_ints(need(raw, "seeds", source, list), "seeds", source)
    rows, names = [], set()
    for i, r in enumerate(need(raw, "rows", source, list)):
        where = f"{source}: rows[{i}]"
        entry_mapping(r, ROW_KEYS, where)
        name = need(r, "name", where)
        if name in names:
            raise PlanError(f"{where}: row {name!r} is listed twice")
        names.add(name)
        settings = r.get("set") or []
        if not isinstance(settings, list) or not all(isinstance(s, str) and "=" in s for s in settings):
            raise PlanError(f"{where}: 'set' must be a list of KEY=VALUE strings, got {settings!r}")
        if any(s.split("=", 1)[0].strip() == "train.seed" for s in settings):
            raise PlanError(f"{where}: train.seed comes from the plan's seeds, not from 'set'")
        rows.append(ModalityRow(name=name, label=need(r, "label", where), config=need(r, "config", where),
                                settings=tuple(settings), note=str(r.get("note") or "")))
    reference = need(raw, "reference", source)
    if reference not in names:
        raise PlanError(f"{source}: reference {reference!r} is not a row of the plan")
    return ModalityPlan(domain=need(raw, "domain", source), seeds=tuple(seeds),
                        runs_root=need(raw, "runs_root", source).rstrip("/"), reference=reference, rows=tuple(rows),
                        title=str(raw.get("title") or ""), description=str(raw.get("description") or ""),
                        source=source)


def load_plan(path: str | Path, label: str | None = None) -> ModalityPlan:
    """Read and validate a modality plan YAML."""
    from research.plan_files import read_plan_yaml

    return parse_plan(read_plan_yaml(path, label, PlanError), label or str(path))


def steps(plan: ModalityPlan, only: list[str] | None = None, seeds: list[int] | None = None,
          extra: list[str] | None = None) -> list:
    """The teacher runs of the plan (research.union.Step), row by row, seed by seed; ``extra``:
    execution-only --set items (ckd.run_dir.EXECUTION_KEYS) added to every run."""
    from ckd.run_dir import EXECUTION_KEYS
    from research.union import Step

    names = {r.name for r in plan.rows}
    unknown = sorted(set(only or []) - names)
    if unknown:
        raise PlanError(f"--only names {unknown}, not rows of {plan.source} (rows: {', '.join(sorted(names))})")
    bad = [e for e in extra or [] if e.split("=", 1)[0].strip() not in EXECUTION_KEYS]
    if bad:
        raise PlanError(f"--set {bad}: only execution keys ({', '.join(sorted(EXECUTION_KEYS))}) may change "
                        "here; anything else would train another recipe than the plan's")
    out = []
    for row in plan.rows:
        if only and row.name not in only:
            continue
        for seed in plan.seeds:
            if seeds and seed not in seeds:
                continue
            out.append(Step(kind="teacher", name=f"{row.name} seed {seed}", config=row.config,
                            run_dir=plan.run_dir(row.name, seed),
                            extra=(f"train.seed={seed}", *row.settings, *(extra or []))))
    return out


def row_command(plan: ModalityPlan, row: ModalityRow) -> str:
    """The teacher command of a row, with ``<N>`` for the seed."""
    argv = ["ckd-train-teacher", "--config", row.config, "--run-dir", f"{plan.runs_root}/{row.name}/seed<N>",
            "--set", "train.seed=<N>"]
    for s in row.settings:
        argv += ["--set", s]
    return " ".join(argv)


# ----------------------------------------------------------------------------- collect


def expected_config(row: ModalityRow, seed: int, root: Path) -> dict[str, Any]:
    """The row's committed config with its --set items and the seed applied: what a run must hold."""
    from ckd.config import load_yaml, with_overrides

    return with_overrides(load_yaml(root / row.config), [*row.settings, f"train.seed={seed}"])


def check_run_config(row: ModalityRow, seed: int, run_dir: Path, root: Path) -> dict[str, Any]:
    """The run's config.yaml, which must hold its row's recipe (execution keys aside,
    research.union.contradictions); else a PlanError naming the run directory and the settings."""
    from research.union import contradictions

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PlanError(f"{path} not found beside metrics.json: cannot tell which variant the run trained")
    cfg = yaml.safe_load(path.read_text()) or {}
    bad = contradictions(expected_config(row, seed, root), cfg)
    if bad:
        raise PlanError(f"{run_dir}: not the run of row {row.name} seed {seed}: " + "; ".join(bad[:5]))
    return cfg


def read_seed(plan: ModalityPlan, row: ModalityRow, seed: int, root: Path) -> dict[str, Any]:
    """One seed of a row: its test metrics and run facts when finished, else why it is pending."""
    from research.mechanisms import domain_test, finished_metrics
    from research.union import machine_for, measured_time

    rel = plan.run_dir(row.name, seed)
    run_dir = root / rel
    rec: dict[str, Any] = {"seed": seed, "run_dir": rel}
    metrics, detail = finished_metrics(root, rel)
    if metrics is None:
        return {**rec, "status": "pending", "detail": detail}
    cfg = check_run_config(row, seed, run_dir, root)
    test = domain_test(metrics, run_dir / "metrics.json", plan.domain)
    timing = measured_time(run_dir, metrics)
    device = (cfg.get("train") or {}).get("device", "cpu")
    return {**rec, "status": "done", "test": test,
            "valid": {k: float(v) for k, v in ((metrics.get("valid") or {}).get(plan.domain) or {}).items()},
            "best_epoch": metrics.get("best_epoch"), "checkpoint_sha256": metrics.get("checkpoint_sha256"),
            "wall_s": timing["seconds"], "wall_s_source": timing["source"],
            "machine": "; ".join(timing["machines"]) if timing["machines"] else machine_for(device)}


def collect(plan: ModalityPlan, root: Path, previous_block: dict[str, Any] | None = None,
            previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The modality block of the mechanisms JSON: per row its seeds (a seed pending here is carried
    from ``previous_block`` while the row's command and config are unchanged, research.carry), their
    statistics, and each row against the reference."""
    from research.carry import carry

    rows: dict[str, Any] = {}
    pending: list[str] = []
    for row in plan.rows:
        command = row_command(plan, row)
        prev_row = ((previous_block or {}).get("rows") or {}).get(row.name) or {}
        seeds = []
        for seed in plan.seeds:
            rec = read_seed(plan, row, seed, root)
            prev = next((s for s in prev_row.get("seeds") or [] if s.get("seed") == seed), None)
            if rec["status"] != "done" and prev and prev.get("status") == "done" and prev_row.get("command") == command:
                got = carry(prev, previous or {}, root, [row.config])
                rec = got if not isinstance(got, str) else {
                    **rec, "detail": f"{rec['detail']}; a recorded result was not carried: {got}"}
            seeds.append(rec)
        done = [s for s in seeds if s["status"] == "done"]
        rows[row.name] = {"label": row.label, "config": row.config, "set": list(row.settings), "command": command,
                          **({"note": row.note} if row.note else {}), "seeds": seeds,
                          "stats": {k: mean_interval([s["test"][k] for s in done], LEVEL) for k in METRICS}}
        pending += [f"modality row {row.name} seed {s['seed']} ({s['run_dir']}): {s['detail']}"
                    for s in seeds if s["status"] != "done"]

    def values(name: str) -> list[float]:
        return [s["test"][SELECT] for s in rows[name]["seeds"] if s["status"] == "done"]

    comparisons = {r.name: {"row": r.name, "against": plan.reference, **welch(values(r.name), values(plan.reference))}
                   for r in plan.rows if r.name != plan.reference}
    return {"plan": plan.source, "title": plan.title, "description": plan.description, "domain": plan.domain,
            "seeds": list(plan.seeds), "reference": plan.reference, "rows": rows, "comparisons": comparisons,
            "command": f"python -m research.modality run --plan {plan.source}", "pending": pending}


# ----------------------------------------------------------------------------- run


def _table(plan: ModalityPlan, root: Path) -> str:
    """Test NDCG@10 per row and seed of what has finished here (``collect``), with the mean and sd."""
    rows = []
    for name, r in collect(plan, root)["rows"].items():
        per = {s["seed"]: s["test"][SELECT] for s in r["seeds"] if s["status"] == "done"}
        st = r["stats"][SELECT]
        rows.append([name, *[f"{per[s]:.4f}" if s in per else DASH for s in plan.seeds],
                     f"{st['mean']:.4f}" if st else DASH, f"{st['sd']:.4f}" if st and st["sd"] is not None else DASH])
    return markdown_table(["row", *[f"seed {s}" for s in plan.seeds], "mean", "sd"], rows)


def _names(only: str | None) -> list[str] | None:
    """``--only a,b`` as a list of row names (None: every row)."""
    return [n.strip() for n in only.split(",") if n.strip()] if only else None


def cmd_run(args: argparse.Namespace, root: Path) -> int:
    from research.union import is_done, run_step, running_elsewhere

    plan = load_plan(root / args.plan, args.plan)
    todo = steps(plan, _names(args.only), args.seeds, args.overrides)
    if args.dry_run:
        for step in todo:
            print(shlex.join(step.argv))
        return 0
    left = [s for s in todo if not is_done(root, s.run_dir)]
    print(f"{plan.source}: {len(todo)} run(s) selected, {len(todo) - len(left)} finished, {len(left)} to run",
          flush=True)
    took: list[float] = []
    failed = []
    for i, step in enumerate(left, 1):
        tag = f"[{i}/{len(left)}] {step.name}"
        pid = running_elsewhere(root, step.run_dir)
        if pid is not None:
            print(f"{tag}: being trained by pid {pid}, left to it", flush=True)
            failed.append(step)
            continue
        eta = (f"; about {fmt_duration(statistics.median(took) * (len(left) - i + 1))} left" if took else "")
        print(f"{tag}: start {time.strftime('%H:%M')} `{step.command}`{eta}", flush=True)
        logs = root / plan.runs_root / "logs" / Path(step.run_dir).parent.name  # one folder per row
        rc, secs = run_step(root, step, logs, args.heartbeat * 60, tag)
        if rc == 0 and is_done(root, step.run_dir):
            took.append(secs)
            test = json.loads((root / step.run_dir / "metrics.json").read_text())["test"][plan.domain]
            print(f"{tag}: finished in {fmt_duration(secs)}: test NDCG@10 {test[SELECT]:.4f}", flush=True)
        else:
            failed.append(step)
            print(f"{tag}: FAILED (exit {rc}) after {fmt_duration(secs)}; see {logs / step.log_name}", flush=True)
    print(_table(plan, root), flush=True)
    if failed:
        print(f"not finished: {', '.join(s.name for s in failed)}; run again to resume", flush=True)
        return 1
    print("next: python -m research.mechanisms collect --out <the mechanisms results JSON>", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.modality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO), help="repository root the plan's paths are relative to")
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="train every missing (row, seed) of the plan, one at a time")
    r.add_argument("--plan", default=PLAN)
    r.add_argument("--only", help="comma-separated row names")
    r.add_argument("--seeds", type=int, nargs="+", help="only these of the plan's seeds")
    r.add_argument("--set", dest="overrides", action="append", default=[],
                   help="KEY=VALUE for every run; execution keys only (threads, device, data_dir, ...)")
    r.add_argument("--heartbeat", type=float, default=10.0, help="minutes between progress lines (0: none)")
    r.add_argument("--dry-run", action="store_true", help="print the commands, train nothing")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        return cmd_run(args, root)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
