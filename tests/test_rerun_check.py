"""research/rerun_check.py: a mechanisms row's recorded seeds against the same seeds trained again."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from research.mechanisms import collect, load_plan
from research.rerun_check import RerunCheckError, check, main
from tests.test_mechanisms import build_repo

pytestmark = pytest.mark.unit


def _recorded(repo: Path) -> dict:
    return collect(load_plan(repo / "configs/plan.yaml", "configs/plan.yaml"), repo, "collect (test)")


def test_the_same_floats_and_a_difference_named_per_seed(tmp_path):
    repo = build_repo(tmp_path)
    recorded = _recorded(repo)
    rerun = repo / "runs/rerun"
    shutil.copytree(repo / "runs/mech/curriculum_off/seed1", rerun / "curriculum_off/seed1")  # identical
    shutil.copytree(repo / "runs/mech/clean_both/seed2", rerun / "clean_both/seed2")
    m = json.loads((rerun / "clean_both/seed2/metrics.json").read_text())
    m["valid"]["Scientific"]["recall@50"] += 0.0001  # one metric of one split moved, inside the 0.002 rule
    (rerun / "clean_both/seed2/metrics.json").write_text(json.dumps(m))
    got = check(recorded, Path("configs/plan.yaml"), ["curriculum_off", "clean_both"], rerun, repo)
    assert got["curriculum_off"]["bit_for_bit"] and [s["seed"] for s in got["curriculum_off"]["seeds"]] == [1]
    both = got["clean_both"]["seeds"][0]
    assert not got["clean_both"]["bit_for_bit"] and got["clean_both"]["within_tolerance"] and both["seed"] == 2
    assert both["valid"]["recall@50"]["abs_diff"] == pytest.approx(0.0001)
    assert both["test"]["ndcg@10"]["abs_diff"] == 0.0 and both["recorded_commit"] == "abc"
    m["test"]["Scientific"]["ndcg@10"] += 0.003  # test NDCG@10 beyond the rule
    (rerun / "clean_both/seed2/metrics.json").write_text(json.dumps(m))
    got = check(recorded, Path("configs/plan.yaml"), ["clean_both"], rerun, repo)
    assert not got["clean_both"]["within_tolerance"]
    assert got["clean_both"]["seeds"][0]["test"]["ndcg@10"]["abs_diff"] == pytest.approx(0.003)


def test_a_rerun_of_another_setting_or_none_at_all_is_refused(tmp_path):
    repo = build_repo(tmp_path)
    recorded = _recorded(repo)
    rerun = repo / "runs/rerun"
    with pytest.raises(RerunCheckError, match="no finished rerun"):
        check(recorded, Path("configs/plan.yaml"), ["clean_both"], rerun, repo)
    d = rerun / "clean_both/seed1"
    shutil.copytree(repo / "runs/mech/clean_both/seed1", d)
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["kd"]["integration"] = "mean"
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RerunCheckError, match="kd.integration='mean'"):
        check(recorded, Path("configs/plan.yaml"), ["clean_both"], rerun, repo)
    with pytest.raises(RerunCheckError, match="not in both the plan"):
        check(recorded, Path("configs/plan.yaml"), ["no_such_row"], rerun, repo)


def test_cli_writes_the_json_once(tmp_path, monkeypatch, capsys):
    repo = build_repo(tmp_path)
    (repo / "recorded.json").write_text(json.dumps(_recorded(repo)))
    shutil.copytree(repo / "runs/mech/curriculum_off/seed3", repo / "runs/rerun/curriculum_off/seed3")
    monkeypatch.chdir(repo)
    monkeypatch.setattr("research.rerun_check.REPO", repo)
    args = ["--recorded", "recorded.json", "--plan", "configs/plan.yaml", "--rows", "curriculum_off",
            "--rerun-root", "runs/rerun", "--out", "out.json"]
    assert main(args) == 0
    doc = json.loads((repo / "out.json").read_text())
    assert doc["kind"] == "rerun_check" and doc["rows"]["curriculum_off"]["bit_for_bit"]
    assert "seed 3" in capsys.readouterr().out
    assert main(args) == 2  # no clobber
