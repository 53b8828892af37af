"""The image-modality study (research/modality.py) on fabricated teacher run directories with known
numbers: the runs it would train, a run that holds another variant refused, the statistics and the
Welch comparison by hand, a result carried from the JSON it replaces, and the mechanisms page's
section and verdict line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ckd.mechanisms_report import load_mechanisms, render_mechanisms_page
from ckd.reporting import parse_markdown_tables
from research import modality
from research.mechanisms import collect as collect_mechanisms, load_plan as load_mechanisms_plan
from research.modality import PlanError, collect, expected_config, load_plan, parse_plan, steps

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [2022, 7, 11]
NDCG = {"text": [0.0820, 0.0830, 0.0825], "text_image": [0.0770, 0.0780, 0.0775],
        "text_image_shared": [0.0830]}  # seed 2022 only: seed 7 started, seed 11 not
CONFIGS = ["configs/teachers/unim2rec_scientificmm.yaml", "configs/teachers/unim2rec_scientificmm_text.yaml"]


def _raw() -> dict:
    return {"title": "Image modality", "domain": "ScientificMM", "seeds": SEEDS, "runs_root": "runs/mod",
            "reference": "text",
            "rows": [{"name": "text", "label": "text", "config": CONFIGS[1]},
                     {"name": "text_image", "label": "text + image", "config": CONFIGS[0]},
                     {"name": "text_image_shared", "label": "shared", "config": CONFIGS[0],
                      "set": ["model.shared_clip_projection=true"]}]}


def _metrics(v: float) -> dict:
    return {"recall@10": 2 * v, "ndcg@10": v, "recall@50": 3 * v, "ndcg@50": 1.2 * v}


def _write_run(root: Path, plan, row, seed: int, v: float) -> Path:
    d = root / plan.run_dir(row.name, seed)
    d.mkdir(parents=True, exist_ok=True)
    cfg = expected_config(row, seed, root)
    cfg["train"].update(threads=1, device="cpu")  # execution keys may differ from the config file
    cfg["data"]["data_dir"] = "/elsewhere/amazon"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.json").write_text(json.dumps({"test": {"ScientificMM": _metrics(v)},
                                                "valid": {"ScientificMM": _metrics(v)}, "best_epoch": 9,
                                                "checkpoint_sha256": "ab" * 32, "history": []}))
    return d


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    for c in CONFIGS:
        (tmp_path / c).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / c, tmp_path / c)
    (tmp_path / "configs/modality.yaml").write_text(yaml.safe_dump(_raw(), sort_keys=False))
    plan = parse_plan(_raw(), "configs/modality.yaml")
    for row in plan.rows:
        for seed, v in zip(SEEDS, NDCG[row.name]):
            _write_run(tmp_path, plan, row, seed, v)
    (tmp_path / plan.run_dir("text_image_shared", 7)).mkdir(parents=True)  # started, not finished
    return tmp_path


def test_the_runs_it_trains_and_bad_plans():
    plan = parse_plan(_raw(), "p.yaml")
    got = steps(plan, only=["text_image_shared"], seeds=[7], extra=["train.threads=1"])
    assert [s.command for s in got] == [
        "ckd-train-teacher --config configs/teachers/unim2rec_scientificmm.yaml --run-dir "
        "runs/mod/text_image_shared/seed7 --set train.seed=7 --set model.shared_clip_projection=true "
        "--set train.threads=1"]
    assert len(steps(plan)) == 9
    with pytest.raises(PlanError, match="only execution keys"):
        steps(plan, extra=["model.hidden=64"])
    with pytest.raises(PlanError, match="not rows of p.yaml"):
        steps(plan, only=["nope"])
    for bad, match in (({"reference": "zzz"}, "reference 'zzz' is not a row"),
                       ({"extra": 1}, "unknown keys"),
                       ({"rows": _raw()["rows"] + [_raw()["rows"][0]]}, "listed twice")):
        with pytest.raises(PlanError, match=match):
            parse_plan({**_raw(), **bad}, "p.yaml")
    seeded = _raw()
    seeded["rows"][0]["set"] = ["train.seed=3"]
    with pytest.raises(PlanError, match="train.seed comes from the plan"):
        parse_plan(seeded, "p.yaml")


def test_collect_statistics_comparison_and_pending(repo):
    block = collect(load_plan(repo / "configs/modality.yaml", "configs/modality.yaml"), repo)
    text = block["rows"]["text"]
    assert text["stats"]["ndcg@10"]["mean"] == pytest.approx(0.0825)
    assert text["stats"]["ndcg@10"]["sd"] == pytest.approx(0.0005)  # sd of 0.0820, 0.0830, 0.0825
    c = block["comparisons"]["text_image"]
    assert c["diff"] == pytest.approx(-0.0050) and c["rel_pct"] == pytest.approx(-0.0050 / 0.0825 * 100)
    # equal variances, n = 3 each: Welch's df = 4, t(0.975, 4) = 2.776, se = sqrt(2 * 0.0005^2 / 3)
    half = 2.7764451 * (2 * 0.0005 ** 2 / 3) ** 0.5
    assert c["ci"] == pytest.approx([-0.0050 - half, -0.0050 + half], abs=1e-7) and c["verdict"] == "hurts"
    assert block["comparisons"]["text_image_shared"]["verdict"] == "open"  # one seed
    assert block["pending"] == [
        "modality row text_image_shared seed 7 (runs/mod/text_image_shared/seed7): started, not finished "
        "(no metrics.json yet)",
        "modality row text_image_shared seed 11 (runs/mod/text_image_shared/seed11): not started"]
    assert text["command"] == ("ckd-train-teacher --config configs/teachers/unim2rec_scientificmm_text.yaml "
                               "--run-dir runs/mod/text/seed<N> --set train.seed=<N>")


def test_a_run_of_another_variant_is_refused(repo):
    plan = load_plan(repo / "configs/modality.yaml", "configs/modality.yaml")
    d = repo / plan.run_dir("text_image_shared", 2022)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["model"]["shared_clip_projection"] = False
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PlanError, match=r"seed2022: not the run of row text_image_shared seed 2022: "
                                        r"model.shared_clip_projection: True in the config, False in the run"):
        collect(plan, repo)


def test_a_recorded_result_is_carried_only_with_the_same_command(repo):
    """A seed pending here keeps its recorded result from the JSON being replaced (research.carry,
    here with a commit that holds the row's config) while the row's command is unchanged."""
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "configs"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "c"], cwd=repo, check=True)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    plan = load_plan(repo / "configs/modality.yaml", "configs/modality.yaml")
    before = collect(plan, repo)
    shutil.rmtree(repo / "runs/mod/text")  # the run directories are on another machine now
    again = collect(plan, repo, before, {"commit": sha, "created": "then"})
    assert [s["test"]["ndcg@10"] for s in again["rows"]["text"]["seeds"]] == NDCG["text"]
    assert all(s["carried"]["from_commit"] == sha for s in again["rows"]["text"]["seeds"])
    assert again["comparisons"]["text_image"] == {**before["comparisons"]["text_image"]}
    before["rows"]["text"]["command"] += " --set model.hidden=64"  # recorded under another recipe
    third = collect(plan, repo, before, {"commit": sha, "created": "then"})
    assert all(s["status"] == "pending" for s in third["rows"]["text"]["seeds"])


def test_the_mechanisms_page_shows_the_variants(tmp_path, repo):
    """With ``modality:`` in the mechanisms plan, collect adds the block and the page a section with
    the table and a verdict line (values from the fabricated runs)."""
    from tests.test_mechanisms import build_repo

    (tmp_path / "mech").mkdir()
    root = build_repo(tmp_path / "mech")
    for c in CONFIGS + ["configs/modality.yaml"]:
        (root / c).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / c, root / c)
    shutil.copytree(repo / "runs/mod", root / "runs/mod")
    (root / "runs/mod/text/seed7/invocations.jsonl").write_text(  # as research.union.run_step records one
        json.dumps({"start": 100.0, "end": 700.0, "rc": 0, "command": "c", "machine": "box A"}) + "\n")
    raw = yaml.safe_load((root / "configs/plan.yaml").read_text())
    raw["modality"] = "configs/modality.yaml"
    (root / "configs/plan.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    data = collect_mechanisms(load_mechanisms_plan(root / "configs/plan.yaml", "configs/plan.yaml"), root, "c")
    assert data["modality"]["comparisons"]["text_image"]["verdict"] == "hurts"
    assert any(p.startswith("modality row text_image_shared seed 11") for p in data["pending"])
    src = tmp_path / "m.json"
    src.write_text(json.dumps(data))
    page = render_mechanisms_page(load_mechanisms(src, "results/m.json"))
    line = next(x for x in page.splitlines() if x.startswith("- **UniM2Rec's image modality"))
    assert "(teacher variants on ScientificMM, against text)" in line and "text + image: hurts by -6.1%" in line
    assert "## 5. Image modality" in page
    line = next(x for x in page.splitlines() if x.startswith("Trained on "))
    assert "box A" in line and "wall time per run 10.0 min to 10.0 min (median 10.0 min, 1 run(s))" in line
    table = next(t for t in parse_markdown_tables(page) if t and "Variant" in t[0])
    row = next(r for r in table if r["Name"] == "`text_image`")
    assert row["NDCG@10"].startswith("0.0775 ± 0.0005") and row["Verdict"] == "lower"
    assert row["NDCG@10 per seed"] == "2022: 0.0770, 7: 0.0780, 11: 0.0775"
    assert next(r for r in table if r["Name"] == "`text`")["vs text (NDCG@10)"] == "reference"


def test_committed_plan_parses_and_its_configs_exist():
    plan = load_plan(ROOT / modality.PLAN, modality.PLAN)
    assert plan.reference == "text" and plan.seeds == (2022, 7, 11)
    for row in plan.rows:
        cfg = expected_config(row, 7, ROOT)
        assert cfg["train"]["seed"] == 7 and cfg["data"]["domains"] == ["ScientificMM"]
    by = {r.name: expected_config(r, 7, ROOT)["model"] for r in plan.rows}
    assert by["text"]["modalities"] == ["plm_text", "clip_text"] and "image" in by["text_image"]["modalities"]
    assert by["text_image_shared"]["shared_clip_projection"] is True
    assert by["text_image_dropout"]["modality_dropout"] == 0.5
    mech = load_mechanisms_plan(ROOT / "configs/mechanisms/scientific.yaml", "configs/mechanisms/scientific.yaml")
    assert mech.modality == modality.PLAN


def test_cli_dry_run_and_the_closing_table(repo, capsys):
    """`run --dry-run` prints the commands and trains nothing; the table `run` ends with is the
    collected values (mean and sd by hand, unfinished seeds as dashes)."""
    assert modality.main(["--root", str(repo), "run", "--plan", "configs/modality.yaml", "--dry-run",
                          "--only", "text_image_shared", "--seeds", "11"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "ckd-train-teacher --config configs/teachers/unim2rec_scientificmm.yaml --run-dir "
        "runs/mod/text_image_shared/seed11 --set train.seed=11 --set model.shared_clip_projection=true"]
    assert not (repo / "runs/mod/text_image_shared/seed11").exists()
    table = modality._table(load_plan(repo / "configs/modality.yaml", "configs/modality.yaml"), repo)
    assert "| text | 0.0820 | 0.0830 | 0.0825 | 0.0825 | 0.0005 |" in table
    assert "| text_image_shared | 0.0830 | — | — | 0.0830 | — |" in table
