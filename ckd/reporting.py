"""Results report: load result JSON, build the tables, render a results page, draw Figure 1.

Pure functions (no torch, no training, no git) over three inputs:

- experiment results, e.g. ``results/experiments_full.json`` (written by research/experiments.py):
  ``{"machine", "commit", "created", "runs": {name: {"group", "model", "variant", "command",
  "run_dir", "metrics": <metrics.json>}}}``;
- the inference benchmark ``results/efficiency.json`` (written by benchmarks/inference.py):
  ``{"machine", "commit", "created", "device", "models": {name: {"kind", "params",
  "peak_memory_mb", "infer_ms_per_1000_users", "score_ms_per_1000_pairs"?, "checkpoint"}}}``;
- the results manifest ``results/MANIFEST.yaml``: which JSON files make which page, with the
  page's figure and domain (see ``load_results_manifest``), so that ``ckd-report`` alone rebuilds
  every committed page.

Every number in the page and in the figure comes from these files, through the same formatting
functions, so the figure's sidecar JSON can be checked cell by cell against the tables.
"""
from __future__ import annotations

import json
import os
import posixpath
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
METRIC_LABELS = {"recall@10": "Recall@10", "ndcg@10": "NDCG@10", "recall@50": "Recall@50", "ndcg@50": "NDCG@50"}
GROUPS = ("teacher", "baseline", "distilled", "ablation", "universality")
MEAN = "mean"
DASH = "—"


class ReportError(ValueError):
    """A results file is missing, malformed, or does not identify the runs a table needs."""


# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Run:
    """One run of the experiment manifest."""

    name: str
    group: str
    model: str
    variant: str
    command: str
    run_dir: str
    metrics: dict[str, Any]

    def test(self, domain: str, metric: str) -> float | None:
        """Test-split metric of one domain ('mean' for the mean), or None if not evaluated."""
        value = self.metrics.get("test", {}).get(domain, {}).get(metric)
        return None if value is None else float(value)

    @property
    def steps_per_s(self) -> float | None:
        value = (self.metrics.get("timing") or {}).get("steps_per_s")
        return None if value is None else float(value)

    @property
    def world_size(self) -> int | None:
        value = self.metrics.get("world_size")
        return None if value is None else int(value)


@dataclass(frozen=True)
class Experiments:
    machine: str
    commit: str
    created: str
    runs: list[Run]
    source: str = ""

    def by_name(self, name: str) -> Run | None:
        return next((r for r in self.runs if r.name == name), None)


@dataclass(frozen=True)
class ModelEfficiency:
    """One model's inference measurement."""

    name: str
    kind: str  # "teacher" | "student"
    params: int
    peak_memory_mb: float
    infer_ms_per_1000_users: float
    checkpoint: str
    score_ms_per_1000_pairs: float | None = None


@dataclass(frozen=True)
class Efficiency:
    machine: str
    commit: str
    created: str
    device: str
    models: list[ModelEfficiency]
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ReportError(f"{where}: missing key {key!r}")
    return obj[key]


def _read_file(path: str | os.PathLike[str], what: str, fmt: str = "json", label: str | None = None) -> Any:
    """Parsed content of a results file; a missing or unparsable file is a ReportError naming it
    (``what``: how the error calls the file; ``fmt``: json or yaml, the latter read with safe_load)."""
    p = Path(path)
    if not p.is_file():
        raise ReportError(f"{what} not found: {p}")
    text = p.read_text()
    if fmt == "yaml":
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ReportError(f"{label or p}: not valid YAML ({exc})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(f"{label or p}: not valid JSON ({exc})") from exc


def load_experiments(path: str | os.PathLike[str], label: str | None = None) -> Experiments:
    """Read and validate an experiment results file (``label``: the name the page shows for it,
    default the path). A run without inline metrics falls back to ``<run_dir>/metrics.json``; a
    run with neither is an error (a table would silently lose it)."""
    p = Path(path)
    raw = _read_file(p, "experiment manifest")
    runs_raw = _require(raw, "runs", str(p))
    if not isinstance(runs_raw, dict):
        raise ReportError(f"{p}: 'runs' must be an object of run name -> run")
    runs: list[Run] = []
    for name, r in runs_raw.items():
        where = f"{p}: run {name!r}"
        group = _require(r, "group", where)
        if group not in GROUPS:
            raise ReportError(f"{where}: group {group!r} is not one of {GROUPS}")
        metrics = r.get("metrics")
        if not metrics:
            mpath = Path(r.get("run_dir", "")) / "metrics.json"
            if not mpath.is_file():
                raise ReportError(f"{where}: no inline metrics and no {mpath}")
            metrics = json.loads(mpath.read_text())
        if "test" not in metrics:
            raise ReportError(f"{where}: metrics have no 'test' split")
        runs.append(Run(name=name, group=group, model=str(_require(r, "model", where)),
                        variant=str(_require(r, "variant", where)), command=str(r.get("command", "")),
                        run_dir=str(r.get("run_dir", "")), metrics=metrics))
    return Experiments(machine=str(raw.get("machine", "unknown")), commit=str(raw.get("commit", "unknown")),
                       created=str(raw.get("created", "")), runs=runs, source=label or str(p))


def merge_experiments(parts: Sequence[Experiments]) -> Experiments:
    """One manifest from several (e.g. one per domain or per suite). Run names must be unique,
    except teacher rows for the same run directory, which every suite that served that teacher
    repeats and which are kept once. Commits, machines and sources are listed in order."""
    if not parts:
        raise ReportError("no experiment manifest given")
    runs: list[Run] = []
    seen: dict[str, tuple[Run, str]] = {}
    for part in parts:
        for r in part.runs:
            if r.name in seen:
                first, where = seen[r.name]
                if r.group == first.group == "teacher" and r.run_dir == first.run_dir:
                    continue
                raise ReportError(f"run {r.name!r} is in both {where} and {part.source}; "
                                  "give one of them another name (launch/experiments.py --name-suffix)")
            seen[r.name] = (r, part.source)
            runs.append(r)

    def listed(values: Iterable[str]) -> str:
        return ", ".join(dict.fromkeys(v for v in values if v))

    return Experiments(machine=listed(p.machine for p in parts), commit=listed(p.commit for p in parts),
                       created=max(p.created for p in parts), runs=runs,
                       source=" + ".join(p.source for p in parts))


def load_efficiency(path: str | os.PathLike[str], label: str | None = None) -> Efficiency:
    """Read and validate results/efficiency.json (``label`` as for ``load_experiments``)."""
    p = Path(path)
    raw = _read_file(p, "efficiency results")
    models_raw = _require(raw, "models", str(p))
    models = []
    for name, m in models_raw.items():
        where = f"{p}: model {name!r}"
        kind = _require(m, "kind", where)
        if kind not in ("teacher", "student"):
            raise ReportError(f"{where}: kind {kind!r} is not 'teacher' or 'student'")
        score = m.get("score_ms_per_1000_pairs")
        models.append(ModelEfficiency(
            name=name, kind=kind, params=int(_require(m, "params", where)),
            peak_memory_mb=float(_require(m, "peak_memory_mb", where)),
            infer_ms_per_1000_users=float(_require(m, "infer_ms_per_1000_users", where)),
            checkpoint=str(m.get("checkpoint", "")), score_ms_per_1000_pairs=None if score is None else float(score)))
    known = {"machine", "commit", "created", "device", "models", "command"}
    return Efficiency(machine=str(raw.get("machine", "unknown")), commit=str(raw.get("commit", "unknown")),
                      created=str(raw.get("created", "")), device=str(raw.get("device", "")), models=models,
                      command=str(raw.get("command", "")),
                      extra={k: v for k, v in raw.items() if k not in known}, source=label or str(p))


# ----------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None) -> str:
    """42 s, 12.3 min, 3 h 05 min (``—`` when unknown)."""
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    h, m = divmod(int(round(seconds / 60)), 60)
    return f"{h} h {m:02d} min"


def fmt_metric(x: float | None) -> str:
    """Accuracy metrics: 4 decimals."""
    return DASH if x is None else f"{x:.4f}"


def fmt_delta(x: float | None) -> str:
    """Signed 4-decimal difference."""
    return DASH if x is None else f"{x:+.4f}"


def fmt_pct(x: float | None) -> str:
    return DASH if x is None else f"{x:+.1f}%"


def fmt_ms(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"


def fmt_sig(x: float | None) -> str:
    """Small timings (per-pair scoring): 3 significant digits."""
    return DASH if x is None else f"{x:.3g}"


def fmt_mb(x: float | None) -> str:
    return DASH if x is None else f"{x:.1f}"


def fmt_rate(x: float | None) -> str:
    return DASH if x is None else f"{x:.2f}"


def fmt_ratio(x: float | None) -> str:
    return DASH if x is None else f"{x:.3f}"


def fmt_int(x: int | None) -> str:
    return DASH if x is None else f"{x:,}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; ``align`` per column is 'l' or 'r' (default: first column left)."""
    headers = list(headers)
    align = list(align) if align else ["l"] + ["r"] * (len(headers) - 1)
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise ReportError(f"table row has {len(row)} cells for {len(headers)} columns: {row}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines)


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every pipe table in ``text`` as a list of {header: cell} rows (for checks and tests)."""
    tables: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0

    def cells(line: str) -> list[str]:
        parts, buf, esc = [], "", False
        for ch in line.strip()[1:-1]:
            if esc:
                buf += ch
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == "|":
                parts.append(buf.strip())
                buf = ""
            else:
                buf += ch
        parts.append(buf.strip())
        return parts

    while i < len(lines) - 1:
        if lines[i].startswith("|") and lines[i + 1].startswith("|") and set(lines[i + 1]) <= set("|:- "):
            headers = cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(headers, cells(lines[i]))))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


# ----------------------------------------------------------------------------- selection helpers


def domains_of(exp: Experiments) -> list[str]:
    """Domains with test results, in order of first appearance (the 'mean' entry excluded)."""
    seen: list[str] = []
    for r in exp.runs:
        for d in r.metrics.get("test", {}):
            if d != MEAN and d not in seen:
                seen.append(d)
    return seen


def ordered_runs(exp: Experiments, groups: Sequence[str] = GROUPS) -> list[Run]:
    """Runs grouped in ``groups`` order, manifest order inside a group."""
    return [r for g in groups for r in exp.runs if r.group == g]


def _unique(runs: list[Run], what: str) -> Run | None:
    if len(runs) > 1:
        raise ReportError(f"{what}: several runs match ({', '.join(r.name for r in runs)}); "
                          f"give them distinct variants in the manifest")
    return runs[0] if runs else None


def run_domains(run: Run) -> frozenset[str]:
    """The domains ``run`` has test results for ('mean' excluded)."""
    return frozenset(d for d in run.metrics.get("test", {}) if d != MEAN)


def _on(run: Run, domain: str | None, like: Run | None) -> bool:
    """Whether ``run`` has results on ``domain`` and covers the same domains as ``like`` (each
    check skipped when None): a manifest may hold one run per domain of the same student."""
    return ((domain is None or domain in run_domains(run))
            and (like is None or run_domains(run) == run_domains(like)))


def _covers(run: Run, domains: Iterable[str] | None) -> bool:
    return domains is None or set(domains) <= run_domains(run)


def alone_run(exp: Experiments, model: str, domain: str | None = None, like: Run | None = None,
              covering: Iterable[str] | None = None) -> Run | None:
    """The student ``model`` trained without teachers (on ``domain`` / on ``like``'s domains / on
    at least the ``covering`` domains)."""
    return _unique([r for r in exp.runs if r.model == model and r.variant == "alone"
                    and r.group in ("baseline", "universality") and _on(r, domain, like)
                    and _covers(r, covering)], f"{model} alone")


def distilled_run(exp: Experiments, model: str, domain: str | None = None,
                  covering: Iterable[str] | None = None) -> Run | None:
    """The student ``model`` trained with the full method (on ``domain`` / on at least the
    ``covering`` domains)."""
    return _unique([r for r in exp.runs if r.model == model and r.variant == "distilled"
                    and r.group in ("distilled", "universality") and _on(r, domain, None)
                    and _covers(r, covering)], f"{model} distilled")


def student_families(exp: Experiments) -> list[str]:
    """Student models that have an 'alone' run, in manifest order (SASRec first when present)."""
    models: list[str] = []
    for r in exp.runs:
        if r.variant == "alone" and r.group in ("baseline", "universality") and r.model not in models:
            models.append(r.model)
    return sorted(models, key=lambda m: (m != "sasrec",))  # stable: keeps manifest order otherwise


def match_run(exp: Experiments, entry: ModelEfficiency) -> Run | None:
    """The run an efficiency entry measured: same name, else the run whose directory holds the
    checkpoint (``<run_dir>`` or ``<run_dir>/<sub>``)."""
    run = exp.by_name(entry.name)
    if run is not None:
        return run
    if not entry.checkpoint:
        return None
    ckpt = os.path.normpath(entry.checkpoint)
    for r in exp.runs:
        if r.run_dir and os.path.normpath(r.run_dir) in (ckpt, os.path.dirname(ckpt)):
            return r
    return None


def throughput_ratio(exp: Experiments, run: Run) -> float | None:
    """steps/s of ``run`` over steps/s of the same student trained without teachers (same world
    size), or None. The reference is the run's no-teacher twin (an ablation whose variant starts
    with "no teachers": same batch size and settings, so a step is the same work) when the
    manifest has one, else the student alone (whose batch size may differ)."""
    if run.group == "teacher" or run.variant == "alone" or run.variant.startswith("no teachers"):
        return None
    twin = _unique([r for r in exp.runs if r.model == run.model and r.variant.startswith("no teachers")
                    and _on(r, None, run)], f"{run.model} without teachers")
    base = twin or alone_run(exp, run.model, like=run)
    if base is None or base.steps_per_s is None or run.steps_per_s is None or base.steps_per_s <= 0:
        return None
    if base.world_size is not None and run.world_size is not None and base.world_size != run.world_size:
        return None
    return run.steps_per_s / base.steps_per_s


# ----------------------------------------------------------------------------- tables


def full_table(exp: Experiments, domain: str) -> str:
    """One row per run (grouped): test Recall/NDCG@10/50 on ``domain`` (or 'mean')."""
    headers = ["Group", "Run", "Model", "Variant"] + [METRIC_LABELS[m] for m in METRICS]
    domains = domains_of(exp)
    rows = []
    for r in ordered_runs(exp):
        # A run's own "mean" averages only its domains: beside runs over more domains it is not
        # the same quantity, so it is left blank rather than compared.
        partial = domain == MEAN and not set(domains) <= run_domains(r)
        rows.append([r.group, r.name, r.model, r.variant]
                    + [fmt_metric(None if partial else r.test(domain, m)) for m in METRICS])
    return markdown_table(headers, rows, align=["l"] * 4 + ["r"] * len(METRICS))


def ablation_sets(exp: Experiments) -> list[tuple[Run, list[Run]]]:
    """Each distilled SASRec with the ablations run on its domains (a manifest may hold a suite per
    domain), in manifest order; sets without ablations are left out. An ablation with no distilled
    SASRec on its domains is an error (its deltas would have nothing to be measured against).
    Without any ablation run, a single distilled SASRec makes a set of its own, so the page still
    shows its difference to SASRec alone (as the seed-7 and two-domain pages were written)."""
    ablations = [r for r in exp.runs if r.group == "ablation"]
    fulls = [r for r in exp.runs if r.group == "distilled" and r.model == "sasrec" and r.variant == "distilled"]
    if not ablations:
        return [(fulls[0], [])] if len(fulls) == 1 else []
    sets = []
    for full in fulls:
        mine = [a for a in ablations if _on(a, None, full)]
        if mine:
            sets.append((full, mine))
    for a in ablations:
        matches = [f.name for f, mine in sets if a in mine]
        if len(matches) != 1:
            raise ReportError(f"ablation {a.name!r}: {len(matches)} distilled SASRec runs on its domains "
                              f"{sorted(run_domains(a))} ({', '.join(matches) or 'none'}); need exactly one")
    return sets


def ablation_table(exp: Experiments, full: Run, ablations: list[Run]) -> str:
    """The full method vs each ablation (and SASRec alone for reference): test NDCG@10 per domain
    and mean, with the difference to the full method."""
    doms = [d for d in domains_of(exp) if d in run_domains(full)]
    cols = doms + ([MEAN] if len(doms) > 1 else [])
    headers = ["Run", "Variant"]
    for d in cols:
        headers += [f"NDCG@10 {d}", f"Δ {d}"]
    rows = []
    reference = alone_run(exp, "sasrec", like=full)
    for r in [full, *ablations] + ([reference] if reference else []):
        row = [r.name, r.variant + (" (reference)" if r is reference else "")]
        for d in cols:
            v, f = r.test(d, "ndcg@10"), full.test(d, "ndcg@10")
            row += [fmt_metric(v), DASH if r is full else fmt_delta(None if v is None or f is None else v - f)]
        rows.append(row)
    return markdown_table(headers, rows, align=["l", "l"] + ["r"] * (len(headers) - 2))


def relative_gain(alone: float | None, distilled: float | None) -> float | None:
    """(distilled - alone) / alone in percent; None when undefined."""
    if alone is None or distilled is None or alone == 0:
        return None
    return 100.0 * (distilled - alone) / alone


def universality_table(exp: Experiments) -> str:
    """Each student family alone vs distilled: test Recall@10 and NDCG@10 per domain, relative gain."""
    domains = domains_of(exp)
    cols = domains + ([MEAN] if len(domains) > 1 else [])
    headers = ["Student", "Domain", "Recall@10 alone", "Recall@10 distilled", "NDCG@10 alone",
               "NDCG@10 distilled", "NDCG@10 gain"]
    rows = []
    for model in student_families(exp):
        for dom in cols:
            # The mean row compares runs over every domain of the page (a run's own 'mean' over
            # fewer domains is another quantity); per-domain runs have no mean row.
            if dom == MEAN:
                a, d = alone_run(exp, model, covering=domains), distilled_run(exp, model, covering=domains)
            else:
                a, d = alone_run(exp, model, dom), distilled_run(exp, model, dom)
            if a is None and d is None:
                continue
            na = a.test(dom, "ndcg@10") if a else None
            nd = d.test(dom, "ndcg@10") if d else None
            rows.append([model, dom, fmt_metric(a.test(dom, "recall@10") if a else None),
                         fmt_metric(d.test(dom, "recall@10") if d else None), fmt_metric(na), fmt_metric(nd),
                         fmt_pct(relative_gain(na, nd))])
    return markdown_table(headers, rows, align=["l", "l"] + ["r"] * 5)


def efficiency_table(exp: Experiments, eff: Efficiency, domain: str) -> str:
    """Per measured model: parameters, peak inference memory, inference and scoring time, test
    NDCG@10 on ``domain``, training steps/s and the distilled-to-alone throughput ratio."""
    headers = ["Model", "Kind", "Run", "Params", "Peak memory (MB)", "Inference ms / 1,000 users",
               "Scoring ms / 1,000 pairs", f"Test NDCG@10 {domain}", "Train steps/s", "Steps/s vs alone"]
    rows = []
    for m in eff.models:
        run = match_run(exp, m)
        rows.append([m.name, m.kind, run.name if run else DASH, fmt_int(m.params), fmt_mb(m.peak_memory_mb),
                     fmt_ms(m.infer_ms_per_1000_users), fmt_sig(m.score_ms_per_1000_pairs),
                     fmt_metric(run.test(domain, "ndcg@10") if run else None),
                     fmt_rate(run.steps_per_s if run else None),
                     fmt_ratio(throughput_ratio(exp, run) if run else None)])
    return markdown_table(headers, rows, align=["l", "l", "l"] + ["r"] * 7)


def throughput_table(exp: Experiments) -> str:
    """Training throughput of every run that recorded timing, and its ratio to the same student
    trained alone (only between runs of equal world size)."""
    headers = ["Run", "Model", "Variant", "World size", "Step ms", "Wait ms", "Steps/s", "Steps/s vs alone"]
    rows = []
    for r in ordered_runs(exp):
        t = r.metrics.get("timing")
        if not t:
            continue
        rows.append([r.name, r.model, r.variant, fmt_int(r.world_size), fmt_ms(t.get("step_ms")),
                     fmt_ms(t.get("wait_ms")), fmt_rate(r.steps_per_s), fmt_ratio(throughput_ratio(exp, r))])
    return markdown_table(headers, rows, align=["l", "l", "l"] + ["r"] * 5)


# ----------------------------------------------------------------------------- figure


def figure_points(exp: Experiments, eff: Efficiency, domain: str) -> dict[str, Any]:
    """What Figure 1 plots: each teacher, SASRec alone and each distilled student that has both an
    inference measurement and a test NDCG@10 on ``domain``. Returns the sidecar dict."""
    points, skipped = [], []
    for m in eff.models:
        run = match_run(exp, m)
        if run is None:
            skipped.append({"model": m.name, "why": "no matching run in the manifest"})
            continue
        if m.kind == "teacher" or run.group == "teacher":
            role = "teacher"
        elif run.variant == "distilled":
            role = "distilled"
        elif run.variant == "alone" and run.model == "sasrec":
            role = "alone"
        else:
            continue  # other students (ablations, non-SASRec alone) are in the tables, not the figure
        y = run.test(domain, "ndcg@10")
        if y is None or not m.infer_ms_per_1000_users > 0:
            skipped.append({"model": m.name, "why": f"no test NDCG@10 on {domain} or no inference time"})
            continue
        points.append({"label": m.name, "role": role, "run": run.name, "model": run.model,
                       "infer_ms_per_1000_users": m.infer_ms_per_1000_users, "ndcg@10": y,
                       "peak_memory_mb": m.peak_memory_mb, "params": m.params})
    return {"domain": domain, "metric": "test ndcg@10", "x": "infer_ms_per_1000_users (log scale)",
            "area": "peak_memory_mb", "experiments_commit": exp.commit, "efficiency_commit": eff.commit,
            "machine": eff.machine, "device": eff.device, "points": points, "skipped": skipped}


ROLE_STYLE = {"teacher": ("tab:red", "Teacher"), "alone": ("tab:gray", "SASRec alone"),
              "distilled": ("tab:blue", "Distilled student")}
FIGURE_SIZE_IN = (8.0, 5.5)
FIGURE_DPI = 150
MAX_AREA_PT2 = 2500.0


def draw_figure(sidecar: dict[str, Any], path: str | os.PathLike[str]) -> list[tuple[float, ...]]:
    """Draw the Figure-1-style bubble chart from ``figure_points``' dict: x = inference ms per 1,000
    users (log), y = test NDCG@10, circle area proportional to peak memory. Returns the label boxes
    (pixels, ``pts`` order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sidecar["points"]
    if not pts:
        raise ReportError(f"figure: nothing to plot ({sidecar.get('skipped')})")
    fig, ax = plt.subplots(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    leg = plot_panel(ax, pts, sidecar["domain"], MAX_AREA_PT2 / (max(p["peak_memory_mb"] for p in pts) or 1.0))
    foot = f"device: {sidecar.get('device', '')}  ·  machine: {sidecar.get('machine', '')}"
    fig.text(0.01, 0.01, foot[:140], fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    boxes = place_labels(fig, ax, pts, avoid=[leg])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, metadata={"Software": None})
    plt.close(fig)
    return boxes


def draw_curves(curves: dict[str, dict[str, Any]], xlabel: str, ylabel: str,
                path: str | os.PathLike[str]) -> None:
    """One line per legend label (``steps``, ``values``; ``sd`` optional, shaded ± 1 sd where any is
    non-zero), written as a PNG: the anytime curves of research/anytime.py and the mechanisms page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=150)
    for label, c in curves.items():
        (line,) = ax.plot(c["steps"], c["values"], marker="o", ms=3, label=label)
        sd = c.get("sd") or []
        if any(sd):
            ax.fill_between(c["steps"], [v - d for v, d in zip(c["values"], sd)],
                            [v + d for v, d in zip(c["values"], sd)], color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_panel(ax: Any, pts: list[dict[str, Any]], domain: str, scale: float) -> Any:
    """One Figure 1 panel on ``ax`` (labels are placed later, after the layout): the points by role,
    circle area = peak memory x ``scale`` (points^2 per MB, so a shared scale keeps panels
    comparable), log x axis. Returns the legend."""
    for role, (color, label) in ROLE_STYLE.items():
        sel = [p for p in pts if p["role"] == role]
        if not sel:
            continue
        xs = [p["infer_ms_per_1000_users"] for p in sel]
        ys = [p["ndcg@10"] for p in sel]
        ax.scatter(xs, ys, s=[max(p["peak_memory_mb"], 0.0) * scale for p in sel], color=color, alpha=0.35,
                   edgecolors=color, linewidths=1.5, label=label, zorder=2)
        # A centre mark keeps tiny-memory models visible whatever the area ratio.
        ax.scatter(xs, ys, s=12, color=color, marker="o", zorder=3)
    ax.set_xscale("log")
    xs = [p["infer_ms_per_1000_users"] for p in pts]
    ys = [p["ndcg@10"] for p in pts]
    ax.set_xlim(min(xs) / 2.5, max(xs) * 4.0)  # room for labels right of the largest circle
    span = (max(ys) - min(ys)) or max(max(ys), 1e-3) * 0.2
    ax.set_ylim(min(ys) - 0.35 * span, max(ys) + 0.35 * span)
    ax.set_xlabel("Inference time, ms per 1,000 users (full ranking, log scale)")
    ax.set_ylabel(f"Test NDCG@10 on {domain}")
    ax.set_title(f"Accuracy vs inference cost ({domain}); circle area = peak memory", fontsize=10)
    ax.grid(True, which="both", alpha=0.3, zorder=0)
    leg = ax.legend(loc="lower right", fontsize=8, markerscale=1.0, scatterpoints=1)
    for handle in leg.legend_handles:  # legend markers at a fixed size, not the first circle's
        handle.set_sizes([60])
    return leg


# Label offsets (points) tried in order: right-above first, as before, then the other corners and
# further out, so close points (SASRec, DeepFM and the UniSRec teachers) get readable labels.
LABEL_OFFSETS = [(8, 6), (8, -26), (-8, 6), (-8, -26), (8, 22), (8, -42), (-8, 22), (-8, -42),
                 (8, 38), (8, -58), (-8, 38), (-8, -58)]


def point_caption(p: dict[str, Any]) -> str:
    """A Figure 1 point's caption: its label, then test NDCG@10 and peak memory."""
    return f"{p['label']}\n{fmt_metric(p['ndcg@10'])} · {fmt_mb(p['peak_memory_mb'])} MB"


def place_labels(fig: Any, ax: Any, pts: list[dict[str, Any]], avoid: Sequence[Any] = (),
                 texts: Sequence[str] | None = None, offsets: Sequence[tuple[int, int]] = LABEL_OFFSETS,
                 leader_from: int | None = None) -> list[tuple[float, ...]]:
    """Annotate each point with ``texts[i]`` (default its ``point_caption``) at the first of
    ``offsets`` whose text box stays inside the axes and overlaps neither an earlier label nor an
    ``avoid`` artist (the legend); the first offset when none fits. Offsets from index
    ``leader_from`` on draw a leader line to the point. Returns the label boxes in pixels,
    (x0, y0, x1, y1), in ``pts`` order."""
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [a.get_window_extent(renderer) for a in avoid]
    texts = [point_caption(p) for p in pts] if texts is None else list(texts)
    leader_from = len(offsets) if leader_from is None else leader_from

    def annotate(i: int, k: int) -> Any:
        p, (dx, dy) = pts[i], offsets[k]
        return ax.annotate(texts[i], (p["infer_ms_per_1000_users"], p["ndcg@10"]), xytext=(dx, dy),
                           textcoords="offset points", fontsize=8, zorder=4,
                           ha="left" if dx >= 0 else "right", va="bottom",
                           arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"} if k >= leader_from else None)

    boxes = []
    # Highest-scoring points first: they are the ones a reader looks for.
    for i in sorted(range(len(pts)), key=lambda i: -pts[i]["ndcg@10"]):
        for k in range(len(offsets)):
            ann = annotate(i, k)
            bb = ann.get_window_extent(renderer)
            inside = frame.x0 <= bb.x0 and bb.x1 <= frame.x1 and frame.y0 <= bb.y0 and bb.y1 <= frame.y1
            if inside and not any(bb.overlaps(t) for t in taken):
                break
            ann.remove()
        else:
            bb = annotate(i, 0).get_window_extent(renderer)
        taken.append(bb)
        boxes.append((i, tuple(float(v) for v in bb.extents)))
    return [b for _, b in sorted(boxes)]


def png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) from a PNG header; ReportError if the file is not a PNG."""
    data = Path(path).read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ReportError(f"{path} is not a PNG file")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def expected_png_size() -> tuple[int, int]:
    return round(FIGURE_SIZE_IN[0] * FIGURE_DPI), round(FIGURE_SIZE_IN[1] * FIGURE_DPI)


# ----------------------------------------------------------------------------- page


def carried_entries(data: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every (JSON path, ``carried`` marker) in a collected results document: results a collect kept
    from the JSON it replaced because their run directories were not on its machine (research.carry)."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(data, dict):
        if isinstance(data.get("carried"), dict):
            found.append((path or "/", data["carried"]))
        for k, v in data.items():
            if k != "carried":
                found += carried_entries(v, f"{path}/{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += carried_entries(v, f"{path}/{i}")
    return found


def carried_note(data: Any) -> str:
    """One sentence for a page: how many of its results were carried, and from which collect commits;
    empty when none was."""
    found = carried_entries(data)
    if not found:
        return ""
    commits = sorted({str(c.get("from_commit", "unknown"))[:12] for _, c in found})
    return (f"{len(found)} of these results were recorded by an earlier collect (commit(s) "
            + ", ".join(f"`{c}`" for c in commits) + ") and carried over unchanged: their run directories "
            "are not on the machine this collect ran on, and every committed file they depend on (configs, "
            "deploy specs, the served teachers' configs) is unchanged since.")


def _source_block(commit: str, machine: str, created: str, commands: Iterable[str], source: str,
                  device: str = "") -> str:
    cmds = [c for c in commands if c]
    lines = [f"*Source:* `{source}` · commit `{commit}` · machine: {machine}"
             + (f" · device: {device}" if device else "") + (f" · created {created}" if created else "")]
    if cmds:
        lines += ["", "<details><summary>Command(s)</summary>", "", "```bash", *cmds, "```", "", "</details>"]
    return "\n".join(lines)


def render_report(exp: Experiments, eff: Efficiency | None, domain: str = "Scientific",
                  figure_link: str | None = None, generated_by: str = "ckd-report",
                  generated_at: str = "", draft: bool = False, see_first: tuple[str, str] | None = None) -> str:
    """The whole results page. ``generated_at``: the commit the page is generated at (named in the
    header when given); ``draft``: the tree had uncommitted changes, which the header says;
    ``see_first``: (link relative to this page, why) of a page to read before this one."""
    domains = domains_of(exp)
    if domain not in domains:
        raise ReportError(f"figure/efficiency domain {domain!r} has no test results; domains: {domains}")
    at = ""
    if generated_at:
        at = f" at commit `{generated_at}`" + (" plus uncommitted changes" if draft else "")
    out = ["# Results", ""]
    if draft:
        out += ["**Draft:** generated from a working tree with uncommitted changes; regenerate it from a "
                "clean tree (`ckd-report`) before citing it.", ""]
    out += [f"Generated by `{generated_by}`{at} from `{exp.source}`"
            + (f" and `{eff.source}`" if eff else "") + ". Do not edit by hand: rerun the command.",
           "All metrics: test split, leave-one-out, full ranking over the user's domain "
           "(UniSRec/RecBole protocol); model selection on valid NDCG@10.", ""]
    if see_first:
        link, why = see_first
        out += [f"{READ_FIRST} [{Path(link).name}]({link}): {why}", ""]
    if figure_link:
        out += ["## Figure 1: accuracy, inference time and memory", "",
                f"![Figure 1: test NDCG@10 on {domain} vs inference ms per 1,000 users; circle area = peak "
                f"memory]({figure_link})", "",
                f"Numbers plotted: `{Path(figure_link).with_suffix('.json').name}` (same values as the "
                "efficiency table below).", ""]
    runs = ordered_runs(exp)
    out += ["## 1. Test results per domain", "",
            _source_block(exp.commit, exp.machine, exp.created, [r.command for r in runs], exp.source), ""]
    for d in domains + ([MEAN] if len(domains) > 1 else []):
        out += [f"### {d if d != MEAN else 'Mean over domains'}", "", full_table(exp, d), ""]

    out += ["## 2. Ablations (distilled SASRec vs each ablation)", ""]
    sets = ablation_sets(exp)
    if not sets:
        out += ["No ablation run in the manifest: no ablation table.", ""]
    for i, (full, ablations) in enumerate(sets):
        ref = alone_run(exp, "sasrec", like=full)
        cmds = [r.command for r in [full, *ablations] + ([ref] if ref else [])]
        if i:  # later sets (other domains) get their own heading
            out += [f"### Ablations on {', '.join(sorted(run_domains(full)))}", ""]
        out += [_source_block(exp.commit, exp.machine, exp.created, cmds, exp.source), "",
                "Δ = NDCG@10 of the row minus NDCG@10 of the full method (negative: the removed part helps).", "",
                ablation_table(exp, full, ablations), ""]

    out += ["## 3. Universality (each student family alone vs distilled)", ""]
    fams = student_families(exp)
    cmds = [r.command for r in exp.runs if r.model in fams and r.variant in ("alone", "distilled")
            and r.group in ("baseline", "distilled", "universality")]
    out += [_source_block(exp.commit, exp.machine, exp.created, cmds, exp.source), "",
            "Gain = (distilled − alone) / alone, on test NDCG@10.", "", universality_table(exp), ""]

    out += ["## 4. Efficiency", ""]
    if eff is None:
        out += ["No inference benchmark (results/efficiency.json) was given.", ""]
    else:
        extra = ", ".join(f"{k}: {v}" for k, v in eff.extra.items() if isinstance(v, (str, int, float)))
        out += ["### Inference", "",
                _source_block(eff.commit, eff.machine, eff.created, [eff.command], eff.source, eff.device), "",
                "Inference = full ranking of each test user over the domain's catalogue (batches of 256, "
                "median of repeats after a warm-up). Peak memory = model plus inference working memory. "
                "Training throughput from the matching run's metrics."
                + (f" Settings: {extra}." if extra else ""), "",
                efficiency_table(exp, eff, domain), ""]
    out += ["### Training throughput", "",
            _source_block(exp.commit, exp.machine, exp.created,
                          [r.command for r in runs if r.metrics.get("timing")], exp.source), "",
            "Steps/s over the whole training (compute plus waiting for soft labels); the ratio compares a run "
            "with the same student trained without teachers at the same world size (its \"no teachers\" twin "
            "when the manifest has one, else the student alone).", "",
            throughput_table(exp), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- results manifest

MANIFEST = "results/MANIFEST.yaml"
READ_FIRST = "**Read first:**"  # opens a page's link to the page to read before it (PageSpec.see_first)
PAGE_KEYS = {"page", "experiments", "efficiency", "figure", "domain", "union", "mechanisms", "see_first"}


@dataclass(frozen=True)
class PageSpec:
    """One results page of the manifest: the JSON behind it and how it is drawn. Paths are
    relative to the repository root, '/'-separated."""

    page: str
    experiments: tuple[str, ...]
    efficiency: str | None = None
    figure: str | None = None
    domain: str = "Scientific"
    union: str | None = None  # a page of its own kind (ckd.union_report), made from this JSON instead
    # A union page's per-domain inference benchmarks, (domain, path) in the manifest's order: the
    # panels of its Figure 1 (``efficiency: {Scientific: ..., Games: ...}``).
    efficiency_by_domain: tuple[tuple[str, str], ...] = ()
    # A page of its own kind (ckd.mechanisms_report) from this JSON; its ``figure`` is the anytime
    # curves' PNG (no efficiency).
    mechanisms: str | None = None
    # Another page of the manifest that this one points to before anything else, and why
    # (``see_first: {page: docs/results_union.md, why: ...}``): e.g. the page that supersedes it.
    see_first: tuple[str, str] | None = None

    @property
    def inputs(self) -> list[str]:
        """The committed JSON files the page is made from."""
        return ([self.mechanisms] if self.mechanisms else []) + ([self.union] if self.union else []) + \
            list(self.experiments) + \
            ([self.efficiency] if self.efficiency else []) + [p for _, p in self.efficiency_by_domain]


@dataclass(frozen=True)
class ResultsManifest:
    """``results/MANIFEST.yaml``: every results page, and the JSON kept for citations only."""

    pages: list[PageSpec]
    cited: dict[str, str]  # JSON behind no page -> where it is cited
    source: str = MANIFEST

    def page(self, name: str) -> PageSpec:
        """The page ``name`` (a root-relative path); ReportError naming the known pages if absent."""
        key = _rel_path(name, "--page")
        for spec in self.pages:
            if spec.page == key:
                return spec
        raise ReportError(f"{name}: not a page of {self.source}; its pages: {', '.join(p.page for p in self.pages)}")

    @property
    def files(self) -> list[str]:
        """Every results JSON the manifest names (behind a page or cited), without repeats."""
        return list(dict.fromkeys([f for p in self.pages for f in p.inputs] + list(self.cited)))


def _rel_path(value: Any, where: str) -> str:
    """A root-relative '/'-path inside the repository, normalised; ReportError otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise ReportError(f"{where}: expected a path, got {value!r}")
    norm = posixpath.normpath(value.strip().replace(os.sep, "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise ReportError(f"{where}: {value!r} is not a path inside the repository")
    return norm


def parse_results_manifest(raw: Any, source: str = MANIFEST) -> ResultsManifest:
    """Validate the manifest's parsed YAML (see results/MANIFEST.yaml for the format): unknown keys,
    a page listed twice, a figure without efficiency results or shared by two pages, and a file both
    behind a page and in ``cited`` are errors, so a typo cannot silently drop a table."""
    if not isinstance(raw, dict) or not isinstance(raw.get("pages"), list) or not raw["pages"]:
        raise ReportError(f"{source}: expected a mapping with a non-empty 'pages' list")
    unknown = set(raw) - {"pages", "cited"}
    if unknown:
        raise ReportError(f"{source}: unknown top-level keys {sorted(unknown)}")
    pages: list[PageSpec] = []
    for i, entry in enumerate(raw["pages"]):
        where = f"{source}: pages[{i}]"
        if not isinstance(entry, dict):
            raise ReportError(f"{where}: expected a mapping")
        extra = set(entry) - PAGE_KEYS
        if extra:
            raise ReportError(f"{where}: unknown keys {sorted(extra)} (known: {sorted(PAGE_KEYS)})")
        page = _rel_path(entry.get("page"), f"{where}.page")
        where = f"{source}: page {page}"
        if not page.endswith(".md"):
            raise ReportError(f"{where}: a page is a .md file")
        union = entry.get("union")
        mechanisms = entry.get("mechanisms")
        if mechanisms and (set(entry) - {"page", "mechanisms", "figure"}):
            raise ReportError(f"{where}: a 'mechanisms' page takes only 'figure' (its anytime curves) besides it, "
                              f"not {sorted(set(entry) - {'page', 'mechanisms', 'figure'})}")
        exps = entry.get("experiments", [] if union or mechanisms else None)
        if union and (exps or "domain" in entry):
            # The union page (ckd.union_report) has every domain: its figure's domains are the keys
            # of its per-domain efficiency mapping.
            raise ReportError(f"{where}: a 'union' page takes only 'efficiency' and 'figure' besides it, not "
                              "experiments or domain")
        if not union and not mechanisms and (not isinstance(exps, list) or not exps):
            raise ReportError(f"{where}: 'experiments' must be a non-empty list of JSON files")
        eff = entry.get("efficiency")
        fig = entry.get("figure")
        by_domain: tuple[tuple[str, str], ...] = ()
        if isinstance(eff, dict):
            if not union:
                raise ReportError(f"{where}: per-domain 'efficiency' ({{domain: file}}) is for a 'union' page; "
                                  "this page's figure has one domain ('domain')")
            if not eff or not all(isinstance(d, str) and d for d in eff):
                raise ReportError(f"{where}: 'efficiency' must map a domain name to its benchmark JSON")
            by_domain = tuple((d, _rel_path(f, f"{where}.efficiency.{d}")) for d, f in eff.items())
            if len({f for _, f in by_domain}) != len(by_domain):
                raise ReportError(f"{where}: one efficiency file is given for two domains")
            eff = None
        if fig and not (eff or by_domain or mechanisms):
            raise ReportError(f"{where}: a figure needs 'efficiency' results")
        if union and fig and not by_domain:
            raise ReportError(f"{where}: a union page's figure needs per-domain efficiency "
                              "({domain: benchmark JSON}, one panel each)")
        domain = entry.get("domain", "Scientific")
        if not isinstance(domain, str) or not domain:
            raise ReportError(f"{where}: 'domain' must be a domain name")
        see_first = _see_first(entry.get("see_first"), where) if "see_first" in entry else None
        if see_first and (union or mechanisms):
            raise ReportError(f"{where}: 'see_first' is for an experiments page")
        spec = PageSpec(page=page, experiments=tuple(_rel_path(e, f"{where}.experiments") for e in exps),
                        efficiency=_rel_path(eff, f"{where}.efficiency") if eff else None,
                        figure=_rel_path(fig, f"{where}.figure") if fig else None, domain=domain,
                        union=_rel_path(union, f"{where}.union") if union else None,
                        efficiency_by_domain=by_domain,
                        mechanisms=_rel_path(mechanisms, f"{where}.mechanisms") if mechanisms else None,
                        see_first=see_first)
        if spec.figure and not spec.figure.endswith(".png"):
            raise ReportError(f"{where}: the figure is a .png file")
        if len(set(spec.experiments)) != len(spec.experiments):
            raise ReportError(f"{where}: an experiments file is listed twice")
        for other in pages:
            if other.page == spec.page:
                raise ReportError(f"{where}: listed twice")
            if spec.figure and other.figure == spec.figure:
                raise ReportError(f"{where}: figure {spec.figure} is also {other.page}'s")
        pages.append(spec)
    names = {p.page for p in pages}
    for spec in pages:
        if spec.see_first and (spec.see_first[0] not in names or spec.see_first[0] == spec.page):
            raise ReportError(f"{source}: page {spec.page}: see_first names {spec.see_first[0]}, which is not "
                              "another page of the manifest")
    cited_raw = raw.get("cited") or {}
    if not isinstance(cited_raw, dict):
        raise ReportError(f"{source}: 'cited' must map a JSON file to where it is cited")
    behind = {f for p in pages for f in p.inputs}
    cited: dict[str, str] = {}
    for name, where_cited in cited_raw.items():
        key = _rel_path(name, f"{source}: cited")
        if key in behind or key in cited:
            raise ReportError(f"{source}: cited {key} is listed twice (or is already behind a page)")
        if not isinstance(where_cited, str) or not where_cited.strip():
            raise ReportError(f"{source}: cited {key}: say where it is cited")
        cited[key] = where_cited
    return ResultsManifest(pages=pages, cited=cited, source=source)


def _see_first(raw: Any, where: str) -> tuple[str, str]:
    """A page's ``see_first: {page, why}``: the page to read first (a root-relative path) and why."""
    if not isinstance(raw, dict) or set(raw) != {"page", "why"}:
        raise ReportError(f"{where}: 'see_first' must be a mapping with exactly 'page' and 'why'")
    why = raw["why"]
    if not isinstance(why, str) or not why.strip():
        raise ReportError(f"{where}: see_first.why must say why the other page comes first")
    return _rel_path(raw["page"], f"{where}.see_first.page"), " ".join(why.split())


def load_results_manifest(path: str | os.PathLike[str], label: str = MANIFEST) -> ResultsManifest:
    """Read and validate ``results/MANIFEST.yaml``."""
    return parse_results_manifest(_read_file(path, "results manifest", fmt="yaml", label=label), label)


def page_body(text: str) -> str:
    """A page without its header (everything above the first '## ' heading, or above the line that
    sends a reader to another page first): what ``ckd-report --check`` compares, since the header
    names the command and the commit it was generated at."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(("## ", READ_FIRST))), len(lines))
    return "\n".join(lines[start:])


def overwrite_refusal(path: str | os.PathLike[str], overwrite: bool, flag: str = "--overwrite",
                      action: str = "replace it") -> str | None:
    """The message refusing to write into an existing results file without ``flag``, or None when
    the write may go ahead (no such file, or the flag given). Committed results are evidence: a
    default path or a typo must not clobber them."""
    p = Path(path)
    if overwrite or not p.exists():
        return None
    return f"{p} already exists; pass {flag} to {action} (results files are never overwritten by default)"


def results_out_path(out: str | os.PathLike[str], root: Path, overwrite: bool) -> Path | None:
    """``out`` resolved against ``root``, or None after printing why it may not be written
    (``overwrite_refusal``); a collect command checks this before it reads any run."""
    path = Path(out) if Path(out).is_absolute() else root / out
    refusal = overwrite_refusal(path, overwrite)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return None
    return path


def write_results_json(path: Path, data: Any) -> None:
    """The collected results as indented JSON (folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
