"""The union page (docs/results_union.md) and its driver (research/union.py), without training:
the page rendered from a small hand-made union JSON shows hand-computed means ± sd, pending rows and
computed target verdicts; ``collect`` turns a tiny fake tree of run directories into the expected
JSON; ``run`` issues the queue's exact commands, skips finished steps, waits for prerequisites and
records every invocation; the manifest accepts a union page."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from ckd.reporting import (Efficiency, ModelEfficiency, ReportError, load_efficiency, parse_markdown_tables,
                           parse_results_manifest, png_size)
from ckd.reporting import fmt_duration
from ckd.union_report import (draw_union_figure, figure_role, key_line, load_union, number_points, parse_union,
                              render_union_page, union_figure_points, union_png_size)
from launch import report
from research import union

pytestmark = pytest.mark.unit
DOMAINS = ["Scientific", "Office14", "Games"]


def m(n10: float) -> dict[str, float]:
    """Hand-made metrics: every metric a fixed multiple of NDCG@10, so each is hand-computable."""
    return {"recall@10": 2 * n10, "ndcg@10": n10, "recall@50": 4 * n10, "ndcg@50": 1.5 * n10}


def split(sci: float, off: float, games: float) -> dict[str, dict[str, float]]:
    return {"Scientific": m(sci), "Office14": m(off), "Games": m(games)}


def with_valid(rec: dict, v: float) -> dict:
    """A seed record whose valid NDCG@10 is ``v`` on every domain and their mean (what §2.5 judges)."""
    rec["valid"] = {**split(v, v, v), "mean": m(v)}
    return rec


def teacher(label: str, test: dict | None, row: bool = True, served: bool = True, note: str = "") -> dict:
    t = {"label": label, "config": f"configs/union/{label.lower().replace(' ', '_')}.yaml",
         "command": f"ckd-train-teacher --config configs/union/{label}.yaml --run-dir runs/union/teachers/{label}",
         "run_dir": f"runs/union/teachers/{label}", "row": row, "served": served,
         "sizing": {"device": "cpu", "stages": {"train": {"epochs": 2, "batch_size": 1024,
                                                          "max_train_rows": {"Games": 60000}}}}}
    if note:
        t["note"] = note
    if test is None:
        return {**t, "status": "pending", "detail": "not started"}
    return {**t, "status": "done", "checkpoint": t["run_dir"] + "/best",
            "checkpoint_sha256": "0123456789abcdef" + "f" * 48, "vocab_hash": "v" * 64, "params": 674048,
            "best_epoch": 1, "device": "cpu", "train_s": 5400.0,
            "train_s_source": "invocations.jsonl (sum of wall times)",
            "invocations": 1, "failed_invocations": 0, "machine": "fixture-box (2 cores)",
            "machine_source": "recorded at training", "stages": {}, "valid": test, "test": test}


def seed(n: int, test: dict | None) -> dict:
    if test is None:
        return {"seed": n, "status": "pending", "runs": [{"status": "pending", "run_dir": f"r/seed{n}"}],
                "test": {}, "valid": {}, "wall_s": None}
    return {"seed": n, "status": "done", "runs": [{"status": "done", "run_dir": f"r/seed{n}", "wall_s": 600.0,
                                                   "wall_s_source": "invocations.jsonl (sum of wall times)",
                                                   "best_epoch": 4, "num_parameters": 538880}],
            "test": test, "valid": test, "wall_s": 600.0}


def student(label: str, group: str, model: str, variant: str, seeds: list[dict]) -> dict:
    return {"label": label, "group": group, "model": model, "variant": variant, "teachers": "none",
            "configs": ["c.yaml"], "run_dirs": ["r"], "commands": [f"ckd-distill --config c.yaml  # {label}"],
            "seeds": seeds}


def fixture() -> dict:
    """A hand-made union results file. Test NDCG@10 per (Scientific, Office14, Games):

    SASRec alone per domain  seed 1: .05 .04 .03 (mean .04)   seed 2: .06 .05 .07 (mean .06)
    SASRec joint alone       seed 1: .10 .05 .05              seed 2: .12 .05 .06
    SASRec joint distilled   seed 1: .10 .09 .08              seed 2: .20 .11 .09   seed 3: pending
    Good teacher .12 .09 .07 · Weak teacher .06 .046 .04 · Late teacher pending · pre-training: no row
    FM alone .03 .02 .02, distilled .04 .03 .025 · LightGCN alone .02 .02 .02, distilled .03 .01 .02
    DeepFM alone .03 .03 .03, distilled pending
    """
    return {
        "kind": "union", "schema": 1, "plan": "configs/union/plan.yaml", "domains": DOMAINS,
        "commit": "0123456789abcdef0123456789abcdef01234567", "created": "2026-12-02T10:00:00",
        "machine": "fixture-box (2 cores)", "command": "python -m research.union collect --out results/u.json",
        "retrain_teachers": {"command": "python -m research.union run --only pre,good,weak,late",
                             "teachers": ["pre", "good", "weak", "late"], "finished": 3, "train_s": 16200.0,
                             "machines": ["fixture-box (2 cores)"], "devices": ["cpu"]},
        "teachers": {
            "pre": teacher("Pre-training", split(0.01, 0.01, 0.01), row=False, served=False),
            "good": teacher("Good teacher", split(0.12, 0.09, 0.07)),
            "weak": teacher("Weak teacher", split(0.06, 0.046, 0.04), note="Games capped at 60,000 rows"),
            "late": teacher("Late teacher", None),
        },
        "students": {
            "sasrec_alone": student("SASRec alone", "baseline", "sasrec", "alone-per-domain",
                                    [seed(1, split(0.05, 0.04, 0.03)), seed(2, split(0.06, 0.05, 0.07))]),
            "sasrec_joint_alone": student("SASRec joint alone", "baseline", "sasrec", "joint-alone",
                                          [seed(1, split(0.10, 0.05, 0.05)), seed(2, split(0.12, 0.05, 0.06))]),
            "sasrec_joint_distilled": student("SASRec distilled", "distilled", "sasrec", "distilled",
                                              [seed(1, split(0.10, 0.09, 0.08)), seed(2, split(0.20, 0.11, 0.09)),
                                               seed(3, None)]),
            "fm_alone": student("FM alone", "universality", "fm", "alone", [seed(1, split(0.03, 0.02, 0.02))]),
            "fm_distilled": student("FM distilled", "universality", "fm", "distilled",
                                    [seed(1, split(0.04, 0.03, 0.025))]),
            "deepfm_alone": student("DeepFM alone", "universality", "deepfm", "alone",
                                    [seed(1, split(0.03, 0.03, 0.03))]),
            "deepfm_distilled": student("DeepFM distilled", "universality", "deepfm", "distilled", [seed(1, None)]),
            "lightgcn_alone": student("LightGCN alone", "universality", "lightgcn", "alone",
                                      [seed(1, split(0.02, 0.02, 0.02))]),
            "lightgcn_distilled": student("LightGCN distilled", "universality", "lightgcn", "distilled",
                                          [seed(1, split(0.03, 0.01, 0.02))]),
        },
        "pending": ["teacher late (runs/union/teachers/late): not started",
                    "student sasrec_joint_distilled seed 3 (r/seed3): not started"],
    }


def sections(md: str) -> dict[str, list[list[dict[str, str]]]]:
    """Tables keyed by the nearest heading above them."""
    out: dict[str, list] = {}
    heading, chunk = "", []
    for line in md.splitlines() + ["# end"]:
        if line.startswith("#"):
            tables = parse_markdown_tables("\n".join(chunk))
            if tables:
                out[heading] = tables
            heading, chunk = line.lstrip("# ").strip(), []
        else:
            chunk.append(line)
    return out


def row(table: list[dict[str, str]], key: str, value: str) -> dict[str, str]:
    rows = [r for r in table if r[key] == value]
    assert len(rows) == 1, f"{key}={value!r}: {len(rows)} rows in {table}"
    return rows[0]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("union") / "experiments_union.json"
    path.write_text(json.dumps(fixture()))
    out = path.parent / "results_union.md"
    assert report.main(["--union", str(path), "--out", str(out), "--draft"]) == 0
    md = out.read_text()
    return {"md": md, "tables": sections(md)}


# ----------------------------------------------------------------------------- the page


def test_per_domain_tables_show_mean_and_sd_over_seeds(page):
    t = page["tables"]
    sci = t["Scientific"][0]
    # teachers with a row first (the pre-training stage has none), then the students in plan order
    assert [r["Row"] for r in sci][:4] == ["Good teacher", "Weak teacher", "Late teacher", "SASRec alone"]
    assert "Pre-training" not in [r["Row"] for r in sci]
    dist = row(sci, "Row", "SASRec distilled")
    # seeds .10 and .20: mean .15, sample sd sqrt(2 * .05^2) = .070711; recall@10 = 2x: .30 ± .141421
    assert (dist["NDCG@10"], dist["Recall@10"]) == ("0.1500 ± 0.0707", "0.3000 ± 0.1414")
    assert dist["Seeds"] == "2 seeds (seed 3 pending)"
    assert row(sci, "Row", "Good teacher")["NDCG@50"] == "0.1800"  # 1.5 x .12
    assert row(sci, "Row", "Good teacher")["Seeds"] == "teacher run"
    fm = row(t["Games"][0], "Row", "FM distilled")
    assert (fm["NDCG@10"], fm["Seeds"]) == ("0.0250", "1 seed")
    # pending rows read pending, every metric
    for name in ("Late teacher", "DeepFM distilled"):
        r = row(sci, "Row", name)
        assert [r[k] for k in ("Seeds", "Recall@10", "NDCG@10", "Recall@50", "NDCG@50")] == ["pending"] * 5


def test_mean_over_domains_of_the_per_domain_alone_row(page):
    mean = page["tables"]["Mean over domains"][0]
    # per seed: (.05 + .04 + .03) / 3 = .04 and (.06 + .05 + .07) / 3 = .06 -> .05 ± .014142
    assert row(mean, "Row", "SASRec alone")["NDCG@10"] == "0.0500 ± 0.0141"
    # Recall@50 = 4 x NDCG@10: .20 ± .056569
    assert row(mean, "Row", "SASRec alone")["Recall@50"] == "0.2000 ± 0.0566"
    assert row(mean, "Row", "Good teacher")["NDCG@10"] == "0.0933"  # (.12 + .09 + .07) / 3
    assert row(mean, "Row", "Late teacher")["NDCG@10"] == "pending"


def test_target_verdicts_are_computed(page):
    md, t = page["md"], page["tables"]
    t1 = t["2.1 Distilled joint SASRec vs the students without teachers"][0]
    cols = ["Distilled", "Baseline NDCG@10", "Δ", "Spread", "Beats it by more than the spread"]

    def cells(domain: str, baseline: str) -> list[str]:
        r = [r for r in t1 if (r["Domain"], r["Baseline"]) == (domain, baseline)]
        assert len(r) == 1
        return [r[0][c] for c in cols]

    # vs SASRec alone: .15 - .055 = +.095 > spread max(.0707, .0071): yes
    assert cells("Scientific", "SASRec alone") == ["0.1500 ± 0.0707", "0.0550 ± 0.0071", "+0.0950", "0.0707", "yes"]
    # vs joint alone: .15 - .11 = +.04, not above the spread .0707: no
    assert cells("Scientific", "SASRec joint alone")[1:] == ["0.1100 ± 0.0141", "+0.0400", "0.0707", "no"]
    # .085 - .05 = +.035 vs sd(.03, .07) = .028284: yes; Office14 vs joint alone: .10 - .05 vs sd .014142
    assert cells("Games", "SASRec alone")[2:] == ["+0.0350", "0.0283", "yes"]
    assert cells("Office14", "SASRec joint alone")[1:] == ["0.0500 ± 0.0000", "+0.0500", "0.0141", "yes"]
    assert ("1. The distilled joint SASRec beats per-domain SASRec alone and the joint SASRec without teachers "
            "on every domain, by more than the seed spread: **not met** (no: Scientific vs SASRec joint alone)") in md

    # best teacher: ahead of every finished teacher, but one is still training -> open, not met
    t2 = t["2.2 Distilled joint SASRec vs the best teacher"][0]
    assert row(t2, "Domain", "Office14")["Best teacher"] == "Good teacher"
    assert row(t2, "Domain", "Office14")["Δ"] == "+0.0100"  # .10 - .09
    assert row(t2, "Domain", "Office14")["Reaches or beats it"].startswith("pending (ahead of the finished")
    assert "2. It reaches or beats the best teacher on every domain: **open** (3 of 3 not judged yet" in md

    t3 = t["2.3 Each teacher vs per-domain SASRec alone"][0]
    assert row(t3, "Teacher", "Good teacher")["Beats it on every domain"] == "met"
    weak = row(t3, "Teacher", "Weak teacher")
    assert weak["Games: Δ NDCG@10 vs SASRec alone"] == "-0.0100 (no)"  # .04 - .05
    assert weak["Scientific: Δ NDCG@10 vs SASRec alone"] == "+0.0050 (yes)"  # .06 - .055
    assert weak["Beats it on every domain"] == "not met (no: Games)"
    assert row(t3, "Teacher", "Late teacher")["Games: Δ NDCG@10 vs SASRec alone"] == "pending"
    assert "Not beating per-domain SASRec alone: Weak teacher on Games (-0.0100): Games capped at 60,000 rows." in md
    assert ("3. Every teacher beats per-domain SASRec alone on every domain: **not met** "
            "(no: Weak teacher on Games)") in md

    t4 = t["2.4 FM, DeepFM and LightGCN: distilled vs alone"][0]
    fm = [r for r in t4 if r["Student"] == "FM"]
    assert [(r["Gain"], r["Gains"]) for r in fm] == [("+33.3%", "yes"), ("+50.0%", "yes"), ("+25.0%", "yes")]
    lg = {r["Domain"]: r for r in t4 if r["Student"] == "LightGCN"}
    assert (lg["Office14"]["Gain"], lg["Office14"]["Gains"]) == ("-50.0%", "no")
    assert (lg["Games"]["Gain"], lg["Games"]["Gains"]) == ("+0.0%", "no")  # equal is no gain
    assert [r["Gains"] for r in t4 if r["Student"] == "DeepFM"] == ["pending"] * 3
    assert "**not met** (no: LightGCN on Office14, LightGCN on Games)" in md


def test_teacher_reproducibility_and_retrain_command(page):
    md = page["md"]
    t = page["tables"]["3. Teachers: reproducibility"][0]
    good = row(t, "Teacher", "Good teacher (`good`)")
    assert good["Checkpoint sha256 (first 16)"] == "`0123456789abcdef`"
    assert (good["Training time"], good["Machine"]) == ("1 h 30 min", "fixture-box (2 cores) (recorded at training)")
    assert good["Sizing"] == "train: 2 ep, batch 1024, Games ≤ 60,000 rows"
    assert row(t, "Teacher", "Pre-training (`pre`)")["On the page"] == "stage of others"
    late = row(t, "Teacher", "Late teacher (`late`)")
    assert (late["Training time"], late["Time measured by"]) == ("pending", "not started")
    assert "python -m research.union run --only pre,good,weak,late\n```" in md
    assert "Measured: 4 h 30 min of training wall time so far (3 of 4 teachers finished), on fixture-box" in md
    assert "- teacher late (runs/union/teachers/late): not started" in md
    # the Figure 1 hook, unfilled: pending, with the commands that make its inputs and the manifest lines
    assert "**Pending:** the figure is drawn once the per-domain inference benchmarks" in md
    assert ("python -m benchmarks.inference \\\n    --teacher good=runs/union/teachers/Good teacher/best" in md)
    assert "--student sasrec_alone=r/seed1/best" in md and "--student fm_alone" not in md
    assert "--domain Games \\\n    --out results/efficiency_union_games.json" in md
    assert ("```yaml\n    efficiency:\n      Scientific: results/efficiency_union_scientific.json\n"
            "      Games: results/efficiency_union_games.json\n    figure: docs/figure1_union.png\n```") in md


def test_efficiency_hook_lists_measurements_beside_the_rows():
    """A single efficiency input (no domain keys) lists each measured model with its row's test
    NDCG@10 per domain; the figure stays pending."""
    u = parse_union(fixture(), "u.json")
    eff = Efficiency(machine="gpu-box", commit="c", created="", device="cpu", source="results/e.json",
                     models=[ModelEfficiency("sasrec_joint_distilled", "student", 538880, 36.0, 87.456, "r/best"),
                             ModelEfficiency("good", "teacher", 674048, 512.5, 1500.0, "t/best"),
                             ModelEfficiency("elsewhere", "teacher", 10, 1.0, 2.0, "x")])
    t = sections(render_union_page(u, eff))["6. Figure 1: accuracy, inference time and memory"][0]
    dist = row(t, "Model", "sasrec_joint_distilled")
    assert (dist["Row"], dist["Inference ms / 1,000 users"], dist["Test NDCG@10 Scientific"]) == \
        ("SASRec distilled", "87.46", "0.1500 ± 0.0707")
    good = row(t, "Model", "good")
    assert (good["Peak memory (MB)"], good["Test NDCG@10 Games"]) == ("512.5", "0.0700")
    assert row(t, "Model", "elsewhere")["Row"] == "—"


def test_bad_union_files_are_named_errors():
    ok = fixture()
    for edit, match in [
        (lambda d: d.update(kind="experiments"), "not a union results file"),
        (lambda d: d["teachers"]["good"].pop("test"), "teacher 'good': missing key 'test'"),
        (lambda d: d["teachers"]["good"]["test"].pop("Games"), r"no results for \['Games'\]"),
        (lambda d: d["students"]["fm_alone"]["seeds"][0]["test"].update(Books=m(0.1)), "not the plan's"),
        # a stored mean that is not the unweighted mean of the domains is refused, not shown
        (lambda d: d["students"]["fm_alone"]["seeds"][0]["test"].update(mean=m(0.5)), "not the unweighted mean"),
        # valid splits are checked the same way (the adoption rules of §2.5 are judged on them)
        (lambda d: d["students"]["fm_alone"]["seeds"][0].update(valid={**split(0.1, 0.1, 0.1), "mean": m(0.2)}),
         "seed 1 valid: 'mean'"),
        (lambda d: d["teachers"]["good"].update(status="running"), "status 'running'"),
    ]:
        bad = copy.deepcopy(ok)
        edit(bad)
        with pytest.raises(ReportError, match=match):
            parse_union(bad, "u.json")
    assert fmt_duration(42) == "42 s" and fmt_duration(738) == "12.3 min" and fmt_duration(11100) == "3 h 05 min"


def test_adoption_rule_is_judged_on_valid_once_every_seed_is_in():
    """A plan rule ``adopt_over``: the candidate replaces the named row only if its seed mean of valid
    NDCG@10 (mean over domains) is higher; open while a planned seed of either row is missing; test
    never decides it (here the candidate's test is far higher while its valid is lower)."""
    def judged(data: dict) -> str:
        md = render_union_page(parse_union(data, "u.json"))
        lines = [ln for ln in md.splitlines() if ln.startswith("Gated over SASRec distilled: ")]
        assert len(lines) == 1, md
        return lines[0].split(": ", 1)[1]

    data = fixture()
    base = data["students"]["sasrec_joint_distilled"]
    base["seeds"] = [with_valid(base["seeds"][0], 0.09), with_valid(base["seeds"][1], 0.13)]  # seed mean .11
    gated = student("Gated", "ablation", "sasrec", "distilled, gated",
                    [with_valid(seed(1, split(0.5, 0.5, 0.5)), 0.10), seed(2, None)])
    data["students"]["gated"] = {**gated, "adopt_over": "sasrec_joint_distilled"}
    assert judged(data) == "**open** (pending: Gated seed 2; so far 0.1000 against 0.1100)"

    lower = copy.deepcopy(data)  # seed 2 in: (.10 + .11) / 2 = .105 < .11, whatever test says
    lower["students"]["gated"]["seeds"][1] = with_valid(seed(2, split(0.5, 0.5, 0.5)), 0.11)
    assert judged(lower) == "**not adopted** (0.1050 against 0.1100)"
    higher = copy.deepcopy(data)  # (.10 + .13) / 2 = .115 > .11
    higher["students"]["gated"]["seeds"][1] = with_valid(seed(2, split(0.01, 0.01, 0.01)), 0.13)
    assert judged(higher) == "**adopted** (0.1150 against 0.1100)"
    table = sections(render_union_page(parse_union(higher, "u.json")))["2.5 Rules fixed before the runs"][0]
    assert row(table, "Row", "Gated")["Valid NDCG@10 per seed (mean over domains)"] == "1: 0.1000, 2: 0.1300"
    assert row(table, "Row", "SASRec distilled")["Seed mean"] == "0.1100"
    # targets 1 and 2 judge the shipped recipe: the adopted row (test .5 and .01: mean .255, sd .3465),
    # and the plan's distilled row (.10 and .20: mean .15, sd .0707) while its rule has not adopted another
    for data_, shown, named in ((higher, "0.2550 ± 0.3465", True), (lower, "0.1500 ± 0.0707", False)):
        md = render_union_page(parse_union(data_, "u.json"))
        t2 = sections(md)["2.2 Distilled joint SASRec vs the best teacher"][0]
        assert row(t2, "Domain", "Scientific")["Distilled"] == shown
        t1 = sections(md)["2.1 Distilled joint SASRec vs the students without teachers"][0]
        assert {r["Distilled"] for r in t1 if r["Domain"] == "Scientific"} == {shown}
        assert ("Targets 1 and 2 judge the shipped distilled recipe, *Gated*: its rule adopted it over "
                "*SASRec distilled* (§2.5)." in md) is named
    # a chain: a row adopted over the adopted one (valid .12 > .115) is judged, named with both it replaced
    chained = copy.deepcopy(higher)
    chained["students"]["third"] = {**student("Third", "ablation", "sasrec", "distilled, third",
                                              [with_valid(seed(1, split(0.3, 0.3, 0.3)), 0.12),
                                               with_valid(seed(2, split(0.3, 0.3, 0.3)), 0.12)]),
                                    "adopt_over": "gated"}
    md = render_union_page(parse_union(chained, "u.json"))
    assert row(sections(md)["2.2 Distilled joint SASRec vs the best teacher"][0], "Domain",
               "Scientific")["Distilled"] == "0.3000 ± 0.0000"
    assert ("Targets 1 and 2 judge the shipped distilled recipe, *Third*: its rule adopted it over *Gated*, "
            "in place of *SASRec distilled* (§2.5)." in md)
    assert "2.5 Rules fixed before the runs" not in render_union_page(parse_union(fixture(), "u.json"))
    no_valid = copy.deepcopy(higher)  # a finished seed whose record has no valid split is not "pending"
    no_valid["students"]["sasrec_joint_distilled"]["seeds"][1]["valid"] = {}
    assert judged(no_valid) == ("**open** (pending: SASRec distilled seed 2 (no valid recorded); "
                                "so far 0.1150 against 0.0900)")

    bad = copy.deepcopy(data)
    bad["students"]["gated"]["adopt_over"] = "nobody"
    with pytest.raises(ReportError, match="student 'gated': adopt_over 'nobody' is not another student"):
        parse_union(bad, "u.json")
    raw = yaml.safe_load((union.REPO / union.PLAN).read_text())
    raw["students"][0]["adopt_over"] = raw["students"][0]["name"]
    with pytest.raises(union.PlanError, match="is not another student of the plan"):
        union.parse_plan(raw)
    committed = union.load_plan(union.REPO / union.PLAN, union.PLAN)
    assert {s.name: s.adopt_over for s in committed.students if s.adopt_over} == {
        "sasrec_joint_distilled_gated": "sasrec_joint_distilled",
        "sasrec_joint_distilled_games_whole": "sasrec_joint_distilled",
        "fm_joint_distilled_games_whole": "fm_joint_distilled",
        "lightgcn_joint_distilled_games_whole": "lightgcn_joint_distilled",
        "deepfm_joint_distilled_games_whole": "deepfm_joint_distilled",
        "sasrec_joint_distilled_games_whole_lambda3": "sasrec_joint_distilled_games_whole",
        "sasrec_joint_distilled_games_whole_lambda3_nocurriculum": "sasrec_joint_distilled_games_whole_lambda3"}


def test_target_4_judges_the_fm_row_a_rule_adopted():
    """A rule over FM distilled (one seed each): once adopted on valid, target 4 judges the adopted row
    (test .05 .04 .01: a loss on Games against FM alone's .02); not adopted, the plan's row
    (.04 .03 .025: gains everywhere)."""
    def fm_games(data: dict) -> tuple[str, str, bool]:
        md = render_union_page(parse_union(data, "u.json"))
        t4 = sections(md)["2.4 FM, DeepFM and LightGCN: distilled vs alone"][0]
        r = [x for x in t4 if x["Student"] == "FM" and x["Domain"] == "Games"]
        assert len(r) == 1, t4
        named = ("Target 4 judges for FM, *FM whole*: its rule adopted it over *FM distilled* (§2.5)." in md)
        return r[0]["NDCG@10 distilled"], r[0]["Gains"], named

    data = fixture()
    data["students"]["fm_distilled"]["seeds"] = [with_valid(seed(1, split(0.04, 0.03, 0.025)), 0.03)]
    for valid, expect in ((0.04, ("0.0100", "no", True)), (0.02, ("0.0250", "yes", False))):
        d = copy.deepcopy(data)
        d["students"]["fm_whole"] = {**student("FM whole", "universality", "fm", "distilled, whole",
                                               [with_valid(seed(1, split(0.05, 0.04, 0.01)), valid)]),
                                     "adopt_over": "fm_distilled"}
        assert fm_games(d) == expect


def test_a_distilled_ablation_is_a_figure_row(tmp_path):
    """A distilled row with a changed recipe (variant "distilled, <change>", which a rule may adopt)
    is drawn as a distilled student, and listed as not on the figure while it has no measurement."""
    data = fixture()
    data["students"]["whole"] = student("Whole", "ablation", "sasrec", "distilled, whole",
                                        [seed(1, split(0.2, 0.2, 0.2))])
    u = parse_union(data, "u.json")
    assert figure_role(u.row("whole")) == "distilled" and figure_role(u.row("fm_alone")) is None
    sci = tmp_path / "es.json"
    write_json(sci, SCI)
    side = union_figure_points(u, {"Scientific": load_efficiency(sci, str(sci))})
    skipped = {s["name"]: s["why"] for s in side["panels"][0]["skipped"]}
    assert skipped["whole"] == f"no inference measurement named so in {sci}"


def test_manifest_accepts_a_union_page_and_refuses_mixed_keys():
    spec = parse_results_manifest({"pages": [{"page": "docs/results_union.md",
                                              "union": "results/experiments_union.json"}]}).pages[0]
    assert (spec.union, spec.experiments, spec.inputs) == ("results/experiments_union.json", (),
                                                           ["results/experiments_union.json"])
    hooked = parse_results_manifest({"pages": [{"page": "docs/u.md", "union": "results/u.json",
                                                "efficiency": "results/e.json"}]}).pages[0]
    assert hooked.inputs == ["results/u.json", "results/e.json"]
    for extra in ({"experiments": ["results/a.json"]}, {"domain": "Games"}):
        with pytest.raises(ReportError, match="a 'union' page takes only"):
            parse_results_manifest({"pages": [{"page": "docs/u.md", "union": "results/u.json", **extra}]})
    with pytest.raises(ReportError, match="figure needs per-domain efficiency"):
        parse_results_manifest({"pages": [{"page": "docs/u.md", "union": "results/u.json",
                                           "efficiency": "results/e.json", "figure": "docs/f.png"}]})
    fig = parse_results_manifest({"pages": [{"page": "docs/u.md", "union": "results/u.json", "figure": "docs/f.png",
                                             "efficiency": {"Scientific": "results/es.json",
                                                            "Games": "results/eg.json"}}]}).pages[0]
    assert fig.efficiency_by_domain == (("Scientific", "results/es.json"), ("Games", "results/eg.json"))
    assert (fig.efficiency, fig.figure, fig.inputs) == (None, "docs/f.png",
                                                        ["results/u.json", "results/es.json", "results/eg.json"])
    with pytest.raises(ReportError, match="is for a 'union' page"):
        parse_results_manifest({"pages": [{"page": "docs/r.md", "experiments": ["results/a.json"],
                                           "efficiency": {"Scientific": "results/es.json"}}]})
    with pytest.raises(ReportError, match="'experiments' must be a non-empty list"):
        parse_results_manifest({"pages": [{"page": "docs/u.md"}]})


# ----------------------------------------------------------------------------- Figure 1, two domains


def bench(domain: str, models: dict[str, tuple[str, int, float, float]]) -> dict:
    """A benchmarks/inference.py result file: name -> (kind, params, peak MB, ms per 1,000 users)."""
    return {"machine": "gpu-box", "commit": "c0ffee", "created": "2026-12-03T10:00:00", "device": "cpu",
            "command": f"python -m benchmarks.inference ... --domain {domain}", "domain": domain, "users": 1000,
            "models": {n: {"kind": k, "params": p, "peak_memory_mb": mb, "infer_ms_per_1000_users": ms,
                           "checkpoint": f"{n}/best"} for n, (k, p, mb, ms) in models.items()}}


SCI = bench("Scientific", {"good": ("teacher", 674048, 512.5, 1500.0), "weak": ("teacher", 500000, 300.0, 900.0),
                           "sasrec_alone": ("student", 538880, 30.0, 80.0),
                           "sasrec_joint_distilled": ("student", 538880, 36.0, 87.456),
                           "fm_alone": ("student", 1000, 5.0, 10.0), "elsewhere": ("teacher", 10, 1.0, 2.0)})
GAMES = bench("Games", {"good": ("teacher", 674048, 600.0, 2000.0), "late": ("teacher", 700000, 650.0, 2100.0),
                        "sasrec_joint_alone": ("student", 538880, 40.0, 95.0),
                        "sasrec_joint_distilled": ("student", 538880, 41.0, 96.0)})


def test_union_figure_two_domains_sidecar_png_and_page(tmp_path):
    """Two hand-made benchmarks (Scientific, Games) -> one PNG with two panels of the expected size,
    a sidecar with exactly the expected points per domain (teachers by plan name, students by entry
    name with their mean over seeds), and every figure row without a measurement listed as skipped."""
    u_path, sci, games = tmp_path / "u.json", tmp_path / "es.json", tmp_path / "eg.json"
    for path, obj in ((u_path, fixture()), (sci, SCI), (games, GAMES)):
        write_json(path, obj)
    out, fig = tmp_path / "docs" / "u.md", tmp_path / "docs" / "f1.png"
    assert report.main(["--union", str(u_path), "--domain-efficiency", f"Scientific={sci}",
                        "--domain-efficiency", f"Games={games}", "--figure", str(fig), "--out", str(out),
                        "--draft"]) == 0
    # (5.5 in + 0.25 in pad + 4 key lines x 0.15 in) x 150 dpi = 952.5
    assert png_size(fig) == union_png_size(2, key_lines=4) == (2400, 952)
    side = json.loads(fig.with_suffix(".json").read_text())
    assert [p["domain"] for p in side["panels"]] == ["Scientific", "Games"]
    assert [q["name"] for q in sorted(side["panels"][0]["points"], key=lambda q: q["number"])] == \
        ["sasrec_joint_distilled", "good", "weak", "sasrec_alone"]  # numbered by NDCG@10, highest first
    got = {p["domain"]: {q["name"]: (q["role"], round(q["ndcg@10"], 6), q["infer_ms_per_1000_users"],
                                     q["peak_memory_mb"], q["seeds"]) for q in p["points"]} for p in side["panels"]}
    assert got == {
        "Scientific": {"good": ("teacher", 0.12, 1500.0, 512.5, None), "weak": ("teacher", 0.06, 900.0, 300.0, None),
                       "sasrec_alone": ("alone", 0.055, 80.0, 30.0, 2),
                       "sasrec_joint_distilled": ("distilled", 0.15, 87.456, 36.0, 2)},
        "Games": {"good": ("teacher", 0.07, 2000.0, 600.0, None), "sasrec_joint_alone": ("alone", 0.055, 95.0, 40.0, 2),
                  "sasrec_joint_distilled": ("distilled", 0.085, 96.0, 41.0, 2)}}
    dist = next(q for q in side["panels"][0]["points"] if q["name"] == "sasrec_joint_distilled")
    assert dist["label"] == "SASRec distilled" and abs(dist["ndcg@10_sd"] - 0.0707107) < 1e-6
    skipped = {p["domain"]: {s["name"]: s["why"] for s in p["skipped"]} for p in side["panels"]}
    no_meas = "no inference measurement named so in "
    assert skipped["Scientific"] == {
        "late": no_meas + str(sci), "sasrec_joint_alone": no_meas + str(sci),
        "fm_distilled": no_meas + str(sci), "deepfm_distilled": no_meas + str(sci),
        "lightgcn_distilled": no_meas + str(sci),
        "fm_alone": "measured, but not a figure row (tables only)",
        "elsewhere": "measured, but no row of the page has this name"}
    assert skipped["Games"]["late"] == "its test NDCG@10 on Games is pending"
    assert skipped["Games"]["weak"] == no_meas + str(games) and skipped["Games"]["sasrec_alone"] == no_meas + str(games)
    md = out.read_text()
    assert "](f1.png)" in md and "**Pending:**" not in md
    t = sections(md)
    assert row(t["Scientific"][-1], "Model", "sasrec_joint_distilled")["Test NDCG@10 Scientific"] == "0.1500 ± 0.0707"
    assert row(t["Games"][-1], "Model", "late")["Peak memory (MB)"] == "650.0"
    assert "Late teacher (its test NDCG@10 on Games is pending)" in md and "Not on the figure: " in md
    # a benchmark measured on another domain than its panel's is refused, naming it
    write_json(games, bench("Office14", {"good": ("teacher", 1, 1.0, 1.0)}))
    with pytest.raises(ReportError, match="measured on 'Office14', but given as the 'Games' panel"):
        union_figure_points(parse_union(fixture(), "u.json"),
                            {"Games": load_efficiency(games, str(games))})


# ----------------------------------------------------------------------------- collect and run


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def inv(path: Path, *records: tuple[float, float, int]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "invocations.jsonl", "w") as f:
        for start, end, rc in records:
            f.write(json.dumps({"start": start, "end": end, "rc": rc, "command": "x"}) + "\n")


def tiny_tree(root: Path) -> None:
    """A plan over two domains and the run directories of a half-finished experiment."""
    domains = ["Scientific", "Office14"]
    plan = {"domains": domains,
            "teachers": [{"name": "pre", "label": "Pre", "config": "configs/pre.yaml", "run_dir": "runs/t/pre",
                          "row": False},
                         {"name": "tid", "label": "Text+ID", "config": "configs/tid.yaml", "run_dir": "runs/t/tid",
                          "served": True},
                         {"name": "late", "label": "Late", "config": "configs/late.yaml", "run_dir": "runs/t/late",
                          "served": True}],
            "students": [{"name": "alone", "label": "Alone", "group": "baseline", "model": "sasrec",
                          "variant": "alone-per-domain", "teachers": "none", "seeds": [1, 2],
                          "runs": [{"config": "configs/a_sci.yaml", "run_dir": "runs/a_sci"},
                                   {"config": "configs/a_off.yaml", "run_dir": "runs/a_off"}]},
                         {"name": "dist", "label": "Distilled", "group": "distilled", "model": "sasrec",
                          "variant": "distilled", "seeds": [1],
                          "runs": [{"config": "configs/dist.yaml", "run_dir": "runs/dist"}]}]}
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    (root / "configs" / "pre.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2, "batch_size": 64, "stages": [
        {"name": "pretrain", "max_train_rows": {"Office14": 500}}]}}))
    (root / "configs" / "tid.yaml").write_text(yaml.safe_dump({"train": {"epochs": 3, "batch_size": 32, "stages": [
        {"name": "finetune", "init_from": "runs/t/pre/best"}]}}))
    (root / "configs" / "late.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    (root / "configs" / "dist.yaml").write_text(yaml.safe_dump({"service": {"spec": "configs/serve.yaml"}}))
    (root / "configs" / "serve.yaml").write_text(yaml.safe_dump({"teachers": [
        {"name": "tid", "checkpoint": "runs/t/tid/best"}, {"name": "late", "checkpoint": "runs/t/late/best"}]}))
    for c in ("a_sci", "a_off"):
        (root / "configs" / f"{c}.yaml").write_text("train: {epochs: 1}\n")

    two = {"Scientific": m(0.10), "Office14": m(0.20), "mean": m(0.15)}
    # pre: two invocations (the first failed after 10 s, the second ran 100 s)
    inv(root / "runs/t/pre", (1000.0, 1010.0, 1), (2000.0, 2100.0, 0))
    write_json(root / "runs/t/pre/metrics.json", {
        "valid": two, "test": two, "kind": "unisrec", "checkpoint": str(root / "runs/t/pre/best"),
        "checkpoint_sha256": "a" * 64, "vocab_hash": "h" * 64, "params": 1000, "best_epoch": 1,
        "stages": {"pretrain": {"best_epoch": 1, "history": [{"epoch": 0, "train_s": 40.0},
                                                             {"epoch": 1, "train_s": 50.0}]}}})
    # tid: one recorded invocation of 20 s, but its history's train_s + eval_s say 71 s (part of the
    # training ran outside research.union): the history, a lower bound, said so
    inv(root / "runs/t/tid", (3000.0, 3020.0, 0))
    write_json(root / "runs/t/tid/metrics.json", {
        "valid": two, "test": {"Scientific": m(0.12), "Office14": m(0.06)}, "kind": "unisrec",
        "checkpoint": "runs/t/tid/best", "checkpoint_sha256": "b" * 64, "vocab_hash": "h" * 64, "params": 2000,
        "best_epoch": 0, "stages": {"finetune": {"best_epoch": 0, "history": [
            {"epoch": 0, "train_s": 30.0, "eval_s": 5.0}, {"epoch": 1, "train_s": 31.5, "eval_s": 4.5}]}}})
    (root / "runs/t/late").mkdir(parents=True)
    (root / "runs/t/late/run.json").write_text("{}")  # started, nothing finished
    # alone: seed 1 both domains (30 s + 50 s), seed 2 only Scientific
    for run, dom, val, secs in (("a_sci", "Scientific", 0.05, 30.0), ("a_off", "Office14", 0.07, 50.0)):
        inv(root / f"runs/{run}/seed1", (0.0, secs, 0))
        write_json(root / f"runs/{run}/seed1/metrics.json", {
            "valid": {dom: m(val), "mean": m(val)}, "test": {dom: m(val), "mean": m(val)}, "best_epoch": 3,
            "epochs_run": 7, "num_parameters": 500, "history": [{"train_s": 1.0}], "timing": {"eval_s": 2.0}})
    write_json(root / "runs/a_sci/seed2/metrics.json", {
        "valid": {"Scientific": m(0.06)}, "test": {"Scientific": m(0.06), "mean": m(0.06)}, "best_epoch": 2,
        "history": [{"train_s": 10.0}, {"train_s": 12.0}], "timing": {"eval_s": 3.0}})
    # each finished run's resolved config: its config file's settings (and seed) plus resolved defaults
    for config, run_dir, run_seed in (("pre", "runs/t/pre", None), ("tid", "runs/t/tid", None),
                                      ("a_sci", "runs/a_sci/seed1", 1), ("a_off", "runs/a_off/seed1", 1),
                                      ("a_sci", "runs/a_sci/seed2", 2)):
        write_resolved(root, f"configs/{config}.yaml", run_dir, run_seed)


def write_resolved(root: Path, config: str, run_dir: str, run_seed: int | None = None) -> dict:
    """``run_dir``/config.yaml as a run of ``config`` writes it: the file's settings, the seed, defaults."""
    cfg = yaml.safe_load((root / config).read_text()) or {}
    cfg.setdefault("train", {})["weight_decay"] = 0.0  # a default the file does not set
    if run_seed is not None:
        cfg["train"]["seed"] = run_seed
    cfg["data"] = {"data_dir": "/data"}
    (root / run_dir).mkdir(parents=True, exist_ok=True)
    (root / run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def test_collect_builds_the_union_json_from_run_directories(tmp_path, capsys):
    tiny_tree(tmp_path)
    out = tmp_path / "results" / "experiments_union.json"
    argv = ["--root", str(tmp_path), "--plan", "configs/plan.yaml", "collect",
            "--out", "results/experiments_union.json"]
    assert union.main(argv) == 0
    assert "2/3 teachers, 1/3 student seeds finished; 3 run(s) pending" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert (data["kind"], data["domains"], data["plan"]) == ("union", ["Scientific", "Office14"], "configs/plan.yaml")
    assert data["command"] == ("python -m research.union --plan configs/plan.yaml collect "
                               "--out results/experiments_union.json")

    pre = data["teachers"]["pre"]
    assert (pre["status"], pre["row"], pre["served"]) == ("done", False, False)
    assert (pre["train_s"], pre["invocations"], pre["failed_invocations"]) == (110.0, 2, 1)
    assert pre["train_s_source"] == "invocations.jsonl (sum of wall times)"
    assert pre["checkpoint"] == "runs/t/pre/best"  # an absolute path inside the checkout, made relative
    assert (pre["checkpoint_sha256"], pre["params"]) == ("a" * 64, 1000)
    assert pre["sizing"]["stages"]["pretrain"] == {"max_train_rows": {"Office14": 500}, "epochs": 2, "batch_size": 64}
    assert pre["command"] == "ckd-train-teacher --config configs/pre.yaml --run-dir runs/t/pre"
    assert pre["machine_source"].startswith("not recorded at training")
    tid = data["teachers"]["tid"]
    assert (tid["train_s"], tid["train_s_lower_bound"], pre["train_s_lower_bound"]) == (71.0, True, False)  # 30+5+31.5+4.5
    assert tid["train_s_source"].startswith("history train_s+eval_s of stage(s) finetune, more than the 1 recorded "
                                            "invocation(s)' 20 s: part of the training ran unrecorded")
    # the mean over domains is the unweighted mean, recomputed: (.12 + .06) / 2
    assert tid["test"]["mean"]["ndcg@10"] == pytest.approx(0.09)
    assert tid["stages"]["finetune"] == {"best_epoch": 0, "epochs_run": 2, "train_s": 71.0}
    assert data["teachers"]["late"] == {**data["teachers"]["late"], "status": "pending",
                                        "detail": "started, not finished"}

    alone = data["students"]["alone"]
    assert alone["commands"] == [
        "ckd-distill --config configs/a_sci.yaml --run-dir runs/a_sci/seed1 --teachers none --set train.seed=1",
        "ckd-distill --config configs/a_off.yaml --run-dir runs/a_off/seed1 --teachers none --set train.seed=1",
        "ckd-distill --config configs/a_sci.yaml --run-dir runs/a_sci/seed2 --teachers none --set train.seed=2",
        "ckd-distill --config configs/a_off.yaml --run-dir runs/a_off/seed2 --teachers none --set train.seed=2"]
    s1, s2 = alone["seeds"]
    assert (s1["status"], s1["wall_s"]) == ("done", 80.0)  # two runs, 30 s + 50 s
    assert list(s1["test"]) == ["Scientific", "Office14", "mean"]  # one row from the two per-domain runs
    assert s1["test"]["mean"]["ndcg@10"] == pytest.approx(0.06)  # (.05 + .07) / 2
    assert [r["domains"] for r in s1["runs"]] == [["Scientific"], ["Office14"]]
    assert (s2["status"], s2["wall_s"], list(s2["test"])) == ("partial", None, ["Scientific"])
    assert s2["runs"][0]["wall_s"] == 25.0  # no invocations.jsonl: 10 + 12 + eval 3
    dist = data["students"]["dist"]
    assert (dist["teachers"], dist["seeds"][0]["status"]) == ("served", "pending")
    assert dist["commands"] == ["ckd-distill --config configs/dist.yaml --run-dir runs/dist/seed1 --set train.seed=1"]
    assert data["pending"] == ["teacher late (runs/t/late): started, not finished",
                               "student alone seed 2 (runs/a_off/seed2): not started",
                               "student dist seed 1 (runs/dist/seed1): not started"]
    assert data["retrain_teachers"]["command"] == "python -m research.union run --only pre,tid,late"
    assert (data["retrain_teachers"]["finished"], data["retrain_teachers"]["train_s"]) == (2, 181.0)
    assert data["retrain_teachers"]["train_s_lower_bound"] is True  # tid's time is a lower bound

    # the JSON renders: the partial seed counts on Scientific only, the mean needs both domains
    u = load_union(out)
    alone_row = u.row("alone")
    assert alone_row.seeds_text("Scientific") == "2 seeds"
    assert alone_row.seeds_text("Office14") == "1 seed (seed 2 pending)"
    assert alone_row.seeds_text("mean") == "1 seed (seed 2 pending)"
    text = render_union_page(u)
    assert "| Alone | baseline | 2 seeds | 0.1100 ± 0.0141 | 0.0550 ± 0.0071 |" in text
    assert "invocations.jsonl (sum of wall times); 2 invocations, 1 failed" in text  # pre's row
    assert "Measured: at least 3.0 min of training wall time so far (2 of 3 teachers finished)" in text

    # an existing --out is never replaced without --overwrite
    before = out.read_text()
    assert union.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == before
    assert union.main(argv + ["--overwrite"]) == 0


def test_run_issues_the_queue_commands_and_records_invocations(tmp_path, capsys):
    tiny_tree(tmp_path)
    base = ["--root", str(tmp_path), "--plan", "configs/plan.yaml", "run"]
    assert union.main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[1/8] teacher pre: finished, skipped" in out
    assert "teacher late: would run `ckd-train-teacher --config configs/late.yaml --run-dir runs/t/late`" in out
    assert ("student alone seed 2 (a_off): would run `ckd-distill --config configs/a_off.yaml --run-dir "
            "runs/a_off/seed2 --teachers none --set train.seed=2`") in out
    # the distilled student needs the served teachers of its deploy spec; in a dry run late would run first
    assert "student dist seed 1 (dist): would run `ckd-distill --config configs/dist.yaml --run-dir runs/dist/seed1 " \
           "--set train.seed=1`" in out
    # one step, for real: the entry point rejects this config (no data, no model), fast; the
    # invocation is recorded with its exit status and the log is written
    (tmp_path / "configs" / "late.yaml").write_text("not_a_key: 1\n")
    assert union.main(base + ["--only", "late,dist", "--heartbeat", "0.005"]) == 1  # a line every 0.3 s
    out = capsys.readouterr().out
    assert "teacher late: start" in out and "teacher late: FAILED (exit" in out
    assert "teacher late: running for" in out  # the heartbeat while the entry point starts up
    assert "student dist seed 1 (dist): waits for late (not finished on this machine" in out
    recs = union.read_invocations(tmp_path / "runs/t/late")
    assert len(recs) == 1 and recs[0]["rc"] != 0 and recs[0]["end"] >= recs[0]["start"]
    assert recs[0]["command"] == "ckd-train-teacher --config configs/late.yaml --run-dir runs/t/late"
    assert "cores" in recs[0]["machine"]
    log = (tmp_path / "runs" / "logs" / "late.log").read_text()
    assert log.startswith("# ") and "ckd-train-teacher --config configs/late.yaml" in log
    assert union.main(base + ["--only", "nope"]) == 2
    assert "--only nope: not in configs/plan.yaml" in capsys.readouterr().err


def test_committed_plan_parses_and_orders_its_steps():
    plan = union.load_plan(union.REPO / union.PLAN, union.PLAN)
    steps = union.plan_steps(plan)
    kinds = [s.kind for s in steps]
    assert kinds == sorted(kinds, key=lambda k: k != "teacher")  # every teacher before any student
    assert steps[0].command == ("ckd-train-teacher --config configs/union/unisrec_pretrain.yaml "
                                "--run-dir runs/union/teachers/unisrec_pretrain")
    alone = [s for s in steps if s.name == "sasrec_alone"]
    assert len(alone) == 3 * len(next(s for s in plan.students if s.name == "sasrec_alone").seeds)
    text = union.Step("teacher", "x", "c.yaml", "r").command
    assert text == "ckd-train-teacher --config c.yaml --run-dir r"
    deps = {s.name: [t.name for t in union.prerequisites(plan, s, union.REPO)] for s in steps if s.seed in (None, 2024)}
    assert deps["unisrec_text"] == ["unisrec_pretrain"] and deps["recformer"] == []
    assert deps["sasrec_joint_distilled"] == [t.name for t in plan.teachers if t.served]
    assert deps["sasrec_joint_alone"] == []


def test_retrain_check_of_a_teacher_on_the_page(tmp_path):
    """The plan's retrain check: pending until the retrained run exists, then per domain the
    recorded and retrained test NDCG@10 with |Δ| and the 0.002 verdict, computed by hand."""
    tiny_tree(tmp_path)
    plan_path = tmp_path / "configs" / "plan.yaml"
    raw = yaml.safe_load(plan_path.read_text())
    raw["retrain_checks"] = [{"teacher": "tid", "run_dir": "runs/repro/tid"}]
    plan_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for d in ("runs/t/tid", "runs/repro/tid"):
        write_resolved(tmp_path, "configs/tid.yaml", d)
        write_json(tmp_path / d / "run.json", {"git_sha": "abc", "argv": ["ckd-train-teacher"]})
    argv = ["--root", str(tmp_path), "--plan", "configs/plan.yaml", "collect", "--out", "u.json", "--overwrite"]
    assert union.main(argv) == 0
    data = json.loads((tmp_path / "u.json").read_text())
    assert data["retrain_checks"][0]["status"] == "pending"
    assert ("retrain check of teacher tid (runs/repro/tid): not finished; train it with "
            "`ckd-train-teacher --config configs/tid.yaml --run-dir runs/repro/tid`") in data["pending"]
    # recorded: Scientific .12, Office14 .06; retrained .1215 (|Δ| .0015) and .0625 (|Δ| .0025 > .002)
    write_json(tmp_path / "runs/repro/tid/metrics.json", {
        "test": {"Scientific": m(0.1215), "Office14": m(0.0625)}, "checkpoint_sha256": "c" * 64,
        "stages": {"finetune": {"history": [{"train_s": 10.0}]}}})
    assert union.main(argv) == 0
    check = json.loads((tmp_path / "u.json").read_text())["retrain_checks"][0]
    assert check["per_domain"]["Scientific"]["abs_diff"] == pytest.approx(0.0015)
    assert (check["per_domain"]["Scientific"]["within_tolerance"], check["per_domain"]["Office14"]["within_tolerance"],
            check["within_tolerance"], check["same_checkpoint_bytes"]) == (True, False, False, False)
    text = render_union_page(load_union(tmp_path / "u.json"))
    assert "- Text+ID: within 0.002 on every domain: **no**; same checkpoint bytes: no" in text
    assert "| Text+ID | Office14 | 0.0600 | 0.0625 | 0.0025 | no |" in text


def test_collect_refuses_a_run_directory_that_trained_another_config(tmp_path, capsys):
    """A finished run whose config.yaml contradicts its plan entry's config file (or seed) is an
    error naming the run and the setting, never a row on the page."""
    tiny_tree(tmp_path)
    argv = ["--root", str(tmp_path), "--plan", "configs/plan.yaml", "collect", "--out", "u.json"]
    cfg = write_resolved(tmp_path, "configs/a_off.yaml", "runs/a_off/seed1", 7)  # seed 7's run in seed 1's place
    assert union.main(argv) == 2
    assert ("runs/a_off/seed1/config.yaml is not the run of configs/a_off.yaml seed 1: train.seed: 1 in the "
            "config, 7 in the run") in capsys.readouterr().err
    cfg["train"].update(seed=1, epochs=True)  # a bool is not the integer 1
    (tmp_path / "runs/a_off/seed1/config.yaml").write_text(yaml.safe_dump(cfg))
    assert union.main(argv) == 2
    assert "train.epochs: 1 in the config, True in the run" in capsys.readouterr().err
    (tmp_path / "runs/t/tid/config.yaml").unlink()
    write_resolved(tmp_path, "configs/a_off.yaml", "runs/a_off/seed1", 1)
    assert union.main(argv) == 2
    assert "runs/t/tid/config.yaml not found beside metrics.json" in capsys.readouterr().err


def test_union_figure_numbers_crowded_points_and_keys_them_by_rank(tmp_path):
    """Nine points, five within 4% of each other in time and .0002 in NDCG@10 (closer than the Games-whole
    teachers and the students on the real Games panel; one tag offset for all would overlap them):
    each gets its rank as a tag (1 = highest NDCG@10), no two tags overlap, and the key lines read in
    rank order with mean ± sd only for several seeds."""
    pts = [{"name": f"m{i}", "label": f"model {i}", "role": "teacher" if i % 2 else "distilled",
            "ndcg@10": 0.0480 + 0.00005 * i, "ndcg@10_sd": 0.0001 if i == 0 else None,
            "seeds": 2 if i == 0 else None,
            "infer_ms_per_1000_users": 320.0 * (1 + 0.01 * i), "peak_memory_mb": 110.0 + 20 * i}
           for i in range(5)]
    pts += [{"name": f"far{i}", "label": f"far {i}", "role": "teacher", "ndcg@10": 0.030 - 0.002 * i,
             "ndcg@10_sd": None, "seeds": None, "infer_ms_per_1000_users": 400.0 + 100 * i,
             "peak_memory_mb": 200.0} for i in range(4)]
    number_points(pts)
    assert [p["number"] for p in pts] == [5, 4, 3, 2, 1, 6, 7, 8, 9]
    assert key_line(pts[0]) == " 5  model 0: 0.0480 ± 0.0001, 110.0 MB, 320.00 ms"
    assert key_line(pts[4]) == " 1  model 4: 0.0482, 190.0 MB, 332.80 ms"
    side = {"panels": [{"domain": "Games", "points": pts, "device": "cpu", "machine": "test box"}]}
    (boxes,) = draw_union_figure(side, tmp_path / "f.png")
    assert png_size(tmp_path / "f.png") == union_png_size(1, key_lines=9)
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes[i], boxes[j]
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, (pts[i]["name"], pts[j]["name"])


def test_figure_commands_stage_each_benchmark_and_leave_out_absent_checkpoints(tmp_path, capsys):
    """`python -m research.union figure-commands` prints, per figure domain, the benchmark of every
    figure row (the page's own ``figure_models``) writing under runs/bench/ and a copy into results/;
    with --present-only a row whose checkpoint directory is not on the machine is left out and named."""
    from ckd.union_report import benchmark_command, figure_models

    (tmp_path / "results").mkdir()
    write_json(tmp_path / "results" / "u.json", fixture())
    u = parse_union(fixture(), "u.json")
    models = figure_models(u, "Games")
    assert models, "the fixture has figure rows"
    kept, dropped = models[0], models[1:]
    (tmp_path / kept[2]).mkdir(parents=True)  # only the first figure row's checkpoint is here

    assert union.main(["--root", str(tmp_path), "figure-commands", "--results", "results/u.json",
                       "--present-only"]) == 0
    out = capsys.readouterr().out
    games = out[out.index("# Games"):]
    assert f"{kept[0]} {kept[1]}={kept[2]}" in games
    assert all(f"{name}=" not in games for _, name, _ in dropped)
    assert games.startswith("# Games: left out, no checkpoint on this machine: " +
                            ", ".join(name for _, name, _ in dropped))
    assert "--out runs/bench/efficiency_union_games.json --overwrite" in games
    assert "cp runs/bench/efficiency_union_games.json results/efficiency_union_games.json" in games

    assert union.main(["--root", str(tmp_path), "figure-commands", "--results", "results/u.json"]) == 0
    everything = capsys.readouterr().out
    assert all(f"{name}={ckpt}" in everything for _, name, ckpt in models)
    assert benchmark_command(u, "Games").endswith("--out results/efficiency_union_games.json")
