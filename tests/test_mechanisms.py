"""The mechanisms study's collect and page (research/mechanisms.py, ckd/mechanisms_report.py) on
fabricated run directories with known numbers: mean, sd and t-intervals by hand, the verdict rule
(helps / no measurable effect / hurts / open), the targets, the anytime steps, pending seeds, a
run directory that holds another setting, and the page with its figure through ckd-report."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ckd.mechanisms_report import (HELPS, HURTS, NONE, OPEN, VERDICT_RULE, against_value, load_mechanisms,
                                   mean_interval, render_mechanisms_page, t_quantile, verdict_of, welch)
from ckd.reporting import ReportError, parse_markdown_tables, parse_results_manifest
from launch import report
from research import mechanisms
from research.mechanisms import PlanError, collect, load_plan, parse_plan, steps_verdict

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [1, 2, 3]
# Test NDCG@10 per seed of each fabricated row (Recall@10 = 2 x, NDCG@50 = 1.2 x, Recall@50 = 3 x).
NDCG = {
    "clean_mean": [0.060, 0.062, 0.064],
    "clean_both": [0.061, 0.063, 0.065],
    "corrupted_mean": [0.055, 0.056, 0.057],
    "corrupted_both": [0.0625, 0.063, 0.0635],
    "curriculum_off": [0.058, 0.060, 0.062],
    "alone": [0.050, 0.051, 0.052],
    "clean_confidence": [0.070],  # seed 1 only: seed 2 started, seed 3 not started
}
TEACHERS = {"unisrec": 0.065, "unim2rec": 0.060}
# Anytime curves: (steps at each epoch's end, value as a fraction of the seed's final); best epoch = the last.
CURVES = {"curriculum_off": ([100, 200, 300, 400], [0.5, 0.8, 0.95, 1.0]),
          "clean_both": ([50, 120, 220, 320], [0.7, 0.96, 0.99, 1.0])}


def _cmd(name: str, sets: list[str], teachers_none: bool = False) -> str:
    return ("python -m research.seeds --config configs/demo/student.yaml"
            + (" --teachers none" if teachers_none else "")
            + f" --seeds 1 2 3 --parallel 1 --runs-root runs/mech/{name} --set train.record_test_curve=true "
            + " ".join(f"--set {s}" for s in sets))


def _plan() -> dict:
    clean, corrupted = "service.spec=configs/clean.yaml", "service.spec=configs/corrupted.yaml"
    rows = [
        {"name": "clean_mean", "label": "clean, mean", "group": "integration", "pool": "clean", "mode": "mean",
         "command": _cmd("clean_mean", [clean, "kd.integration=mean"])},
        {"name": "clean_confidence", "label": "clean, confidence", "group": "integration", "pool": "clean",
         "mode": "confidence", "command": _cmd("clean_confidence", [clean, "kd.integration=confidence"])},
        {"name": "clean_both", "label": "clean, both", "group": "integration", "pool": "clean", "mode": "both",
         "command": _cmd("clean_both", [clean, "kd.integration=both"])},
        {"name": "corrupted_mean", "label": "corrupted, mean", "group": "integration", "pool": "corrupted",
         "mode": "mean", "command": _cmd("corrupted_mean", [corrupted, "kd.integration=mean"])},
        {"name": "corrupted_both", "label": "corrupted, both", "group": "integration", "pool": "corrupted",
         "mode": "both", "command": _cmd("corrupted_both", [corrupted, "kd.integration=both"])},
        {"name": "curriculum_off", "label": "no curriculum", "group": "curriculum",
         "command": _cmd("curriculum_off", [clean, "kd.integration=both", "curriculum.enabled=false"])},
        {"name": "alone", "label": "SASRec alone", "group": "baseline",
         "command": _cmd("alone", ["curriculum.enabled=false"], teachers_none=True)},
    ]
    return {"title": "Fabricated", "domain": "Scientific", "seeds": SEEDS, "runs_root": "runs/mech",
            "pools": {"clean": {"label": "two", "spec": "configs/clean.yaml"},
                      "corrupted": {"label": "three", "spec": "configs/corrupted.yaml"}},
            "teachers": [{"name": "unisrec", "label": "UniSRec", "metrics": "runs/t/unisrec/metrics.json"},
                         {"name": "unim2rec", "label": "UniM2Rec", "metrics": "runs/t/unim2rec/metrics.json"},
                         {"name": "permuted", "label": "UniSRec permuted", "corrupted": True}],
            "rows": rows,
            "curriculum": {"reference": "curriculum_off",
                           "rows": [{"row": "curriculum_off", "label": "no curriculum"},
                                    {"row": "clean_both", "label": "curriculum on"}]},
            "mechanisms": [
                {"name": "integration", "label": "Consistency-aware integration (both, against mean)",
                 "comparisons": [{"where": "clean pool", "row": "clean_both", "against": "clean_mean"},
                                 {"where": "corrupted pool", "row": "corrupted_both", "against": "corrupted_mean"}]},
                {"name": "curriculum", "label": "Curriculum (against none)",
                 "comparisons": [{"where": "clean pool", "row": "clean_both", "against": "curriculum_off"}]},
                {"name": "confidence", "label": "Confidence integration (against mean)",
                 "comparisons": [{"where": "clean pool", "row": "clean_confidence", "against": "clean_mean"}]},
                {"name": "corruption", "label": "A corrupted teacher under mean integration",
                 "comparisons": [{"where": "mean", "row": "corrupted_mean", "against": "clean_mean"}]}]}


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parts, last = key.split(".")
        for p in parts:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics(v: float) -> dict:
    return {"recall@10": 2 * v, "ndcg@10": v, "recall@50": 3 * v, "ndcg@50": 1.2 * v}


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return build_repo(tmp_path)


def build_repo(tmp_path: Path) -> Path:
    """A repository root with the plan, the pools' serve specs, the teachers' metrics and the runs."""
    raw = _plan()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "plan.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "configs" / "clean.yaml").write_text(yaml.safe_dump(
        {"teachers": [{"name": "unisrec", "checkpoint": "x"}, {"name": "unim2rec", "checkpoint": "y"}]}))
    (tmp_path / "configs" / "corrupted.yaml").write_text(yaml.safe_dump(
        {"teachers": [{"name": "unisrec", "checkpoint": "x"}, {"name": "unim2rec", "checkpoint": "y"},
                      {"name": "permuted", "checkpoint": "z"}]}))
    for name, v in TEACHERS.items():
        _write_json(tmp_path / f"runs/t/{name}/metrics.json", {"test": {"Scientific": _metrics(v)}, "best_epoch": 3})
    plan = parse_plan(raw, "configs/plan.yaml")
    for row in plan.rows:
        for seed, v in zip(SEEDS, NDCG[row.name]):
            d = tmp_path / row.runs_root / f"seed{seed}"
            steps, fracs = CURVES.get(row.name, ([10, 20], [0.9, 1.0]))
            hist = [{"epoch": e, "global_step": s, "test_ndcg@10": f * v} for e, (s, f) in enumerate(zip(steps, fracs))]
            client = {"teacher_reliability": {"unisrec": -2.0 - seed / 10, "permuted": -6.0}} \
                if row.name == "corrupted_both" else {}
            _write_json(d / "metrics.json", {"test": {"Scientific": _metrics(v), "mean": _metrics(v)},
                                             "valid": {"Scientific": _metrics(v)}, "best_epoch": len(steps) - 1,
                                             "epochs_run": len(steps), "global_step": steps[-1], "history": hist,
                                             "teacher_client": client})
            (d / "config.yaml").write_text(yaml.safe_dump(_nested({**row.settings, "train.seed": seed,
                                                                   "train.epochs": 6})))
            _write_json(d / "run.json", {"git_sha": "abc", "device": "cpu",
                                         "teachers": {} if row.name == "alone" else {"unisrec": {}}})
    (tmp_path / "runs/mech/clean_confidence/seed2").mkdir(parents=True)  # started, not finished
    return tmp_path


@pytest.fixture()
def data(repo: Path) -> dict:
    return collect(load_plan(repo / "configs" / "plan.yaml", "configs/plan.yaml"), repo, "collect (test)")


# ----------------------------------------------------------------------------- statistics


def test_t_quantiles_match_the_table():
    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (10, 2.2281), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.5, 2.94, 7.3, 55.0):
        assert t_quantile(0.975, df) == pytest.approx(float(scipy_stats.t.ppf(0.975, df)), abs=1e-7)


def test_mean_sd_and_t_interval_by_hand():
    s = mean_interval([0.060, 0.062, 0.064])
    half = 4.302653 * 0.002 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n) = 0.0049683
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.062) and s["sd"] == pytest.approx(0.002)
    assert s["ci"] == pytest.approx([0.062 - half, 0.062 + half], abs=1e-7)
    assert mean_interval([0.07]) == {"n": 1, "mean": 0.07, "sd": None, "ci": None} and mean_interval([]) is None


def test_welch_interval_and_verdict_rule():
    # Equal sds 0.002, n 3 and 3: se = 0.002 * sqrt(2/3), df = 4, half = 2.776445 * se = 0.004533.
    c = welch([0.061, 0.063, 0.065], [0.058, 0.060, 0.062])
    se = 0.002 * math.sqrt(2 / 3)
    assert c["df"] == pytest.approx(4.0) and c["diff"] == pytest.approx(0.003)
    assert c["ci"] == pytest.approx([0.003 - 2.776445 * se, 0.003 + 2.776445 * se], abs=1e-6)
    assert c["rel_pct"] == pytest.approx(5.0) and c["verdict"] == NONE  # the interval includes 0
    assert welch([0.07, 0.071, 0.072], [0.05, 0.051, 0.052])["verdict"] == HELPS
    assert welch([0.05, 0.051, 0.052], [0.07, 0.071, 0.072])["verdict"] == HURTS
    assert welch([0.07], [0.05, 0.051])["verdict"] == OPEN
    assert [verdict_of(x) for x in ([0.1, 0.2], [-0.2, -0.1], [-0.1, 0.1], None)] == [HELPS, HURTS, NONE, OPEN]
    assert welch([0.06, 0.06], [0.05, 0.05])["ci"] == pytest.approx([0.01, 0.01])  # no spread: exact
    t = against_value([0.061, 0.063, 0.065], 0.065)
    assert t["rel_pct"] == pytest.approx(-100 * 0.002 / 0.065) and t["diff"] == pytest.approx(-0.002)
    assert t["verdict"] == NONE  # 0.063 ± 0.00497 includes 0.065


# ----------------------------------------------------------------------------- collect


def test_collect_rows_stats_and_pending(data):
    both = data["rows"]["clean_both"]
    assert [s["status"] for s in both["seeds"]] == ["done"] * 3
    assert both["stats"]["ndcg@10"]["mean"] == pytest.approx(0.063)
    assert both["stats"]["recall@10"]["mean"] == pytest.approx(0.126)
    half = 4.302653 * 0.002 / math.sqrt(3)
    assert data["rows"]["clean_mean"]["stats"]["ndcg@10"]["ci"] == pytest.approx([0.062 - half, 0.062 + half], abs=1e-7)
    conf = data["rows"]["clean_confidence"]
    assert conf["pending_seeds"] == [2, 3] and conf["stats"]["ndcg@10"]["n"] == 1
    assert data["pending"] == [
        "row clean_confidence seed 2 (runs/mech/clean_confidence/seed2): started, not finished (no metrics.json yet)",
        "row clean_confidence seed 3 (runs/mech/clean_confidence/seed3): not started"]
    assert data["pools"]["corrupted"]["teachers"] == ["unisrec", "unim2rec", "permuted"]
    assert data["teachers"]["permuted"]["status"] == "not evaluated" and data["best_teacher"] == "unisrec"
    assert data["epochs"] == [6] and data["configs"] == ["configs/demo/student.yaml"]


def test_collect_verdicts_and_targets(data):
    verdicts = {(m["name"], c["where"]): c["verdict"] for m in data["mechanisms"] for c in m["comparisons"]}
    assert verdicts == {("integration", "clean pool"): NONE, ("integration", "corrupted pool"): HELPS,
                        ("curriculum", "clean pool"): NONE, ("confidence", "clean pool"): OPEN,
                        ("corruption", "mean"): HURTS}
    change = data["integration"]["change"]
    assert change["mean"]["rel_pct"] == pytest.approx(100 * (0.056 - 0.062) / 0.062)  # -9.68%
    assert change["both"]["rel_pct"] == pytest.approx(0.0, abs=1e-9)
    ti = data["targets"]["integration"]
    assert ti["mean_loses_5pct"] is True and ti["within_1pct"]["both"] is True and ti["met"] is True
    assert "confidence" not in change  # no corrupted confidence row in this plan
    # Curriculum: means 0.063 vs 0.060, larger sd 0.002 -> higher by more than the spread.
    tc = data["targets"]["curriculum"]["rows"]["clean_both"]
    assert tc["higher_by_spread"] is True and tc["ok"] is True and data["targets"]["curriculum"]["met"] is True
    tb = data["targets"]["best_teacher"]
    # Rows with two or more seeds only (clean_confidence, +7.7% on one seed, is open): both rows at 0.063.
    assert tb["closest"] in ("clean_both", "corrupted_both")
    assert tb["closest_rel_pct"] == pytest.approx(-100 * 0.002 / 0.065)
    assert tb["met"] is False
    assert data["student_vs_teacher"]["clean_both"]["ndcg@10"]["rel_pct"] == pytest.approx(-100 * 0.002 / 0.065)


def test_anytime_mean_curves_and_steps_by_hand(data):
    curves = data["curriculum"]["anytime"]["curves"]
    off, on = curves["curriculum_off"], curves["clean_both"]
    assert off["steps"] == [100, 200, 300, 400] and off["values"] == pytest.approx([0.030, 0.048, 0.057, 0.060])
    assert off["final"] == pytest.approx(0.060) and off["seeds"] == SEEDS and off["steps_differ"] is False
    assert on["values"] == pytest.approx([0.0441, 0.06048, 0.06237, 0.063])
    steps = data["curriculum"]["anytime"]["compare"]["runs"]
    # on: 95% of 0.063 = 0.05985, first reached at step 120 (0.06048); the off final 0.060 also at 120.
    assert steps["clean_both"]["steps_to_95pct_of_final"] == 120
    assert steps["clean_both"]["steps_to_reference_final"] == 120
    # off: 95% of 0.060 = 0.057, reached at 300; its own final at 400 -> (400 - 120) / 400 = 70% fewer.
    assert steps["curriculum_off"]["steps_to_95pct_of_final"] == 300
    assert steps["clean_both"]["fewer_steps_than_reference_pct"] == 70.0
    assert data["targets"]["curriculum"]["rows"]["clean_both"]["by_steps"] is True


def test_steps_verdict_is_open_when_the_reference_never_reaches_its_own_final():
    # compare() output by hand: the reference's mean curve stays below its final (its seeds selected
    # different epochs), so no row's saving is defined -> open, even for a row that is ahead throughout.
    never = {"reference": "off", "runs": {"off": {"steps_to_reference_final": None},
                                          "on": {"steps_to_reference_final": None,
                                                 "fewer_steps_than_reference_pct": None}}}
    assert steps_verdict(never, "on", True) is None
    reaches = {"reference": "off", "runs": {"off": {"steps_to_reference_final": 400},
                                            "on": {"steps_to_reference_final": 300,
                                                   "fewer_steps_than_reference_pct": 25.0},
                                            "late": {"steps_to_reference_final": None,
                                                     "fewer_steps_than_reference_pct": None}}}
    assert steps_verdict(reaches, "on", True) is True  # 25% >= 20%
    assert steps_verdict(reaches, "late", True) is False  # never reaches the reference's final
    assert steps_verdict(reaches, "on", False) is None  # curves of fewer than two seeds


def test_a_run_of_another_setting_is_refused(repo):
    cfg = repo / "runs/mech/clean_both/seed2/config.yaml"
    c = yaml.safe_load(cfg.read_text())
    c["kd"]["integration"] = "mean"
    cfg.write_text(yaml.safe_dump(c))
    with pytest.raises(PlanError, match=r"seed2: config.yaml has kd.integration='mean', but row clean_both trains "
                                        r"kd.integration='both'"):
        collect(load_plan(repo / "configs" / "plan.yaml"), repo)


def test_bad_plans_are_named_errors():
    for mutate, match in [
        (lambda p: p["rows"][0].update(mode="average"), "mode 'average' is not one of"),
        (lambda p: p["rows"][0].update(command=p["rows"][0]["command"].replace("kd.integration=mean",
                                                                               "kd.integration=both")),
         "mode mean needs --set kd.integration=mean"),
        (lambda p: p["rows"][0].update(command=p["rows"][0]["command"].replace("runs/mech/clean_mean", "runs/x")),
         "--runs-root is runs/x"),
        (lambda p: p["rows"][0].update(command=p["rows"][0]["command"].replace("--seeds 1 2 3", "--seeds 1 2")),
         "trains seeds"),
        (lambda p: p["rows"][0].update(command=p["rows"][0]["command"].replace("configs/clean.yaml",
                                                                               "configs/corrupted.yaml")),
         "pool clean is served by configs/clean.yaml"),
        (lambda p: p["mechanisms"][0]["comparisons"][0].update(against="nope"), "'nope' is not a row"),
        (lambda p: p["rows"][5].update(command=p["rows"][5]["command"].replace("--set train.record_test_curve=true",
                                                                               "")),
         "must --set train.record_test_curve=true"),
        (lambda p: p.update(extra=1), "unknown top-level keys"),
    ]:
        raw = _plan()
        mutate(raw)
        with pytest.raises(PlanError, match=match):
            parse_plan(raw, "plan.yaml")


def test_cli_writes_once_and_refuses_to_overwrite(repo, capsys):
    argv = ["--root", str(repo), "collect", "--plan", "configs/plan.yaml", "--out", "results/m.json"]
    assert mechanisms.main(argv) == 0
    out = json.loads((repo / "results/m.json").read_text())
    assert out["kind"] == "mechanisms" and out["command"].startswith("python -m research.mechanisms collect")
    assert "cores" in out["machine"] and out["commit"]
    assert mechanisms.main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert mechanisms.main(argv + ["--overwrite"]) == 0


# ----------------------------------------------------------------------------- page


def test_page_names_the_verdicts_and_tables(repo, data, tmp_path):
    src = tmp_path / "m.json"
    src.write_text(json.dumps(data))
    m = load_mechanisms(src, "results/m.json")
    page = render_mechanisms_page(m, generated_by="ckd-report --page docs/m.md", generated_at="c0ffee")
    assert page.startswith("# Results\n") and "Generated by `ckd-report --page docs/m.md` at commit `c0ffee`" in page
    assert "Demo scale" in page and "`configs/demo/student.yaml`" in page and "train.epochs = 6" in page
    assert VERDICT_RULE in page
    line = next(x for x in page.splitlines() if x.startswith("- **Consistency-aware integration"))
    assert "clean pool: no measurable effect, +1.6%" in line and "corrupted pool: helps by +12.5%" in line
    assert "open (clean_confidence: 1 seed(s), clean_mean: 3 seed(s) finished)" in page
    assert "hurts by -9.7%" in page
    assert "**Integration under a corrupted teacher**" in page and "**met**" in page
    assert ("curriculum on: 70.0% fewer steps to the no-curriculum final, final higher by more than the seed "
            "spread") in page
    assert "- corrupted, both (`corrupted_both`): unisrec R = -2.200, permuted R = -6.000" in page
    tables = parse_markdown_tables(page)
    integ = next(t for t in tables if t and "Mode" in t[0])
    mean = next(r for r in integ if r["Mode"] == "mean")
    assert mean["NDCG@10 clean"].startswith("0.0620 ± 0.0020 [0.0570, 0.0670]")
    assert mean["Corrupted vs clean (NDCG@10)"].startswith("-9.7%") and mean["Within 1% of clean?"] == "no"
    assert mean["Verdict of the change"] == "lower (interval below 0)"
    conf = next(r for r in integ if r["Mode"] == "confidence")
    assert conf["NDCG@10 clean"] == "0.0700 (1 seed)" and conf["NDCG@10 corrupted"] == "pending"
    cur = next(t for t in tables if t and "Final NDCG@10 (test)" in t[0])
    on = next(r for r in cur if r["Row"] == "curriculum on")
    assert on["Steps to 95% of its final"] == "120" and on["Fewer steps than it"] == "+70.0%"
    assert "row clean_confidence seed 3 (runs/mech/clean_confidence/seed3): not started" in page
    with pytest.raises(ReportError, match="not a mechanisms results file"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"kind": "union"}))
        load_mechanisms(bad)


def test_ckd_report_writes_the_page_figure_and_sidecar(repo, data, tmp_path, capsys):
    src = repo / "results" / "m.json"
    src.parent.mkdir(exist_ok=True)
    src.write_text(json.dumps(data))
    out, fig = repo / "docs" / "m.md", repo / "docs" / "m_anytime.png"
    argv = ["--root", str(repo), "--mechanisms", str(src), "--out", str(out), "--figure", str(fig), "--draft"]
    assert report.main(argv, state=report.TreeState(commit="")) == 0, capsys.readouterr().err
    page = out.read_text()
    assert "](m_anytime.png)" in page and "**Draft:**" in page
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    side = json.loads(fig.with_suffix(".json").read_text())
    assert side["reference"] == "curriculum_off" and side["curves"]["clean_both"]["steps"] == [50, 120, 220, 320]
    assert side["curves"]["clean_both"]["mean"] == pytest.approx([0.0441, 0.06048, 0.06237, 0.063])
    # As a manifest page: parsed, and --check compares the page and the sidecar with the JSON.
    spec = parse_results_manifest({"pages": [{"page": "docs/m.md", "mechanisms": "results/m.json",
                                              "figure": "docs/m_anytime.png"}]}).pages[0]
    assert spec.inputs == ["results/m.json"] and spec.figure == "docs/m_anytime.png"
    assert report.check_page(spec, repo) == []
    for extra in ({"experiments": ["results/a.json"]}, {"efficiency": "results/e.json"}, {"domain": "Games"}):
        with pytest.raises(ReportError, match="a 'mechanisms' page takes only 'figure'"):
            parse_results_manifest({"pages": [{"page": "docs/m.md", "mechanisms": "results/m.json", **extra}]})


def test_committed_plan_rows_resolve_to_their_settings():
    """configs/mechanisms/scientific.yaml parses, and each row's command resolves (launch/distill.py's
    own resolution, research.seeds' argv) to a config that holds the settings collect checks."""
    import shlex

    from research.seeds import distill_argv, resolved

    plan = load_plan(ROOT / "configs/mechanisms/scientific.yaml", "configs/mechanisms/scientific.yaml")
    assert [r.name for r in plan.rows][:2] == ["clean_mean", "clean_confidence"] and len(plan.rows) == 18
    assert plan.seeds == (2024, 7, 11) and plan.curriculum["reference"] == "curriculum_off"
    cfgs = {}
    for row in plan.rows:
        args = mechanisms.seeds_parser().parse_args(shlex.split(row.command)[3:])
        cfg = cfgs[row.name] = resolved(distill_argv(args, plan.seeds[0]))
        for key, want in row.settings.items():
            assert mechanisms._dotted(cfg, key) == (True, want), (row.name, key)
    # the shipped student differs from the paper's recipe (clean_both) in lambda and the curriculum only
    # (with the curriculum off its pacing settings are unused); run_dir differs by the plan's layout
    def recipe(cfg: dict) -> tuple:
        rest = {k: v for k, v in cfg.items() if k not in ("run_dir", "curriculum", "kd")}
        kd = {k: v for k, v in cfg["kd"].items() if k != "lambda_kd"}
        return (cfg["kd"]["lambda_kd"], cfg["curriculum"]["enabled"]), kd, rest

    (shipped, *shipped_rest), (paper, *paper_rest) = recipe(cfgs["shipped"]), recipe(cfgs["clean_both"])
    assert shipped == (3.0, False) and paper == (1.0, True) and shipped_rest == paper_rest


def test_parameter_sweeps_on_the_page(repo):
    """A plan's parameter sweep: every point read from its run directory (the default point is the
    one shared base run), pending points named, and the page's row per parameter computed by hand."""
    raw = yaml.safe_load((repo / "configs/plan.yaml").read_text())
    raw["params"] = [{"sweep": "configs/sweep.yaml", "label": "Sci", "png": "docs/params_sci.png"}]
    (repo / "configs/plan.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (repo / "configs/sweep.yaml").write_text(yaml.safe_dump({
        "config": "configs/demo/student.yaml", "runs_root": "runs/params", "seed": 2024,
        "params": {"kd.lambda_kd": [0.3, 1.0, 3.0], "kd.temperature": [1.0, 2.0]}}))
    # valid picks λ=0.3 (.0660), which test ranks last: the page must say what valid picks, not test
    for name, v, va in (("default", 0.0579, 0.0650), ("kd.lambda_kd=0.3", 0.0564, 0.0660),
                        ("kd.lambda_kd=3.0", 0.0583, 0.0640)):
        _write_json(repo / f"runs/params/{name}/metrics.json",
                    {"test": {"mean": {"ndcg@10": v}}, "valid": {"mean": {"ndcg@10": va}}})
    data = collect(load_plan(repo / "configs/plan.yaml", "configs/plan.yaml"), repo, "collect (test)")
    sweep = data["params"][0]
    lam = sweep["params"]["kd.lambda_kd"]
    assert lam["default"] == 1.0  # configs/demo/student.yaml's value
    assert [q["test_ndcg@10"] for q in lam["points"]] == [0.0564, 0.0579, 0.0583]
    assert lam["points"][1]["run_dir"] == "runs/params/default"
    assert [q["valid_ndcg@10"] for q in lam["points"]] == [0.0660, 0.0650, 0.0640]
    temp = sweep["params"]["kd.temperature"]["points"]
    assert [q["test_ndcg@10"] for q in temp] == [0.0579, None]  # T=1 is the default run; T=2 pending
    assert ("parameter point Sci kd.temperature=2.0 (runs/params/kd.temperature=2.0): not finished"
            in data["pending"])
    assert not any("runs/params/default" in x for x in data["pending"])  # finished, so not listed
    (repo / "runs/params/default/metrics.json").unlink()
    again = collect(load_plan(repo / "configs/plan.yaml", "configs/plan.yaml"), repo, "collect (test)")["pending"]
    assert [x for x in again if "(runs/params/default)" in x] == [
        "parameter point Sci kd.lambda_kd=1.0 (runs/params/default): not finished"]  # once, not per parameter
    _write_json(repo / "runs/params/default/metrics.json",
                {"test": {"mean": {"ndcg@10": 0.0579}}, "valid": {"mean": {"ndcg@10": 0.0650}}})
    data = collect(load_plan(repo / "configs/plan.yaml", "configs/plan.yaml"), repo, "collect (test)")
    src = repo / "m.json"
    src.write_text(json.dumps(data))
    page = render_mechanisms_page(load_mechanisms(src, "results/m.json"))
    table = next(t for t in parse_markdown_tables(page) if t and "Default vs best" in t[0])
    rows = {r["Parameter"]: r for r in table}
    assert rows["`kd.lambda_kd`"]["Test NDCG@10 per value"] == "0.3: 0.0564 · **1.0: 0.0579** · 3.0: 0.0583"
    assert rows["`kd.lambda_kd`"]["Default vs best"] == "best at 3.0, the default -0.0004 from it"
    assert rows["`kd.temperature`"]["Default vs best"] == "pending (best so far at 1.0)"
    assert rows["`kd.lambda_kd`"]["Picked on valid"] == "0.3 (valid 0.0660)"
    assert rows["`kd.temperature`"]["Picked on valid"] == "—"  # a point still pending: nothing picked yet
    assert "## 5. Parameter analysis" in page and "## 8. Pending" in page


def test_multi_domain_plan_is_judged_on_the_mean_and_shows_each_domain(tmp_path):
    """A plan over a multi-domain student (`domains`): every verdict and target is judged on the
    runs' "mean" over the domains, each seed and teacher also carries each domain, the page has the
    per-domain table with hand-computed means, and a plan without curriculum rows has no curriculum
    section or target. Naming both `domain` and `domains`, or neither, is a named error."""
    raw = _plan()
    raw.pop("domain")
    raw.pop("curriculum")
    raw["domains"] = ["A", "B"]
    raw["scale"] = "Reduced scale on A and B"
    raw["rows"] = [r for r in raw["rows"] if r["name"] in ("clean_mean", "clean_both", "corrupted_mean",
                                                           "corrupted_both")]
    raw["mechanisms"] = raw["mechanisms"][:1]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/plan.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "configs/clean.yaml").write_text(yaml.safe_dump({"teachers": [{"name": "unisrec"}]}))
    (tmp_path / "configs/corrupted.yaml").write_text(yaml.safe_dump(
        {"teachers": [{"name": "unisrec"}, {"name": "permuted"}]}))
    # Domain A scores v, domain B v / 2: the mean over the plan's domains is 0.75 v. Each file's own
    # "mean" also covers a domain C outside the plan (0), so reading it would judge on v / 2 instead.
    def three(v: float) -> dict:
        return {"A": _metrics(v), "B": _metrics(v / 2), "C": _metrics(0.0), "mean": _metrics(v / 2)}

    _write_json(tmp_path / "runs/t/unisrec/metrics.json", {"test": three(0.08)})
    _write_json(tmp_path / "runs/t/unim2rec/metrics.json", {"test": three(0.06)})
    plan = parse_plan(raw, "configs/plan.yaml")
    assert plan.domain == "mean" and plan.domains == ("A", "B") and plan.curriculum["rows"] == []
    for row in plan.rows:
        for seed, v in zip(SEEDS, NDCG[row.name]):
            d = tmp_path / row.runs_root / f"seed{seed}"
            _write_json(d / "metrics.json", {"test": three(v), "valid": three(2 * v), "best_epoch": 1,
                                             "epochs_run": 2, "global_step": 20, "history": []})
            (d / "config.yaml").write_text(yaml.safe_dump(_nested({**row.settings, "train.seed": seed,
                                                                   "train.epochs": 5, "data.domains": ["A", "B"]})))
            _write_json(d / "run.json", {"git_sha": "abc", "device": "cpu", "teachers": {"unisrec": {}}})
    m = collect(load_plan(tmp_path / "configs/plan.yaml", "configs/plan.yaml"), tmp_path, "collect (test)")
    assert m["domain"] == "mean" and m["domains"] == ["A", "B"]
    seed = m["rows"]["clean_mean"]["seeds"][0]
    assert seed["test"]["ndcg@10"] == pytest.approx(0.75 * 0.060)
    assert seed["valid"]["ndcg@10"] == pytest.approx(0.75 * 0.120)
    assert set(seed["test_by_domain"]) == {"A", "B"} and seed["test_by_domain"]["B"]["ndcg@10"] == pytest.approx(0.030)
    assert m["rows"]["clean_mean"]["stats"]["ndcg@10"]["mean"] == pytest.approx(0.75 * 0.062)
    # corrupted_mean vs clean_mean on the mean: (0.056 - 0.062) / 0.062 = -9.68% (the scale cancels)
    assert m["targets"]["integration"]["change_pct"]["mean"] == pytest.approx(-9.677, abs=1e-3)
    assert m["best_teacher"] == "unisrec" and m["teachers"]["unisrec"]["test"]["ndcg@10"] == pytest.approx(0.06)
    assert m["targets"]["curriculum"] == {} and m["curriculum"]["reference"] is None
    src = tmp_path / "m.json"
    src.write_text(json.dumps(m))
    page = render_mechanisms_page(load_mechanisms(src, "results/m.json"))
    assert "Reduced scale on A and B. Student: `configs/demo/student.yaml` (train.epochs = 5" in page
    assert "All metrics: test split of each of A and B" in page and "(mean over the domains)" in page
    assert "Curriculum" not in page and "## 3. Student against its teachers" in page
    table = next(t for t in parse_markdown_tables(page) if t and "B" in t[0])
    row = next(r for r in table if r["Row"] == "clean, mean")
    assert (row["A"], row["B"], row["mean"]) == ("0.0620 ± 0.0020", "0.0310 ± 0.0010", "0.0465 ± 0.0015")
    teacher = next(r for r in table if r["Row"] == "teacher: UniSRec")
    assert (teacher["A"], teacher["B"], teacher["mean"]) == ("0.0800", "0.0400", "0.0600")
    for mutate, match in [(lambda p: p.update(domain="A"), "not both"), (lambda p: p.pop("domains"), "not neither"),
                          (lambda p: p.update(domains=["A", "A"]), "distinct domain names"),
                          (lambda p: p.update(curriculum=[]), "'curriculum' must be a mapping"),
                          (lambda p: p.update(curriculum={"rows": [], "reference": "clean_mean"}),
                           "curriculum.reference clean_mean must be one of curriculum.rows")]:
        bad = json.loads(json.dumps(raw))
        mutate(bad)
        with pytest.raises(PlanError, match=match):
            parse_plan(bad, "plan.yaml")
    # a teacher file whose domain B lacks a metric is a named error (not a KeyError), naming B
    broken = three(0.08)
    del broken["B"]["ndcg@50"]
    _write_json(tmp_path / "runs/t/unisrec/metrics.json", {"test": broken})
    with pytest.raises(PlanError, match=r"unisrec/metrics.json: no test .* for B \(the plan's domains: A, B\)"):
        collect(load_plan(tmp_path / "configs/plan.yaml", "configs/plan.yaml"), tmp_path)
    _write_json(tmp_path / "runs/t/unisrec/metrics.json", {"test": three(0.08)})
    # a run of another student (other domains) in a row's directory is refused, naming both
    cfg = tmp_path / "runs/mech/clean_both/seed2/config.yaml"
    c = yaml.safe_load(cfg.read_text())
    c["data"]["domains"] = ["A"]
    cfg.write_text(yaml.safe_dump(c))
    with pytest.raises(PlanError, match=r"seed2: config.yaml trains domains \['A'\], the plan \['A', 'B'\]"):
        collect(load_plan(tmp_path / "configs/plan.yaml", "configs/plan.yaml"), tmp_path)


def test_committed_union_plan_rows_resolve_to_their_settings():
    """configs/mechanisms/union.yaml parses, and each row's command resolves to a config that holds
    what collect checks, over the union's three domains (the served pools named by each row)."""
    import shlex

    from research.seeds import distill_argv, resolved

    plan = load_plan(ROOT / "configs/mechanisms/union.yaml", "configs/mechanisms/union.yaml")
    assert plan.domain == "mean" and plan.domains == ("Scientific", "Office14", "Games")
    assert [(r.pool, r.mode) for r in plan.rows] == [
        ("clean", "mean"), ("clean", "both"), ("corrupted", "mean"), ("corrupted", "both"), ("clean", "confidence"),
        ("clean", "consistency"), ("corrupted", "confidence"), ("corrupted", "consistency"), (None, None), (None, None)]
    assert [r.name for r in plan.rows[-2:]] == ["curriculum_on", "curriculum_off"]
    # curriculum on is clean_both with the test curve recorded; off differs from it only by the curriculum
    by_name = {r.name: r for r in plan.rows}
    assert by_name["curriculum_on"].settings == {**by_name["clean_both"].settings, "train.record_test_curve": True}
    assert by_name["curriculum_off"].settings == {**by_name["curriculum_on"].settings, "curriculum.enabled": False}
    for row in plan.rows:
        cfg = resolved(distill_argv(mechanisms.seeds_parser().parse_args(shlex.split(row.command)[3:]), 2024))
        assert cfg["data"]["domains"] == list(plan.domains)
        assert (cfg["train"]["epochs"], cfg["train"]["max_steps_per_epoch"]) == (5, 80)
        for key, want in row.settings.items():
            assert mechanisms._dotted(cfg, key) == (True, want), (row.name, key)
    # the corrupted pool is the clean one plus the permuted copy of its Games-whole text+ID UniSRec
    from cluster.deploy import load_spec

    clean, bad = (load_spec(ROOT / plan.pools[p]["spec"], check_checkpoints=False) for p in ("clean", "corrupted"))
    assert [t.name for t in bad.teachers] == [t.name for t in clean.teachers] + ["unisrec_textid_full_permuted"]
    assert all(t.precision == "bfloat16" for t in bad.teachers)
    permuted = next(t for t in plan.teachers if t["name"] == "unisrec_textid_full_permuted")
    assert permuted["corrupted"] and "--base runs/union/teachers/unisrec_textid_full/best" in permuted["build"]


def test_committed_two_corrupted_plan_reuses_the_clean_rows_and_adds_one_wrong_teacher():
    """configs/mechanisms/union_two_corrupted.yaml: its clean rows are union.yaml's (the same commands,
    so the same finished runs), and its corrupted pool is union.yaml's plus a permuted UniM2Rec."""
    from cluster.deploy import load_spec

    one = load_plan(ROOT / "configs/mechanisms/union.yaml", "configs/mechanisms/union.yaml")
    two = load_plan(ROOT / "configs/mechanisms/union_two_corrupted.yaml", "configs/mechanisms/union_two_corrupted.yaml")
    assert two.domains == one.domains and two.seeds == one.seeds
    by_name = {r.name: r for r in one.rows}
    for row in two.rows[:2]:
        assert row.pool == "clean" and row.command == by_name[row.name].command
    assert [(r.pool, r.mode) for r in two.rows[2:]] == [("corrupted", "mean"), ("corrupted", "both")]
    specs = [load_spec(ROOT / p.pools["corrupted"]["spec"], check_checkpoints=False) for p in (one, two)]
    assert [t.name for t in specs[1].teachers] == [t.name for t in specs[0].teachers] + ["unim2rec_permuted"]
    assert sum(t["corrupted"] for t in two.teachers) == 2


def test_anytime_sidecar_names_the_mean_over_the_domains(tmp_path):
    """A multi-domain plan's anytime curves are its runs' test mean over the domains, and the sidecar
    and the figure's axis say so; a one-domain plan's keep the domain's name. The figure is drawn."""
    from ckd.mechanisms_report import anytime_points, anytime_ylabel, draw_anytime

    curve = {"steps": [1, 2], "values": [0.1, 0.2], "sd": [0.0, 0.0], "seeds": [1, 2], "final": 0.2}
    m = {"domain": "mean", "domains": ["A", "B", "C"],
         "curriculum": {"reference": "off", "rows": [{"row": "off", "label": "no curriculum"}],
                        "anytime": {"curves": {"off": curve}, "compare": {"runs": {}}}}}
    side = anytime_points(m)
    assert side["domain"] == "mean over A, B and C" and side["curves"]["off"]["mean"] == [0.1, 0.2]
    one = anytime_points({**m, "domain": "A", "domains": None})
    assert one["domain"] == "A"
    assert anytime_ylabel(side) == "test NDCG@10, mean over A, B and C\n(mean over seeds)"
    assert anytime_ylabel(one) == "test NDCG@10, A\n(mean over seeds)"
    draw_anytime(side, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
