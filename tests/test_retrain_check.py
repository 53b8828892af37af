"""research/retrain_check.py on hand-built teacher run directories: differences by hand, the 0.002
rule on every domain, a different recipe refused, the exit code."""
from __future__ import annotations

import json

import pytest
import yaml

from research.retrain_check import RetrainCheckError, compare, main

pytestmark = pytest.mark.unit

CONFIG = {"kind": "unisrec", "model": {"hidden": 300}, "data": {"data_dir": "/a", "domains": ["Sci", "Off"]},
          "train": {"epochs": 5, "seed": 2022, "progress": True}}


def _run(d, ndcg: dict[str, float], sha: str, config=None, data_dir="/a"):
    d.mkdir(parents=True)
    cfg = json.loads(json.dumps(config or CONFIG))
    cfg["data"]["data_dir"] = data_dir
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    test = {k: {"recall@10": 2 * v, "ndcg@10": v, "recall@50": 3 * v, "ndcg@50": 1.5 * v} for k, v in ndcg.items()}
    (d / "metrics.json").write_text(json.dumps({"test": test, "checkpoint_sha256": sha, "best_epoch": 4,
                                                "stages": {"train": {"history": [{"train_s": 10.0}]}}}))
    (d / "run.json").write_text(json.dumps({"git_sha": "abc", "argv": ["ckd-train-teacher", "--config", "c.yaml"]}))
    return d


def test_differences_and_the_rule_on_every_domain(tmp_path, capsys):
    rec = _run(tmp_path / "rec", {"Sci": 0.0600, "Off": 0.0500}, "s1")
    ok = _run(tmp_path / "ok", {"Sci": 0.0615, "Off": 0.0490}, "s2", data_dir="/elsewhere")  # data_dir may differ
    r = compare(rec, ok)
    assert r["per_domain"]["Sci"]["ndcg@10"]["abs_diff"] == pytest.approx(0.0015)
    assert r["per_domain"]["Off"]["recall@10"]["abs_diff"] == pytest.approx(0.0020)  # 2 x 0.0010
    assert r["within_tolerance"] is True and r["same_checkpoint_bytes"] is False
    assert (r["recorded_commit"], r["recorded_uncommitted_changes"]) == ("abc", False)
    (rec / "run.json").write_text(json.dumps({"git_sha": "abc-dirty"}))
    assert (compare(rec, ok)["recorded_commit"], compare(rec, ok)["recorded_uncommitted_changes"]) == ("abc", True)
    far = _run(tmp_path / "far", {"Sci": 0.0600, "Off": 0.0525}, "s1")  # Office off by 0.0025
    r = compare(rec, far)
    assert (r["per_domain"]["Sci"]["within_tolerance"], r["per_domain"]["Off"]["within_tolerance"]) == (True, False)
    assert r["within_tolerance"] is False and r["same_checkpoint_bytes"] is True
    assert main(["--recorded", str(rec), "--retrained", str(far)]) == 1
    assert "within 0.002 on every domain: NO" in capsys.readouterr().out
    out = tmp_path / "check.json"
    assert main(["--recorded", str(rec), "--retrained", str(ok), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["within_tolerance"] is True


def test_a_different_recipe_is_refused(tmp_path, capsys):
    rec = _run(tmp_path / "rec", {"Sci": 0.06, "Off": 0.05}, "s1")
    other = {**CONFIG, "train": {**CONFIG["train"], "seed": 7}}
    bad = _run(tmp_path / "bad", {"Sci": 0.06, "Off": 0.05}, "s1", config=other)
    with pytest.raises(RetrainCheckError, match="not the recipe"):
        compare(rec, bad)
    assert main(["--recorded", str(rec), "--retrained", str(tmp_path / "missing")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_execution_settings_are_not_the_recipe(tmp_path):
    """A retrain with other threads or on another device (ckd.run_dir.EXECUTION_KEYS) is compared."""
    rec = _run(tmp_path / "rec", {"Sci": 0.06, "Off": 0.05}, "s1")
    other = {**CONFIG, "train": {**CONFIG["train"], "threads": 1, "device": "cuda", "progress": False}}
    again = _run(tmp_path / "again", {"Sci": 0.06, "Off": 0.05}, "s2", config=other, data_dir="/b")
    assert compare(rec, again)["within_tolerance"]
