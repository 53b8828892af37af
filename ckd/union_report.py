"""The "every domain" page (docs/results_union.md) from the union results JSON.

Pure functions (no torch, no training, no git) over ``results/experiments_union.json``, written by
``python -m research.union collect`` from the run directories of configs/union/plan.yaml:

    {"kind": "union", "schema": 1, "plan", "domains": [D, ...], "commit", "created", "machine",
     "command",                                   # the collect command
     "retrain_teachers": {"command", "teachers": [name], "finished", "train_s", "train_s_lower_bound"?,
                          "machines", "devices"},
     "retrain_checks": [{"teacher", "label", "run_dir", "command", "status": "done" | "pending",
                         # when done: research.retrain_check's verdict, per domain test NDCG@10
                         "tolerance", "within_tolerance", "same_checkpoint_bytes", "retrained_commit",
                         "retrain_time_s", "per_domain": {D: {"recorded", "retrained", "abs_diff",
                                                              "within_tolerance"}}}]?,
     "teachers": {name: {"label", "config", "command", "run_dir", "row", "served", "note"?, "sizing",
                         "status": "done" | "pending", "detail"? (pending),
                         # when done:
                         "kind", "checkpoint", "checkpoint_sha256", "vocab_hash", "params", "best_epoch",
                         "device", "train_s", "train_s_source", "train_s_lower_bound"?, "invocations",
                         "failed_invocations",
                         "machine", "machine_source", "stages", "valid", "test",
                         # a recorded run of the same config this one replaced (e.g. on another machine):
                         "supersedes"?: {"machine", "trained_commit", "checkpoint_sha256", "train_s",
                                         "comparable", "why"? | ("tolerance", "within_tolerance",
                                         "same_checkpoint_bytes", "best_epoch", "per_domain"),
                                         "supersedes"?: the same, for the run that one replaced}}},
     "students": {name: {"label", "group", "model", "variant", "teachers": "none" | "served",
                         "configs", "run_dirs", "commands", "note"?,
                         "adopt_over"?: the student it replaces only if its seed mean of valid NDCG@10
                                        (mean over domains) is higher (a rule fixed before its runs),
                         "seeds": [{"seed", "status": "done" | "partial" | "pending",
                                    "runs": [{"config", "run_dir", "command", "status", "wall_s", ...}],
                                    "test", "valid", "wall_s"}]}},
     "pending": ["teacher X (run dir): why", ...]}

A split ("test", "valid") is ``{domain: {recall@10, ndcg@10, recall@50, ndcg@50}, "mean": {...}}``;
"mean" is the unweighted mean over the plan's domains and is present only when every domain is.
A student seed whose runs are one per domain (SASRec alone) is merged into one such split.

The page: per domain and for the mean over domains, every row's test Recall/NDCG@10/50 (students:
mean ± sample sd over their finished seeds, with the seed count); the issue's targets, each verdict
computed from those numbers, and the verdicts of the plan's adoption rules (``adopt_over``,
judged on valid); the teachers' reproducibility facts (config, machine, measured
training time, checkpoint sha256) and the one command that retrains them; the students' runs.

Figure 1 (section 6) is drawn for two domains, as in the paper: the page's ``efficiency:`` maps each
domain to the inference benchmark measured on it (``python -m benchmarks.inference ... --domain D``),
and ``figure:`` names one PNG with one panel per domain (manifest order): x = inference ms per 1,000
users (log), y = test NDCG@10 on that domain (students: mean over their finished seeds), circle area =
peak memory on one scale for every panel; teachers, SASRec alone (per domain and joint) and the
distilled students, styled as docs/figure1.png. Points are matched to rows by name (a teacher by its
plan name, a student by its plan entry name); the plotted values and every row left off (with why)
go to the sidecar JSON beside the PNG (``union_figure_points``). A single efficiency file (no
domain keys) still lists its measurements beside every row, without a figure.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ckd.reporting import (DASH, FIGURE_DPI, FIGURE_SIZE_IN, MAX_AREA_PT2, MEAN, METRIC_LABELS, METRICS, Efficiency,
                           ReportError, _read_file, _require, _source_block, carried_note, fmt_duration, fmt_int,
                           fmt_mb, fmt_metric, fmt_ms, markdown_table, place_labels, plot_panel)

FORMAT = "union"
PENDING = "pending"
SELECT = "ndcg@10"  # the metric every target is judged on (the page's selection metric)
# The student rows the targets name, by (model, variant) as the plan writes them.
DISTILLED = ("sasrec", "distilled")
ALONE_PER_DOMAIN = ("sasrec", "alone-per-domain")
JOINT_ALONE = ("sasrec", "joint-alone")
FAMILY_LABELS = {"fm": "FM", "deepfm": "DeepFM", "lightgcn": "LightGCN", "sasrec": "SASRec"}
FIGURE_DOMAINS = ("Scientific", "Games")  # the paper's two panels (the pending note's suggestion)
FIGURE_PATH = "docs/figure1_union.png"


# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Stat:
    """Mean and sample sd of one metric over a row's seeds (sd None for one seed)."""

    mean: float
    sd: float | None
    n: int


def stat_of(values: Iterable[float]) -> Stat | None:
    vals = [float(v) for v in values]
    if not vals:
        return None
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))


def fmt_stat(s: Stat | None) -> str:
    """``0.1500 ± 0.0707`` over seeds, ``0.1500`` for one, ``pending`` for none."""
    if s is None:
        return PENDING
    return fmt_metric(s.mean) if s.sd is None else f"{s.mean:.4f} ± {s.sd:.4f}"


@dataclass(frozen=True)
class Row:
    """One row of the per-domain tables: a teacher (one run) or a student entry (its seeds)."""

    name: str
    label: str
    kind: str  # "teacher" | "student"
    group: str
    model: str
    variant: str
    planned: tuple[int, ...]  # the student's planned seeds; () for a teacher
    results: dict[int | None, dict[str, dict[str, float]]]  # seed (None: a teacher) -> test split
    valid: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # student seed -> valid split
    adopt_over: str = ""  # a student: the row it replaces only on a higher valid seed mean (§2.5)

    def values(self, domain: str, metric: str) -> list[float]:
        return [split[domain][metric] for split in self.results.values() if domain in split]

    def stat(self, domain: str, metric: str = SELECT) -> Stat | None:
        return stat_of(self.values(domain, metric))

    def pending_seeds(self, domain: str) -> list[int]:
        """Planned seeds with no result on ``domain`` yet."""
        return [s for s in self.planned if domain not in self.results.get(s, {})]

    def seeds_text(self, domain: str) -> str:
        if self.kind == "teacher":
            return "teacher run" if self.results else PENDING
        n = len(self.values(domain, SELECT))
        if not n:
            return PENDING
        rest = self.pending_seeds(domain)
        return f"{n} seed{'s' if n > 1 else ''}" + (f" (seed {', '.join(map(str, rest))} pending)" if rest else "")


@dataclass(frozen=True)
class UnionResults:
    domains: list[str]
    rows: list[Row]  # page rows in order: teachers with row: true, then the students
    teachers: dict[str, dict[str, Any]]  # raw entries (every teacher, rows or not)
    students: dict[str, dict[str, Any]]
    commit: str
    created: str
    machine: str
    command: str
    plan: str
    retrain: dict[str, Any]
    pending: list[str]
    source: str = ""
    retrain_checks: list[dict[str, Any]] = field(default_factory=list)  # research.union collect_retrain_check

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise ReportError(f"{self.source}: no row named {name!r}")

    def student(self, model: str, variant: str) -> Row | None:
        """The student row of (model, variant); None if the plan has none, an error if several."""
        found = [r for r in self.rows if r.kind == "student" and (r.model, r.variant) == (model, variant)]
        if len(found) > 1:
            raise ReportError(f"{self.source}: several students are {model} {variant}: "
                              f"{', '.join(r.name for r in found)}")
        return found[0] if found else None


def _check_split(split: Any, domains: list[str], where: str, complete: bool) -> dict[str, dict[str, float]]:
    if not isinstance(split, dict):
        raise ReportError(f"{where}: expected {{domain: metrics}}")
    unknown = set(split) - set(domains) - {MEAN}
    if unknown:
        raise ReportError(f"{where}: domains {sorted(unknown)} are not the plan's {domains}")
    if complete and set(domains) - set(split):
        raise ReportError(f"{where}: no results for {sorted(set(domains) - set(split))}")
    for d, m in split.items():
        missing = [k for k in METRICS if not isinstance(m, dict) or not isinstance(m.get(k), (int, float))]
        if missing:
            raise ReportError(f"{where}: {d} lacks {missing}")
    out = {d: {k: float(split[d][k]) for k in METRICS} for d in domains if d in split}
    if len(out) == len(domains):
        # The mean over domains is the unweighted mean of the plan's domains: computed here, and a
        # stored one that says otherwise (e.g. weighted by users) is refused, not shown.
        mean = {k: statistics.fmean(out[d][k] for d in domains) for k in METRICS}
        stored = split.get(MEAN)
        if stored is not None and any(abs(float(stored[k]) - mean[k]) > 1e-9 for k in METRICS):
            raise ReportError(f"{where}: 'mean' {stored} is not the unweighted mean of {domains} ({mean})")
        out[MEAN] = mean
    elif MEAN in split:
        raise ReportError(f"{where}: a 'mean' without every domain of {domains}")
    return out


def parse_union(raw: Any, source: str) -> UnionResults:
    """Validate the union JSON (format above); a wrong kind, a done entry without its test results
    or a domain outside the plan's is a ReportError naming the entry."""
    if not isinstance(raw, dict) or raw.get("kind") != FORMAT:
        raise ReportError(f"{source}: not a union results file (expected \"kind\": \"{FORMAT}\"; write it with "
                          "python -m research.union collect)")
    domains = _require(raw, "domains", source)
    if not isinstance(domains, list) or not domains:
        raise ReportError(f"{source}: 'domains' must be a non-empty list")
    teachers = _require(raw, "teachers", source)
    students = _require(raw, "students", source)
    if not isinstance(teachers, dict) or not isinstance(students, dict):
        raise ReportError(f"{source}: 'teachers' and 'students' must map a name to an entry")
    rows: list[Row] = []
    for name, t in teachers.items():
        where = f"{source}: teacher {name!r}"
        status = _require(t, "status", where)
        if status not in ("done", PENDING):
            raise ReportError(f"{where}: status {status!r} is not 'done' or 'pending'")
        results = {}
        if status == "done":
            results[None] = _check_split(_require(t, "test", where), domains, f"{where} test", complete=True)
        if t.get("row", True):
            rows.append(Row(name, str(_require(t, "label", where)), "teacher", "teacher", name, "teacher", (), results))
    for name, s in students.items():
        where = f"{source}: student {name!r}"
        results, valid = {}, {}
        planned = []
        for i, rec in enumerate(_require(s, "seeds", where)):
            seed = _require(rec, "seed", f"{where} seeds[{i}]")
            planned.append(seed)
            test = _check_split(rec.get("test") or {}, domains, f"{where} seed {seed} test", complete=False)
            if test:
                results[seed] = test
            val = _check_split(rec.get("valid") or {}, domains, f"{where} seed {seed} valid", complete=False)
            if val:
                valid[seed] = val
        adopt_over = str(s.get("adopt_over") or "")
        if adopt_over and (adopt_over == name or adopt_over not in students):
            raise ReportError(f"{where}: adopt_over {adopt_over!r} is not another student of the file")
        rows.append(Row(name, str(_require(s, "label", where)), "student", str(_require(s, "group", where)),
                        str(_require(s, "model", where)), str(_require(s, "variant", where)), tuple(planned), results,
                        valid, adopt_over))
    return UnionResults(domains=list(domains), rows=rows, teachers=teachers, students=students,
                        commit=str(raw.get("commit", "unknown")), created=str(raw.get("created", "")),
                        machine=str(raw.get("machine", "unknown")), command=str(raw.get("command", "")),
                        plan=str(raw.get("plan", "")), retrain=raw.get("retrain_teachers") or {},
                        pending=list(raw.get("pending") or []), source=source,
                        retrain_checks=list(raw.get("retrain_checks") or []))


def load_union(path: str | Path, label: str | None = None) -> UnionResults:
    """Read and validate a union results file (``label``: the name the page shows for it)."""
    return parse_union(_read_file(path, "union results", label=label), label or str(path))


# ----------------------------------------------------------------------------- tables


def domain_table(u: UnionResults, domain: str) -> str:
    """Every row's test Recall/NDCG@10/50 on ``domain`` ('mean': the mean over domains)."""
    headers = ["Row", "Group", "Seeds"] + [METRIC_LABELS[m] for m in METRICS]
    rows = [[r.label, r.group, r.seeds_text(domain)] + [fmt_stat(r.stat(domain, m)) for m in METRICS]
            for r in u.rows]
    return markdown_table(headers, rows, align=["l", "l", "l"] + ["r"] * len(METRICS))


@dataclass(frozen=True)
class Verdict:
    """One computed claim: ``ok`` True/False, or None when it cannot be judged yet (``why``)."""

    ok: bool | None
    why: str = ""

    @property
    def text(self) -> str:
        return "yes" if self.ok else ("no" if self.ok is False else self.why)


def beats_by_spread(a: Stat | None, b: Stat | None) -> tuple[float | None, float | None, Verdict]:
    """Whether ``a`` beats ``b`` by more than the seed spread: mean(a) − mean(b) > max(sd(a), sd(b))
    (the larger sample sd of the two rows). Needs two seeds on each side."""
    if a is None or b is None:
        return None, None, Verdict(None, PENDING)
    margin = a.mean - b.mean
    if a.sd is None or b.sd is None:
        return margin, None, Verdict(None, "undetermined (needs 2 seeds each)")
    spread = max(a.sd, b.sd)
    return margin, spread, Verdict(margin > spread)


def overall(verdicts: dict[str, Verdict]) -> str:
    """``met`` / ``not met (where)`` / ``open (where)`` over a target's per-domain verdicts."""
    no = [k for k, v in verdicts.items() if v.ok is False]
    open_ = [v.why for v in verdicts.values() if v.ok is None]
    if no:
        return f"**not met** (no: {', '.join(no)})"
    if not verdicts:
        return "**open** (no rows to judge)"
    if open_:
        reasons = ", ".join(f"{open_.count(w)} {w}" for w in dict.fromkeys(open_))
        return f"**open** ({len(open_)} of {len(verdicts)} not judged yet: {reasons})"
    return "**met**"


def fmt_signed(x: float | None) -> str:
    return DASH if x is None else f"{x:+.4f}"


def fmt_sd(x: float | None) -> str:
    return DASH if x is None else f"{x:.4f}"


def shipped_line(u: UnionResults) -> list[str]:
    """The sentences naming the rows the targets judge where a rule of §2.5 adopted one: targets 1 and
    2 for the distilled joint SASRec, target 4 for FM, DeepFM and LightGCN."""
    families = dict.fromkeys(r.model for r in u.rows if r.kind == "student" and r.model != "sasrec")
    judged = [(u.student(*DISTILLED), "Targets 1 and 2 judge the shipped distilled recipe")] + \
             [(u.student(m, "distilled"), f"Target 4 judges for {FAMILY_LABELS.get(m, m)}") for m in families]
    out = []
    for plan_row, what in judged:
        row = shipped(u, plan_row)
        if row is None or row is plan_row:
            continue
        chain = "" if row.adopt_over == plan_row.name else f", in place of *{plan_row.label}*"
        out.append(f"{what}, *{row.label}*: its rule adopted it over *{u.row(row.adopt_over).label}*{chain} (§2.5).")
    return [" ".join(out), ""] if out else []


def target_vs_baselines(u: UnionResults) -> tuple[str, dict[str, Verdict]]:
    """Target 1: the distilled joint SASRec vs per-domain SASRec alone and vs the joint SASRec
    without teachers, test NDCG@10 per domain, by more than the seed spread."""
    dist = shipped_distilled(u)
    bases = [b for b in (u.student(*ALONE_PER_DOMAIN), u.student(*JOINT_ALONE)) if b is not None]
    headers = ["Domain", "Baseline", "Distilled", "Baseline NDCG@10", "Δ", "Spread",
               "Beats it by more than the spread"]
    rows, verdicts = [], {}
    for d in u.domains:
        ds = dist.stat(d) if dist else None
        for b in bases:
            margin, spread, v = beats_by_spread(ds, b.stat(d))
            rows.append([d, b.label, fmt_stat(ds), fmt_stat(b.stat(d)), fmt_signed(margin), fmt_sd(spread), v.text])
            verdicts[f"{d} vs {b.label}"] = v
    return markdown_table(headers, rows, align=["l", "l", "r", "r", "r", "r", "l"]), verdicts


def target_vs_best_teacher(u: UnionResults) -> tuple[str, dict[str, Verdict]]:
    """Target 2: the distilled joint SASRec reaches or beats the best teacher's test NDCG@10 on
    each domain (its mean over seeds ≥ the best finished teacher row)."""
    dist = shipped_distilled(u)
    teachers = [r for r in u.rows if r.kind == "teacher"]
    unfinished = [r.label for r in teachers if not r.results]
    headers = ["Domain", "Distilled", "Best teacher", "Its NDCG@10", "Δ", "Reaches or beats it"]
    rows, verdicts = [], {}
    for d in u.domains:
        ds = dist.stat(d) if dist else None
        done = [(r.stat(d).mean, r) for r in teachers if r.stat(d) is not None]
        best = max(done, key=lambda x: x[0]) if done else None
        if ds is None or best is None:
            v = Verdict(None, PENDING)
        elif ds.mean < best[0]:
            v = Verdict(False)
        elif unfinished:  # ahead of the finished teachers; one still training may be better
            v = Verdict(None, f"pending (ahead of the finished teachers; {len(unfinished)} not finished)")
        else:
            v = Verdict(True)
        verdicts[d] = v
        text = v.text
        rows.append([d, fmt_stat(ds), best[1].label if best else PENDING, fmt_metric(best[0]) if best else PENDING,
                     fmt_signed(ds.mean - best[0] if ds and best else None), text])
    return markdown_table(headers, rows, align=["l", "r", "l", "r", "r", "l"]), verdicts


def target_teachers_vs_alone(u: UnionResults) -> tuple[str, dict[str, Verdict], list[str]]:
    """Target 3: every teacher beats per-domain SASRec alone (its mean over seeds) on every domain;
    returns the table, the verdicts and, per teacher that falls behind anywhere, where and its note."""
    alone = u.student(*ALONE_PER_DOMAIN)
    headers = ["Teacher"] + [f"{d}: Δ NDCG@10 vs SASRec alone" for d in u.domains] + ["Beats it on every domain"]
    rows, verdicts, failing = [], {}, []
    for r in (r for r in u.rows if r.kind == "teacher"):
        cells, mine = [], {}
        for d in u.domains:
            t, a = r.stat(d), alone.stat(d) if alone else None
            v = Verdict(None, PENDING) if t is None or a is None else Verdict(t.mean > a.mean)
            mine[d] = verdicts[f"{r.label} on {d}"] = v
            cells.append(PENDING if v.ok is None else f"{fmt_signed(t.mean - a.mean)} ({v.text})")
        behind = [f"{d} ({fmt_signed(r.stat(d).mean - alone.stat(d).mean)})" for d in u.domains if mine[d].ok is False]
        if behind:  # one entry per teacher, so its note is said once
            note = u.teachers.get(r.name, {}).get("note")
            failing.append(f"{r.label} on {', '.join(behind)}" + (f": {note}" if note else ""))
        rows.append([r.label, *cells, overall(mine).replace("**", "")])
    return markdown_table(headers, rows, align=["l"] + ["r"] * len(u.domains) + ["l"]), verdicts, failing


def target_universality(u: UnionResults) -> tuple[str, dict[str, Verdict]]:
    """Target 4: each non-SASRec student family gains from distillation on every domain (test
    NDCG@10 of the distilled row above the alone row; one seed each is enough)."""
    models = list(dict.fromkeys(r.model for r in u.rows if r.kind == "student" and r.model != "sasrec"))
    headers = ["Student", "Domain", "NDCG@10 alone", "NDCG@10 distilled", "Gain", "Gains"]
    rows, verdicts = [], {}
    for m in models:
        a, dist = u.student(m, "alone"), shipped(u, u.student(m, "distilled"))
        for d in u.domains:
            sa = a.stat(d) if a else None
            sd = dist.stat(d) if dist else None
            v = Verdict(None, PENDING) if sa is None or sd is None else Verdict(sd.mean > sa.mean)
            verdicts[f"{FAMILY_LABELS.get(m, m)} on {d}"] = v
            gain = None if sa is None or sd is None or sa.mean == 0 else 100.0 * (sd.mean - sa.mean) / sa.mean
            rows.append([FAMILY_LABELS.get(m, m), d, fmt_stat(sa), fmt_stat(sd),
                         DASH if gain is None else f"{gain:+.1f}%", v.text])
    return markdown_table(headers, rows, align=["l", "l", "r", "r", "r", "l"]), verdicts


@dataclass(frozen=True)
class Adoption:
    """The verdict of one ``adopt_over`` rule (§2.5): ``adopted`` is None while a seed is missing."""

    adopted: bool | None
    cand_mean: float | None  # seed mean of valid NDCG@10 (mean over domains)
    base_mean: float | None
    missing: tuple[str, ...]  # "<label> seed <n>[ (why)]" for each planned seed without a valid mean
    per_seed: dict[str, str]  # row name -> "seed: value, ..." for the table


def adoption(cand: Row, base: Row) -> Adoption:
    """Judge ``cand``'s rule over ``base``: adopted only if its seed mean of valid NDCG@10 (mean over
    domains, the selected epoch) is above ``base``'s, once both rows have every planned seed."""
    means, missing, per_seed = {}, [], {}
    for r in (cand, base):
        vals = {seed: split[MEAN][SELECT] for seed, split in r.valid.items() if MEAN in split}
        means[r.name] = statistics.fmean(vals.values()) if vals else None
        # a finished seed without a valid mean (an older record) cannot be judged either; say which
        why = {s: PENDING if s not in r.results else "no valid recorded" for s in r.planned if s not in vals}
        missing += [f"{r.label} seed {s}" + ("" if w == PENDING else f" ({w})") for s, w in why.items()]
        per_seed[r.name] = ", ".join(f"{s}: {vals[s]:.4f}" if s in vals else f"{s}: {why[s]}" for s in r.planned)
    c, b = means[cand.name], means[base.name]
    adopted = None if missing or c is None or b is None else c > b
    return Adoption(adopted, c, b, tuple(missing), per_seed)


def shipped(u: UnionResults, row: Row | None) -> Row | None:
    """The shipped recipe of ``row``: itself, or the row a rule of §2.5 adopted over it (followed again
    if another rule adopted a row over that one; the higher valid seed mean wins if two were adopted
    over the same row)."""
    while row is not None:
        adopted = [(a.cand_mean, r) for r in u.rows if r.adopt_over == row.name
                   and (a := adoption(r, row)).adopted]
        if not adopted:
            return row
        row = max(adopted, key=lambda x: x[0])[1]
    return row


def shipped_distilled(u: UnionResults) -> Row | None:
    """The shipped distilled joint SASRec (targets 1 and 2 judge it): the plan's distilled row or the
    row adopted over it."""
    return shipped(u, u.student(*DISTILLED))


def adoption_section(u: UnionResults) -> list[str]:
    """§2.5: each student whose plan entry has ``adopt_over`` (a rule fixed before its runs): it
    replaces that student as the shipped recipe only if its seed mean of valid NDCG@10 (mean over
    domains, the selected epoch) is above the other's. Judged once both rows have every planned seed;
    until then the verdict is *open* with the values so far. The test NDCG@10 of both is shown
    either way, for information only: the rule never looks at test."""
    rules = [(r, u.row(r.adopt_over)) for r in u.rows if r.adopt_over]
    if not rules:
        return []
    out = ["### 2.5 Rules fixed before the runs", "",
           "A row with a rule replaces the named row as the shipped recipe only if its seed mean of valid "
           f"{METRIC_LABELS[SELECT]} (the selected epoch, mean over {', '.join(u.domains)}) is above that row's. "
           "Test is shown beside it for information; the rule does not look at it. The targets of §2 judge "
           "the shipped recipe.", ""]
    headers = ["Row", "Valid NDCG@10 per seed (mean over domains)", "Seed mean"] + \
              [f"{d}: test NDCG@10" for d in u.domains]
    for cand, base in rules:
        a = adoption(cand, base)
        c, b = a.cand_mean, a.base_mean
        rows = [[r.label, a.per_seed[r.name], DASH if mean is None else f"{mean:.4f}"]
                + [fmt_stat(r.stat(d)) for d in u.domains] for r, mean in ((cand, c), (base, b))]
        if a.adopted is None:
            so_far = "" if c is None or b is None else f"; so far {c:.4f} against {b:.4f}"
            verdict = f"**open** (pending: {', '.join(a.missing)}{so_far})"
        else:
            verdict = ("**adopted**" if a.adopted else "**not adopted**") + f" ({c:.4f} against {b:.4f})"
        out += [f"{cand.label} over {base.label}: {verdict}", "",
                markdown_table(headers, rows, align=["l", "l", "r"] + ["r"] * len(u.domains)), ""]
    return out


def _caps(sizing: dict[str, Any]) -> str:
    """One line per stage: epochs, batch and the caps that make the teacher fit the CPU."""
    parts = []
    for name, st in (sizing.get("stages") or {}).items():
        bits = [f"{st.get('epochs')} ep, batch {st.get('batch_size')}"]
        for dom, n in (st.get("max_train_rows") or {}).items():
            bits.append(f"{dom} ≤ {n:,} rows")
        if st.get("max_steps_per_epoch"):
            bits.append(f"≤ {st['max_steps_per_epoch']:,} steps/epoch")
        parts.append(f"{name}: {', '.join(bits)}")
    return "; ".join(parts) or DASH


def _time_source(t: dict[str, Any]) -> str:
    """How the training time was measured, with the invocation count when there were several."""
    text = str(t.get("train_s_source") or DASH)
    n, failed = int(t.get("invocations") or 0), int(t.get("failed_invocations") or 0)
    if n > 1 or failed:
        text += f"; {n} invocations" + (f", {failed} failed" if failed else "")
    return text


def teacher_table(u: UnionResults) -> str:
    """Reproducibility facts of every teacher (rows and stages alike)."""
    headers = ["Teacher", "Config", "On the page", "Served", "Device", "Machine", "Training time", "Time measured by",
               "Params", "Checkpoint sha256 (first 16)", "Sizing"]
    rows = []
    for name, t in u.teachers.items():
        done = t.get("status") == "done"
        sha = t.get("checkpoint_sha256") or ""
        rows.append([f"{t.get('label', name)} (`{name}`)", f"`{t.get('config', '')}`",
                     "row" if t.get("row", True) else "stage of others", "yes" if t.get("served") else "no",
                     t.get("device") or (t.get("sizing") or {}).get("device") or DASH,
                     (t.get("machine", DASH) + (f" ({t['machine_source']})" if t.get("machine_source") else ""))
                     if done else PENDING,
                     fmt_duration(t.get("train_s")) if done else PENDING,
                     _time_source(t) if done else t.get("detail", PENDING),
                     fmt_int(t.get("params")) if done else DASH,
                     f"`{sha[:16]}`" if sha else (DASH if done else PENDING), _caps(t.get("sizing") or {})])
    return markdown_table(headers, rows, align=["l"] * 6 + ["r", "l", "r", "l", "l"])


def student_runs_table(u: UnionResults) -> str:
    """Every student seed: status, measured wall time, best epochs and parameters of its runs."""
    headers = ["Row", "Seed", "Status", "Wall time", "Time measured by", "Best epoch", "Parameters"]
    rows = []
    for name, s in u.students.items():
        for rec in s.get("seeds") or []:
            runs = [r for r in rec.get("runs") or [] if r.get("status") == "done"]
            sources = sorted({r.get("wall_s_source", "") for r in runs} - {""})
            rows.append([s.get("label", name), str(rec.get("seed")), rec.get("status", PENDING),
                         fmt_duration(rec.get("wall_s")) if rec.get("wall_s") is not None else
                         (PENDING if not runs else f"{fmt_duration(sum(r.get('wall_s') or 0 for r in runs))} so far"),
                         "; ".join(sources) or DASH,
                         ", ".join(str(r.get("best_epoch")) for r in runs) or DASH,
                         ", ".join(fmt_int(r.get("num_parameters")) for r in runs) or DASH])
    return markdown_table(headers, rows, align=["l", "r", "l", "r", "l", "r", "r"])


# ----------------------------------------------------------------------------- Figure 1


def figure_role(r: Row) -> str | None:
    """A row's style on Figure 1 (ckd.reporting.ROLE_STYLE): teachers, SASRec alone (per domain or
    joint) and every distilled student (variant "distilled" or "distilled, <what changed>"); None for
    the other rows (FM/DeepFM/LightGCN alone), which stay in the tables, as on docs/figure1.png."""
    if r.kind == "teacher":
        return "teacher"
    if r.variant == "distilled" or r.variant.startswith("distilled,"):  # also an ablation that may be adopted
        return "distilled"
    if r.model == "sasrec" and r.variant in (ALONE_PER_DOMAIN[1], JOINT_ALONE[1]):
        return "alone"
    return None


def union_figure_points(u: UnionResults, effs: dict[str, Efficiency]) -> dict[str, Any]:
    """What the union Figure 1 plots, one panel per domain of ``effs`` ({domain: the benchmark
    measured on it}, in order): every figure row with a measurement of its name and a test NDCG@10 on
    that domain (students: mean over finished seeds). Rows without either, and measured models
    that are no figure row, are listed under the panel's "skipped" with why. The sidecar dict."""
    if not effs:
        raise ReportError("union figure: no per-domain efficiency results")
    panels = []
    for domain, eff in effs.items():
        if domain not in u.domains:
            raise ReportError(f"{eff.source}: domain {domain!r} is not one of the plan's {u.domains}")
        measured_on = eff.extra.get("domain")
        if measured_on is not None and measured_on != domain:
            raise ReportError(f"{eff.source}: measured on {measured_on!r}, but given as the {domain!r} panel")
        by_name = {m.name: m for m in eff.models}
        points, skipped = [], []
        for r in u.rows:
            role = figure_role(r)
            if role is None:
                continue
            m, st = by_name.get(r.name), r.stat(domain)
            why = ("no inference measurement named so in " + eff.source if m is None else
                   f"its test NDCG@10 on {domain} is pending" if st is None else
                   "no positive inference time" if not m.infer_ms_per_1000_users > 0 else "")
            if why:
                skipped.append({"name": r.name, "label": r.label, "why": why})
                continue
            points.append({"name": r.name, "label": r.label, "role": role, "kind": m.kind,
                           "infer_ms_per_1000_users": m.infer_ms_per_1000_users, "ndcg@10": st.mean,
                           "ndcg@10_sd": st.sd, "seeds": st.n if r.kind == "student" else None,
                           "peak_memory_mb": m.peak_memory_mb, "params": m.params, "checkpoint": m.checkpoint})
        number_points(points)
        rows = {r.name: r for r in u.rows}
        for m in eff.models:
            r = rows.get(m.name)
            if r is None:
                skipped.append({"name": m.name, "label": m.name, "why": "measured, but no row of the page has this name"})
            elif figure_role(r) is None:
                skipped.append({"name": m.name, "label": r.label, "why": "measured, but not a figure row (tables only)"})
        panels.append({"domain": domain, "efficiency": eff.source, "efficiency_commit": eff.commit,
                       "machine": eff.machine, "device": eff.device, "points": points, "skipped": skipped})
    return {"kind": FORMAT, "metric": "test ndcg@10 (students: mean over finished seeds)",
            "x": "infer_ms_per_1000_users (log scale)", "area": "peak_memory_mb (one scale for every panel)",
            "union": u.source, "union_commit": u.commit, "panels": panels}


# The union panels hold up to a dozen points, several within a few percent of each other on both
# axes (the Games-whole teachers and the students), where no placement fits full captions. So each
# point carries its number (1 = highest NDCG@10 of its panel) and the captions are a key under it.
KEY_LINE_IN = 0.15     # height of one key line (fontsize 7)
KEY_PAD_IN = 0.25      # between the x-axis label and the key


# Offsets for short tags (a point's number): a tight ring first, so a tag sits by its own point;
# tags from TAG_LEADER_FROM on are further out and get a thin leader line to their point.
TAG_OFFSETS = [(5, 3), (5, -13), (-5, 3), (-5, -13), (9, -5), (-9, -5), (0, 9), (0, -19),
               (14, 12), (-14, 12), (14, -24), (-14, -24), (20, -5), (-20, -5)]
TAG_LEADER_FROM = 8


def key_height_in(lines: int) -> float:
    """Inches under the panels for a key of ``lines`` lines."""
    return KEY_PAD_IN + KEY_LINE_IN * lines


def union_png_size(panels: int, key_lines: int) -> tuple[int, int]:
    """(width, height) in pixels of the union Figure 1 with ``panels`` panels side by side and a key
    of ``key_lines`` lines (the most points of any panel) under them."""
    return (round(FIGURE_SIZE_IN[0] * panels * FIGURE_DPI),
            round((FIGURE_SIZE_IN[1] + key_height_in(key_lines)) * FIGURE_DPI))


def number_points(points: list[dict[str, Any]]) -> None:
    """Give each point of a panel its ``number``, the tag on the panel and its line in the key:
    1 = highest test NDCG@10 (ties by name), so the numbers read as a ranking."""
    order = sorted(range(len(points)), key=lambda i: (-points[i]["ndcg@10"], points[i]["name"]))
    for n, i in enumerate(order, start=1):
        points[i]["number"] = n


def key_line(p: dict[str, Any]) -> str:
    """One line of a panel's key: number, row label, test NDCG@10 (± sd over seeds where there are
    several), peak memory and inference time."""
    ndcg = fmt_stat(Stat(p["ndcg@10"], p.get("ndcg@10_sd"), p.get("seeds") or 1))
    return (f"{p['number']:>2}  {p['label']}: {ndcg}, {fmt_mb(p['peak_memory_mb'])} MB, "
            f"{fmt_ms(p['infer_ms_per_1000_users'])} ms")


def draw_union_figure(sidecar: dict[str, Any], path: str | Path) -> list[list[tuple[float, ...]]]:
    """Draw ``union_figure_points``' panels side by side in one PNG (each as docs/figure1.png's
    single panel; one circle-area scale for all), each point tagged with its ``number``
    (``number_points``) and the captions in a key under its panel. A panel with nothing measured says so. Returns the
    tag boxes per panel (pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sidecar["panels"]
    every = [p for panel in panels for p in panel["points"]]
    if not every:
        raise ReportError(f"union figure: nothing to plot ({[pn['skipped'] for pn in panels]})")
    scale = MAX_AREA_PT2 / (max(p["peak_memory_mb"] for p in every) or 1.0)
    key_lines = max(len(panel["points"]) for panel in panels)
    width_px, height_px = union_png_size(len(panels), key_lines)
    fig, axes = plt.subplots(1, len(panels), dpi=FIGURE_DPI, squeeze=False,
                             figsize=(width_px / FIGURE_DPI, height_px / FIGURE_DPI))
    legends = []
    for ax, panel in zip(axes[0], panels):
        if panel["points"]:
            legends.append(plot_panel(ax, panel["points"], panel["domain"], scale))
        else:
            ax.set_title(f"{panel['domain']}: no measured row yet", fontsize=10)
            ax.text(0.5, 0.5, "nothing measured (see the sidecar's skipped)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="0.4")
            legends.append(None)
    where = sorted({f"device: {pn['device']} · machine: {pn['machine']}" for pn in panels})
    fig.text(0.01, 0.01, "  |  ".join(where)[:240], fontsize=6, color="0.4")
    height_in = height_px / FIGURE_DPI
    key_frac = key_height_in(key_lines) / height_in
    fig.tight_layout(rect=(0, 0.03 + key_frac, 1, 1))
    boxes = []
    for ax, panel, leg in zip(axes[0], panels, legends):
        pts = panel["points"]
        boxes.append(place_labels(fig, ax, pts, avoid=[leg] if leg else [], texts=[str(p["number"]) for p in pts],
                                  offsets=TAG_OFFSETS, leader_from=TAG_LEADER_FROM))
        lines = [key_line(p) for p in sorted(pts, key=lambda p: p["number"])]
        fig.text(ax.get_position().x0, 0.03 + key_frac - KEY_PAD_IN / 2 / height_in,
                 "\n".join(lines), fontsize=7, va="top", ha="left", linespacing=1.25)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, metadata={"Software": None})
    plt.close(fig)
    return boxes


def _checkpoint_for(entry: dict[str, Any], domain: str) -> str:
    """``<run_dir>/best`` of a student's first planned seed on ``domain`` (for a per-domain row, the
    run trained on that domain). Inference cost does not depend on the seed."""
    for rec in entry.get("seeds") or []:
        runs = rec.get("runs") or []
        mine = [r for r in runs if r.get("domains") == [domain]] or \
               [r for r in runs if domain.lower() in str(r.get("run_dir", "")).lower()] or \
               (runs if len(runs) == 1 else [])
        if mine and mine[0].get("run_dir"):
            return f"{mine[0]['run_dir']}/best"
    return "<run_dir>/seed<N>/best"


def efficiency_out(domain: str) -> str:
    """Where the benchmark of ``domain`` goes: results/efficiency_union_<domain>.json."""
    return f"results/efficiency_union_{domain.lower()}.json"


def figure_models(u: UnionResults, domain: str) -> list[tuple[str, str, str]]:
    """``(flag, name, checkpoint)`` of every figure row measured on ``domain``, teachers first, in the
    plan's order: what benchmarks/inference.py is given (``flag`` is ``--teacher`` or ``--student``)."""
    models = [("--teacher", r.name, f"{u.teachers[r.name].get('run_dir') or f'runs/union/teachers/{r.name}'}/best")
              for r in u.rows if figure_role(r) == "teacher"]
    return models + [("--student", r.name, _checkpoint_for(u.students[r.name], domain))
                     for r in u.rows if r.kind == "student" and figure_role(r)]


def benchmark_command(u: UnionResults, domain: str, out: str | None = None,
                      models: list[tuple[str, str, str]] | None = None) -> str:
    """The benchmarks/inference.py command measuring ``models`` (default: every figure row of the page)
    on ``domain``, written to ``out`` (default: the committed results/efficiency_union_<domain>.json)."""
    models = figure_models(u, domain) if models is None else models
    parts = ["python -m benchmarks.inference", *[f"{flag} {name}={ckpt}" for flag, name, ckpt in models],
             f"--domain {domain}", f"--out {out or efficiency_out(domain)}"]
    return " \\\n    ".join(parts)


def figure_domains(u: UnionResults) -> list[str]:
    """The figure's panels: Scientific and Games when the union has both, else its first two domains."""
    doms = [d for d in FIGURE_DOMAINS if d in u.domains]
    return doms if len(doms) == len(FIGURE_DOMAINS) else u.domains[:2]


def _pending_note(u: UnionResults, intro: str) -> list[str]:
    """How to produce the figure's inputs: the benchmark commands and the manifest lines to add."""
    doms = figure_domains(u)
    manifest = ["    efficiency:"] + [f"      {d}: {efficiency_out(d)}" for d in doms] + \
               [f"    figure: {FIGURE_PATH}"]
    return [intro, "",
            "Measure every figure row on each domain (teachers, SASRec alone, the distilled students; a "
            "teacher's domains come from its run directory's config.yaml; one fresh process per model):", "",
            "```bash", *[benchmark_command(u, d) for d in doms], "```", "",
            "Hook: once those files exist, add to this page's entry in results/MANIFEST.yaml (tests/test_report.py "
            "requires every file it names to exist) and run `ckd-report --page docs/results_union.md`:", "",
            "```yaml", *manifest, "```", ""]


def _measurement_table(u: UnionResults, eff: Efficiency, domains: list[str]) -> str:
    by_name = {r.name: r for r in u.rows}
    headers = ["Model", "Kind", "Row", "Params", "Peak memory (MB)", "Inference ms / 1,000 users"] + \
              [f"Test NDCG@10 {d}" for d in domains]
    rows = []
    for m in eff.models:
        r = by_name.get(m.name)
        rows.append([m.name, m.kind, r.label if r else DASH, fmt_int(m.params), fmt_mb(m.peak_memory_mb),
                     fmt_ms(m.infer_ms_per_1000_users)] + [fmt_stat(r.stat(d)) if r else DASH for d in domains])
    return markdown_table(headers, rows, align=["l", "l", "l"] + ["r"] * (len(headers) - 3))


def efficiency_section(u: UnionResults, eff: Efficiency | None = None, effs: dict[str, Efficiency] | None = None,
                       figure_link: str | None = None, sidecar: dict[str, Any] | None = None) -> list[str]:
    """Section 6, Figure 1. With per-domain benchmarks (``effs``): the figure (``figure_link``,
    drawn from ``sidecar``), then per domain its measurements beside the rows' test NDCG@10 and the
    rows left off the figure. With one benchmark (``eff``, no domain keys): its measurements beside
    every domain's NDCG@10, no figure. With neither: pending, with the commands and manifest lines."""
    out = ["## 6. Figure 1: accuracy, inference time and memory", ""]
    if effs:
        if figure_link and sidecar is not None:
            out += [f"![Figure 1 on {' and '.join(effs)}: test NDCG@10 vs inference time, circle area = peak "
                    f"memory]({figure_link})", "",
                    "One panel per domain: x = inference ms per 1,000 users (full ranking of the domain's catalogue, "
                    "log scale), y = test NDCG@10 on that domain (students: mean over their finished seeds), circle "
                    "area = peak memory (one scale for both panels). Red: teachers; grey: SASRec alone; blue: "
                    "distilled students. Each point carries its number in the key under its panel (1 = highest "
                    "NDCG@10 there). Plotted values: the sidecar JSON beside the PNG.", ""]
        else:
            out += ["No figure file is set for this page (`figure:`); the measurements per domain:", ""]
        skipped = {pn["domain"]: pn["skipped"] for pn in (sidecar or {}).get("panels", [])}
        for d, e in effs.items():
            out += [f"### {d}", "", _source_block(e.commit, e.machine, e.created, [e.command], e.source, e.device), "",
                    _measurement_table(u, e, [d]), ""]
            if skipped.get(d):
                out += ["Not on the figure: " + "; ".join(f"{s['label']} ({s['why']})" for s in skipped[d]) + ".", ""]
        return out
    if eff is None:
        return out + _pending_note(u, "**Pending:** the figure is drawn once the per-domain inference benchmarks "
                                      "below exist; none is given for this page yet.")
    return out + [_source_block(eff.commit, eff.machine, eff.created, [eff.command], eff.source, eff.device), "",
                  _measurement_table(u, eff, u.domains), ""] + \
        _pending_note(u, "This single benchmark is listed beside every row; the figure needs one benchmark per domain.")


# ----------------------------------------------------------------------------- page


def _verdict(c: dict[str, Any]) -> str:
    """A retrain check's verdict line: the rule on every domain, and whether the bytes are the same."""
    return (f"within {c['tolerance']} on every domain: **{'yes' if c['within_tolerance'] else 'no'}**; "
            f"same checkpoint bytes: {'yes' if c['same_checkpoint_bytes'] else 'no'}")


def _check_rows(label: str, c: dict[str, Any]) -> list[list[str]]:
    """A retrain check's table rows, one per domain."""
    return [[label, d, fmt_metric(v["recorded"]), fmt_metric(v["retrained"]), f"{v['abs_diff']:.4f}",
             "yes" if v["within_tolerance"] else "no"] for d, v in c["per_domain"].items()]


def retrain_check_lines(u: UnionResults) -> list[str]:
    """§3's seeded-training check: each teacher the plan trains again from its config, and each teacher
    trained here over a recorded run of the same config (its ``supersedes``), its test NDCG@10 per
    domain against the recorded run's, within the tolerance or not."""
    checks = u.retrain_checks
    superseded = {n: t["supersedes"] for n, t in u.teachers.items() if t.get("supersedes")}
    if not checks and not superseded:
        return []
    out = ["### Retrain check", "",
           "A teacher trained again from its committed config (`python -m research.retrain_check` compares the "
           "two); seeded training should land within the tolerance of the recorded test NDCG@10 on every "
           "domain.", ""]
    rows = []
    for c in checks:
        if c.get("status") != "done":
            out += [f"- {c['label']}: *pending*; train it with `{c['command']}`."]
            continue
        rows += _check_rows(c["label"], c)
        out += [f"- {c['label']}: {_verdict(c)}; retrained at `{c.get('retrained_commit')}` in "
                f"{fmt_duration(c.get('retrain_time_s'))} (`{c['command']}`)"
                + (f"; recorded on {c['recorded_machine']}, retrained on {c['retrained_machine']}"
                   if c.get("retrained_machine") else "") + "."]
    for name, sup in superseded.items():
        t = u.teachers[name]
        # (the run that replaced it, the replaced run), newest first down the nested history
        chain = [(t, sup)]
        while chain[-1][1].get("supersedes"):
            chain.append((chain[-1][1], chain[-1][1]["supersedes"]))
        for i, (by, link) in enumerate(chain):
            label = f"{t.get('label', name)} ({'an earlier retrain' if i else 'retrained in place'})"
            was = (f"recorded on {link.get('machine')} at `{link.get('trained_commit')}` (checkpoint "
                   f"`{str(link.get('checkpoint_sha256') or '')[:16]}`), retrained in its run directory on "
                   f"{by.get('machine')} at `{by.get('trained_commit')}` in {fmt_duration(by.get('train_s'))}")
            tail = " That run was replaced in turn (above)." if i else " The page's rows are this run's."
            if not link.get("comparable"):
                out += [f"- {label}: {was}; not comparable: {link.get('why')}."]
                continue
            rows += _check_rows(label, link)
            out += [f"- {label}: {_verdict(link)}; {was}.{tail}"]
    out += [""]
    if rows:
        out += [markdown_table(["Teacher", "Domain", "Recorded NDCG@10", "Retrained NDCG@10", "|Δ|", "Within"], rows,
                               align=["l", "l", "r", "r", "r", "l"]), ""]
    return out


def render_union_page(u: UnionResults, eff: Efficiency | None = None, generated_by: str = "ckd-report",
                      generated_at: str = "", draft: bool = False, effs: dict[str, Efficiency] | None = None,
                      figure_link: str | None = None, sidecar: dict[str, Any] | None = None) -> str:
    """The whole page. ``generated_at``/``draft`` as for ckd.reporting.render_report; ``eff``,
    ``effs``, ``figure_link`` and ``sidecar`` as for ``efficiency_section``."""
    at = ""
    if generated_at:
        at = f" at commit `{generated_at}`" + (" plus uncommitted changes" if draft else "")
    doms = ", ".join(u.domains)
    out = ["# Results", ""]
    if draft:
        out += ["**Draft:** generated from a working tree with uncommitted changes; regenerate it from a "
                "clean tree (`ckd-report`) before citing it.", ""]
    out += [f"Generated by `{generated_by}`{at} from `{u.source}`"
            + "".join(f" and `{e.source}`" for e in ([eff] if eff else []) + list((effs or {}).values()))
            + ". Do not edit by hand: rerun the command.",
            f"One student for every domain: teachers trained on the union of [{doms}] (one global item id "
            f"space), the joint SASRec student distilled from them, and its baselines; the runs of `{u.plan}` "
            "(`python -m research.union run`, then `python -m research.union collect`).",
            "All metrics: test split, leave-one-out, full ranking over the user's domain (UniSRec/RecBole "
            "protocol); model selection on valid NDCG@10. Students: mean ± sample sd over their finished seeds "
            "(the count beside it); one seed: its value. Rows not finished yet read *pending*.", ""]
    commands = [t.get("command", "") for t in u.teachers.values()] + \
               [c for s in u.students.values() for c in s.get("commands") or []]
    out += ["## 1. Test results per domain", "",
            _source_block(u.commit, u.machine, u.created, [u.command] + commands, u.source), ""]
    carried = carried_note({"teachers": u.teachers, "students": u.students, "retrain_checks": u.retrain_checks})
    if carried:
        out += [carried, ""]
    for d in u.domains:
        out += [f"### {d}", "", domain_table(u, d), ""]
    out += ["### Mean over domains", "",
            f"Unweighted mean of {doms} per run (per seed for students), then over seeds; a run without "
            "every domain has no mean.", "", domain_table(u, MEAN), ""]

    t1, v1 = target_vs_baselines(u)
    t2, v2 = target_vs_best_teacher(u)
    t3, v3, failing = target_teachers_vs_alone(u)
    t4, v4 = target_universality(u)
    out += ["## 2. Targets", "",
            f"Every verdict below is computed from the tables above (test {METRIC_LABELS[SELECT]}); *open* means "
            "a row it needs is pending, or has too few seeds to judge.", "",
            *shipped_line(u),
            f"1. The distilled joint SASRec beats per-domain SASRec alone and the joint SASRec without teachers on "
            f"every domain, by more than the seed spread: {overall(v1)}",
            f"2. It reaches or beats the best teacher on every domain: {overall(v2)}",
            f"3. Every teacher beats per-domain SASRec alone on every domain: {overall(v3)}",
            f"4. FM, DeepFM and LightGCN each gain from distillation on every domain: {overall(v4)}", "",
            "### 2.1 Distilled joint SASRec vs the students without teachers", "",
            "Δ = mean NDCG@10 of the distilled row minus the baseline's; spread = the larger sample sd of the two "
            "rows over their seeds; it beats the baseline when Δ > spread.", "", t1, "",
            "### 2.2 Distilled joint SASRec vs the best teacher", "", t2, "",
            "### 2.3 Each teacher vs per-domain SASRec alone", "",
            "Δ = the teacher's NDCG@10 minus the mean of SASRec alone (one model per domain) over its seeds.", "",
            t3, ""]
    if failing:
        out += ["Not beating per-domain SASRec alone: " + "; ".join(failing) + ".", ""]
    out += ["### 2.4 FM, DeepFM and LightGCN: distilled vs alone", "",
            "Gain = (distilled − alone) / alone; each row trained on the joint set.", "", t4, ""]
    out += adoption_section(u)

    rt = u.retrain
    n_teachers, finished = len(rt.get("teachers") or u.teachers), int(rt.get("finished") or 0)
    so_far = "" if finished == n_teachers else f" so far ({finished} of {n_teachers} teachers finished)"
    out += ["## 3. Teachers: reproducibility", "",
            "Training time = the sum of the wall times of the training invocations recorded in the run "
            "directory (invocations.jsonl); where there are none, or the per-epoch times the run recorded sum to "
            "more (part of the training ran unrecorded), those per-epoch times, a lower bound (said so in the "
            "row).", "",
            teacher_table(u), "",
            "Retrain every teacher on a fresh clone (each resumes from its run directory if interrupted):", "",
            "```bash", rt.get("command") or "python -m research.union run --only " + ",".join(u.teachers), "```", "",
            "On a lent CUDA machine the same steps run as one prepared command, `bash gpu/union.sh` (its header "
            "says what to carry and how to unpack what comes back). Run directories stay on the machine that "
            "trained them; results recorded elsewhere are carried into a new collect while their inputs are "
            "unchanged (§1), but a distilled student needs its teachers' checkpoints on its own machine, so "
            "`python -m research.union run` trains those again there.", "",
            f"Measured: {'at least ' if rt.get('train_s_lower_bound') else ''}{fmt_duration(rt.get('train_s'))} "
            f"of training wall time{so_far}"
            + (f", on {'; '.join(rt.get('machines') or [])}" if rt.get("machines") else "")
            + (f" (device: {', '.join(rt.get('devices') or [])})" if rt.get("devices") else "") + ".", ""]
    out += retrain_check_lines(u)
    out += ["## 4. Students: runs", "",
            "Wall time of a seed = the sum over its runs (SASRec alone: one per domain) of their training "
            "invocations.", "", student_runs_table(u), ""]
    out += ["## 5. Pending", ""]
    out += ([f"- {p}" for p in u.pending] if u.pending else ["Nothing: every run of the plan has finished."]) + [""]
    out += efficiency_section(u, eff, effs, figure_link, sidecar)
    return "\n".join(out)
