"""The "every domain" experiment (issue 20): train every step of configs/union/plan.yaml, then
collect what has finished into one JSON that docs/results_union.md is rendered from.

    python -m research.union run [--only NAME,...] [--seeds 2024 7] [--dry-run]
    python -m research.union collect --out results/experiments_union.json [--overwrite]
    ckd-report --page docs/results_union.md

``run`` trains the plan in order: the teachers, then each student entry x seed x run, with the
commands a user types (teacher: ``ckd-train-teacher --config C --run-dir R``; student:
``ckd-distill --config C --run-dir R/seed<N> [--teachers none] --set train.seed=<N>``). A step
whose run directory holds metrics.json is skipped, and so, without ``--only``, is a step that the
committed results JSON records from another machine (``--results``), unless a step still to run
needs it as a teacher (its checkpoint must be here); an unfinished one is started again and the entry
point resumes it from its run directory, so an interrupted ``run`` is continued by running it
again. A step being trained by another process (found by its ``--run-dir`` in /proc) is left to
it, and a step whose prerequisites (the pre-training a teacher starts from, the teachers a distilled
student is served) have not finished waits for the next ``run``. Each invocation appends
``{"start", "end", "rc", "command", "machine"}`` to ``<run dir>/invocations.jsonl`` (epoch
seconds: the measured training time) and logs to ``runs/union/logs/<run>[_seed<N>].log``.

``collect`` reads whatever has finished; the rest is listed as pending. Run directories are
git-ignored and stay on the machine that trained them; on another machine ``collect`` keeps each
finished entry of the JSON it replaces whose run directory is not here, marked ``carried``, while
every committed file it depends on (config, deploy spec, the served teachers' configs) is unchanged
since it was recorded (research/carry.py). Retrain every teacher on a fresh clone with
``python -m research.union run --only <the plan's teachers>`` (the page prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckd.reporting import METRICS, carried_entries, fmt_duration
from ckd.run_dir import EXECUTION_KEYS, read_run_header
from ckd.union_report import FORMAT, SELECT
from research.carry import carry, load_previous
from research.plan_schema import PlanError, distinct_ints, entry_mapping, need

REPO = Path(__file__).resolve().parents[1]  # the checkout: the plan's paths are relative to it
PLAN = "configs/union/plan.yaml"
DEFAULT_OUT = "results/experiments_union.json"
SCHEMA = 1
TEACHER_KEYS = {"name", "label", "config", "run_dir", "row", "served", "note"}
STUDENT_KEYS = {"name", "label", "group", "model", "variant", "teachers", "seeds", "runs", "note", "adopt_over"}



# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TeacherPlan:
    name: str
    label: str
    config: str
    run_dir: str
    row: bool = True  # a row of the page (False: a stage of other teachers, e.g. the pre-training)
    served: bool = False  # served to the distilled students
    note: str = ""


@dataclass(frozen=True)
class StudentPlan:
    name: str
    label: str
    group: str
    model: str
    variant: str
    teachers_none: bool  # trained with --teachers none
    seeds: tuple[int, ...]
    runs: tuple[tuple[str, str], ...]  # (config, run_dir); the seed's directory is <run_dir>/seed<N>
    note: str = ""
    # A rule fixed before the runs: this row replaces the student named here as the shipped recipe
    # only if its seed mean of the selected epochs' valid NDCG@10 (mean over the plan's domains) is
    # above that student's (judged by ckd.union_report.adoption_section once both have every seed).
    adopt_over: str = ""


@dataclass(frozen=True)
class Plan:
    domains: tuple[str, ...]
    teachers: tuple[TeacherPlan, ...]
    students: tuple[StudentPlan, ...]
    source: str = PLAN
    # Teachers trained again from their committed config into another run directory, to check that
    # training is seeded: (teacher name, retrained run directory).
    retrain_checks: tuple[tuple[str, str], ...] = ()

    def names(self) -> list[str]:
        return [t.name for t in self.teachers] + [s.name for s in self.students]

    @property
    def logs_dir(self) -> str:
        """``<common parent of the run directories>/logs`` (runs/union/logs for the committed plan)."""
        dirs = [t.run_dir for t in self.teachers] + [r for s in self.students for _, r in s.runs]
        return (Path(os.path.commonpath(dirs)) / "logs").as_posix()


def parse_plan(raw: Any, source: str = PLAN) -> Plan:
    """Validate the plan's parsed YAML: unknown keys, repeated names or run directories, and
    malformed seeds or runs are errors naming the entry."""
    if not isinstance(raw, dict):
        raise PlanError(f"{source}: expected a mapping with domains, teachers and students")
    unknown = set(raw) - {"domains", "teachers", "students", "retrain_checks"}
    if unknown:
        raise PlanError(f"{source}: unknown top-level keys {sorted(unknown)}")
    domains = raw.get("domains")
    if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
        raise PlanError(f"{source}: 'domains' must be a non-empty list of domain names")
    teachers, students, names, dirs = [], [], set(), set()

    def claim(name: str, run_dirs: list[str], where: str) -> None:
        if name in names:
            raise PlanError(f"{where}: name {name!r} is used twice")
        names.add(name)
        for d in run_dirs:
            if d in dirs:
                raise PlanError(f"{where}: run_dir {d} is used twice")
            dirs.add(d)

    for i, t in enumerate(raw.get("teachers") or []):
        where = f"{source}: teachers[{i}]"
        entry_mapping(t, TEACHER_KEYS, where)
        tp = TeacherPlan(name=need(t, "name", where), label=need(t, "label", where),
                         config=need(t, "config", where), run_dir=need(t, "run_dir", where).rstrip("/"),
                         row=bool(t.get("row", True)), served=bool(t.get("served", False)),
                         note=str(t.get("note", "")))
        claim(tp.name, [tp.run_dir], where)
        teachers.append(tp)
    for i, s in enumerate(raw.get("students") or []):
        where = f"{source}: students[{i}]"
        entry_mapping(s, STUDENT_KEYS, where)
        name = need(s, "name", where)
        where = f"{source}: student {name}"
        seeds = distinct_ints(need(s, "seeds", where, list), "seeds", where)
        runs = need(s, "runs", where, list)
        if not runs:
            raise PlanError(f"{where}: 'runs' must list at least one {{config, run_dir}}")
        pairs = []
        for j, r in enumerate(runs):
            if not isinstance(r, dict) or set(r) != {"config", "run_dir"}:
                raise PlanError(f"{where}: runs[{j}] must be {{config, run_dir}}, got {r!r}")
            pairs.append((need(r, "config", f"{where}: runs[{j}]"),
                          need(r, "run_dir", f"{where}: runs[{j}]").rstrip("/")))
        teachers_value = s.get("teachers")
        if teachers_value not in (None, "none"):
            raise PlanError(f"{where}: 'teachers' is 'none' (trained alone) or absent (the served teachers)")
        sp = StudentPlan(name=name, label=need(s, "label", where), group=need(s, "group", where),
                         model=need(s, "model", where), variant=need(s, "variant", where),
                         teachers_none=teachers_value == "none", seeds=tuple(seeds), runs=tuple(pairs),
                         note=str(s.get("note", "")), adopt_over=str(s.get("adopt_over") or ""))
        claim(name, [r for _, r in pairs], where)
        students.append(sp)
    if not teachers and not students:
        raise PlanError(f"{source}: no teachers and no students")
    student_names = [sp.name for sp in students]
    for sp in students:
        if sp.adopt_over and (sp.adopt_over == sp.name or sp.adopt_over not in student_names):
            raise PlanError(f"{source}: student {sp.name}: adopt_over {sp.adopt_over!r} is not another student "
                            f"of the plan ({', '.join(n for n in student_names if n != sp.name)})")
    checks = []
    for i, c in enumerate(raw.get("retrain_checks") or []):
        where = f"{source}: retrain_checks[{i}]"
        entry_mapping(c, {"teacher", "run_dir"}, where)
        name, run_dir = need(c, "teacher", where), need(c, "run_dir", where).rstrip("/")
        if name not in {t.name for t in teachers if t.row}:
            raise PlanError(f"{where}: {name!r} is not a teacher row of the plan")
        claim(f"retrain check {i}", [run_dir], where)
        checks.append((name, run_dir))
    return Plan(domains=tuple(domains), teachers=tuple(teachers), students=tuple(students), source=source,
                retrain_checks=tuple(checks))


def load_plan(path: str | os.PathLike[str], label: str | None = None) -> Plan:
    """Read and validate the plan YAML."""
    from research.plan_files import read_plan_yaml

    return parse_plan(read_plan_yaml(path, label, PlanError), label or str(path))


# ----------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """One invocation target: a teacher, or one run of a student entry at one seed."""

    kind: str  # "teacher" | "student"
    name: str  # the plan entry's name
    config: str
    run_dir: str  # where metrics.json lands
    seed: int | None = None
    teachers_none: bool = False
    extra: tuple[str, ...] = ()  # --set KEY=VALUE added by `run --set`

    @property
    def argv(self) -> list[str]:
        """The entry point's arguments, in the order the queue and the configs' comments use."""
        if self.kind == "teacher":
            argv = ["ckd-train-teacher", "--config", self.config, "--run-dir", self.run_dir]
        else:
            argv = ["ckd-distill", "--config", self.config, "--run-dir", self.run_dir]
            if self.teachers_none:
                argv += ["--teachers", "none"]
            argv += ["--set", f"train.seed={self.seed}"]
        for item in self.extra:
            argv += ["--set", item]
        return argv

    @property
    def command(self) -> str:
        """As a user types it: the console script, paths relative to the checkout."""
        return shlex.join(self.argv)

    @property
    def log_name(self) -> str:
        """The log file's name, as the queue names it: <run>[_seed<N>].log."""
        base = Path(self.run_dir).name if self.kind == "teacher" else Path(self.run_dir).parent.name
        return f"{base}_seed{self.seed}.log" if self.seed is not None else f"{base}.log"

    def describe(self) -> str:
        if self.kind == "teacher":
            return f"teacher {self.name}"
        return f"student {self.name} seed {self.seed} ({Path(self.run_dir).parent.name})"


def plan_steps(plan: Plan, only: list[str] | None = None, seeds: list[int] | None = None,
               extra: list[str] | None = None) -> list[Step]:
    """The plan's steps in training order: teachers, then students x seeds x runs; ``only``: entry
    names to keep; ``seeds``: the students' seeds to keep (teachers have none)."""
    if only:
        unknown = sorted(set(only) - set(plan.names()))
        if unknown:
            raise PlanError(f"--only {','.join(unknown)}: not in {plan.source}; its entries: {', '.join(plan.names())}")
    keep = set(only or plan.names())
    ex = tuple(extra or ())
    steps = [Step("teacher", t.name, t.config, t.run_dir, extra=ex) for t in plan.teachers if t.name in keep]
    for s in plan.students:
        if s.name not in keep:
            continue
        for seed in s.seeds:
            if seeds and seed not in seeds:
                continue
            steps += [Step("student", s.name, c, f"{r}/seed{seed}", seed, s.teachers_none, ex) for c, r in s.runs]
    if not steps:
        raise PlanError("no step selected (check --only and --seeds against the plan)")
    return steps


def prerequisites(plan: Plan, step: Step, root: Path) -> list[TeacherPlan]:
    """The teachers ``step`` needs finished first: for a teacher, those whose run directory one of
    its stages starts from (``init_from``); for a distilled student, the teachers its deploy spec
    (service.spec) serves, else the plan's ``served`` teachers."""
    from ckd.config import load_yaml

    cfg_path = root / step.config
    cfg = load_yaml(cfg_path) if cfg_path.is_file() else {}
    if step.kind == "teacher":
        sources = [str(s.get("init_from") or "") for s in (cfg.get("train") or {}).get("stages") or []]
    elif step.teachers_none:
        return []
    else:
        spec = ((cfg.get("service") or {}).get("spec") or "")
        spec_path = root / spec if spec else None
        if spec_path is None or not spec_path.is_file():
            return [t for t in plan.teachers if t.served]
        sources = [str(t.get("checkpoint") or "") for t in (load_yaml(spec_path).get("teachers") or [])]

    def under(src: str, run_dir: str) -> bool:
        src = os.path.normpath(src)
        return src == os.path.normpath(run_dir) or src.startswith(os.path.normpath(run_dir) + os.sep)

    return [t for t in plan.teachers if t.name != step.name and any(under(s, t.run_dir) for s in sources if s)]


def input_files(plan: Plan, step: Step, root: Path) -> list[str]:
    """The committed files a step's result depends on: its config, its deploy spec (a distilled
    student), and, recursively, the input files of the teachers it starts from or is served
    (``prerequisites``). A result is carried to a fresh machine only while all of them are unchanged."""
    from ckd.config import load_yaml

    out = [step.config]
    if step.kind == "student" and not step.teachers_none:
        cfg_path = root / step.config
        spec = ((load_yaml(cfg_path) if cfg_path.is_file() else {}).get("service") or {}).get("spec")
        if spec:
            out.append(str(spec))
    for t in prerequisites(plan, step, root):
        out += input_files(plan, Step("teacher", t.name, t.config, t.run_dir), root)
    return list(dict.fromkeys(out))


def is_done(root: Path, run_dir: str) -> bool:
    return (root / run_dir / "metrics.json").is_file()


def running_elsewhere(root: Path, run_dir: str) -> int | None:
    """The pid of another process whose command line trains ``run_dir`` (``--run-dir`` with that
    directory, relative to its own working directory), or None. Linux /proc; elsewhere None."""
    target = (root / run_dir).resolve()
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--run-dir" not in argv:
                continue
            value = argv[argv.index(b"--run-dir") + 1].decode()
            cwd = Path(os.readlink(entry / "cwd"))
        except (OSError, IndexError, ValueError):
            continue  # gone, or not ours to read
        if (cwd / value).resolve() == target:
            return int(entry.name)
    return None


# ----------------------------------------------------------------------------- measured time


def read_invocations(run_dir: Path) -> list[dict[str, Any]]:
    """The invocation records of a run directory (empty when it has no invocations.jsonl); a line
    that is not a JSON object with start/end is an error naming the file and line."""
    path = run_dir / "invocations.jsonl"
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{path}:{i}: not JSON ({exc})") from exc
        if not isinstance(rec, dict) or not {"start", "end"} <= set(rec):
            raise PlanError(f"{path}:{i}: expected an object with start and end, got {line!r}")
        out.append(rec)
    return out


def history_seconds(metrics: dict[str, Any]) -> tuple[float, str]:
    """Training time from metrics.json alone, and what it covers: a teacher's per-epoch train_s +
    eval_s over the stages recorded; a student's per-epoch train_s plus its timing.eval_s."""
    if "stages" in metrics:
        stages = metrics.get("stages") or {}
        total = sum(float(h.get("train_s", 0)) + float(h.get("eval_s", 0))
                    for st in stages.values() for h in st.get("history") or [])
        return total, f"history train_s+eval_s of stage(s) {', '.join(stages) or 'none'}"
    total = sum(float(h.get("train_s", 0)) for h in metrics.get("history") or [])
    total += float((metrics.get("timing") or {}).get("eval_s", 0) or 0)
    return total, "history train_s + timing.eval_s"


def measured_time(run_dir: Path, metrics: dict[str, Any] | None) -> dict[str, Any]:
    """``{"seconds", "source", "lower_bound", "invocations", "failed_invocations", "machines"}``: the
    sum of the invocations' wall times when invocations.jsonl exists, else the metrics' history (said
    so). When the history's per-epoch times sum to more than the invocations (part of the training ran
    outside ``research.union run``: before it, or in a continuation it did not launch), the history is
    the better record; it excludes start-up and the final evaluation, so it is a lower bound."""
    inv = read_invocations(run_dir)
    hist = history_seconds(metrics) if metrics is not None else None
    if inv:
        failed = sum(1 for r in inv if r.get("rc", 0) != 0)
        machines = list(dict.fromkeys(str(r["machine"]) for r in inv if r.get("machine")))
        out = {"seconds": round(sum(float(r["end"]) - float(r["start"]) for r in inv), 1),
               "source": "invocations.jsonl (sum of wall times)", "lower_bound": False, "invocations": len(inv),
               "failed_invocations": failed, "machines": machines}
        if hist is not None and hist[0] > out["seconds"]:
            out.update(seconds=round(hist[0], 1), lower_bound=True,
                       source=f"{hist[1]}, more than the {len(inv)} recorded invocation(s)' "
                              f"{fmt_duration(out['seconds'])}: part of the training ran unrecorded (a lower "
                              "bound: excludes start-up and the final evaluation)")
        return out
    if hist is None:
        return {"seconds": None, "source": "not run", "lower_bound": False, "invocations": 0,
                "failed_invocations": 0, "machines": []}
    return {"seconds": round(hist[0], 1), "source": f"no invocations.jsonl: {hist[1]} (excludes start-up and the "
            "final evaluation)", "lower_bound": True, "invocations": 0, "failed_invocations": 0, "machines": []}


# ----------------------------------------------------------------------------- run


def machine_for(device: str) -> str:
    """research.experiments.machine_description, never failing (a CUDA device without torch.cuda
    is described, not probed)."""
    from research.experiments import machine_description

    try:
        return machine_description(device)
    except Exception:  # noqa: BLE001 - a description must not stop a run
        return machine_description("cpu") + f", device {device} (name not read)"


def step_device(root: Path, step: Step) -> str:
    """train.device of the step: a --set override, else the config's, else cpu."""
    from ckd.config import load_yaml

    for item in reversed(step.extra):
        if item.startswith("train.device="):
            return item.split("=", 1)[1] or "cpu"
    path = root / step.config
    cfg = load_yaml(path) if path.is_file() else {}
    return str(((cfg.get("train") or {}).get("device")) or "cpu")


def _dur(seconds: float | None) -> str:
    return "unknown" if seconds is None else fmt_duration(seconds)


def _script(name: str) -> list[str]:
    """The console script next to this interpreter, else its module (same entry point)."""
    exe = Path(sys.executable).parent / name
    if exe.is_file():
        return [str(exe)]
    module = {"ckd-train-teacher": "launch.train_teacher", "ckd-distill": "launch.distill"}[name]
    return [sys.executable, "-m", module]


@dataclass
class Estimator:
    """Expected wall time of a step: from steps finished here (the same run at another seed, else the
    same student entry), else from the times the committed results JSON recorded for the same run
    directory or another seed of it (maybe on another machine: what a fresh clone has), else unknown
    (teachers differ too much for one to predict another)."""

    seconds: dict[Step, float] = field(default_factory=dict)
    recorded: dict[str, float] = field(default_factory=dict)  # run_dir -> seconds in the results JSON

    def record(self, step: Step, seconds: float | None) -> None:
        if seconds is not None and seconds > 0:
            self.seconds[step] = seconds

    def record_previous(self, previous: dict[str, Any] | None) -> None:
        """Take each run's recorded time from a results JSON (collect's format): a teacher's
        ``train_s``, a student run's ``wall_s``. Entries without a usable time are skipped."""
        def keep(run_dir: Any, seconds: Any) -> None:
            if isinstance(run_dir, str) and isinstance(seconds, (int, float)) and seconds > 0:
                self.recorded[run_dir] = float(seconds)

        for t in _values(previous, "teachers"):
            keep(t.get("run_dir"), t.get("train_s"))
        for s in _values(previous, "students"):
            for rec in s.get("seeds") or []:
                for r in (rec.get("runs") or []) if isinstance(rec, dict) else []:
                    if isinstance(r, dict):
                        keep(r.get("run_dir"), r.get("wall_s"))

    def estimate(self, step: Step) -> float | None:
        if step.kind == "teacher":  # one finished here is skipped, never estimated
            return self.recorded.get(step.run_dir)
        base = str(Path(step.run_dir).parent)
        same_run = [s for k, s in self.seconds.items() if k.kind == "student" and str(Path(k.run_dir).parent) == base]
        same_entry = [s for k, s in self.seconds.items() if k.kind == "student" and k.name == step.name]
        exact = [self.recorded[step.run_dir]] if step.run_dir in self.recorded else []
        recorded_run = [s for d, s in self.recorded.items() if str(Path(d).parent) == base]
        for pool in (same_run, same_entry, exact, recorded_run):
            if pool:
                return statistics.median(pool)
        return None

    def eta(self, steps: list[Step]) -> str:
        known = [e for e in (self.estimate(s) for s in steps) if e is not None]
        unknown = len(steps) - len(known)
        if not steps:
            return "nothing left"
        text = f"~{fmt_duration(sum(known))} for {len(known)} step(s)" if known else ""
        if unknown:
            text += (" + " if text else "") + f"{unknown} step(s) without an estimate yet"
        return text


def _values(data: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The mapping entries of ``data[key]`` (a results JSON section), or none."""
    section = (data or {}).get(key)
    return [v for v in section.values() if isinstance(v, dict)] if isinstance(section, dict) else []


def _last_log_line(run_dir: Path) -> str:
    """The last line of the run's own train.log (epoch progress), for the heartbeat."""
    try:
        lines = (run_dir / "train.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].split(" INFO ", 1)[-1][:160] if lines else ""


def run_step(root: Path, step: Step, logs: Path, heartbeat_s: float = 600.0, tag: str = "") -> tuple[int, float]:
    """Invoke one step (its log appended to), record the invocation, return (rc, seconds). Every
    ``heartbeat_s`` a line says how long it has run and what its train.log says last."""
    run_dir = root / step.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    cmd = _script(step.argv[0]) + step.argv[1:]
    machine = machine_for(step_device(root, step))
    start = time.time()
    with open(logs / step.log_name, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} research.union: {step.command}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=heartbeat_s if heartbeat_s > 0 else None)
                    break
                except subprocess.TimeoutExpired:
                    print(f"{tag or step.describe()}: running for {fmt_duration(time.time() - start)}; "
                          f"{_last_log_line(run_dir) or 'no train.log line yet'}", flush=True)
        except KeyboardInterrupt:
            # Ctrl-C reaches the child too (same process group): let it save and stop, then record.
            try:
                rc = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            _append_invocation(run_dir, start, rc, step.command, machine)
            raise
    _append_invocation(run_dir, start, rc, step.command, machine)
    return rc, time.time() - start


def _append_invocation(run_dir: Path, start: float, rc: int, command: str, machine: str) -> None:
    rec = {"start": round(start, 1), "end": round(time.time(), 1), "rc": rc, "command": command,
           "machine": machine, "by": "python -m research.union run"}
    with open(run_dir / "invocations.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _result_line(root: Path, step: Step) -> str:
    try:
        test = json.loads((root / step.run_dir / "metrics.json").read_text())["test"]
        return "test NDCG@10 " + " ".join(f"{d}={v['ndcg@10']:.4f}" for d, v in test.items())
    except (OSError, KeyError, TypeError, ValueError):
        return "no metrics.json"


def recorded_elsewhere(plan: Plan, root: Path, previous: dict[str, Any] | None) -> set[str]:
    """Run directories of the plan not finished here whose results ``previous`` (the committed JSON,
    research.carry.load_previous) holds and a collect would carry: finished work from another machine."""
    if previous is None:
        return set()
    data = collect(plan, root, previous=previous)
    out = {t["run_dir"] for t in data["teachers"].values() if t.get("carried")}
    out |= {r["run_dir"] for s in data["students"].values() for rec in s["seeds"] for r in rec["runs"]
            if r.get("carried")}
    return out


def needed_teachers(plan: Plan, steps: list[Step], root: Path) -> set[str]:
    """Run directories of the teachers ``steps`` need (prerequisites, recursively) that are not
    finished here: their checkpoints must exist on this machine, whatever a results JSON records."""
    need: set[str] = set()
    todo = list(steps)
    while todo:
        for t in prerequisites(plan, todo.pop(), root):
            if t.run_dir not in need and not is_done(root, t.run_dir):
                need.add(t.run_dir)
                todo.append(Step("teacher", t.name, t.config, t.run_dir))
    return need


def cmd_run(args: argparse.Namespace, root: Path) -> int:
    plan = load_plan(root / args.plan, args.plan)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    steps = plan_steps(plan, only, args.seeds, args.overrides)
    # Without --only, work recorded on another machine (the committed results JSON) is not repeated,
    # except the teachers that a step still to run is served or starts from: their checkpoints are
    # needed here. --only trains what it names.
    recorded: set[str] = set()
    try:
        previous = load_previous(root / args.results)
    except PlanError:
        if not only:
            raise  # what is recorded elsewhere cannot be told: the user must fix the JSON first
        previous = None  # --only needs the JSON for its estimates alone
    if not only:
        recorded = recorded_elsewhere(plan, root, previous)
        pending_here = [s for s in steps if not is_done(root, s.run_dir) and s.run_dir not in recorded]
        recorded -= needed_teachers(plan, pending_here, root)
    logs = root / (args.logs or plan.logs_dir)
    est = Estimator()
    est.record_previous(previous)  # a fresh clone's estimates: the times the committed JSON recorded
    for s in plan_steps(plan):  # what has finished already informs the estimates
        if is_done(root, s.run_dir):
            m = json.loads((root / s.run_dir / "metrics.json").read_text())
            est.record(s, measured_time(root / s.run_dir, m)["seconds"])
    todo = [s for s in steps if not is_done(root, s.run_dir) and s.run_dir not in recorded]
    n_rec = sum(s.run_dir in recorded for s in steps)
    print(f"{plan.source}: {len(steps)} step(s) selected, {len(steps) - len(todo) - n_rec} finished here, {n_rec} "
          f"recorded from another machine, {len(todo)} to run "
          f"({est.eta(todo)}); logs in {logs.relative_to(root) if logs.is_relative_to(root) else logs}", flush=True)
    failed, waiting, elsewhere = [], [], []
    would_run: set[str] = set()  # --dry-run: steps that would have finished before the later ones start
    for i, step in enumerate(steps, 1):
        tag = f"[{i:>{len(str(len(steps)))}}/{len(steps)}] {step.describe()}"
        if is_done(root, step.run_dir):
            print(f"{tag}: finished, skipped", flush=True)
            continue
        if step.run_dir in recorded:
            print(f"{tag}: recorded in {args.results} (trained on another machine), skipped; "
                  f"`--only {step.name}` trains it again", flush=True)
            continue
        pid = running_elsewhere(root, step.run_dir)
        if pid is not None:
            print(f"{tag}: being trained by pid {pid}, left to it", flush=True)
            elsewhere.append(step)
            continue
        missing = [t.name for t in prerequisites(plan, step, root)
                   if not is_done(root, t.run_dir) and t.run_dir not in would_run]
        if missing:
            print(f"{tag}: waits for {', '.join(missing)} (not finished on this machine: the checkpoint is needed "
                  f"here; add it to --only, or run without --only); run again once it is", flush=True)
            waiting.append(step)
            continue
        rest = [s for s in steps[i:] if not is_done(root, s.run_dir)]
        if args.dry_run:
            would_run.add(step.run_dir)
            print(f"{tag}: would run `{step.command}` (expected {_dur(est.estimate(step))})", flush=True)
            continue
        print(f"{tag}: start {time.strftime('%H:%M')} `{step.command}` (this step {_dur(est.estimate(step))}; "
              f"after it {est.eta(rest)})", flush=True)
        rc, secs = run_step(root, step, logs, args.heartbeat * 60, tag)
        if rc == 0 and is_done(root, step.run_dir):
            est.record(step, secs)
            print(f"{tag}: finished in {fmt_duration(secs)}: {_result_line(root, step)}", flush=True)
        else:
            failed.append(step)
            print(f"{tag}: FAILED (exit {rc}) after {fmt_duration(secs)}; see {logs / step.log_name}", flush=True)
    left = failed + waiting + elsewhere
    if args.dry_run:
        return 0
    if left:
        print(f"not finished: {', '.join(s.describe() for s in left)}; `python -m research.union run` again "
              "resumes them", flush=True)
        return 1
    print("every selected step has finished; next: python -m research.union collect --out " + DEFAULT_OUT, flush=True)
    return 0


# ----------------------------------------------------------------------------- collect


def _rel(path: str, root: Path) -> str:
    """A path as the JSON shows it: repository-relative when it is inside ``root``."""
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return str(p)
    return p.as_posix()


def split_over_domains(metrics: dict[str, Any], split: str,
                       domains: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The plan's domains of one split that carry every metric, with 'mean' = the unweighted mean over
    the plan's domains when every one is there (the page's "mean over domains")."""
    got = metrics.get(split) or {}
    out = {d: {m: float(got[d][m]) for m in METRICS} for d in domains
           if isinstance(got.get(d), dict) and all(m in got[d] for m in METRICS)}
    if len(out) == len(domains):
        out["mean"] = {m: statistics.fmean(out[d][m] for d in domains) for m in METRICS}
    return out


def _machine(timing: dict[str, Any], device: str, here: str) -> tuple[str, str]:
    """(machine, how it is known): recorded by the invocations, else the box collect runs on."""
    if timing["machines"]:
        return "; ".join(timing["machines"]), "recorded at training"
    if device.startswith("cuda"):
        return f"GPU box (train.device={device}; machine not recorded)", "config"
    return here, "not recorded at training: the machine collect ran on"


def _sizing(run_dir: Path, config: Path) -> dict[str, Any]:
    """The teacher's CPU sizing from its resolved config (run dir, else the plan's config): per
    stage, the epochs, row caps and step caps that differ from "everything"."""
    from ckd.config import load_yaml

    src = run_dir / "config.yaml" if (run_dir / "config.yaml").is_file() else config
    if not src.is_file():
        return {}
    train = load_yaml(src).get("train") or {}
    out: dict[str, Any] = {"device": str(train.get("device") or "cpu")}
    for st in train.get("stages") or []:
        caps = {k: st[k] for k in ("max_train_rows", "max_steps_per_epoch") if st.get(k)}
        caps["epochs"] = st.get("epochs") or train.get("epochs")
        caps["batch_size"] = st.get("batch_size") or train.get("batch_size")
        out.setdefault("stages", {})[st.get("name", "train")] = caps
    return out


def collect_teacher(t: TeacherPlan, plan: Plan, root: Path, here: str,
                    previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A teacher's entry from its run directory; when that has not finished here, its finished entry
    of the ``previous`` results JSON (research.carry), unless its config changed since."""
    entry = _collect_teacher_here(t, plan, root, here)
    prev = ((previous or {}).get("teachers") or {}).get(t.name)
    if entry["status"] == "done":
        return _with_superseded(entry, prev, t, root)
    if not prev or prev.get("status") != "done" \
            or (prev.get("config"), prev.get("run_dir")) != (t.config, t.run_dir):
        return entry
    got = _same_plan(previous, plan) or carry(prev, previous or {}, root, input_files(
        plan, Step("teacher", t.name, t.config, t.run_dir), root))
    if isinstance(got, str):
        return {**entry, "detail": f"{entry['detail']}; a recorded result was not carried: {got}"}
    # what the plan says about the teacher is today's plan, not the recorded one's
    got.update({k: entry[k] for k in ("label", "row", "served", "command")})
    got.pop("note", None)
    return {**got, **({"note": t.note} if t.note else {})}


def _with_superseded(entry: dict[str, Any], prev: dict[str, Any] | None, t: TeacherPlan,
                     root: Path) -> dict[str, Any]:
    """A teacher finished here that replaces another recorded run of the same step (e.g. one trained on
    another machine, whose students' results the page still shows) keeps that run's facts under
    ``supersedes``, with the retrain check of the two (research.retrain_check.compare_to_entry), and
    that run's own ``supersedes`` nested inside. The same run collected again keeps what it superseded;
    a rebuild that gave the same checkpoint bytes is another run (``_same_run``), recorded as a retrain
    (same_checkpoint_bytes true) rather than merged into the run it reproduced."""
    if not prev or prev.get("status") != "done" or (prev.get("config"), prev.get("run_dir")) != (t.config, t.run_dir):
        return entry
    if _same_run(prev, entry):
        return {**entry, **({"supersedes": prev["supersedes"]} if prev.get("supersedes") else {})}
    from research.retrain_check import RetrainCheckError, compare_to_entry

    facts = {"machine": prev.get("machine"),
             "trained_commit": prev.get("trained_commit") or (prev.get("carried") or {}).get("from_commit"),
             "checkpoint_sha256": prev.get("checkpoint_sha256"), "train_s": prev.get("train_s"),
             "best_epoch": prev.get("best_epoch"),
             # a run that had itself replaced an older one keeps that history (nested, newest first):
             # students carried from before a retrain may rest on one of those older checkpoints
             **({"supersedes": prev["supersedes"]} if prev.get("supersedes") else {})}
    try:
        r = compare_to_entry(prev, root / t.run_dir, root)
    except RetrainCheckError as exc:
        return {**entry, "supersedes": {**facts, "comparable": False, "why": str(exc)}}
    return {**entry, "supersedes": {
        **facts, "comparable": True, "tolerance": r["tolerance"], "within_tolerance": r["within_tolerance"],
        "same_checkpoint_bytes": r["same_checkpoint_bytes"],
        "best_epoch": {"recorded": r["best_epoch"]["recorded"], "retrained": r["best_epoch"]["retrained"]},
        "per_domain": {d: {"recorded": v[SELECT]["recorded"], "retrained": v[SELECT]["retrained"],
                           "abs_diff": v[SELECT]["abs_diff"], "within_tolerance": v["within_tolerance"]}
                       for d, v in r["per_domain"].items()}}}


def _same_run(prev: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a recorded teacher entry and one collected here are the same training run: the same
    checkpoint bytes from the same commit, time and invocations. Equal bytes alone are not enough:
    a seeded rebuild on the same machine can reproduce a checkpoint bit for bit, and that rebuild is
    the strongest retrain check there is, so it is kept, not folded into the run it reproduced."""
    keys = ("checkpoint_sha256", "trained_commit", "train_s", "invocations")
    if all(prev.get(k) == entry.get(k) for k in keys):
        return True
    # A clean-tree rebuild with the same bytes as a run recorded from a dirty tree verifies that
    # unverifiable record: it takes the record's place instead of sitting above it as a retrain.
    return (prev.get("checkpoint_sha256") == entry.get("checkpoint_sha256")
            and str(prev.get("trained_commit") or "").endswith("-dirty")
            and not str(entry.get("trained_commit") or "").endswith("-dirty"))


def _same_plan(previous: dict[str, Any] | None, plan: Plan) -> str:
    """Why nothing of ``previous`` may be carried into a collect of ``plan`` (other domains), or ''."""
    if list((previous or {}).get("domains") or []) != list(plan.domains):
        return (f"the recorded results cover domains {(previous or {}).get('domains')}, the plan "
                f"{list(plan.domains)}")
    return ""


def _collect_teacher_here(t: TeacherPlan, plan: Plan, root: Path, here: str) -> dict[str, Any]:
    run_dir = root / t.run_dir
    step = Step("teacher", t.name, t.config, t.run_dir)
    entry: dict[str, Any] = {"label": t.label, "config": t.config, "command": step.command, "run_dir": t.run_dir,
                             "row": t.row, "served": t.served}
    if t.note:
        entry["note"] = t.note
    mpath = run_dir / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.is_file() else None
    timing = measured_time(run_dir, metrics)
    sizing = _sizing(run_dir, root / t.config)
    device = sizing.get("device", "cpu")
    entry["sizing"] = sizing
    if metrics is None:
        entry["status"] = "pending"
        entry["detail"] = _pending_detail(run_dir, timing)
        return entry
    check_run_config(t.config, t.run_dir, root)
    test = split_over_domains(metrics, "test", plan.domains)
    missing = [d for d in plan.domains if d not in test]
    if missing:
        raise PlanError(f"{mpath}: no test results for {missing} (the plan's domains are {list(plan.domains)})")
    machine, machine_source = _machine(timing, device, here)
    entry.update({
        "status": "done", "kind": metrics.get("kind"), "checkpoint": _rel(str(metrics.get("checkpoint", "")), root),
        "trained_commit": read_run_header(run_dir).get("git_sha"),
        "checkpoint_sha256": metrics.get("checkpoint_sha256"), "vocab_hash": metrics.get("vocab_hash"),
        "params": metrics.get("params"), "best_epoch": metrics.get("best_epoch"), "device": device,
        "train_s": timing["seconds"], "train_s_source": timing["source"],
        "train_s_lower_bound": timing["lower_bound"], "invocations": timing["invocations"],
        "failed_invocations": timing["failed_invocations"], "machine": machine, "machine_source": machine_source,
        "stages": {n: {"best_epoch": s.get("best_epoch"), "epochs_run": len(s.get("history") or []),
                       "train_s": round(sum(float(h.get("train_s", 0)) + float(h.get("eval_s", 0))
                                            for h in s.get("history") or []), 1)}
                   for n, s in (metrics.get("stages") or {}).items()},
        "valid": split_over_domains(metrics, "valid", plan.domains), "test": test,
    })
    return entry


def contradictions(raw: Any, resolved: Any, at: str = "") -> list[str]:
    """Where a run's resolved config contradicts the config file it was meant to train: every leaf
    the file sets (lists by position) must hold the same value in the run's config.yaml, except the
    EXECUTION_KEYS: `research.union run --set train.device=cuda` (a lent GPU) or more threads must not
    make its result another recipe's."""
    if at in EXECUTION_KEYS:
        return []
    if isinstance(raw, dict):
        if not isinstance(resolved, dict):
            return [f"{at or '/'}: a mapping in the config, {resolved!r} in the run"]
        return [c for k, v in raw.items() for c in contradictions(v, resolved.get(k, _ABSENT), f"{at}.{k}".lstrip("."))]
    if isinstance(raw, list) and isinstance(resolved, list) and len(raw) == len(resolved):
        return [c for i, (a, b) in enumerate(zip(raw, resolved)) for c in contradictions(a, b, f"{at}[{i}]")]
    if raw == resolved and isinstance(raw, bool) == isinstance(resolved, bool):  # True is not 1 here
        return []
    return [f"{at}: {raw!r} in the config, " + ("absent" if resolved is _ABSENT else f"{resolved!r}") + " in the run"]


_ABSENT = object()


def check_run_config(config: str, run_dir: str, root: Path, seed: int | None = None) -> None:
    """A finished run directory must hold the run its plan entry names: its config.yaml agrees with
    every setting of the committed ``config`` (and ``train.seed`` = ``seed`` for a student); else a
    PlanError naming the run directory and the settings, so another run's numbers never reach the page."""
    import yaml

    from ckd.config import load_yaml

    path = root / run_dir / "config.yaml"
    if not path.is_file():
        raise PlanError(f"{path} not found beside metrics.json: cannot tell which config the run trained")
    raw = load_yaml(root / config)  # over its base:, as the run resolved it
    if seed is not None:
        raw = {**raw, "train": {**(raw.get("train") or {}), "seed": seed}}
    bad = contradictions(raw, yaml.safe_load(path.read_text()) or {})
    if bad:
        raise PlanError(f"{run_dir}/config.yaml is not the run of {config}" + (f" seed {seed}" if seed is not None
                        else "") + ": " + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))


def _pending_detail(run_dir: Path, timing: dict[str, Any]) -> str:
    if not run_dir.is_dir():
        return "not started"
    if timing["invocations"]:
        return (f"started, not finished ({timing['invocations']} invocation(s) so far, "
                f"{timing['failed_invocations']} failed, {fmt_duration(timing['seconds'])})")
    return "started, not finished"


def collect_student(s: StudentPlan, plan: Plan, root: Path,
                    previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A student row: per seed, each run's result from its run directory or, when that has not
    finished here, carried from the ``previous`` results JSON (research.carry)."""
    entry: dict[str, Any] = {"label": s.label, "group": s.group, "model": s.model, "variant": s.variant,
                             "teachers": "none" if s.teachers_none else "served",
                             "configs": [c for c, _ in s.runs], "run_dirs": [r for _, r in s.runs],
                             "commands": [], "seeds": []}
    if s.note:
        entry["note"] = s.note
    if s.adopt_over:
        entry["adopt_over"] = s.adopt_over
    prev_entry = ((previous or {}).get("students") or {}).get(s.name) or {}
    prev_seeds = {r.get("seed"): r for r in prev_entry.get("seeds") or []}
    for seed in s.seeds:
        rec: dict[str, Any] = {"seed": seed, "runs": []}
        test: dict[str, dict[str, float]] = {}
        valid: dict[str, dict[str, float]] = {}
        owner: dict[str, str] = {}
        for config, base in s.runs:
            step = Step("student", s.name, config, f"{base}/seed{seed}", seed, s.teachers_none)
            entry["commands"].append(step.command)
            run_dir = root / step.run_dir
            mpath = run_dir / "metrics.json"
            metrics = json.loads(mpath.read_text()) if mpath.is_file() else None
            timing = measured_time(run_dir, metrics)
            run: dict[str, Any] = {"config": config, "run_dir": step.run_dir, "command": step.command}
            if metrics is None:
                run.update(status="pending", detail=_pending_detail(run_dir, timing))
                run = _carried_run(run, prev_seeds.get(seed), previous, root, plan, step)
            else:
                check_run_config(config, step.run_dir, root, seed)
                got = [d for d in plan.domains if d in (metrics.get("test") or {})]
                if not got:
                    raise PlanError(f"{mpath}: test results for none of the plan's domains {list(plan.domains)}")
                run.update(status="done", domains=got, wall_s=timing["seconds"], wall_s_source=timing["source"],
                           invocations=timing["invocations"], failed_invocations=timing["failed_invocations"],
                           machines=timing["machines"], best_epoch=metrics.get("best_epoch"),
                           epochs_run=metrics.get("epochs_run"), num_parameters=metrics.get("num_parameters"),
                           peak_rss_mb=(metrics.get("peak_memory_mb") or {}).get("rss"),
                           steps_per_s=(metrics.get("timing") or {}).get("steps_per_s"),
                           test={d: {m: float(metrics["test"][d][m]) for m in METRICS} for d in got},
                           valid={d: {m: float(metrics["valid"][d][m]) for m in METRICS}
                                  for d in got if d in (metrics.get("valid") or {})})
            if run["status"] == "done":
                for d in run["domains"]:
                    if d in owner:
                        raise PlanError(f"{s.name} seed {seed}: {d} is in both {owner[d]} and {step.run_dir}")
                    owner[d] = step.run_dir
                    test[d] = run["test"][d]
                    if d in run["valid"]:
                        valid[d] = run["valid"][d]
            rec["runs"].append(run)
        done = [r for r in rec["runs"] if r["status"] == "done"]
        rec["status"] = "done" if len(done) == len(rec["runs"]) else ("partial" if done else "pending")
        for split, values in (("test", test), ("valid", valid)):
            ordered = {d: values[d] for d in plan.domains if d in values}
            if len(ordered) == len(plan.domains):
                ordered["mean"] = {m: statistics.fmean(ordered[d][m] for d in plan.domains) for m in METRICS}
            rec[split] = ordered
        rec["wall_s"] = round(sum(r["wall_s"] for r in done), 1) if rec["status"] == "done" and all(
            r["wall_s"] is not None for r in done) else None
        entry["seeds"].append(rec)
    return entry


def _carried_run(run: dict[str, Any], prev_rec: dict[str, Any] | None, previous: dict[str, Any] | None,
                 root: Path, plan: Plan, step: Step) -> dict[str, Any]:
    """``run`` (pending here) replaced by the same run's finished record in ``prev_rec`` (one seed of
    the previous JSON), with its per-domain test/valid metrics (older JSON kept them per seed only)."""
    prev = next((r for r in (prev_rec or {}).get("runs") or [] if r.get("run_dir") == run["run_dir"]), None)
    if not prev or prev.get("status") != "done" or (prev.get("config"), prev.get("command")) != (
            run["config"], run["command"]):
        return run
    got = _same_plan(previous, plan) or carry(prev, previous or {}, root, input_files(plan, step, root))
    if isinstance(got, str):
        return {**run, "detail": f"{run['detail']}; a recorded result was not carried: {got}"}
    for split in ("test", "valid"):
        if split not in got:
            per_seed = (prev_rec or {}).get(split) or {}
            got[split] = {d: per_seed[d] for d in got["domains"] if d in per_seed}
        if split == "test" and set(got[split]) != set(got["domains"]):
            return {**run, "detail": f"{run['detail']}; the recorded result lacks test metrics of {got['domains']}"}
    return got


def collect_retrain_check(plan: Plan, name: str, run_dir: str, root: Path, previous: dict[str, Any] | None = None,
                          teachers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A teacher of the plan trained again from its config into ``run_dir``, against the recorded
    run (research.retrain_check); pending until both have finished here, unless the ``previous``
    results JSON holds this check finished (research.carry). When the recorded run directory is not
    here, the retrain is compared with the recorded entry of ``teachers`` (collect's teacher entries)."""
    got = _collect_retrain_check_here(plan, name, run_dir, root, teachers)
    prev = next((c for c in (previous or {}).get("retrain_checks") or []
                 if (c.get("teacher"), c.get("run_dir"), c.get("command")) == (name, run_dir, got["command"])), None)
    # only beside the recorded teacher it was checked against: a teacher trained here is another one
    if got["status"] == "done" or not prev or prev.get("status") != "done" \
            or not ((teachers or {}).get(name) or {}).get("carried"):
        return got
    t = next(t for t in plan.teachers if t.name == name)
    kept = carry(prev, previous or {}, root, input_files(plan, Step("teacher", name, t.config, t.run_dir), root))
    return got if isinstance(kept, str) else {**kept, "label": t.label}


def _collect_retrain_check_here(plan: Plan, name: str, run_dir: str, root: Path,
                                teachers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from research.retrain_check import RetrainCheckError, compare, compare_to_entry

    t = next(t for t in plan.teachers if t.name == name)
    entry: dict[str, Any] = {"teacher": name, "label": t.label, "run_dir": run_dir,
                             "command": Step("teacher", name, t.config, run_dir).command}
    recorded = (teachers or {}).get(name) or {}
    here = (root / t.run_dir / "metrics.json").is_file()
    if not ((here or recorded.get("status") == "done") and (root / run_dir / "metrics.json").is_file()):
        return {**entry, "status": "pending"}
    try:
        r = compare(root / t.run_dir, root / run_dir) if here else compare_to_entry(recorded, root / run_dir, root)
    except RetrainCheckError as exc:
        raise PlanError(f"retrain check of {name}: {exc}") from exc
    return {**entry, "status": "done", "tolerance": r["tolerance"], "within_tolerance": r["within_tolerance"],
            "same_checkpoint_bytes": r["same_checkpoint_bytes"], "retrained_commit": r["retrained_commit"],
            "retrain_time_s": r["retrain_time_s"], "retrain_time_source": r["retrain_time_source"],
            **{k: r[k] for k in ("recorded_machine", "retrained_machine") if k in r},
            "per_domain": {d: {"recorded": v["ndcg@10"]["recorded"], "retrained": v["ndcg@10"]["retrained"],
                               "abs_diff": v["ndcg@10"]["abs_diff"], "within_tolerance": v["within_tolerance"]}
                           for d, v in r["per_domain"].items()}}


def collect(plan: Plan, root: Path, command: str = "", previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The union results JSON (see ckd.union_report for the format) from the run directories, with
    the finished entries of ``previous`` (the JSON it replaces) whose run directories are not here."""
    from ckd.run_dir import git_sha

    here = machine_for("cpu")
    teachers = {t.name: collect_teacher(t, plan, root, here, previous) for t in plan.teachers}
    students = {s.name: collect_student(s, plan, root, previous) for s in plan.students}
    pending = [f"teacher {n} ({t['run_dir']}): {t['detail']}" for n, t in teachers.items() if t["status"] != "done"]
    for n, s in students.items():
        for rec in s["seeds"]:
            pending += [f"student {n} seed {rec['seed']} ({r['run_dir']}): {r['detail']}"
                        for r in rec["runs"] if r["status"] != "done"]
    checks = [collect_retrain_check(plan, name, run_dir, root, previous, teachers)
              for name, run_dir in plan.retrain_checks]
    pending += [f"retrain check of teacher {c['teacher']} ({c['run_dir']}): not finished; train it with "
                f"`{c['command']}`" for c in checks if c["status"] != "done"]
    done_t = [t for t in teachers.values() if t["status"] == "done"]
    retrain = {"command": "python -m research.union run --only " + ",".join(teachers),
               "teachers": list(teachers), "finished": len(done_t),
               "train_s": round(sum(t["train_s"] or 0 for t in done_t), 1) if done_t else None,
               "train_s_lower_bound": any(t.get("train_s_lower_bound") for t in done_t),
               "machines": list(dict.fromkeys(t["machine"] for t in done_t)),
               "devices": list(dict.fromkeys(t["device"] for t in done_t))}
    return {"kind": FORMAT, "schema": SCHEMA, "plan": plan.source, "domains": list(plan.domains),
            "commit": git_sha(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": here,
            "command": command, "retrain_teachers": retrain, "retrain_checks": checks, "teachers": teachers,
            "students": students,
            "pending": pending}


def cmd_collect(args: argparse.Namespace, root: Path) -> int:
    from ckd.reporting import results_out_path, write_results_json

    out = results_out_path(args.out, root, args.overwrite)
    if out is None:
        return 2
    plan = load_plan(root / args.plan, args.plan)
    shown = "python -m research.union " + (f"--plan {args.plan} " if args.plan != PLAN else "")
    data = collect(plan, root, shown + f"collect --out {args.out}", load_previous(out))
    write_results_json(out, data)
    n_seeds = sum(len(s["seeds"]) for s in data["students"].values())
    done_seeds = sum(rec["status"] == "done" for s in data["students"].values() for rec in s["seeds"])
    done_t = sum(t["status"] == "done" for t in data["teachers"].values())
    print(f"written {args.out}: {done_t}/{len(data['teachers'])} teachers, {done_seeds}/{n_seeds} student seeds "
          f"finished; {len(data['pending'])} run(s) pending; {len(carried_entries(data))} result(s) carried "
          f"from the previous {args.out} (run directories not on this machine)")
    return 0


def cmd_figure_commands(args: argparse.Namespace, root: Path) -> int:
    """Print the inference benchmarks behind Figure 1, one per figure domain, from the collected results:
    each writes under runs/bench/ and is then copied into results/, so the second benchmark's commit is
    not marked dirty by the first one's output (benchmarks/inference.py records the tree's state)."""
    from ckd.union_report import benchmark_command, efficiency_out, figure_domains, figure_models, parse_union

    u = parse_union(json.loads((root / args.results).read_text()), args.results)
    for domain in figure_domains(u):
        models = figure_models(u, domain)
        absent = [name for _, name, ckpt in models if not (root / ckpt).is_dir()]
        if args.present_only:
            models = [m for m in models if m[1] not in absent]
            if absent:
                print(f"# {domain}: left out, no checkpoint on this machine: {', '.join(absent)}")
        elif absent:
            print(f"# {domain}: no checkpoint on this machine for {', '.join(absent)} (--present-only leaves them out)")
        staged = f"runs/bench/{Path(efficiency_out(domain)).name}"
        print(benchmark_command(u, domain, out=staged, models=models) + " --overwrite")
        print(f"cp {staged} {efficiency_out(domain)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m research.union", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO), help="repository root the plan's paths are relative to")
    ap.add_argument("--plan", default=PLAN, help=f"the plan, relative to --root (default {PLAN})")
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="train every missing step of the plan, in order")
    r.add_argument("--only", default="", help="comma list of plan entries (teachers or students) to train")
    r.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="the students' seeds to train (default: the plan's)")
    r.add_argument("--dry-run", action="store_true", help="print each step's state and command; train nothing")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="added to every command (e.g. train.device=cuda on a lent GPU); recorded in invocations.jsonl")
    r.add_argument("--heartbeat", type=float, default=10.0, metavar="MINUTES",
                   help="while a step runs, print its elapsed time and last train.log line this often (0: never)")
    r.add_argument("--logs", default=None, help="log folder (default <runs>/logs, runs/union/logs for the plan)")
    r.add_argument("--results", default=DEFAULT_OUT,
                   help=f"the committed results JSON whose recorded runs a run without --only skips (default {DEFAULT_OUT})")
    c = sub.add_parser("collect", help="write the results JSON from the finished run directories")
    c.add_argument("--out", default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    f = sub.add_parser("figure-commands", help="print the inference benchmarks behind Figure 1 (commit, then run them)")
    f.add_argument("--results", default=DEFAULT_OUT, help=f"the collected results JSON (default {DEFAULT_OUT})")
    f.add_argument("--present-only", action="store_true",
                   help="leave out the rows whose checkpoint is not on this machine (carried results)")
    args = ap.parse_args(given)
    root = Path(args.root).resolve()
    try:
        if args.what == "run":
            return cmd_run(args, root)
        if args.what == "figure-commands":
            return cmd_figure_commands(args, root)
        return cmd_collect(args, root)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the step's run directory keeps its progress; run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
