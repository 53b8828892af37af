"""The results report (tables, deltas, Figure 1 and its sidecar) from hand-made fixtures; results
hygiene (the pages manifest read by default, no page from a dirty tree, no results file overwritten
without the flag); and the inference benchmark on a tiny real student and a fixture teacher over
real ScientificMM data."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from benchmarks import inference as bench_inference
from ckd.reporting import (MANIFEST, ReportError, draw_figure, expected_png_size, fmt_mb, fmt_metric, fmt_ms,
                           load_efficiency, load_experiments, load_results_manifest, page_body,
                           parse_markdown_tables, parse_results_manifest, png_size, render_report)
from launch import report

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
EXPERIMENTS = FIXTURES / "results_fixture.json"
EFFICIENCY = FIXTURES / "efficiency_fixture.json"
# Ad-hoc pages in tests are written whatever state the real checkout is in: --draft.
DRAFT = "--draft"


def _sections(md: str) -> dict[str, list[dict[str, str]]]:
    """Tables keyed by the nearest heading above them."""
    out: dict[str, list[dict[str, str]]] = {}
    heading = ""
    chunk: list[str] = []
    for line in md.splitlines() + ["# end"]:
        if line.startswith("#"):
            tables = parse_markdown_tables("\n".join(chunk))
            if tables:
                out[heading] = tables[0]
            heading, chunk = line.lstrip("# ").strip(), []
        else:
            chunk.append(line)
    return out


def _row(table: list[dict[str, str]], key: str, value: str) -> dict[str, str]:
    rows = [r for r in table if r[key] == value]
    assert len(rows) == 1, f"{key}={value!r}: {len(rows)} rows in {table}"
    return rows[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    code = report.main(["--experiments", str(EXPERIMENTS), "--efficiency", str(EFFICIENCY), DRAFT,
                        "--out", str(out / "docs" / "results.md"), "--figure", str(out / "docs" / "figure1.png")])
    assert code == 0
    md = (out / "docs" / "results.md").read_text()
    return {"dir": out / "docs", "md": md, "tables": _sections(md),
            "sidecar": json.loads((out / "docs" / "figure1.json").read_text())}


@pytest.mark.unit
def test_full_table_has_fixture_numbers(built):
    t = built["tables"]
    sci, off, mean = t["Scientific"], t["Office14"], t["Mean over domains"]
    assert [r["Run"] for r in sci][:3] == ["teacher_unisrec", "teacher_recformer", "sasrec_alone"]  # grouped
    assert len(sci) == 9
    d = _row(sci, "Run", "sasrec_distilled")
    assert (d["Recall@10"], d["NDCG@10"], d["Recall@50"], d["NDCG@50"]) == ("0.1246", "0.0639", "0.2390", "0.0885")
    assert _row(off, "Run", "fm_alone")["Recall@10"] == "0.0812"
    assert _row(off, "Run", "teacher_recformer")["NDCG@50"] == "0.0893"
    # mean of 0.055312 and 0.060125 = 0.0577185
    assert _row(mean, "Run", "sasrec_alone")["NDCG@10"] == "0.0577"
    assert "0123456789abcdef0123456789abcdef01234567" in built["md"]
    assert "fixture-box (2 cores, no GPU)" in built["md"]
    assert "--run-dir runs/ablation_positive_only" in built["md"]


@pytest.mark.unit
def test_ablation_deltas_hand_computed(built):
    t = built["tables"]["2. Ablations (distilled SASRec vs each ablation)"]
    assert _row(t, "Run", "sasrec_distilled")["Δ Scientific"] == "—"
    nc = _row(t, "Run", "ablation_no_curriculum")
    assert nc["NDCG@10 Scientific"] == "0.0612"
    assert nc["Δ Scientific"] == "-0.0027"  # 0.061152 - 0.063871 = -0.002719
    po = _row(t, "Run", "ablation_positive_only")
    assert po["Δ Scientific"] == "-0.0041"  # 0.059780 - 0.063871
    assert po["Δ mean"] == "-0.0030"  # 0.063147 - 0.0661075 = -0.0029605
    assert _row(t, "Run", "ablation_mean_integration")["Δ Office14"] == "-0.0004"  # 0.067900 - 0.068344
    assert _row(t, "Run", "sasrec_alone")["Variant"] == "alone (reference)"


@pytest.mark.unit
def test_universality_gains(built):
    t = built["tables"]["3. Universality (each student family alone vs distilled)"]
    sci = [r for r in t if r["Domain"] == "Scientific"]
    assert [r["Student"] for r in sci] == ["sasrec", "fm"]
    assert sci[0]["NDCG@10 gain"] == "+15.5%"  # (0.063871 - 0.055312) / 0.055312 = 15.47%
    fm_off = next(r for r in t if r["Student"] == "fm" and r["Domain"] == "Office14")
    assert (fm_off["NDCG@10 alone"], fm_off["NDCG@10 distilled"]) == ("0.0401", "0.0440")
    assert fm_off["NDCG@10 gain"] == "+9.7%"  # 0.00391 / 0.04011 = 9.75%


@pytest.mark.unit
def test_efficiency_and_throughput_tables(built):
    eff = built["tables"]["Inference"]
    ckd = _row(eff, "Model", "sasrec-ckd")
    assert ckd["Run"] == "sasrec_distilled"  # matched through its checkpoint path
    assert (ckd["Params"], ckd["Peak memory (MB)"], ckd["Inference ms / 1,000 users"]) == ("381,376", "36.0", "87.46")
    assert ckd["Train steps/s"] == "18.00" and ckd["Steps/s vs alone"] == "0.900"  # 18 / 20
    assert _row(eff, "Model", "fm_distilled")["Steps/s vs alone"] == "0.750"  # 30 / 40
    uni = _row(eff, "Model", "unisrec_textid")
    assert (uni["Run"], uni["Train steps/s"], uni["Scoring ms / 1,000 pairs"]) == ("teacher_unisrec", "—", "0.0413")
    thr = built["tables"]["Training throughput"]
    assert _row(thr, "Run", "ablation_positive_only")["Steps/s vs alone"] == "0.945"  # 18.9 / 20
    assert _row(thr, "Run", "sasrec_alone")["Steps/s vs alone"] == "—"
    assert "teacher_unisrec" not in [r["Run"] for r in thr]  # no timing recorded


@pytest.mark.unit
def test_figure_png_and_sidecar_match_tables(built):
    png = built["dir"] / "figure1.png"
    assert png_size(png) == expected_png_size() == (1200, 825)
    assert png.stat().st_size > 20_000  # a drawn chart, not an empty canvas
    assert "](figure1.png)" in built["md"]
    side = built["sidecar"]
    assert side["domain"] == "Scientific"
    pts = {p["label"]: p for p in side["points"]}
    # teachers, SASRec alone and the distilled students; FM alone stays out of the figure
    assert set(pts) == {"unisrec_textid", "teacher_recformer", "sasrec_alone", "sasrec-ckd", "fm_distilled"}
    assert pts["sasrec-ckd"]["role"] == "distilled" and pts["sasrec_alone"]["role"] == "alone"
    eff = built["tables"]["Inference"]
    sci = built["tables"]["Scientific"]
    for label, p in pts.items():
        row = _row(eff, "Model", label)
        assert fmt_ms(p["infer_ms_per_1000_users"]) == row["Inference ms / 1,000 users"]
        assert fmt_mb(p["peak_memory_mb"]) == row["Peak memory (MB)"]
        assert fmt_metric(p["ndcg@10"]) == row["Test NDCG@10 Scientific"]
        assert fmt_metric(p["ndcg@10"]) == _row(sci, "Run", p["run"])["NDCG@10"]


@pytest.mark.unit
def test_figure_labels_of_crowded_points_do_not_overlap(tmp_path):
    # Four models within 10% of each other on both axes (as SASRec, DeepFM and the two UniSRec
    # teachers sit on the real page): with one fixed offset their labels would pile up.
    pts = [{"label": f"model_{i}", "role": role, "ndcg@10": 0.064 + 0.0003 * i,
            "infer_ms_per_1000_users": 1000.0 * (1 + 0.03 * i), "peak_memory_mb": 90.0 + i}
           for i, role in enumerate(["teacher", "teacher", "distilled", "alone"])]
    pts.append({"label": "far", "role": "distilled", "ndcg@10": 0.040, "infer_ms_per_1000_users": 30.0,
                "peak_memory_mb": 40.0})
    boxes = draw_figure({"domain": "Scientific", "points": pts}, tmp_path / "f.png")
    assert len(boxes) == len(pts) and png_size(tmp_path / "f.png") == expected_png_size()
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (a0, b0, a1, b1), (c0, d0, c1, d1) = boxes[i], boxes[j]
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, (pts[i]["label"], pts[j]["label"])


@pytest.mark.unit
def test_report_without_efficiency_has_no_figure(tmp_path):
    code = report.main(["--experiments", str(EXPERIMENTS), "--efficiency", str(tmp_path / "missing.json"), DRAFT,
                        "--out", str(tmp_path / "r.md"), "--figure", str(tmp_path / "f.png")])
    assert code == 0
    md = (tmp_path / "r.md").read_text()
    assert "No inference benchmark" in md and "](f.png)" not in md and "## Figure 1" not in md
    assert not (tmp_path / "f.png").exists()


@pytest.mark.unit
def test_bad_manifests_are_named_errors(tmp_path):
    raw = json.loads(EXPERIMENTS.read_text())
    dup = copy.deepcopy(raw)
    dup["runs"]["sasrec_distilled_again"] = copy.deepcopy(dup["runs"]["sasrec_distilled"])
    p = tmp_path / "dup.json"
    p.write_text(json.dumps(dup))
    with pytest.raises(ReportError, match="sasrec_distilled_again"):
        render_report(load_experiments(p), None)
    bad = copy.deepcopy(raw)
    bad["runs"]["fm_alone"]["group"] = "students"
    p.write_text(json.dumps(bad))
    with pytest.raises(ReportError, match="group 'students'"):
        load_experiments(p)
    with pytest.raises(ReportError, match="Games"):
        render_report(load_experiments(EXPERIMENTS), None, domain="Games")
    # runs at different world sizes are not compared
    ws = copy.deepcopy(raw)
    ws["runs"]["sasrec_distilled"]["metrics"]["world_size"] = 2
    p.write_text(json.dumps(ws))
    md = render_report(load_experiments(p), load_efficiency(EFFICIENCY))
    assert _row(_sections(md)["Training throughput"], "Run", "sasrec_distilled")["Steps/s vs alone"] == "—"


# ----------------------------------------------------------------------------- bench_inference


@pytest.mark.unit
def test_teacher_domains_from_run_config(tmp_path):
    (tmp_path / "run" / "best").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("data:\n  domains: [Scientific, Office14]\n  max_len: 20\n")
    assert bench_inference.teacher_domains(tmp_path / "run" / "best", None, "X") == (["Scientific", "Office14"], 20)
    assert bench_inference.teacher_domains(tmp_path / "run" / "best", ["A"], "X") == (["A"], 50)
    assert bench_inference.teacher_domains(tmp_path / "other", None, "X") == (["X"], 50)
    with pytest.raises(bench_inference.BenchError, match="NAME=CHECKPOINT_DIR"):
        bench_inference.parse_named(["no_equals_sign"], "student")


@pytest.mark.integration
def test_bench_inference_tiny_student_and_fixture_teacher(tmp_path, data_dir, scientific_mm):
    import torch

    from student.models import build_student
    from student.trainer import save_student
    from benchmarks.fixture_teacher import make_fixture_checkpoint

    ds = scientific_mm
    students = {}
    for kind, kwargs in {"sasrec": dict(hidden=16, layers=1, heads=1, dropout=0.0, attn_dropout=0.0, max_len=50),
                         "fm": dict(hidden=16)}.items():
        torch.manual_seed(0)
        model = build_student(kind, ds, **kwargs)
        save_student(model, tmp_path / kind / "best", {
            "kind": kind, "kwargs": kwargs, "vocab_hash": ds.vocab_hash(), "vocab_size": ds.vocab_size,
            "domains": ds.domain_names, "max_len": 50})
        students[kind] = sum(p.numel() for p in model.parameters())
    make_fixture_checkpoint(tmp_path / "teacher" / "best", num_items=ds.vocab_size, vocab_hash=ds.vocab_hash(),
                            dim=32)
    (tmp_path / "teacher" / "config.yaml").write_text("data:\n  domains: [ScientificMM]\n  max_len: 50\n")
    out = tmp_path / "efficiency.json"
    code = bench_inference.main(["--student", f"tiny_sasrec={tmp_path / 'sasrec' / 'best'}",
                                 "--student", f"tiny_fm={tmp_path / 'fm' / 'best'}",
                                 "--teacher", f"fixture={tmp_path / 'teacher' / 'best'}",
                                 "--teacher-module", "benchmarks.fixture_teacher",
                                 "--data-dir", str(data_dir), "--domain", "ScientificMM", "--users", "300",
                                 "--repeats", "1", "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert {"machine", "commit", "created", "device", "models"} <= set(res) and res["device"] == "cpu"
    m = res["models"]
    assert list(m) == ["tiny_sasrec", "tiny_fm", "fixture"]
    assert m["tiny_sasrec"]["params"] == students["sasrec"] and m["tiny_fm"]["params"] == students["fm"]
    assert m["fixture"]["kind"] == "teacher" and m["fixture"]["params"] == ds.vocab_size * 32
    for name, entry in m.items():
        assert entry["users"] == 300 and entry["catalogue"] == ds.domain_range(0)[1] - ds.domain_range(0)[0]
        for key in ("peak_memory_mb", "infer_ms_per_1000_users", "score_ms_per_1000_pairs"):
            assert entry[key] > 0, (name, key, entry[key])
        assert entry["checkpoint"].endswith("best")
    # the report reads what the benchmark wrote
    eff = load_efficiency(out)
    assert [e.name for e in eff.models] == ["tiny_sasrec", "tiny_fm", "fixture"]
    # a teacher trained on other domains is refused before anything is timed
    (tmp_path / "teacher" / "config.yaml").write_text("data:\n  domains: [Scientific]\n")
    assert bench_inference.main(["--teacher", f"fixture={tmp_path / 'teacher' / 'best'}", "--data-dir",
                                 str(data_dir), "--domain", "ScientificMM", "--out", str(tmp_path / "x.json")]) == 2


@pytest.mark.unit
def test_throughput_ratio_prefers_the_no_teacher_twin(tmp_path):
    """A distilled run is compared with its same-settings run without teachers when there is one
    (the alone baseline may use another batch size, so its steps are not the same work)."""
    from ckd.reporting import throughput_ratio

    raw = json.loads(EXPERIMENTS.read_text())
    twin = copy.deepcopy(raw["runs"]["sasrec_alone"])
    twin.update(group="ablation", variant="no teachers (same batch, lr)")
    twin["metrics"]["timing"]["steps_per_s"] = 25.0
    raw["runs"]["ablation_no_teachers"] = twin
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(raw))
    exp = load_experiments(path)
    distilled = next(r for r in exp.runs if r.name == "sasrec_distilled")
    assert throughput_ratio(exp, distilled) == pytest.approx(distilled.steps_per_s / 25.0)
    assert throughput_ratio(exp, next(r for r in exp.runs if r.name == "ablation_no_teachers")) is None


@pytest.mark.unit
def test_mean_row_is_blank_for_a_run_missing_some_domains(tmp_path):
    """Teachers of two domains beside a student of three: their own 'mean' averages fewer domains,
    so the mean table leaves it blank instead of comparing unlike quantities."""
    from ckd.reporting import MEAN, full_table

    raw = json.loads(EXPERIMENTS.read_text())
    run = copy.deepcopy(raw["runs"]["sasrec_alone"])
    dom = next(d for d in run["metrics"]["test"] if d != MEAN)
    run["metrics"]["test"]["Games"] = dict(run["metrics"]["test"][dom])
    raw["runs"]["two_domain_alone"] = dict(run, variant="with Games")
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(raw))
    rows = {r["Run"]: r for r in parse_markdown_tables(full_table(load_experiments(path), MEAN))[0]}
    teacher = next(n for n, r in raw["runs"].items() if r["group"] == "teacher")
    assert rows[teacher]["NDCG@10"] == "—"
    assert rows["two_domain_alone"]["NDCG@10"] != "—"


@pytest.mark.unit
def test_one_run_per_domain_of_the_same_student(tmp_path):
    """A manifest may hold the same student trained separately on each domain (teachers exist per
    domain): the universality table pairs alone and distilled within each domain, and a run's
    throughput is compared with the alone run on its own domains."""
    from ckd.reporting import throughput_ratio, universality_table

    raw = json.loads(EXPERIMENTS.read_text())
    for variant, ndcg, rate in (("alone", 0.0300, 10.0), ("distilled", 0.0360, 4.0)):
        run = copy.deepcopy(raw["runs"][f"fm_{variant}"])
        m = {"recall@10": 0.05, "ndcg@10": ndcg, "recall@50": 0.1, "ndcg@50": ndcg + 0.01}
        run["metrics"]["test"] = {"Games": m, "mean": m}
        run["metrics"]["timing"] = {"steps_per_s": rate}
        raw["runs"][f"fm_{variant}_games"] = run
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(raw))
    exp = load_experiments(path)
    rows = parse_markdown_tables(universality_table(exp))[0]
    games = _row([r for r in rows if r["Student"] == "fm"], "Domain", "Games")
    assert (games["NDCG@10 alone"], games["NDCG@10 distilled"], games["NDCG@10 gain"]) == ("0.0300", "0.0360",
                                                                                            "+20.0%")
    sci = _row([r for r in rows if r["Student"] == "fm"], "Domain", "Scientific")
    assert sci["NDCG@10 alone"] == _row(parse_markdown_tables(
        render_report(exp, None).split("### Scientific", 1)[1])[0], "Run", "fm_alone")["NDCG@10"]
    games_distilled = next(r for r in exp.runs if r.name == "fm_distilled_games")
    assert throughput_ratio(exp, games_distilled) == pytest.approx(0.4)

    # the same SASRec suite on Games: its ablation is measured against the Games distilled run
    for name, ndcg in (("sasrec_distilled", 0.0500), ("ablation_no_curriculum", 0.0450)):
        run = copy.deepcopy(raw["runs"][name])
        m = {"recall@10": 0.05, "ndcg@10": ndcg, "recall@50": 0.1, "ndcg@50": ndcg + 0.01}
        run["metrics"]["test"] = {"Games": m, "mean": m}
        raw["runs"][f"{name}_games"] = run
    path.write_text(json.dumps(raw))
    md = render_report(load_experiments(path), None)
    games_ablations = _sections(md)["Ablations on Games"]
    assert _row(games_ablations, "Run", "ablation_no_curriculum_games")["Δ Games"] == "-0.0050"
    assert "ablation_no_curriculum_games" not in md.split("## 2.", 1)[1].split("### Ablations on Games")[0]


@pytest.mark.unit
def test_manifests_merge_into_one_page(tmp_path, capsys):
    """Two suites' manifests make one page: runs of both, a shared teacher row once, and a run name
    in both is a named error."""
    raw = json.loads(EXPERIMENTS.read_text())
    teacher = next(n for n, r in raw["runs"].items() if r["group"] == "teacher")
    second = {"runs": {"fm_alone_other": copy.deepcopy(raw["runs"]["fm_alone"]),
                       teacher: copy.deepcopy(raw["runs"][teacher])},
              "machine": "other-box", "commit": "feedface", "created": "2099-01-01T00:00:00"}
    second["runs"]["fm_alone_other"]["metrics"]["test"]["Scientific"]["ndcg@10"] = 0.0123
    second["runs"]["fm_alone_other"]["variant"] = "alone, other settings"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(raw))
    b.write_text(json.dumps(second))
    out = tmp_path / "page.md"
    assert report.main(["--experiments", str(a), "--experiments", str(b), "--efficiency", "", DRAFT,
                        "--out", str(out)]) == 0
    md = out.read_text()
    sci = _sections(md)["Scientific"]
    assert _row(sci, "Run", "fm_alone_other")["NDCG@10"] == "0.0123"
    assert len([r for r in sci if r["Run"] == teacher]) == 1
    assert "other-box" in md and "feedface" in md
    second["runs"]["sasrec_alone"] = raw["runs"]["sasrec_alone"]
    b.write_text(json.dumps(second))
    capsys.readouterr()
    assert report.main(["--experiments", str(a), "--experiments", str(b), "--efficiency", "", DRAFT,
                        "--overwrite", "--out", str(out)]) == 2
    assert "run 'sasrec_alone' is in both" in capsys.readouterr().err


@pytest.mark.unit
def test_universality_mean_row_and_reference_table_without_ablations(tmp_path):
    """A student trained on every domain of the page gets a mean row (the committed two-domain
    page has one); a suite without ablations still compares distilled SASRec with SASRec alone."""
    md = render_report(load_experiments(EXPERIMENTS), None)
    uni = _sections(md)["3. Universality (each student family alone vs distilled)"]
    mean = _row([r for r in uni if r["Student"] == "sasrec"], "Domain", "mean")
    # means 0.0577185 and 0.0661075: (0.0661075 - 0.0577185) / 0.0577185 = 14.53%
    assert (mean["NDCG@10 alone"], mean["NDCG@10 distilled"], mean["NDCG@10 gain"]) == ("0.0577", "0.0661", "+14.5%")
    assert _row([r for r in uni if r["Student"] == "fm"], "Domain", "mean")["NDCG@10 gain"] == "+13.4%"  # .04045/.03568

    raw = json.loads(EXPERIMENTS.read_text())
    raw["runs"] = {n: r for n, r in raw["runs"].items() if r["group"] != "ablation"}
    path = tmp_path / "no_ablations.json"
    path.write_text(json.dumps(raw))
    t = _sections(render_report(load_experiments(path), None))["2. Ablations (distilled SASRec vs each ablation)"]
    assert [r["Run"] for r in t] == ["sasrec_distilled", "sasrec_alone"]
    assert _row(t, "Run", "sasrec_alone")["Δ Scientific"] == "-0.0086"  # 0.055312 - 0.063871 = -0.008559


# ----------------------------------------------------------------------------- results hygiene


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def results_repo(tmp_path) -> Path:
    """A real git repository holding two results JSON and a manifest of two pages, committed."""
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    shutil.copy(EXPERIMENTS, repo / "results" / "suite.json")
    shutil.copy(EFFICIENCY, repo / "results" / "efficiency.json")
    (repo / MANIFEST).write_text(yaml.safe_dump({"pages": [
        {"page": "docs/results.md", "experiments": ["results/suite.json"], "efficiency": "results/efficiency.json",
         "figure": "docs/figure1.png", "domain": "Scientific"},
        {"page": "docs/results_plain.md", "experiments": ["results/suite.json"]},
    ]}, sort_keys=False))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "results")
    return repo


@pytest.mark.unit
def test_manifest_pages_regenerated_by_default(results_repo, capsys):
    repo = results_repo
    head = _git(repo, "rev-parse", "HEAD")
    assert report.main(["--root", str(repo)]) == 0  # no page named: every page of the manifest
    md = (repo / "docs" / "results.md").read_text()
    plain = (repo / "docs" / "results_plain.md").read_text()
    header = md.split("\n## ", 1)[0]
    assert f"Generated by `ckd-report --page docs/results.md` at commit `{head}` from `results/suite.json` and " \
           "`results/efficiency.json`" in header
    assert "-dirty" not in header and "Draft" not in header and "uncommitted" not in header
    assert _row(_sections(md)["Scientific"], "Run", "sasrec_distilled")["NDCG@10"] == "0.0639"
    assert png_size(repo / "docs" / "figure1.png") == expected_png_size()
    assert {p["label"] for p in json.loads((repo / "docs" / "figure1.json").read_text())["points"]} >= {"sasrec-ckd"}
    assert "## Figure 1" not in plain and "No inference benchmark" in plain
    assert f"`ckd-report --page docs/results_plain.md` at commit `{head}`" in plain

    # --check compares the pages below their headers with what the JSON gives now
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "pages")
    assert report.main(["--root", str(repo), "--check"]) == 0
    raw = json.loads((repo / "results" / "suite.json").read_text())
    raw["runs"]["sasrec_distilled"]["metrics"]["test"]["Scientific"]["ndcg@10"] = 0.0701
    (repo / "results" / "suite.json").write_text(json.dumps(raw))
    capsys.readouterr()
    assert report.main(["--root", str(repo), "--check", "--page", "docs/results_plain.md"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS docs/results_plain.md" in out and "0.0701" in out and "docs/results.md" not in out
    assert report.main(["--root", str(repo), "--page", "docs/nope.md"]) == 2
    assert "not a page of results/MANIFEST.yaml" in capsys.readouterr().err


@pytest.mark.unit
def test_a_page_links_the_page_to_read_first(results_repo, capsys):
    """``see_first`` puts a link to another page of the manifest, relative to this page, with its
    reason, at the top of the page, before the first section."""
    repo = results_repo
    manifest = yaml.safe_load((repo / MANIFEST).read_text())
    manifest["pages"][1] = {"page": "docs/old/plain.md", "experiments": ["results/suite.json"],
                            "see_first": {"page": "docs/results.md", "why": "it has\n every   domain."}}
    (repo / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    _git(repo, "commit", "-q", "-am", "see first")
    assert report.main(["--root", str(repo)]) == 0
    header = (repo / "docs" / "old" / "plain.md").read_text().split("\n## ", 1)[0]
    assert "**Read first:** [results.md](../results.md): it has every domain." in header
    assert "Read first" not in (repo / "docs" / "results.md").read_text()
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "pages")
    assert report.main(["--root", str(repo), "--check"]) == 0
    del manifest["pages"][1]["see_first"]  # the manifest drops it: --check says the page still has it
    (repo / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    capsys.readouterr()
    assert report.main(["--root", str(repo), "--check", "--page", "docs/old/plain.md"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS docs/old/plain.md" in out and "-**Read first:** [results.md](../results.md)" in out


@pytest.mark.unit
def test_dirty_tree_is_refused_unless_draft(results_repo, capsys):
    repo = results_repo
    head = _git(repo, "rev-parse", "HEAD")
    assert report.main(["--root", str(repo), "--page", "docs/results_plain.md"]) == 0
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "page")
    page = repo / "docs" / "results_plain.md"
    committed = page.read_text()

    raw = json.loads((repo / "results" / "suite.json").read_text())
    raw["machine"] = "edited, not committed"
    (repo / "results" / "suite.json").write_text(json.dumps(raw))
    capsys.readouterr()
    assert report.main(["--root", str(repo), "--page", "docs/results_plain.md"]) == 2
    err = capsys.readouterr().err
    assert "dirty tree" in err and "results/suite.json" in err and "--draft" in err
    assert page.read_text() == committed  # nothing written

    assert report.main(["--root", str(repo), "--page", "docs/results_plain.md", "--draft"]) == 0
    draft = page.read_text()
    head2 = _git(repo, "rev-parse", "HEAD")
    assert "**Draft:**" in draft and f"at commit `{head2}` plus uncommitted changes" in draft
    assert "-dirty" not in draft.split("\n## ", 1)[0] and "edited, not committed" in draft
    assert head2 != head

    # an input git does not track is refused as well, even when tracked files are clean
    _git(repo, "checkout", "-q", "--", ".")
    shutil.copy(EXPERIMENTS, repo / "results" / "new.json")
    manifest = yaml.safe_load((repo / MANIFEST).read_text())
    manifest["pages"].append({"page": "docs/results_new.md", "experiments": ["results/new.json"]})
    (repo / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    _git(repo, "add", MANIFEST)
    _git(repo, "commit", "-q", "-m", "manifest")
    capsys.readouterr()
    assert report.main(["--root", str(repo), "--page", "docs/results_new.md"]) == 2
    err = capsys.readouterr().err
    assert "not committed: results/new.json" in err and not (repo / "docs" / "results_new.md").exists()

    # the tree state can also be handed in (no git involved)
    dirty = report.TreeState(commit="f" * 40, changes=[" M ckd/reporting.py"])
    assert report.main(["--root", str(repo), "--page", "docs/results_plain.md"], state=dirty) == 2
    assert "ckd/reporting.py" in capsys.readouterr().err
    clean = report.TreeState(commit="f" * 40)
    assert report.main(["--root", str(repo), "--page", "docs/results_plain.md"], state=clean) == 0
    assert f"at commit `{'f' * 40}` from" in page.read_text() and "Draft" not in page.read_text()


@pytest.mark.unit
def test_not_a_git_checkout_is_refused(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    shutil.copy(EXPERIMENTS, tmp_path / "results" / "suite.json")
    (tmp_path / MANIFEST).write_text("pages:\n  - page: docs/r.md\n    experiments: [results/suite.json]\n")
    assert report.main(["--root", str(tmp_path)]) == 2
    assert "not a git checkout" in capsys.readouterr().err and not (tmp_path / "docs" / "r.md").exists()


@pytest.mark.unit
def test_results_files_are_not_overwritten_without_the_flag(tmp_path, results_repo, capsys, monkeypatch):
    from research import experiments, seeds

    existing = tmp_path / "results.json"
    existing.write_text('{"kept": true}\n')

    def refused(code_or_exit) -> str:
        err = capsys.readouterr().err + str(code_or_exit)
        assert str(existing) in err and "--overwrite" in err, err
        assert existing.read_text() == '{"kept": true}\n'
        return err

    # the experiment suite: refused before any teacher is served; its default --out is under runs/
    assert experiments.main(["--out", str(existing)]) == 2
    refused("")
    (tmp_path / "runs").mkdir()
    default_out = tmp_path / "runs" / "experiments.json"
    default_out.write_text("{}")
    assert experiments.main(["--runs-root", str(tmp_path / "runs")]) == 2
    assert f"{default_out} already exists" in capsys.readouterr().err
    # the seed sweep, before anything trains
    with pytest.raises(SystemExit) as exc:
        seeds.main(["--seeds", "1", "--out", str(existing)])
    refused(exc.value.code)
    # the inference benchmark, before anything is measured; its default --out is not results/
    assert bench_inference.main(["--student", f"x={tmp_path}", "--out", str(existing)]) == 2
    refused("")
    (tmp_path / "runs" / "efficiency.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # the default --out is relative: runs/efficiency.json, not results/
    assert bench_inference.main(["--student", f"x={tmp_path}"]) == 2
    assert "runs/efficiency.json already exists" in capsys.readouterr().err
    # an ad-hoc report page: refused over an existing file, allowed with the flag
    assert report.main(["--experiments", str(EXPERIMENTS), "--out", str(existing), DRAFT]) == 2
    refused("")
    assert report.main(["--experiments", str(EXPERIMENTS), "--out", str(existing), DRAFT, "--overwrite"]) == 0
    assert existing.read_text().startswith("# Results")
    # ... and never onto a page or figure the manifest owns, flag or not
    for target in ("--out", "--figure"):
        path = results_repo / ("docs/results.md" if target == "--out" else "docs/figure1.png")
        argv = ["--root", str(results_repo), "--experiments", str(EXPERIMENTS), "--efficiency", str(EFFICIENCY),
                "--out", str(tmp_path / "p.md"), DRAFT, "--overwrite", target, str(path)]
        assert report.main(argv) == 2
        assert "ckd-report --page docs/results.md" in capsys.readouterr().err and not path.exists()


@pytest.mark.unit
def test_manifest_errors_are_named():
    ok = {"page": "docs/r.md", "experiments": ["results/a.json"]}
    for bad, match in [({"pages": [dict(ok, figur="docs/f.png")]}, "unknown keys"),
                       ({"pages": [dict(ok, figure="docs/f.png")]}, "needs 'efficiency'"),
                       ({"pages": [ok, ok]}, "listed twice"),
                       ({"pages": [dict(ok, experiments=[])]}, "non-empty list"),
                       ({"pages": [dict(ok, page="../r.md")]}, "inside the repository"),
                       ({"pages": [ok], "cited": {"results/a.json": "x"}}, "listed twice"),
                       ({"page": [ok]}, "'pages' list"),
                       ({"pages": [dict(ok, see_first={"page": "docs/other.md", "why": "x"})]},
                        "not another page of the manifest"),
                       ({"pages": [dict(ok, see_first={"page": "docs/r.md", "why": "x"})]},
                        "not another page of the manifest"),
                       ({"pages": [dict(ok, see_first={"page": "docs/r2.md"}), dict(ok, page="docs/r2.md")]},
                        "exactly 'page' and 'why'"),
                       ({"pages": [dict(ok, see_first={"page": "docs/r2.md", "why": " "}),
                                   dict(ok, page="docs/r2.md")]}, "must say why")]:
        with pytest.raises(ReportError, match=match):
            parse_results_manifest(bad)


@pytest.mark.unit
def test_repository_results_are_all_in_the_manifest_and_pages_match_their_json(capsys):
    """Every results JSON of the checkout is behind a page or cited (none orphaned), every results
    page is in the manifest, and each page below its header is what its committed JSON gives."""
    manifest = load_results_manifest(ROOT / MANIFEST)
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "results").rglob("*.json")}
    assert on_disk == set(manifest.files)
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("results*.md")}
    assert pages == {p.page for p in manifest.pages}
    assert manifest.page("docs/results.md").figure == "docs/figure1.png"
    assert report.main(["--check"]) == 0, capsys.readouterr().out
    # the single-domain page sends a reader to the page of every domain first, then its Figure 1
    body = page_body((ROOT / "docs" / "results.md").read_text()).splitlines()
    assert body[0].startswith("**Read first:** [results_union.md](results_union.md): one student for every domain.")
    assert body[2] == "## Figure 1: accuracy, inference time and memory"


@pytest.mark.unit
def test_results_files_missing_or_unparsable_are_named(tmp_path):
    """One reader for every results file: a missing or unparsable one is a ReportError naming it."""
    with pytest.raises(ReportError, match="efficiency results not found"):
        load_efficiency(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ReportError, match="bad.json: not valid JSON"):
        load_efficiency(bad)
    with pytest.raises(ReportError, match="bad.json: not valid JSON"):
        load_experiments(bad)
    manifest = tmp_path / "MANIFEST.yaml"
    manifest.write_text("pages: [unclosed\n")
    with pytest.raises(ReportError, match="MANIFEST.yaml: not valid YAML"):
        load_results_manifest(manifest, label="MANIFEST.yaml")
