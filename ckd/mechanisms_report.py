"""The mechanisms page (issue 22) from the mechanisms results JSON, and the statistics behind it.

Pure functions (no torch, no training, no git) over a mechanisms results JSON
(``results/mechanisms_scientific.json``, ``results/mechanisms_union.json``), written by
``python -m research.mechanisms collect`` from the run directories of a plan
(configs/mechanisms/scientific.yaml, configs/mechanisms/union.yaml):

    {"kind": "mechanisms", "schema": 1, "plan", "title", "description", "scale", "domain", "domains", "seeds",
     "confidence": 0.95, "commit", "created", "machine", "command",
     "configs": [student configs of the rows' commands], "epochs": [train.epochs of finished runs],
     "pools": {pool: {"label", "spec", "teachers": [name]}},
     "teachers": {name: {"label", "metrics", "build", "corrupted", "pools", "status", "test"?}},
     "best_teacher": name | null,                  # the clean teacher with the highest test NDCG@10
     "rows": {name: {"label", "group", "pool", "mode", "command", "runs_root", "pending_seeds",
                     "seeds": [{"seed", "run_dir", "status": "done" | "pending", "detail"?, "test",
                                "best_epoch", "epochs_run", "global_step", "wall_s", "git_sha",
                                "device", "served", "curve"? | "curve_error"?, ...}],
                     "stats": {metric: Stat | null}}},
     "integration": {"modes", "pools", "cells": {mode: {pool: row}}, "change": {mode: Comparison}},
     "curriculum": {"reference", "rows": [{"row", "label"}], "comparisons": {row: Comparison},
                    "anytime": {"curves": {row: MeanCurve}, "compare": research.anytime.compare(...)}},
     "student_vs_teacher": {row: {"ndcg@10": OneSample, "recall@10": OneSample}},
     "mechanisms": [{"name", "label", "comparisons": [{"where", **Comparison}]}],
     "modality": null | {"plan", "title", "description", "domain", "seeds", "reference", "command",
                         "rows": {name: {"label", "config", "set", "command", "seeds", "stats"}},
                         "comparisons": {name: Comparison against the reference}, "pending"},
     "targets": {"integration": {...}, "curriculum": {...}, "best_teacher": {...}},
     "pending": ["row X seed N (run dir): why", ...]}

    Stat       = {"n", "mean", "sd", "ci": [lo, hi]}          # sd/ci null for one seed
    Comparison = {"row", "against", "n": [n_row, n_against], "mean", "mean_against", "diff",
                  "ci": [lo, hi], "df", "rel_pct", "rel_ci_pct": [lo, hi], "verdict"}

``domain`` is what every number is judged on: the one domain, or "mean" (the unweighted mean over
``domains``) for a multi-domain student, whose seeds and teachers then also carry "test_by_domain":
{domain: metrics}. A plan without curriculum rows has an empty curriculum section and target.
"scale" ("" = the Scientific demo scale's sentence) and "domains" are absent from files written
before they existed; the page reads those as the defaults.

The rule behind every verdict (``VERDICT_RULE``, printed on the page): the difference of the two
rows' mean test NDCG@10 over their finished seeds with a 95% Welch t-interval; *helps* when the
interval lies above 0, *hurts* when below, *no measurable effect* when it includes 0, *open* while a
row has fewer than two finished seeds. t quantiles are computed here (regularized incomplete beta),
so no scipy is needed.
"""
from __future__ import annotations

import math
import statistics
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from ckd.reporting import (DASH, METRIC_LABELS, METRICS, ReportError, _read_file, _require, _source_block,
                           carried_note, draw_curves, fmt_duration, fmt_metric, markdown_table)

FORMAT = "mechanisms"
SCHEMA = 1
LEVEL = 0.95
SELECT = "ndcg@10"  # the metric every verdict and target is judged on
PENDING = "pending"
HELPS, NONE, HURTS, OPEN = "helps", "none", "hurts", "open"
VERDICT_RULE = (
    "Every comparison of a row against another is the difference of their mean test NDCG@10 over the finished "
    "seeds, with a 95% Welch t-interval (unequal variances, Welch–Satterthwaite degrees of freedom), also given "
    "in % of the second row's mean (that mean taken as fixed). Verdict: **helps** when the whole interval is "
    "above 0, **hurts** when it is below 0, **no measurable effect** when it includes 0; **open** while either "
    "row has fewer than two finished seeds.")
ANYTIME_FRACTION = 0.95
# A change between pools (corrupted vs clean) in words: "helps" would misread there.
CHANGE_WORDS = {HELPS: "higher (interval above 0)", HURTS: "lower (interval below 0)",
                NONE: "no measurable change (interval includes 0)", OPEN: "open"}


# ----------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (> 0, real) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by bisection
    on ``t_cdf`` (to 1e-10): t_quantile(0.975, 2) = 4.3027."""
    if not 0.5 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-10:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_interval(values: Iterable[float], level: float = LEVEL) -> dict[str, Any] | None:
    """{"n", "mean", "sd", "ci"}: the mean, sample sd and t-interval of the mean over ``values``
    (sd and ci None for one value; None for none)."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci": None}
    sd = statistics.stdev(vals)
    half = t_quantile(0.5 + level / 2.0, len(vals) - 1) * sd / math.sqrt(len(vals))
    return {"n": len(vals), "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def verdict_of(ci: Sequence[float] | None) -> str:
    """helps / hurts / none from the interval of a difference (row minus the row it is against)."""
    if ci is None:
        return OPEN
    lo, hi = ci
    if lo > 0:
        return HELPS
    if hi < 0:
        return HURTS
    return NONE


def welch(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """mean(a) − mean(b) with its Welch t-interval, in absolute terms and in % of mean(b), and its
    verdict (``VERDICT_RULE``). Fewer than two values on a side: verdict open, no interval."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    out: dict[str, Any] = {"n": [len(a), len(b)], "mean": statistics.fmean(a) if a else None,
                           "mean_against": statistics.fmean(b) if b else None, "diff": None, "ci": None,
                           "df": None, "rel_pct": None, "rel_ci_pct": None, "verdict": OPEN}
    if a and b:
        out["diff"] = out["mean"] - out["mean_against"]
        if out["mean_against"]:
            out["rel_pct"] = 100.0 * out["diff"] / out["mean_against"]
    if len(a) < 2 or len(b) < 2:
        return out
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical seeds on both sides: the difference is exact
        out.update(ci=[out["diff"], out["diff"]], df=float(len(a) + len(b) - 2))
    else:
        df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
        half = t_quantile(0.5 + level / 2.0, df) * se
        out.update(ci=[out["diff"] - half, out["diff"] + half], df=df)
    if out["mean_against"]:
        out["rel_ci_pct"] = [100.0 * c / out["mean_against"] for c in out["ci"]]
    out["verdict"] = verdict_of(out["ci"])
    return out


def against_value(values: Sequence[float], reference: float | None, level: float = LEVEL) -> dict[str, Any]:
    """mean(values) − ``reference`` (a single run, e.g. a teacher) with the one-sample t-interval of
    the mean, in % of the reference, and its verdict (open below two values or without reference)."""
    st = mean_interval(values, level)
    out: dict[str, Any] = {"n": st["n"] if st else 0, "mean": st["mean"] if st else None, "reference": reference,
                           "diff": None, "ci": None, "rel_pct": None, "rel_ci_pct": None, "verdict": OPEN}
    if st is None or reference is None:
        return out
    out["diff"] = st["mean"] - reference
    out["rel_pct"] = 100.0 * out["diff"] / reference if reference else None
    if st["ci"] is not None:
        out["ci"] = [c - reference for c in st["ci"]]
        out["rel_ci_pct"] = [100.0 * c / reference for c in out["ci"]] if reference else None
        out["verdict"] = verdict_of(out["ci"])
    return out


def higher_by_spread_of(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool | None:
    """mean(a) − mean(b) > max(sd(a), sd(b)) on two Stats (None: a side has fewer than two seeds)."""
    if not a or not b or a.get("sd") is None or b.get("sd") is None:
        return None
    return a["mean"] - b["mean"] > max(a["sd"], b["sd"])


# ----------------------------------------------------------------------------- formatting


def fmt_seed_stat(s: dict[str, Any] | None, interval: bool = True) -> str:
    """``0.0620 ± 0.0020 [0.0570, 0.0670]`` (mean ± sample sd [95% t-interval]); one seed: its value."""
    if not s:
        return PENDING
    if s.get("sd") is None:
        return f"{s['mean']:.4f} (1 seed)"
    text = f"{s['mean']:.4f} ± {s['sd']:.4f}"
    return text + (f" [{s['ci'][0]:.4f}, {s['ci'][1]:.4f}]" if interval and s.get("ci") else "")


def fmt_signed_pct(x: float | None, digits: int = 1) -> str:
    return DASH if x is None else f"{x:+.{digits}f}%"


def fmt_rel(c: dict[str, Any]) -> str:
    """``−3.2% [−5.0%, −1.4%]``: a comparison's relative difference with its interval."""
    if c.get("rel_pct") is None:
        return PENDING
    text = fmt_signed_pct(c["rel_pct"])
    if c.get("rel_ci_pct"):
        text += f" [{fmt_signed_pct(c['rel_ci_pct'][0])}, {fmt_signed_pct(c['rel_ci_pct'][1])}]"
    return text


def verdict_text(c: dict[str, Any]) -> str:
    """One comparison in words, e.g. ``helps by +6.2% (95% CI [+3.0%, +9.4%])``."""
    v = c.get("verdict", OPEN)
    if v == OPEN:
        n = c.get("n") or [0, 0]
        return f"open ({c.get('row', 'row')}: {n[0]} seed(s), {c.get('against', 'reference')}: {n[1]} seed(s) finished)"
    rel = c.get("rel_pct")
    ci = c.get("rel_ci_pct") or [None, None]
    amount = f"{fmt_signed_pct(rel)} (95% CI [{fmt_signed_pct(ci[0])}, {fmt_signed_pct(ci[1])}])"
    return {HELPS: f"helps by {amount}", HURTS: f"hurts by {amount}",
            NONE: f"no measurable effect, {amount}: the interval includes 0"}[v]


def fmt_steps(x: int | float | None, never: str = "not reached") -> str:
    return never if x is None else f"{int(round(x)):,}"


def yes_no_open(ok: bool | None) -> str:
    return "open" if ok is None else ("**met**" if ok else "**not met**")


# ----------------------------------------------------------------------------- loading


def load_mechanisms(path: str | Path, label: str | None = None) -> dict[str, Any]:
    """Read and check a mechanisms results file (``label``: the name the page shows for it)."""
    raw = _read_file(path, "mechanisms results", label=label)
    where = label or str(path)
    if not isinstance(raw, dict) or raw.get("kind") != FORMAT:
        kind = raw.get("kind") if isinstance(raw, dict) else None
        raise ReportError(f"{where}: not a mechanisms results file (kind {kind!r}; written by python -m "
                          "research.mechanisms collect)")
    if raw.get("schema") != SCHEMA:
        raise ReportError(f"{where}: schema {raw.get('schema')!r}, this page renders schema {SCHEMA}")
    for key in ("domain", "seeds", "rows", "teachers", "integration", "curriculum", "mechanisms", "targets",
                "student_vs_teacher", "pending"):
        _require(raw, key, where)
    for name, row in raw["rows"].items():
        for key in ("label", "group", "seeds", "stats"):
            _require(row, key, f"{where}: row {name!r}")
    raw["source"] = where
    return raw


# ----------------------------------------------------------------------------- anytime figure


def anytime_points(m: dict[str, Any]) -> dict[str, Any] | None:
    """The anytime figure's sidecar: per curriculum row with a curve, the mean test NDCG@10 over
    seeds at each step (and its sd), its final value and the steps it needs (None: no curve yet)."""
    any_ = (m.get("curriculum") or {}).get("anytime") or {}
    curves = any_.get("curves") or {}
    if not curves:
        return None
    labels = {r["row"]: r["label"] for r in m["curriculum"].get("rows") or []}
    steps = (any_.get("compare") or {}).get("runs") or {}
    # a multi-domain run's curve is its test metric's mean over the domains (student/trainer.py)
    return {"metric": f"test {SELECT}", "domain": _domains_text(m, "mean over "),
            "reference": m["curriculum"].get("reference"),
            "fraction": ANYTIME_FRACTION,
            "curves": {row: {"label": labels.get(row, row), "steps": c["steps"], "mean": c["values"], "sd": c["sd"],
                             "seeds": c["seeds"], "final": c["final"],
                             **({"steps_needed": steps[row]} if row in steps else {})}
                       for row, c in curves.items()}}


def draw_anytime(sidecar: dict[str, Any], path: str | Path) -> None:
    """Mean test NDCG@10 against training steps per curriculum row, ± 1 sd over seeds shaded."""
    curves = {f"{c['label']} (final {c['final']:.4f}, {len(c['seeds'])} seed(s))":
              {"steps": c["steps"], "values": c["mean"], "sd": c["sd"]} for c in sidecar["curves"].values()}
    draw_curves(curves, "training steps", anytime_ylabel(sidecar), path)


def anytime_ylabel(sidecar: dict[str, Any]) -> str:
    """The anytime figure's y axis: the sidecar's domain text (one domain, or "mean over ..."), on two
    lines so that the three union domains fit the figure's height."""
    return f"test NDCG@10, {sidecar['domain']}\n(mean over seeds)"


# ----------------------------------------------------------------------------- tables


def _row_label(m: dict[str, Any], name: str | None) -> str:
    return DASH if not name else m["rows"].get(name, {}).get("label", name)


def _seeds_text(m: dict[str, Any], name: str) -> str:
    row = m["rows"][name]
    done = [s["seed"] for s in row["seeds"] if s["status"] == "done"]
    rest = row.get("pending_seeds") or []
    return f"{len(done)} of {len(row['seeds'])}" + (f" (pending: {', '.join(map(str, rest))})" if rest else "")


def rows_table(m: dict[str, Any]) -> str:
    """Every row of the plan: seeds finished, test metrics mean ± sd [95% CI], NDCG@10 per seed."""
    headers = ["Row", "Name", "Group", "Seeds"] + [METRIC_LABELS[k] for k in METRICS] + ["NDCG@10 per seed"]
    rows = []
    for name, r in m["rows"].items():
        per_seed = ", ".join(f"{s['seed']}: {s['test'][SELECT]:.4f}" for s in r["seeds"] if s["status"] == "done")
        rows.append([r["label"], f"`{name}`", r["group"], _seeds_text(m, name)]
                    + [fmt_seed_stat(r["stats"].get(k), interval=k == SELECT) for k in METRICS] + [per_seed or PENDING])
    return markdown_table(headers, rows, align=["l", "l", "l", "l"] + ["r"] * (len(METRICS) + 1))


def integration_table(m: dict[str, Any]) -> str:
    """Rows = integration modes; clean and corrupted pools' NDCG@10 and Recall@10; the change."""
    integ = m["integration"]
    pools = integ.get("pools") or []
    headers = ["Mode"]
    for p in pools:
        headers += [f"NDCG@10 {p}", f"Recall@10 {p}"]
    headers += ["Corrupted vs clean (NDCG@10)", "Verdict of the change", "Within 1% of clean?"]
    rows = []
    for mode in integ.get("modes") or []:
        cells = integ["cells"].get(mode) or {}
        line = [mode]
        for p in pools:
            stats = (m["rows"].get(cells.get(p)) or {}).get("stats") or {}
            line += [fmt_seed_stat(stats.get(SELECT)), fmt_seed_stat(stats.get("recall@10"), interval=False)]
        ch = (integ.get("change") or {}).get(mode)
        keeps = (m["targets"].get("integration") or {}).get("within_1pct", {}).get(mode)
        line += [fmt_rel(ch) if ch else DASH, CHANGE_WORDS[ch["verdict"]] if ch else DASH,
                 DASH if keeps is None else ("yes" if keeps else "no")]
        rows.append(line)
    return markdown_table(headers, rows, align=["l"] + ["r"] * (len(headers) - 1))


def curriculum_table(m: dict[str, Any]) -> str:
    """Per curriculum row: final NDCG@10, its difference to the no-curriculum row, and the steps of
    its mean anytime curve to 95% of its own final and to the no-curriculum final."""
    cur = m["curriculum"]
    ref = cur.get("reference")
    steps = ((cur.get("anytime") or {}).get("compare") or {}).get("runs") or {}
    pct = int(round(ANYTIME_FRACTION * 100))
    headers = ["Row", "Final NDCG@10 (test)", f"vs {_row_label(m, ref)}", f"Steps to {pct}% of its final",
               f"Steps to the {_row_label(m, ref)} final", "Fewer steps than it", "Total steps"]
    rows = []
    for entry in cur.get("rows") or []:
        name = entry["row"]
        st = (m["rows"].get(name) or {}).get("stats", {}).get(SELECT)
        comp = (cur.get("comparisons") or {}).get(name)
        s = steps.get(name) or {}
        curve = ((cur.get("anytime") or {}).get("curves") or {}).get(name)
        rows.append([entry["label"], fmt_seed_stat(st), DASH if name == ref else (fmt_rel(comp) if comp else DASH),
                     fmt_steps(s.get(f"steps_to_{pct}pct_of_final")) if s else DASH,
                     fmt_steps(s.get("steps_to_reference_final")) if s else DASH,
                     DASH if name == ref or not s else fmt_signed_pct(s.get("fewer_steps_than_reference_pct")),
                     fmt_steps(curve["steps"][-1]) if curve and curve.get("steps") else DASH])
    return markdown_table(headers, rows, align=["l"] + ["r"] * 6)


def mechanisms_teacher_table(m: dict[str, Any]) -> str:
    headers = ["Teacher", "Pools", "NDCG@10 (test)", "Recall@10 (test)", "Source"]
    rows = []
    for name, t in m["teachers"].items():
        test = t.get("test") or {}
        best = " (best clean teacher)" if name == m.get("best_teacher") else ""
        src = f"`{t['metrics']}`" if t.get("metrics") else "no metrics file in the plan"
        rows.append([t["label"] + best, ", ".join(t.get("pools") or []) or DASH,
                     fmt_metric(test.get(SELECT)) if test else t.get("status", PENDING),
                     fmt_metric(test.get("recall@10")) if test else DASH, src])
    return markdown_table(headers, rows, align=["l", "l", "r", "r", "l"])


def student_vs_teacher_table(m: dict[str, Any]) -> str:
    headers = ["Student row", "NDCG@10", "vs best teacher (NDCG@10)", "Verdict", "Recall@10",
               "vs best teacher (Recall@10)"]
    rows = []
    for name, c in (m.get("student_vs_teacher") or {}).items():
        n, r = c["ndcg@10"], c["recall@10"]
        stats = m["rows"][name]["stats"]
        word = {HELPS: "beats it", HURTS: "trails it", NONE: "ties (interval includes it)", OPEN: "open"}[n["verdict"]]
        rows.append([_row_label(m, name), fmt_seed_stat(stats.get(SELECT), interval=False), fmt_rel(n), word,
                     fmt_seed_stat(stats.get("recall@10"), interval=False), fmt_rel(r)])
    return markdown_table(headers, rows, align=["l", "r", "r", "l", "r", "r"])


# ----------------------------------------------------------------------------- verdict lines


def mechanism_lines(m: dict[str, Any]) -> list[str]:
    """One line per mechanism of the plan: its verdict in every place it was measured."""
    out = []
    for mech in m.get("mechanisms") or []:
        parts = [f"{c['where']}: {verdict_text(c)}" for c in mech["comparisons"]]
        out.append(f"- **{mech['label']}**: " + "; ".join(parts) + ".")
    return out


def modality_lines(m: dict[str, Any]) -> list[str]:
    """The verdict line of UniM2Rec's image modality: each teacher variant against the reference row."""
    mod = m.get("modality")
    if not mod:
        return []
    ref = mod["rows"][mod["reference"]]["label"]
    parts = [f"{mod['rows'][name]['label']}: {verdict_text(c)}" for name, c in mod["comparisons"].items()]
    return [f"- **UniM2Rec's image modality (teacher variants on {mod['domain']}, against {ref})**: "
            + "; ".join(parts) + "."]


def modality_table(mod: dict[str, Any]) -> str:
    """One row per teacher variant: seeds, test NDCG@10 and Recall@10 (mean ± sd [95% CI]), NDCG@10 per
    seed, and the Welch comparison with the reference row."""
    rows = []
    for name, r in mod["rows"].items():
        done = [s for s in r["seeds"] if s["status"] == "done"]
        c = mod["comparisons"].get(name)
        rows.append([r["label"], f"`{name}`", f"{len(done)} of {len(r['seeds'])}",
                     fmt_seed_stat(r["stats"].get(SELECT)), fmt_seed_stat(r["stats"].get("recall@10"), interval=False),
                     ", ".join(f"{s['seed']}: {s['test'][SELECT]:.4f}" for s in done) or PENDING,
                     "reference" if c is None else fmt_rel(c),
                     DASH if c is None else {HELPS: "higher", HURTS: "lower", NONE: "no measurable difference",
                                            OPEN: "open"}[c["verdict"]]])
    return markdown_table(["Variant", "Name", "Seeds", "NDCG@10", "Recall@10", "NDCG@10 per seed",
                           f"vs {mod['reference']} (NDCG@10)", "Verdict"], rows,
                          align=["l", "l", "l", "r", "r", "r", "r", "l"])


def modality_section(mod: dict[str, Any], n: int) -> list[str]:
    """Section ``n``: the teacher variants of the image-modality study, with their commands."""
    out = [f"## {n}. {mod.get('title') or 'UniM2Rec image modality'}", ""]
    if mod.get("description"):
        out += [mod["description"].strip(), ""]
    out += [f"Teachers, not students: test split of {mod['domain']}, full ranking, selection on valid NDCG@10; seeds "
            f"{', '.join(map(str, mod['seeds']))}; each variant against `{mod['reference']}` by the rule of section 1. "
            "Items without an image are scored from their text (the gated fusion renormalised over the modalities "
            "they have, plus a learned missing-image vector; tests/test_teacher_unim2rec.py checks it over gRPC).", "",
            modality_table(mod), ""]
    done = [s for r in mod["rows"].values() for s in r["seeds"] if s["status"] == "done"]
    walls = sorted(s["wall_s"] for s in done if s.get("wall_s"))
    if done:
        machines = sorted({str(s.get("machine") or "unknown") for s in done})
        out += [f"Trained on {'; '.join(machines)}"
                + (f"; wall time per run {fmt_duration(walls[0])} to {fmt_duration(walls[-1])} (median "
                   f"{fmt_duration(statistics.median(walls))}, {len(walls)} run(s))" if walls else "") + ".", ""]
    out += ["```bash", mod.get("command", ""),
            *[f"# {name}: {r['command']}" for name, r in mod["rows"].items()], "```", ""]
    return out


def target_lines(m: dict[str, Any]) -> list[str]:
    t = m["targets"]
    out = []
    ti = t.get("integration") or {}
    if ti:
        ch = ti.get("change_pct") or {}
        mean_loss = ch.get("mean")
        kept = ", ".join(f"{k} {fmt_signed_pct(v)}" for k, v in ch.items() if k != "mean" and v is not None)
        out.append(f"- **Integration under a corrupted teacher** (consistency-aware `both` within 1% of its clean-pool "
                   f"NDCG@10 and `mean` losing at least 5%): {yes_no_open(ti.get('met'))}. Mean integration: "
                   f"{fmt_signed_pct(mean_loss)}; the others: {kept or PENDING}."
                   + (f" Modes meeting the 1% half with mean's loss: {', '.join(ti['modes_meeting'])}."
                      if ti.get("modes_meeting") else ""))
    tc = t.get("curriculum") or {}
    if tc:
        labels = {e["row"]: e["label"] for e in m["curriculum"].get("rows") or []}
        per = []
        for row, r in (tc.get("rows") or {}).items():
            fewer = r.get("fewer_steps_pct")
            steps = ("never reaches the no-curriculum final" if fewer is None else
                     f"{abs(fewer):.1f}% {'fewer' if fewer >= 0 else 'more'} steps to the no-curriculum final")
            spread = {True: "higher", False: "not higher", None: "open whether higher"}[r.get("higher_by_spread")]
            if r.get("by_steps") is None:
                steps = "steps open (too few seeds, or the no-curriculum mean curve never reaches its own final)"
            per.append(f"{labels.get(row, row)}: {steps}, "
                       f"final {spread} by more than the seed spread")
        out.append(f"- **Curriculum** (reaches the no-curriculum final in at least 20% fewer steps, or ends higher "
                   f"by more than the seed spread): {yes_no_open(tc.get('met'))}"
                   + (f". {'; '.join(per)}." if per else "."))
    tb = t.get("best_teacher") or {}
    if tb:
        closest = tb.get("closest")
        out.append(f"- **Student against its best teacher** (at least +3% NDCG@10): {yes_no_open(tb.get('met'))}."
                   + (f" Closest: {_row_label(m, closest)}, {fmt_signed_pct(tb.get('closest_rel_pct'))} against "
                      f"{m['teachers'].get(m.get('best_teacher') or '', {}).get('label', DASH)}." if closest else ""))
    return out


# ----------------------------------------------------------------------------- page


def render_mechanisms_page(m: dict[str, Any], generated_by: str = "ckd-report", generated_at: str = "",
                           draft: bool = False, figure_link: str | None = None) -> str:
    """The whole page. ``generated_at``/``draft`` as for ckd.reporting.render_report;
    ``figure_link``: the anytime PNG relative to the page (None: no figure)."""
    at = ""
    if generated_at:
        at = f" at commit `{generated_at}`" + (" plus uncommitted changes" if draft else "")
    seeds = ", ".join(map(str, m["seeds"]))
    epochs = (f"train.epochs = {', '.join(map(str, m['epochs']))} in the finished runs" if m.get("epochs")
              else "train.epochs read from the runs once one finishes")
    pools = m.get("pools") or {}
    configs = ', '.join(f'`{c}`' for c in m.get('configs') or []) or 'the plan'
    out = ["# Results", ""]
    if draft:
        out += ["**Draft:** generated from a working tree with uncommitted changes; regenerate it from a "
                "clean tree (`ckd-report`) before citing it.", ""]
    out += [f"Generated by `{generated_by}`{at} from `{m['source']}`. Do not edit by hand: rerun the command.", "",
            f"**{m.get('title') or 'Does each mechanism earn its place?'}**", "",
            (f"{m['scale'].strip().rstrip('.')}. Student: {configs} ({epochs})" if m.get("scale") else
             f"Demo scale: CPU-sized teachers and the student of {configs} ({epochs}) on {_domains_text(m)}, not "
             "the converged runs of docs/results.md")
            + f"; seeds {seeds}; plan `{m.get('plan', '')}`; teacher pools "
            + ", ".join(f"{p} = `{v.get('spec')}` ({', '.join(v.get('teachers') or []) or 'unread'})"
                        for p, v in pools.items()) + ".", "",
            *([m["description"].strip(), ""] if m.get("description") else []),
            f"All metrics: test split of {_domains_text(m)}, leave-one-out, full ranking (UniSRec/RecBole protocol); "
            "model selection on valid NDCG@10"
            + (" (mean over the domains). Every number judged below is the mean over the domains of each domain's "
               "metric; section 2 also gives each domain" if _multi(m) else "")
            + ". Cells: mean ± sample sd over the finished seeds [95% t-interval of the mean]. "
            "Rows not finished yet read *pending*.", ""]

    out += ["## 1. Verdicts", "", VERDICT_RULE, ""]
    out += mechanism_lines(m) + modality_lines(m) + [""]
    out += ["Targets of the issue, each computed from the tables below:", ""] + target_lines(m) + [""]

    out += ["## 2. Integration with a clean and a corrupted teacher pool", "",
            "Corrupted vs clean = the mode's corrupted-pool row against its clean-pool row (Welch interval, % of "
            "the clean mean). Within 1% of clean: that relative change is at least −1% (point estimate).", "",
            integration_table(m), ""]
    if _multi(m):
        out += ["Each domain (test NDCG@10, mean ± sample sd over the finished seeds; teachers: one run each):", "",
                domains_table(m), ""]
    prior = _reliability_lines(m)
    if prior:
        out += ["Teacher reliability measured by the `reliability` rows (mean log-probability of the true item over "
                "the training rows, mean over seeds; the prior weights are its softmax):", ""] + prior + [""]

    cur = m["curriculum"]
    n = 3  # the sections below are numbered as they come (curriculum, image modality, parameters: optional)
    if cur.get("rows"):
        out += _curriculum_section(m, n, figure_link)
        n += 1
    out += [f"## {n}. Student against its teachers", "",
            "Teachers: one run each (their metrics.json); the best is the clean teacher with the highest test "
            "NDCG@10. A student row against it: its mean over seeds minus the teacher's value, with the row's "
            "one-sample 95% t-interval, in % of the teacher's value (Recall@10: against the same teacher's); "
            "*beats it* / *trails it* when the interval is above / below the teacher's value.", "",
            mechanisms_teacher_table(m), "",
            student_vs_teacher_table(m), ""]

    n += 1
    if m.get("modality"):
        out += modality_section(m["modality"], n)
        n += 1
    if m.get("params"):
        out += [f"## {n}. Parameter analysis", "", *params_lines(m)]
        n += 1
    out += [f"## {n}. Every row", "", rows_table(m), ""]
    n += 1
    commands = [m.get("command", "")] + [r.get("command", "") for r in m["rows"].values()]
    builds = [t.get("build", "") for t in m["teachers"].values() if t.get("build")]
    out += [f"## {n}. Runs", "", _source_block(m.get("commit", "unknown"), m.get("machine", "unknown"),
                                           m.get("created", ""), commands, m["source"]), ""]
    if carried_note(m):
        out += [carried_note(m), ""]
    if builds:
        out += ["Teacher checkpoints served (each built by):", "", "```bash", *builds, "```", ""]
    out += [_wall_line(m), ""]
    out += [f"## {n + 1}. Pending", ""]
    out += [f"- {p}" for p in m["pending"]] if m["pending"] else ["Nothing: every run of the plan has finished."]
    out += [""]
    return "\n".join(out)


def _curriculum_section(m: dict[str, Any], n: int, figure_link: str | None) -> list[str]:
    """Section ``n``: the anytime curves and the curriculum table."""
    cur = m["curriculum"]
    out = [f"## {n}. Curriculum: anytime curves", "",
            f"Test NDCG@10 after every epoch (`train.record_test_curve=true`; never used for selection), mean over "
            f"the finished seeds at each step. Steps to {int(ANYTIME_FRACTION * 100)}% of its final: the first "
            f"recorded step at which the mean curve reaches {ANYTIME_FRACTION} × its final value (the test value of "
            f"the epoch selected on valid, mean over seeds); steps to the {_row_label(m, cur.get('reference'))} "
            "final: the first at which it reaches that row's final; fewer steps: against that row's own.", ""]
    if figure_link:
        out += [f"![Anytime curves: test NDCG@10 against training steps]({figure_link})", "",
                f"Numbers plotted: `{Path(figure_link).with_suffix('.json').name}`.", ""]
    elif not (cur.get("anytime") or {}).get("curves"):
        out += ["No curve yet: no curriculum row has a finished seed with a recorded test curve.", ""]
    out += [curriculum_table(m), ""]
    errors = [f"- `{name}` seed {s['seed']}: {s['curve_error']}" for name, r in m["rows"].items()
              for s in r["seeds"] if s.get("curve_error") and any(e["row"] == name for e in cur.get("rows") or [])]
    if errors:
        out += ["Finished seeds without a usable curve (left out of the curves):", ""] + errors + [""]
    return out


def _multi(m: dict[str, Any]) -> bool:
    return len(m.get("domains") or []) > 1


def _domains_text(m: dict[str, Any], lead: str = "each of ") -> str:
    """"Scientific", or ``lead`` + "Scientific, Office14 and Games" for a multi-domain student."""
    doms = m.get("domains") or [m["domain"]]
    return doms[0] if len(doms) == 1 else lead + ", ".join(doms[:-1]) + f" and {doms[-1]}"


def domains_table(m: dict[str, Any]) -> str:
    """Per row and per teacher, test NDCG@10 on each domain and their mean (a multi-domain plan)."""
    doms = list(m.get("domains") or [])
    rows = []
    for name, r in m["rows"].items():
        done = [s for s in r["seeds"] if s["status"] == "done"]
        cells = [fmt_seed_stat(mean_interval([s["test_by_domain"][d][SELECT] for s in done
                                              if d in (s.get("test_by_domain") or {})]), interval=False)
                 for d in doms]
        rows.append([r["label"], *cells, fmt_seed_stat(r["stats"].get(SELECT), interval=False)])
    for name, t in m["teachers"].items():
        by = t.get("test_by_domain") or {}
        rows.append([f"teacher: {t['label']}", *[fmt_metric(by[d][SELECT]) if d in by else DASH for d in doms],
                     fmt_metric((t.get("test") or {}).get(SELECT)) if t.get("test") else t.get("status", PENDING)])
    return markdown_table(["Row", *doms, "mean"], rows, align=["l"] + ["r"] * (len(doms) + 1))


def params_lines(m: dict[str, Any]) -> list[str]:
    """Per sweep: one row per parameter with every point's test NDCG@10 (the default in bold), the
    best point and the default's distance to it, then the commands and the figure."""
    key = f"test_{SELECT}"
    sds = [r["stats"][SELECT]["sd"] for r in m["rows"].values()
           if (r.get("stats") or {}).get(SELECT) and r["stats"][SELECT].get("sd") is not None]
    out = ["One setting at a time, the others at the sweep's base config; one seed per point, so a difference "
           "smaller than the seed spread of the rows above "
           + (f"(sample sd {min(sds):.4f}–{max(sds):.4f} NDCG@10 over their seeds) " if sds else "")
           + "is not a measured difference. Default = the value of the sweep's base config (bold); the last "
           "column is what a user tuning that one setting on valid would ship.", ""]
    for sw in m["params"]:
        rows = []
        for name, r in sw["params"].items():
            pts, d = r["points"], r.get("default")
            cells = " · ".join((f"**{value_label(q['value'])}: {fmt_metric(q[key])}**" if q["value"] == d else
                                f"{value_label(q['value'])}: {fmt_metric(q[key])}") for q in pts)
            done = [q for q in pts if q[key] is not None]
            best = max(done, key=lambda q: q[key]) if done else None
            dflt = next((q for q in done if q["value"] == d), None)
            if best is None or dflt is None:
                verdict = PENDING
            elif len(done) < len(pts):
                verdict = f"{PENDING} (best so far at {value_label(best['value'])})"
            elif best["value"] == d:
                verdict = "the default is the best point"
            else:
                verdict = f"best at {value_label(best['value'])}, the default {dflt[key] - best[key]:+.4f} from it"
            rows.append([f"`{name.replace(',', ' / ')}`", value_label(d), cells, verdict, picked_on_valid(pts)])
        args = " ".join(sw.get("args") or [])
        out += [f"### {sw['label']} (`{sw['sweep']}`)", "",
                f"Base: `{sw['config']}`" + (f" with `{args}`" if args else "") + f", seed {sw['seed']}; figure: "
                f"`{sw['png']}` (its plotted numbers: `results/{Path(sw['png']).stem}.json`).", "",
                markdown_table(["Parameter", "Default", f"Test {METRIC_LABELS[SELECT]} per value", "Default vs best",
                                "Picked on valid"], rows, align=["l", "l", "l", "l", "l"]), "",
                "```bash", *sw.get("commands", []), "```", ""]
    return out


def value_label(value: Any) -> str:
    """A sweep point's value as shown: a joint key's list of values joined by " / "."""
    return " / ".join(map(str, value)) if isinstance(value, list) else str(value)


def picked_on_valid(points: list[dict[str, Any]]) -> str:
    """The value a user tuning this setting on valid would ship: the point with the highest valid
    NDCG@10, once every point has one (points collected before valid was recorded have none)."""
    key = f"valid_{SELECT}"
    if not points or any(q.get(key) is None for q in points):
        return DASH
    best = max(points, key=lambda q: q[key])
    return f"{value_label(best['value'])} (valid {fmt_metric(best[key])})"


def _reliability_lines(m: dict[str, Any]) -> list[str]:
    out = []
    for name, r in m["rows"].items():
        vals: dict[str, list[float]] = {}
        for s in r["seeds"]:
            for t, v in (s.get("teacher_reliability") or {}).items():
                vals.setdefault(t, []).append(float(v))
        if vals:
            out.append(f"- {r['label']} (`{name}`): " + ", ".join(
                f"{t} R = {statistics.fmean(v):.3f}" for t, v in vals.items()))
    return out


def _wall_line(m: dict[str, Any]) -> str:
    secs = [s["wall_s"] for r in m["rows"].values() for s in r["seeds"] if s["status"] == "done"
            and s.get("wall_s") is not None]
    sources = sorted({s.get("wall_s_source", "") for r in m["rows"].values() for s in r["seeds"]
                      if s["status"] == "done" and s.get("wall_s_source")})
    if not secs:
        return "Training time: no run has finished."
    return (f"Training time of the {len(secs)} finished run(s): {fmt_duration(sum(secs))} in all, "
            f"{fmt_duration(statistics.fmean(secs))} per run on average ({'; '.join(sources)}).")
