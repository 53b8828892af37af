"""The mechanisms study (issue 22): collect the runs of a plan into the JSON that the mechanisms
page (ckd/mechanisms_report.py) is rendered from.

    python -m research.mechanisms collect --plan configs/mechanisms/scientific.yaml \
        --out results/mechanisms_scientific.json [--overwrite]
    python -m research.mechanisms collect --plan configs/mechanisms/union.yaml \
        --out results/mechanisms_union.json [--overwrite]
    ckd-report --page <the page of results/MANIFEST.yaml>      # or, ad hoc:
    ckd-report --mechanisms results/mechanisms_scientific.json --out docs/X.md --figure docs/X.png --draft

The plan names each row (name, label, group, the exact ``python -m research.seeds ...`` command that
trains it, and for integration rows the teacher pool and integration mode), the teachers (their
metrics.json), the curriculum rows (optional) and the mechanisms whose verdicts the page prints. A
plan names one ``domain``, or the ``domains`` of a multi-domain student: every number is then judged
on the unweighted mean over those domains (the union runs' selection metric), each domain kept beside
it. Every seed's run directory is ``<runs_root>/<row>/seed<N>``; this script only reads them (train a row with its
command). A finished seed (metrics.json) whose config.yaml contradicts its row's command (a
``--set`` value, ``--teachers none``, the seed) is an error naming the key, so a table never mixes
settings; the rest is listed as pending.

Per row and metric: mean, sample sd and the 95% t-interval of the mean over the finished seeds.
Computed: for each integration mode, corrupted vs clean pool (Welch interval of the difference of
means, in % of the clean mean); the mechanisms' comparisons with their verdicts
(ckd.mechanisms_report.VERDICT_RULE); the curriculum rows' anytime curves (mean over seeds of test
NDCG@10 per step, research/anytime.py) with the steps to 95% of their final and to the
no-curriculum final; each row against the best clean teacher; and the issue's targets. With
``modality:`` (a research.modality plan), the teacher variants of UniM2Rec's image modality too.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ckd.config import load_yaml
from ckd.mechanisms_report import (ANYTIME_FRACTION, FORMAT, LEVEL, SCHEMA, SELECT, against_value,
                                   higher_by_spread_of, mean_interval, welch)
from ckd.reporting import METRICS
from research.plan_schema import PlanError, distinct_ints, entry_mapping, need

REPO = Path(__file__).resolve().parents[1]  # the checkout: the plan's paths are relative to it
PLAN = "configs/mechanisms/scientific.yaml"
DEFAULT_OUT = "results/mechanisms_scientific.json"
GROUPS = ("integration", "curriculum", "precision", "baseline")
MODES = ("mean", "confidence", "consistency", "both", "reliability")
TOP_KEYS = {"title", "description", "scale", "domain", "domains", "seeds", "runs_root", "pools", "teachers", "rows",
            "curriculum", "mechanisms", "params", "modality"}
PARAMS_KEYS = {"sweep", "label", "png"}
ROW_KEYS = {"name", "label", "group", "pool", "mode", "command", "note"}
TEACHER_KEYS = {"name", "label", "metrics", "build", "corrupted"}
# The targets (issue 22, "What to build and measure").
KEEP_WITHIN_PCT = -1.0  # consistency-aware integration keeps >= -1% of its clean-pool NDCG@10
MEAN_LOSES_PCT = -5.0  # while mean integration loses at least 5%
FEWER_STEPS_PCT = 20.0  # the curriculum reaches the no-curriculum final in >= 20% fewer steps
BEAT_TEACHER_PCT = 3.0  # the student beats its best teacher by >= 3% NDCG@10



# ----------------------------------------------------------------------------- the plan


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # noqa: D401 - argparse hook
        raise PlanError(message)


def seeds_parser() -> argparse.ArgumentParser:
    """The options of ``python -m research.seeds`` (research/seeds.py main), to read a row's command."""
    ap = _Parser(prog="python -m research.seeds", add_help=False)
    ap.add_argument("--config")
    ap.add_argument("--teachers")
    ap.add_argument("--data-dir")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--runs-root", required=True)
    ap.add_argument("--domain")
    ap.add_argument("--reference", action="append", default=[])
    ap.add_argument("--out")
    ap.add_argument("--overwrite", action="store_true")
    return ap


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    group: str
    command: str
    runs_root: str  # the command's --runs-root: <plan runs_root>/<name>
    config: str
    settings: dict[str, Any]  # dotted key -> value every finished seed's config.yaml must hold
    pool: str | None = None
    mode: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Plan:
    domain: str  # the metrics.json key every number is judged on: the one domain, or "mean" over `domains`
    seeds: tuple[int, ...]
    runs_root: str
    pools: dict[str, dict[str, str]]  # name -> {"label", "spec"}
    teachers: tuple[dict[str, Any], ...]
    rows: tuple[Row, ...]
    curriculum: dict[str, Any]  # {"reference": row, "rows": [{"row", "label"}]}
    mechanisms: tuple[dict[str, Any], ...]
    params: tuple[dict[str, str], ...] = ()  # parameter sweeps (research.param_analysis): sweep, label, png
    modality: str = ""  # a research.modality plan (UniM2Rec's image modality), or none
    title: str = ""
    description: str = ""
    scale: str = ""  # the page's sentence on the study's scale (default: the Scientific demo scale's)
    domains: tuple[str, ...] = ()  # the student's domains, in order (one: `domain` itself)
    source: str = PLAN

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def _overrides(items: list[str], where: str) -> dict[str, Any]:
    """``--set`` items as {dotted key: YAML-parsed value} (ckd.config.parse_overrides' parsing)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PlanError(f"{where}: --set {item!r} must look like section.key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def parse_row(raw: Any, i: int, plan_seeds: tuple[int, ...], runs_root: str, pools: dict[str, Any],
              source: str) -> Row:
    """One row of the plan, its command read and checked against its group, pool and mode."""
    where = f"{source}: rows[{i}]"
    entry_mapping(raw, ROW_KEYS, where)
    name = need(raw, "name", where)
    where = f"{source}: row {name}"
    group = need(raw, "group", where)
    if group not in GROUPS:
        raise PlanError(f"{where}: group {group!r} is not one of {GROUPS}")
    command = " ".join(need(raw, "command", where).split())
    argv = shlex.split(command)
    if argv[:3] != ["python", "-m", "research.seeds"]:
        raise PlanError(f"{where}: the command must start with `python -m research.seeds`, got {command!r}")
    try:
        args = seeds_parser().parse_args(argv[3:])
    except PlanError as exc:
        raise PlanError(f"{where}: command: {exc}") from None
    want_root = f"{runs_root}/{name}"
    if args.runs_root.rstrip("/") != want_root:
        raise PlanError(f"{where}: the command's --runs-root is {args.runs_root}, the plan's layout wants {want_root}")
    if tuple(args.seeds) != plan_seeds:
        raise PlanError(f"{where}: the command trains seeds {args.seeds}, the plan's are {list(plan_seeds)}")
    if not args.config:
        raise PlanError(f"{where}: the command names no --config")
    settings = _overrides(args.overrides, where)
    if "train.seed" in settings:
        raise PlanError(f"{where}: --set train.seed: the seeds come from --seeds")
    teachers_none = (args.teachers or "").strip().lower() == "none"
    if teachers_none:
        settings["service.enabled"] = False
    pool, mode = raw.get("pool"), raw.get("mode")
    if group == "integration" or pool is not None or mode is not None:
        if pool not in pools:
            raise PlanError(f"{where}: pool {pool!r} is not one of the plan's pools {sorted(pools)}")
        if mode not in MODES:
            raise PlanError(f"{where}: mode {mode!r} is not one of {MODES}")
        if teachers_none:
            raise PlanError(f"{where}: a row with a teacher pool cannot run with --teachers none")
        if settings.get("service.spec") != pools[pool]["spec"]:
            raise PlanError(f"{where}: pool {pool} is served by {pools[pool]['spec']}, the command sets "
                            f"service.spec={settings.get('service.spec')!r}")
        integration = "both" if mode == "reliability" else mode
        if settings.get("kd.integration") != integration:
            raise PlanError(f"{where}: mode {mode} needs --set kd.integration={integration}, the command sets "
                            f"{settings.get('kd.integration')!r}")
        prior = "reliability" if mode == "reliability" else "none"
        if settings.get("kd.teacher_prior", "none") != prior:
            raise PlanError(f"{where}: mode {mode} needs kd.teacher_prior={prior}, the command sets "
                            f"{settings.get('kd.teacher_prior')!r}")
    return Row(name=name, label=need(raw, "label", where), group=group, command=command,
               runs_root=want_root, config=args.config, settings=settings, pool=pool, mode=mode,
               note=str(raw.get("note", "")))


def parse_plan(raw: Any, source: str = PLAN) -> Plan:
    """Validate the plan's parsed YAML; every error names the entry."""
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a mapping")
    if set(raw) - TOP_KEYS:
        raise PlanError(f"{source}: unknown top-level keys {sorted(set(raw) - TOP_KEYS)}")
    domain, domains = plan_domains(raw, source)
    seeds = distinct_ints(need(raw, "seeds", source, list), "seeds", source)
    runs_root = need(raw, "runs_root", source).rstrip("/")
    pools_raw = need(raw, "pools", source, dict)
    pools = {}
    for p, v in pools_raw.items():
        pools[str(p)] = {"label": need(v, "label", f"{source}: pool {p}"),
                         "spec": need(v, "spec", f"{source}: pool {p}")}
    teachers, tnames = [], set()
    for i, t in enumerate(raw.get("teachers") or []):
        where = f"{source}: teachers[{i}]"
        if not isinstance(t, dict) or set(t) - TEACHER_KEYS:
            raise PlanError(f"{where}: expected a mapping with keys among {sorted(TEACHER_KEYS)}")
        name = need(t, "name", where)
        if name in tnames:
            raise PlanError(f"{where}: teacher {name!r} is listed twice")
        tnames.add(name)
        teachers.append({"name": name, "label": need(t, "label", where), "metrics": t.get("metrics") or "",
                         "build": str(t.get("build") or ""), "corrupted": bool(t.get("corrupted", False))})
    rows, names = [], set()
    for i, r in enumerate(need(raw, "rows", source, list)):
        row = parse_row(r, i, tuple(seeds), runs_root, pools, source)
        if row.name in names:
            raise PlanError(f"{source}: row {row.name} is listed twice")
        names.add(row.name)
        rows.append(row)
    cells = [(r.pool, r.mode) for r in rows if r.pool]
    if len(set(cells)) != len(cells):
        raise PlanError(f"{source}: two rows share a pool and mode")

    def known(name: Any, where: str) -> str:
        if name not in names:
            raise PlanError(f"{where}: {name!r} is not a row of the plan")
        return name

    cur = raw.get("curriculum", {"rows": [], "reference": None})  # a plan may study integration alone
    if not isinstance(cur, dict):
        raise PlanError(f"{source}: 'curriculum' must be a mapping with 'reference' and 'rows'")
    cur_rows = [{"row": known(need(c, "row", f"{source}: curriculum.rows[{i}]"), f"{source}: curriculum.rows[{i}]"),
                 "label": need(c, "label", f"{source}: curriculum.rows[{i}]")}
                for i, c in enumerate(need(cur, "rows", f"{source}: curriculum", list))]
    reference = None if not cur_rows and cur.get("reference") is None else \
        known(need(cur, "reference", f"{source}: curriculum"), f"{source}: curriculum.reference")
    if reference is not None and reference not in [c["row"] for c in cur_rows]:
        raise PlanError(f"{source}: curriculum.reference {reference} must be one of curriculum.rows")
    by_name = {r.name: r for r in rows}
    for c in cur_rows:
        if by_name[c["row"]].settings.get("train.record_test_curve") is not True:
            raise PlanError(f"{source}: curriculum row {c['row']}: its command must --set train.record_test_curve=true "
                            "(the anytime curves)")
    mechanisms = []
    for i, mech in enumerate(need(raw, "mechanisms", source, list)):
        where = f"{source}: mechanisms[{i}]"
        comps = []
        for j, c in enumerate(need(mech, "comparisons", where, list)):
            w = f"{where}.comparisons[{j}]"
            comps.append({"where": need(c, "where", w), "row": known(need(c, "row", w), w),
                          "against": known(need(c, "against", w), w)})
        if not comps:
            raise PlanError(f"{where}: no comparisons")
        mechanisms.append({"name": need(mech, "name", where), "label": need(mech, "label", where),
                           "comparisons": comps})
    params = []
    for i, sw in enumerate(raw.get("params") or []):
        where = f"{source}: params[{i}]"
        entry_mapping(sw, PARAMS_KEYS, where)
        params.append({"sweep": need(sw, "sweep", where), "label": need(sw, "label", where),
                       "png": need(sw, "png", where)})
    modality = raw.get("modality") or ""
    if not isinstance(modality, str):
        raise PlanError(f"{source}: 'modality' must be the path of a research.modality plan, got {modality!r}")
    return Plan(domain=domain, seeds=tuple(seeds), runs_root=runs_root, pools=pools, teachers=tuple(teachers),
                rows=tuple(rows), curriculum={"reference": reference, "rows": cur_rows}, mechanisms=tuple(mechanisms),
                params=tuple(params), modality=modality, title=str(raw.get("title", "")),
                description=str(raw.get("description", "")), scale=str(raw.get("scale", "")), domains=domains,
                source=source)


def plan_domains(raw: dict[str, Any], source: str) -> tuple[str, tuple[str, ...]]:
    """(the metrics key judged, the student's domains) from a plan's `domain` (one domain) or
    `domains` (a multi-domain student: judged on "mean", the mean over its domains that its runs
    select on, with each domain shown beside it). Exactly one of the two."""
    if ("domain" in raw) == ("domains" in raw):
        raise PlanError(f"{source}: name either 'domain' (one) or 'domains' (a multi-domain student), not "
                        + ("both" if "domain" in raw else "neither"))
    if "domain" in raw:
        domain = need(raw, "domain", source)
        return domain, (domain,)
    domains = raw["domains"]
    if (not isinstance(domains, list) or not domains or len(set(map(str, domains))) != len(domains)
            or not all(isinstance(d, str) and d for d in domains)):
        raise PlanError(f"{source}: 'domains' must be a list of distinct domain names, got {domains!r}")
    return ("mean" if len(domains) > 1 else domains[0]), tuple(domains)


def load_plan(path: str | Path, label: str | None = None) -> Plan:
    """Read and validate the plan YAML."""
    from research.plan_files import read_plan_yaml

    return parse_plan(read_plan_yaml(path, label, PlanError), label or str(path))


# ----------------------------------------------------------------------------- run directories


def _dotted(cfg: dict[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_run_config(row: Row, seed: int, run_dir: Path) -> dict[str, Any]:
    """The run's resolved config.yaml, which must hold what the row's command sets (and its seed);
    else a PlanError naming the run directory and the key."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise PlanError(f"{path} not found beside metrics.json: cannot tell which setting the run trained")
    cfg = yaml.safe_load(path.read_text()) or {}
    for key, want in {**row.settings, "train.seed": seed}.items():
        found, have = _dotted(cfg, key)
        if not found or have != want:
            raise PlanError(f"{run_dir}: config.yaml has {key}={have!r}" + ("" if found else " (absent)")
                            + f", but row {row.name} trains {key}={want!r}: another setting's run is in its directory")
    return cfg


def finished_metrics(root: Path, rel: str) -> tuple[dict[str, Any] | None, str]:
    """(metrics.json of the run directory ``rel``, "") when it has finished, else (None, why not: not
    started, being trained by a pid, or started and stopped)."""
    from research.union import running_elsewhere

    run_dir = root / rel
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        pid = running_elsewhere(root, rel) if run_dir.is_dir() else None
        return None, ("not started" if not run_dir.is_dir() else
                      f"being trained (pid {pid})" if pid else "started, not finished (no metrics.json yet)")
    try:
        return json.loads(mpath.read_text()), ""
    except json.JSONDecodeError as exc:
        raise PlanError(f"{mpath}: not valid JSON ({exc})") from exc


def domain_test(metrics: dict[str, Any], path: Path, domain: str) -> dict[str, float]:
    """The test metrics of ``domain`` in a run's metrics.json (``path``, for the error)."""
    test = (metrics.get("test") or {}).get(domain)
    if not test or any(k not in test for k in METRICS):
        raise PlanError(f"{path}: no test {', '.join(METRICS)} for {domain}")
    return {k: float(test[k]) for k in METRICS}


def plan_split(metrics: dict[str, Any], split: str, plan: Plan) -> tuple[dict[str, float] | None,
                                                                        dict[str, dict[str, float]]]:
    """(the metrics the plan judges, {domain: metrics}) of one split of a run's or teacher's
    metrics.json: the plan's one domain, or for a multi-domain plan the unweighted mean over the plan's
    domains, computed from each domain's (research.union.split_over_domains), not read from the
    file's own "mean", which covers whatever domains that run evaluated. None when incomplete."""
    from research.union import split_over_domains

    by = split_over_domains(metrics, split, plan.domains)
    judged = by.pop("mean", None)
    return (judged if len(plan.domains) > 1 else by.get(plan.domain)), by


def plan_test(metrics: dict[str, Any], path: Path, plan: Plan) -> dict[str, Any]:
    """{"test": the metrics judged}, plus "test_by_domain" for a multi-domain plan; a PlanError
    naming the file and the plan's domains when any of them lacks a metric."""
    judged, by = plan_split(metrics, "test", plan)
    if judged is None:
        missing = [d for d in plan.domains if d not in by]
        raise PlanError(f"{path}: no test {', '.join(METRICS)} for {', '.join(missing)} "
                        f"(the plan's domains: {', '.join(plan.domains)})")
    return {"test": judged, **({"test_by_domain": by} if len(plan.domains) > 1 else {})}


def read_seed(plan: Plan, row: Row, seed: int, root: Path) -> dict[str, Any]:
    """One seed of a row: its test metrics and run facts when finished, else why it is pending."""
    from research.anytime import CurveError, read_curve
    from research.union import measured_time

    rel = f"{row.runs_root}/seed{seed}"
    run_dir = root / rel
    rec: dict[str, Any] = {"seed": seed, "run_dir": rel}
    metrics, detail = finished_metrics(root, rel)
    if metrics is None:
        return {**rec, "status": "pending", "detail": detail}
    cfg = check_run_config(row, seed, run_dir)
    doms = (cfg.get("data") or {}).get("domains")
    if doms is not None and list(doms) != list(plan.domains):
        raise PlanError(f"{run_dir}: config.yaml trains domains {doms}, the plan {list(plan.domains)}: another "
                        "student's run is in its directory")
    judged = plan_test(metrics, run_dir / "metrics.json", plan)
    from ckd.run_dir import read_run_header

    header = read_run_header(run_dir)
    timing = measured_time(run_dir, metrics)
    client = metrics.get("teacher_client") or {}
    rec.update(status="done", **judged,
               valid=plan_split(metrics, "valid", plan)[0] or {},
               best_epoch=metrics.get("best_epoch"), epochs_run=metrics.get("epochs_run"),
               epochs=(cfg.get("train") or {}).get("epochs"), global_step=metrics.get("global_step"),
               wall_s=timing["seconds"], wall_s_source=timing["source"],
               steps_per_s=(metrics.get("timing") or {}).get("steps_per_s"),
               git_sha=header.get("git_sha"), device=header.get("device"), started=header.get("started"),
               served=sorted((header.get("teachers") or {}).keys()),
               kd_skipped_batches=client.get("kd_skipped_batches"))
    if client.get("teacher_reliability"):
        rec["teacher_reliability"] = client["teacher_reliability"]
    try:
        rec["curve"] = read_curve(run_dir, SELECT)
    except CurveError as exc:
        rec["curve_error"] = str(exc)
    return rec


def mean_curve(curves: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """The mean over seeds of test NDCG@10 at each epoch's end (aligned by epoch; cut to the
    shortest curve), with its sd, in research.anytime's curve shape: {"steps", "values", "final",
    "best_epoch"} plus "sd", "seeds" and "steps_differ" (True when seeds ended an epoch at different
    steps; the mean step is used then). ``final``: the mean of each seed's final value."""
    n = min(len(c["steps"]) for c in curves)
    steps, values, sd, differ = [], [], [], False
    for i in range(n):
        at = [c["steps"][i] for c in curves]
        differ |= len(set(at)) > 1
        steps.append(int(round(statistics.fmean(at))))
        vals = [c["values"][i] for c in curves]
        values.append(statistics.fmean(vals))
        sd.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return {"steps": steps, "values": values, "sd": sd, "final": statistics.fmean(c["final"] for c in curves),
            "best_epoch": [c["best_epoch"] for c in curves], "seeds": seeds, "steps_differ": differ}


# ----------------------------------------------------------------------------- collect


def _values(rows: dict[str, Any], name: str, metric: str = SELECT) -> list[float]:
    return [s["test"][metric] for s in rows[name]["seeds"] if s["status"] == "done"]


def _compare(rows: dict[str, Any], name: str, against: str) -> dict[str, Any]:
    return {"row": name, "against": against, **welch(_values(rows, name), _values(rows, against), LEVEL)}


def read_teacher(t: dict[str, Any], plan: Plan, root: Path) -> dict[str, Any]:
    entry = {k: t[k] for k in ("label", "metrics", "build", "corrupted")}
    if not t["metrics"]:
        return {**entry, "status": "not evaluated"}
    path = root / t["metrics"]
    if not path.is_file():
        return {**entry, "status": "pending"}
    m = json.loads(path.read_text())
    return {**entry, "status": "done", **plan_test(m, path, plan),
            "best_epoch": m.get("best_epoch"), "checkpoint_sha256": m.get("checkpoint_sha256")}


def _pool_teachers(spec: str, root: Path) -> list[str]:
    path = root / spec
    if not path.is_file():
        return []
    return [str(t.get("name")) for t in load_yaml(path).get("teachers") or []]


def collect_sweep(sw: dict[str, str], root: Path, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """One parameter sweep of the plan (research.param_analysis): per parameter its points (test
    NDCG@10 of each finished run, None while pending; carried from ``previous`` when recorded there)
    and the base config's default."""
    from research import param_analysis as pa

    try:
        sweep = pa.load_sweep(root / sw["sweep"])
        sweep["runs_root"] = str(root / sweep["runs_root"]) if not Path(sweep["runs_root"]).is_absolute() \
            else sweep["runs_root"]
        defaults = {p: pa.default_value(sweep, p) for p in sweep["params"]}
    except (pa.SweepError, OSError) as exc:
        raise PlanError(f"{sw['sweep']}: {exc}") from exc
    result = pa.collect(sweep, defaults, SELECT)
    for r in result.values():  # run directories as the plan names them (relative to the checkout)
        for q in r["points"]:
            if Path(q["run_dir"]).is_relative_to(root):
                q["run_dir"] = str(Path(q["run_dir"]).relative_to(root))
    prev = next((p for p in (previous or {}).get("params") or [] if p.get("sweep") == sw["sweep"]), None)
    if prev:
        pa.carry_points(result, previous, prev.get("params"), root, pa.sweep_inputs(sw["sweep"], sweep, root), SELECT)
    plot = (f"python -m research.param_analysis plot --sweep {sw['sweep']} --out "
            f"results/{Path(sw['png']).stem}.json --png {sw['png']} --overwrite")
    return {"sweep": sw["sweep"], "label": sw["label"], "png": sw["png"], "config": sweep["config"],
            "args": list(map(str, sweep["args"])), "seed": sweep["seed"], "params": result,
            "commands": [f"python -m research.param_analysis run --sweep {sw['sweep']}", plot]}


def steps_verdict(compare: dict[str, Any] | None, row: str, enough_seeds: bool) -> bool | None:
    """The curriculum target's steps half for ``row`` from research.anytime.compare's output: True when
    its mean curve reaches the reference's final in at least FEWER_STEPS_PCT% fewer steps; None (open)
    without curves of enough seeds, or when the reference's own mean curve never reaches its final
    (seeds that select different epochs), so that no saving is defined."""
    runs = (compare or {}).get("runs") or {}
    ref = (compare or {}).get("reference")
    if row not in runs or not enough_seeds or runs.get(ref, {}).get("steps_to_reference_final") is None:
        return None
    fewer = runs[row].get("fewer_steps_than_reference_pct")
    return fewer is not None and fewer >= FEWER_STEPS_PCT


def _without_seeds(command: str) -> str:
    """A row's command without its seed list and parallelism: adding a seed is not another recipe."""
    return re.sub(r" --parallel \d+", "", re.sub(r" --seeds( -?\d+)+", "", command or ""))


def row_inputs(plan: Plan, row: Row, root: Path) -> list[str]:
    """The committed files a row's seeds depend on: its config, its pool's deploy spec, and the
    config (``--config``) of each teacher build of that pool."""
    out = [row.config]
    spec = row.settings.get("service.spec") or (plan.pools.get(row.pool or "") or {}).get("spec")
    if spec and row.settings.get("service.enabled", True) is not False:
        out.append(str(spec))
        served = set(_pool_teachers(str(spec), root))
        for t in plan.teachers:
            if t["name"] in served:
                out += re.findall(r"--config (\S+)", t.get("build") or "")
    return list(dict.fromkeys(out))


def _carry_seed(rec: dict[str, Any], plan: Plan, row: Row, prev_row: dict[str, Any] | None,
                previous: dict[str, Any] | None, root: Path) -> dict[str, Any]:
    """A seed pending here replaced by the same seed's finished record of ``previous`` (research.carry),
    while the row's recipe and its input files (``row_inputs``) are unchanged."""
    from research.carry import carry

    prev = next((s for s in (prev_row or {}).get("seeds") or [] if (s.get("seed"), s.get("run_dir")) == (
        rec["seed"], rec["run_dir"])), None)
    if rec["status"] == "done" or not prev or prev.get("status") != "done" or _without_seeds(
            (prev_row or {}).get("command", "")) != _without_seeds(row.command):
        return rec
    got = carry(prev, previous or {}, root, row_inputs(plan, row, root))
    if isinstance(got, str):
        return {**rec, "detail": f"{rec['detail']}; a recorded result was not carried: {got}"}
    got.setdefault("machine", str((previous or {}).get("machine") or "unknown"))  # older JSON: one machine for all
    return got


def collect(plan: Plan, root: Path, command: str = "", previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mechanisms results JSON (format: ckd.mechanisms_report) from the plan's run directories,
    with the finished entries of ``previous`` (the JSON it replaces) whose run directories are not here."""
    from research.carry import carry
    from ckd.run_dir import git_sha
    from research.anytime import compare as anytime_compare
    from research.union import machine_for

    pools = {p: {**v, "teachers": _pool_teachers(v["spec"], root)} for p, v in plan.pools.items()}
    teachers = {}
    for t in plan.teachers:
        got = read_teacher(t, plan, root)
        prev = ((previous or {}).get("teachers") or {}).get(t["name"])
        if got["status"] == "pending" and prev and prev.get("status") == "done" and (
                prev.get("metrics"), prev.get("build")) == (t["metrics"], t["build"]):
            kept = carry(prev, previous or {}, root, re.findall(r"--config (\S+)", t.get("build") or ""))
            # the plan's label and corrupted flag are today's
            got = got if isinstance(kept, str) else {**{k: v for k, v in kept.items() if k != "pools"},
                                                      **{k: t[k] for k in ("label", "corrupted")}}
        teachers[t["name"]] = {**got, "pools": [p for p, v in pools.items() if t["name"] in v["teachers"]]}
    clean = {n: t for n, t in teachers.items() if t["status"] == "done" and not t["corrupted"]}
    best_teacher = max(clean, key=lambda n: clean[n]["test"][SELECT]) if clean else None

    rows: dict[str, Any] = {}
    pending: list[str] = []
    for row in plan.rows:
        prev_row = ((previous or {}).get("rows") or {}).get(row.name)
        seeds = [_carry_seed(read_seed(plan, row, s, root), plan, row, prev_row, previous, root) for s in plan.seeds]
        for rec in seeds:  # the seeds trained here: the machine collect runs on (research.seeds records none)
            if rec["status"] == "done" and not rec.get("carried"):
                rec["machine"] = machine_for(rec.get("device") or "cpu")
        done = [s for s in seeds if s["status"] == "done"]
        rows[row.name] = {
            "label": row.label, "group": row.group, "pool": row.pool, "mode": row.mode, "command": row.command,
            "config": row.config, "runs_root": row.runs_root, **({"note": row.note} if row.note else {}),
            "seeds": seeds, "pending_seeds": [s["seed"] for s in seeds if s["status"] != "done"],
            "stats": {k: mean_interval([s["test"][k] for s in done], LEVEL) for k in METRICS}}
        pending += [f"row {row.name} seed {s['seed']} ({s['run_dir']}): {s['detail']}" for s in seeds
                    if s["status"] != "done"]
    for n, t in teachers.items():
        if t["status"] == "pending":
            pending.append(f"teacher {n}: {t['metrics']} not found"
                           + (f" (built by `{t['build']}`)" if t["build"] else ""))

    # Integration: rows = modes, columns = pools; the change from the clean to the corrupted pool.
    modes = [m for m in MODES if any(r.mode == m for r in plan.rows)]
    pool_names = list(plan.pools)
    cells = {m: {r.pool: r.name for r in plan.rows if r.mode == m} for m in modes}
    change = {}
    if {"clean", "corrupted"} <= set(pool_names):
        change = {m: _compare(rows, c["corrupted"], c["clean"]) for m, c in cells.items()
                  if "clean" in c and "corrupted" in c}
    change_pct = {m: c["rel_pct"] if min(c["n"]) >= 2 else None for m, c in change.items()}
    within = {m: (None if v is None else v >= KEEP_WITHIN_PCT) for m, v in change_pct.items()}
    mean_loses = None if change_pct.get("mean") is None else change_pct["mean"] <= MEAN_LOSES_PCT
    both_ok = within.get("both")
    integ_target = {"rule": f"'both' corrupted vs clean >= {KEEP_WITHIN_PCT}% and 'mean' <= {MEAN_LOSES_PCT}% "
                            "(point estimates of the relative change; each row at least two seeds)",
                    "change_pct": change_pct, "within_1pct": within, "mean_loses_5pct": mean_loses,
                    "met": None if both_ok is None or mean_loses is None else bool(both_ok and mean_loses),
                    "modes_meeting": [m for m, ok in within.items() if ok and m != "mean" and mean_loses]}

    # Curriculum: comparisons of the finals, and the anytime curves (mean over seeds).
    ref = plan.curriculum["reference"]  # None: the plan has no curriculum rows
    cur_comps = {c["row"]: _compare(rows, c["row"], ref) for c in plan.curriculum["rows"] if c["row"] != ref}
    curves = {}
    for c in plan.curriculum["rows"]:
        got = [(s["seed"], s["curve"]) for s in rows[c["row"]]["seeds"] if s.get("curve")]
        if got:
            curves[c["row"]] = mean_curve([cv for _, cv in got], [sd for sd, _ in got])
    steps = anytime_compare({ref: curves[ref], **{k: v for k, v in curves.items() if k != ref}},
                            ANYTIME_FRACTION) if ref in curves else None
    cur_rows = {}
    for name in cur_comps:
        s = ((steps or {}).get("runs") or {}).get(name) or {}
        fewer = s.get("fewer_steps_than_reference_pct")
        spread = higher_by_spread_of(rows[name]["stats"][SELECT], rows[ref]["stats"][SELECT])
        two = (name in curves and ref in curves and len(curves[name]["seeds"]) >= 2
               and len(curves[ref]["seeds"]) >= 2)
        by_steps = steps_verdict(steps, name, two)
        ok = True if (by_steps or spread) else (None if by_steps is None or spread is None else False)
        cur_rows[name] = {"fewer_steps_pct": fewer, "by_steps": by_steps, "higher_by_spread": spread, "ok": ok}
    oks = [r["ok"] for r in cur_rows.values()]
    met = True if any(oks) else (None if not oks or any(o is None for o in oks) else False)
    cur_target = {"rule": f">= {FEWER_STEPS_PCT}% fewer steps of the mean curve to the no-curriculum row's final "
                          "(curves of at least two seeds each), or final mean higher by more than the larger sd of "
                          "the two rows", "rows": cur_rows, "met": met}

    # Each student row against the best clean teacher.
    vs_teacher = {}
    ref_t = teachers[best_teacher]["test"] if best_teacher else {}
    for row in plan.rows:
        vs_teacher[row.name] = {k: against_value(_values(rows, row.name, k), ref_t.get(k), LEVEL)
                                for k in (SELECT, "recall@10")}
    # What gets closest: among the rows with at least two seeds (the others are open).
    finished = {n: rows[n]["stats"][SELECT]["mean"] for n in rows
                if rows[n]["stats"][SELECT] and rows[n]["stats"][SELECT]["n"] >= 2}
    closest = max(finished, key=finished.get) if finished and best_teacher else None
    rel = vs_teacher[closest][SELECT]["rel_pct"] if closest else None
    judged = [v[SELECT]["rel_pct"] for v in vs_teacher.values()
              if v[SELECT]["n"] >= 2 and v[SELECT]["rel_pct"] is not None]
    teacher_target = {"rule": f"some row's mean NDCG@10 >= best clean teacher + {BEAT_TEACHER_PCT}% "
                              "(at least two seeds)",
                      "best_teacher": best_teacher, "closest": closest, "closest_rel_pct": rel,
                      "met": (max(judged) >= BEAT_TEACHER_PCT) if judged else None}

    params = [collect_sweep(sw, root, previous) for sw in plan.params]
    listed = set()  # the default run is every parameter's point: listed once
    for p in params:
        for name, r in p["params"].items():
            for q in r["points"]:
                if q[f"test_{SELECT}"] is None and q["run_dir"] not in listed:
                    listed.add(q["run_dir"])
                    pending.append(f"parameter point {p['label']} {name}={q['value']} ({q['run_dir']}): not finished")
    mechanisms = [{"name": m["name"], "label": m["label"],
                   "comparisons": [{"where": c["where"], **_compare(rows, c["row"], c["against"])}
                                   for c in m["comparisons"]]} for m in plan.mechanisms]
    modality = None
    if plan.modality:
        from research import modality as mod

        modality = mod.collect(mod.load_plan(root / plan.modality, plan.modality), root,
                               (previous or {}).get("modality"), previous)
        pending += modality["pending"]
    return {"kind": FORMAT, "schema": SCHEMA, "plan": plan.source, "title": plan.title,
            "description": plan.description, "scale": plan.scale, "domain": plan.domain,
            "domains": list(plan.domains), "seeds": list(plan.seeds), "confidence": LEVEL,
            "commit": git_sha(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": _machine(rows, machine_for),
            "command": command, "configs": list(dict.fromkeys(r.config for r in plan.rows)),
            "epochs": sorted({s["epochs"] for r in rows.values() for s in r["seeds"] if s.get("epochs") is not None}),
            "pools": pools, "teachers": teachers, "best_teacher": best_teacher, "rows": rows,
            "integration": {"modes": modes, "pools": pool_names, "cells": cells, "change": change},
            "curriculum": {"reference": ref, "rows": plan.curriculum["rows"], "comparisons": cur_comps,
                           "anytime": {"curves": curves, "compare": steps}},
            "student_vs_teacher": vs_teacher, "mechanisms": mechanisms, "params": params, "modality": modality,
            "targets": {"integration": integ_target, "curriculum": cur_target if plan.curriculum["rows"] else {},
                        "best_teacher": teacher_target},
            "pending": pending}


def _machine(rows: dict[str, Any], machine_for: Any) -> str:
    """The machine(s) the runs trained on: research.seeds records none, so each seed carries the box
    its collect ran on (said so), with the devices the runs' run.json name."""
    seeds = [s for r in rows.values() for s in r["seeds"] if s["status"] == "done"]
    machines = list(dict.fromkeys(str(s["machine"]) for s in seeds if s.get("machine")))
    if len(machines) > 1:
        return "; ".join(machines)
    if machines and any(s.get("carried") for s in seeds):
        return machines[0]
    devices = sorted({str(s.get("device")) for s in seeds if s.get("device")})
    if any(d.startswith("cuda") for d in devices):
        return f"GPU box (devices {', '.join(devices)}; machine not recorded by the runs)"
    return machine_for("cpu") + " (not recorded by the runs: the machine collect ran on" + (
        f"; run devices: {', '.join(devices)})" if devices else ")")


def cmd_collect(args: argparse.Namespace, root: Path) -> int:
    from ckd.reporting import carried_entries, results_out_path, write_results_json
    from research.carry import load_previous

    out = results_out_path(args.out, root, args.overwrite)
    if out is None:
        return 2
    plan = load_plan(root / args.plan, args.plan)
    data = collect(plan, root, f"python -m research.mechanisms collect --plan {args.plan} --out {args.out}",
                   load_previous(out))
    write_results_json(out, data)
    n = sum(len(r["seeds"]) for r in data["rows"].values())
    done = sum(s["status"] == "done" for r in data["rows"].values() for s in r["seeds"])
    print(f"written {args.out}: {done}/{n} seeds of {len(data['rows'])} rows finished; {len(data['pending'])} pending; "
          f"{len(carried_entries(data))} result(s) carried from the previous {args.out} (run directories not on "
          "this machine)")
    for mech in data["mechanisms"]:
        print(f"  {mech['label']}: " + "; ".join(f"{c['where']} {c['verdict']}" for c in mech["comparisons"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.mechanisms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO), help="repository root the plan's paths are relative to")
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("collect", help="write the results JSON from the finished run directories")
    c.add_argument("--plan", default=PLAN, help=f"the plan, relative to --root (default {PLAN})")
    c.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        return cmd_collect(args, root)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
