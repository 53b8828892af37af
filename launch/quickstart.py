"""The demo (`make demo` / `ckd-demo`): teachers, the student alone and the student distilled, in one table.

Steps, each a subprocess run from the repository root, as the plan (configs/demo/plan.yaml) lists them:

1. train each CPU-sized teacher (``python -m launch.train_teacher``), into runs/demo/teachers/<name>;
2. train the student alone: the student config with ``--teachers none`` and no curriculum;
3. train the student distilled (``python -m launch.distill``): an embedded local Ray serves the
   teachers of the student config's serve spec over loopback gRPC, soft labels arrive per batch;
4. print one table of test Recall@10, NDCG@10, Recall@50 and NDCG@50 per domain, and write it to
   runs/demo/summary.{txt,json}.

A finished step is reused on the next run when nothing it depends on changed (its command, its
config files, the data folder and, for the distilled student, the teachers' checkpoints); an
interrupted step resumes from its last finished epoch. Code changes are not tracked: after editing
the models or the loops, ``--fresh`` retrains everything.

    ckd-demo [--plan configs/demo/plan.yaml] [--data-dir D] [--fresh] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ckd.config import default_data_dir, load_yaml

REPO = Path(__file__).resolve().parents[1]  # the checkout: configs and runs/ are relative to it
DEFAULT_PLAN = "configs/demo/plan.yaml"
STAMP = "demo_step.json"  # written into each step's run directory: what the step was run with
METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
HEADERS = ("Recall@10", "NDCG@10", "Recall@50", "NDCG@50")


@dataclass
class Step:
    """One subprocess of the demo and what it leaves behind."""

    key: str  # unique; also the name of its console log under <plan.log_dir>
    title: str  # what the console says it is doing
    group: str  # "teacher" or "student": the table's first column
    label: str  # the table's model column
    argv: list[str]  # after ``python -m``
    run_dir: Path
    expected_s: float  # typical wall time on a quiet 2-core box, for the ETA
    inputs: list[Path] = field(default_factory=list)  # files whose content the result depends on

    def fingerprint(self, data_dir: str) -> str:
        """Digest of everything the step's result depends on (the command, the content of its input
        files and the data folder): a finished run with the same digest is reused as it is. A YAML
        input counts by its parsed document, as research.carry compares it: a comment edit of a
        config does not retrain the demo."""
        from ckd.config import content_key, read_file_bytes

        h = hashlib.sha256(json.dumps({"argv": self.argv, "data_dir": str(Path(data_dir).resolve())}).encode())
        for p in self.inputs:
            h.update(str(p).encode())
            h.update(content_key(str(p), p.read_bytes(), read_file_bytes) if p.is_file() else b"<missing>")
        return h.hexdigest()

    @property
    def finished(self) -> bool:
        return (self.run_dir / "metrics.json").is_file()


@dataclass
class Plan:
    steps: list[Step]
    student_config: Path
    summary_dir: Path
    log_dir: Path


def _repo_path(p: str | os.PathLike[str]) -> Path:
    path = Path(p)
    return path if path.is_absolute() else REPO / path


def show(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it (shorter on the console)."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def load_plan(path: str | os.PathLike[str], data_dir: str, overrides: Sequence[str]) -> Plan:
    """The demo's steps from its plan YAML (see configs/demo/plan.yaml for the schema).

    ``overrides`` (``--set key=value``) go to both student runs, so alone and distilled stay comparable."""
    plan = load_yaml(path)
    steps: list[Step] = []
    teacher_metrics: list[Path] = []
    for t in plan.get("teachers", []):
        run_dir = _repo_path(t["run_dir"])
        argv = ["launch.train_teacher", "--config", t["config"], "--run-dir", t["run_dir"], "--data-dir", data_dir]
        for o in t.get("overrides", []):
            argv += ["--set", o]
        steps.append(Step(key=f"teacher_{t['name']}", title=f"teacher {t.get('label', t['name'])}",
                          group="teacher", label=t.get("label", t["name"]), argv=argv, run_dir=run_dir,
                          expected_s=60.0 * float(t.get("minutes", 3)), inputs=[_repo_path(t["config"])]))
        teacher_metrics.append(run_dir / "metrics.json")
    student = plan["student"]
    config = student["config"]
    spec = load_yaml(_repo_path(config)).get("service", {}).get("spec", "")
    for kind in ("alone", "distilled"):
        s = student[kind]
        argv = ["launch.distill", "--config", config, "--run-dir", s["run_dir"], "--data-dir", data_dir]
        argv += list(s.get("args", []))
        for o in list(s.get("overrides", [])) + list(overrides):
            argv += ["--set", o]
        inputs = [_repo_path(config)]
        if kind == "distilled":
            # The teachers' metrics.json carries their checkpoint digests: a retrained teacher
            # makes the distilled student stale.
            inputs += ([_repo_path(spec)] if spec else []) + teacher_metrics
        steps.append(Step(key=f"student_{kind}", title=s.get("label", f"student {kind}"), group="student",
                          label=s.get("label", kind), argv=argv, run_dir=_repo_path(s["run_dir"]),
                          expected_s=60.0 * float(s.get("minutes", 2)), inputs=inputs))
    keys = [s.key for s in steps]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"error: {path}: teacher names must be unique, got {keys}")
    return Plan(steps, _repo_path(config), _repo_path(plan.get("summary_dir", "runs/demo")),
                _repo_path(plan.get("log_dir", "runs/demo/logs")))


# -- running one step -----------------------------------------------------------------------------

_TABLE_LINE = re.compile(r"^(split\s+domain\b|-{10,}\s*$|(valid|test)\s+\S+(\s+-?\d+\.\d+){4}\s*$)")
_TABLE_STARTS = ("split ", "-----", "valid ", "test ")


class ConsoleFilter:
    """Passes a child's output through (progress bars included) but drops the metric tables each
    step prints for itself: the demo prints one table of everything at the end."""

    def __init__(self) -> None:
        self.buf = ""

    def feed(self, text: str) -> str:
        """What of ``text`` (the next piece of the child's output) to show now."""
        self.buf += text
        out = []
        while True:
            cut = min((i for i in (self.buf.find("\r"), self.buf.find("\n")) if i >= 0), default=-1)
            if cut < 0:
                break
            segment, end, self.buf = self.buf[:cut], self.buf[cut], self.buf[cut + 1:]
            if end == "\n" and _TABLE_LINE.match(segment):
                continue
            out.append(segment + end)
        # A partial segment that cannot be the start of a table line goes out now, so a progress
        # bar (written as "\r" + bar, with no line end) shows at once.
        if self.buf and not any(p.startswith(self.buf) or self.buf.startswith(p) for p in _TABLE_STARTS):
            out.append(self.buf)
            self.buf = ""
        return "".join(out)

    def close(self) -> str:
        """What is left to show once the child has exited."""
        rest, self.buf = self.buf, ""
        return "" if _TABLE_LINE.match(rest) else rest


def child_env() -> dict[str, str]:
    """The environment of each step: offline PLM, no Ray telemetry, unbuffered output (so lines
    arrive when written), the item-text cache shared by every step."""
    env = dict(os.environ)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                 ("RAY_USAGE_STATS_ENABLED", "0"), ("CKD_CACHE_DIR", str(REPO / ".cache" / "ckd"))):
        env.setdefault(k, v)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(argv: list[str], log_path: Path) -> int:
    """Run ``python -m <argv>`` from the repository root; everything it writes goes to ``log_path``
    and, without its own metric tables, to the console. Returns the exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    console = ConsoleFilter()
    with open(log_path, "wb") as log:
        log.write(("$ python -m " + " ".join(argv) + "\n").encode())
        proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO, env=child_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                log.write(chunk)
                log.flush()
                sys.stdout.write(console.feed(decoder.decode(chunk)))
                sys.stdout.flush()
        finally:
            code = proc.wait()
    sys.stdout.write(console.feed(decoder.decode(b"", final=True)) + console.close())
    sys.stdout.flush()
    return code


def reusable(step: Step, data_dir: str) -> bool:
    """Whether ``step`` finished earlier with the inputs it has now."""
    stamp = step.run_dir / STAMP
    return step.finished and stamp.is_file() and \
        json.loads(stamp.read_text()).get("fingerprint") == step.fingerprint(data_dir)


def prepare_run_dir(step: Step, stamp: str, fresh: bool) -> str:
    """Decide what to do with ``step``'s run directory: "reuse" (finished with the same inputs),
    "resume" (interrupted with the same inputs) or "train" (none yet). A directory left by an
    earlier demo with other inputs is removed first; one the demo did not make is never touched."""
    d = step.run_dir
    if not d.exists():
        return "train"
    stamp_file = d / STAMP
    if not stamp_file.is_file():
        raise SystemExit(f"error: {d} exists but was not made by the demo: move it away or change the plan")
    same = json.loads(stamp_file.read_text()).get("fingerprint") == stamp
    if same and not fresh:
        return "reuse" if step.finished else "resume"
    why = "--fresh" if fresh else "its command, configs, data or teachers changed"
    print(f"  {show(d)}: starting afresh ({why})", flush=True)
    shutil.rmtree(d)
    return "train"


def fmt_clock(seconds: float) -> str:
    """``seconds`` as m:ss."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}"


class Clock:
    """Elapsed time and an estimate of what is left: the plan's typical times of the remaining
    steps, scaled by how fast the finished ones went compared with theirs (a loaded box is slower)."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.done_expected = 0.0
        self.done_actual = 0.0

    def finish(self, step: Step, seconds: float) -> None:
        self.done_expected += step.expected_s
        self.done_actual += seconds

    def left(self, remaining: Sequence[Step]) -> float:
        """Seconds the ``remaining`` steps should take at the pace seen so far."""
        pace = self.done_actual / self.done_expected if self.done_expected > 0 else 1.0
        return sum(s.expected_s for s in remaining) * min(max(pace, 0.5), 4.0)

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0


# -- the table ------------------------------------------------------------------------------------

def table_rows(steps: Sequence[Step]) -> list[dict[str, Any]]:
    """One row per step: who it is and its test metrics per domain (from its metrics.json)."""
    rows = []
    for s in steps:
        m = json.loads((s.run_dir / "metrics.json").read_text())
        rows.append({"group": s.group, "label": s.label, "run_dir": str(s.run_dir),
                     "best_epoch": m.get("best_epoch"),
                     "test": {d: {k: float(v[k]) for k in METRICS} for d, v in m["test"].items() if d != "mean"}})
    return rows


def format_results(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's table: per domain, each teacher, the student alone and the student distilled,
    with test Recall/NDCG@10/50; then, per domain, what distillation changed and any teacher that
    scores below the distilled student."""
    domains: list[str] = []
    for r in rows:
        domains += [d for d in r["test"] if d not in domains]
    width = max(len(f"{r['group']}  {r['label']}") for r in rows)
    head = f"{'model':<{width}}  " + "  ".join(f"{h:>9}" for h in HEADERS) + "  best epoch"
    out = []
    for dom in domains:
        out += [f"Test, {dom} (full ranking over the domain's items; each model at its best valid NDCG@10 epoch)",
                head, "-" * len(head)]
        for r in rows:
            name = f"{r['group']}  {r['label']}"
            vals = r["test"].get(dom)
            cells = [f"{vals[k]:>9.4f}" if vals else f"{'-':>9}" for k in METRICS]
            out.append(f"{name:<{width}}  " + "  ".join(cells) + f"  {r['best_epoch']:>10}")
        out += verdict(rows, dom)
        out.append("")
    return "\n".join(out).rstrip()


def verdict(rows: Sequence[dict[str, Any]], domain: str) -> list[str]:
    """Plain sentences on the domain's rows: distilled against alone, and teachers below the student."""
    students = [r for r in rows if r["group"] == "student" and domain in r["test"]]
    teachers = [r for r in rows if r["group"] == "teacher" and domain in r["test"]]
    if len(students) < 2:
        return []
    alone, distilled = students[0]["test"][domain], students[-1]["test"][domain]
    lines = []
    gain = {k: distilled[k] / alone[k] - 1.0 if alone[k] > 0 else float("nan") for k in METRICS}
    better = [h for h, k in zip(HEADERS, METRICS) if distilled[k] > alone[k]]
    lines.append(f"distilled vs alone: NDCG@10 {alone['ndcg@10']:.4f} -> {distilled['ndcg@10']:.4f} "
                 f"({gain['ndcg@10']:+.1%}), Recall@10 {gain['recall@10']:+.1%}; "
                 f"better on {len(better)} of {len(METRICS)} metrics")
    below = [t["label"] for t in teachers if t["test"][domain]["ndcg@10"] < distilled["ndcg@10"]]
    if below:
        lines.append(f"note: {' and '.join(below)} {'is' if len(below) == 1 else 'are'} below the distilled "
                     "student on NDCG@10: the demo trains each teacher for a few CPU minutes only\n"
                     "      (full-size teachers and results: docs/teachers.md, docs/results.md)")
    return lines


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=DEFAULT_PLAN, help=f"the demo plan (default {DEFAULT_PLAN})")
    ap.add_argument("--data-dir", default=None, help="data root (default: $CKD_DATA_DIR or ../shared/data/amazon)")
    ap.add_argument("--fresh", action="store_true", help="retrain every step, even finished ones")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a student config key in both student runs (repeatable)")
    args = ap.parse_args(argv)
    data_dir = str(Path(args.data_dir or default_data_dir()).resolve())
    plan = load_plan(_repo_path(args.plan), data_dir, args.overrides)
    for s in plan.steps:
        for p in s.inputs:
            if not p.is_file() and p.name != "metrics.json":  # a teacher's metrics.json comes later
                print(f"error: {show(p)} (named by {args.plan}) not found", file=sys.stderr)
                return 2
    domains = load_yaml(plan.student_config).get("data", {}).get("domains", ["Scientific"])
    absent = [d for d in domains if not (Path(data_dir) / d).is_dir()]
    if absent:
        print(f"error: no {', '.join(absent)} data under {data_dir}: set CKD_DATA_DIR or pass --data-dir",
              file=sys.stderr)
        return 2

    try:
        return run_plan(plan, data_dir, args.fresh)
    except KeyboardInterrupt:
        print("\ninterrupted: run the demo again to resume where it stopped", file=sys.stderr)
        return 130


def run_plan(plan: Plan, data_dir: str, fresh: bool) -> int:
    """Run (or reuse) every step in order, then print and write the table; returns the exit status."""
    clock = Clock()
    todo = [s for s in plan.steps if fresh or not reusable(s, data_dir)]
    if any(s.group == "teacher" for s in todo):  # a retrained teacher makes the distilled student stale
        todo += [s for s in plan.steps if s.key == "student_distilled" and s not in todo]
    if todo:
        print(f"demo: {len(plan.steps)} steps ({len(todo)} to run), typically "
              f"{fmt_clock(sum(s.expected_s for s in todo))} (min:s) on a quiet 2-core CPU box; "
              f"each step's full output goes to {show(plan.log_dir)}/", flush=True)
    timings: dict[str, float] = {}
    for i, step in enumerate(plan.steps):
        # A step's fingerprint is taken when it starts: the distilled student's includes the
        # teachers' results, which the steps before it may just have written.
        stamp = step.fingerprint(data_dir)
        action = prepare_run_dir(step, stamp, fresh)
        header = f"[{i + 1}/{len(plan.steps)}] {step.title}"
        if action == "reuse":
            print(f"{header}: done earlier, reusing {show(step.run_dir)}", flush=True)
            timings[step.key] = 0.0
            continue
        eta = clock.left(plan.steps[i:])
        print(f"\n{header}: {'resuming' if action == 'resume' else 'training'} "
              f"(usually ~{fmt_clock(step.expected_s)}; demo elapsed {fmt_clock(clock.elapsed)}, "
              f"about {fmt_clock(eta)} to go)", flush=True)
        step.run_dir.mkdir(parents=True, exist_ok=True)
        (step.run_dir / STAMP).write_text(json.dumps({"fingerprint": stamp, "argv": step.argv}, indent=2) + "\n")
        t0 = time.time()
        code = run_logged(step.argv, plan.log_dir / f"{step.key}.log")
        seconds = time.time() - t0
        if code != 0 or not step.finished:
            print(f"\nerror: {step.title} failed (exit {code}); its full output is in "
                  f"{show(plan.log_dir / (step.key + '.log'))}. Run the demo again to resume.", file=sys.stderr)
            return code or 1
        timings[step.key] = round(seconds, 1)
        clock.finish(step, seconds)
        print(f"[{i + 1}/{len(plan.steps)}] {step.title}: done in {fmt_clock(seconds)}", flush=True)

    rows = table_rows(plan.steps)
    table = format_results(rows)
    plan.summary_dir.mkdir(parents=True, exist_ok=True)
    (plan.summary_dir / "summary.txt").write_text(table + "\n")
    (plan.summary_dir / "summary.json").write_text(json.dumps(
        {"rows": rows, "step_seconds": timings, "data_dir": data_dir}, indent=2) + "\n")
    if any(timings.values()):
        print(f"\ndemo finished in {fmt_clock(clock.elapsed)} (steps: "
              + ", ".join(f"{k} {fmt_clock(v) if v else 'reused'}" for k, v in timings.items()) + ")\n")
    else:
        print("\nevery step was reused from an earlier run (`ckd-demo --fresh` retrains them)\n")
    print(table)
    print(f"\n(also in {show(plan.summary_dir / 'summary.txt')}; each run's metrics.json, train.log and "
          f"best/ checkpoint are under {show(plan.summary_dir)}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
