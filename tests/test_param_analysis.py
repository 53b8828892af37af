"""Parameter analysis (research/param_analysis.py): points read from finished runs, pending ones
named, the default read from the resolved config, and the figure written."""
from __future__ import annotations

import json

import pytest

from research.param_analysis import SweepError, collect, command, default_value, load_sweep, main

pytestmark = pytest.mark.unit


def _sweep(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(f"config: configs/distill_scientific.yaml\nruns_root: {tmp_path / 'runs'}\nseed: 7\n"
                 "params:\n  kd.lambda_kd: [1.0, 3.0]\n  curriculum.pacing: [linear, root]\n")
    # λ=3 and root pacing are the base config's defaults: both read the one "default" run
    for name, y in (("kd.lambda_kd=1.0", 0.06), ("default", 0.065), ("curriculum.pacing=linear", 0.064)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"test": {"mean": {"ndcg@10": y}},
                                                    "valid": {"mean": {"ndcg@10": y + 0.01}}}))
    return p


def test_points_defaults_and_commands(tmp_path):
    sweep = load_sweep(_sweep(tmp_path))
    assert command(sweep, "kd.lambda_kd", 3.0)[-4:] == ["--set", "kd.lambda_kd=3.0", "--set", "train.seed=7"]
    defaults = {p: default_value(sweep, p) for p in sweep["params"]}
    assert defaults == {"kd.lambda_kd": 3.0, "curriculum.pacing": "root"}  # the shipped config's values
    runs = tmp_path / "runs"
    assert command(sweep, "kd.lambda_kd", 3.0, defaults)[3] == str(runs / "default")
    assert command(sweep, "curriculum.pacing", "root", defaults)[3] == str(runs / "default")
    assert command(sweep, "kd.lambda_kd", 1.0, defaults)[3] == str(runs / "kd.lambda_kd=1.0")
    r = collect(sweep, defaults)
    assert [q["test_ndcg@10"] for q in r["kd.lambda_kd"]["points"]] == [0.06, 0.065]
    assert [q["valid_ndcg@10"] for q in r["kd.lambda_kd"]["points"]] == pytest.approx([0.07, 0.075])
    assert [q["test_ndcg@10"] for q in r["curriculum.pacing"]["points"]] == [0.064, 0.065]  # root: the default run
    (runs / "default" / "metrics.json").unlink()
    r = collect(sweep, defaults)
    assert r["kd.lambda_kd"]["points"][1]["test_ndcg@10"] is None  # pending until the default run lands
    assert r["curriculum.pacing"]["points"][1]["test_ndcg@10"] is None
    with pytest.raises(SweepError):
        default_value(sweep, "kd.no_such_setting")


def test_plot_cli_writes_json_and_png(tmp_path):
    sweep = _sweep(tmp_path)
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["plot", "--sweep", str(sweep), "--out", str(out), "--png", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["params"]["kd.lambda_kd"]["default"] == 3.0 and png.stat().st_size > 1000
    assert main(["plot", "--sweep", str(sweep), "--out", str(out), "--png", str(png)]) == 2  # no clobber
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: x\n")
    assert main(["plot", "--sweep", str(bad)]) == 2


def test_a_joint_key_sets_its_settings_together(tmp_path):
    """Settings tuned together: each point sets both, its run directory names both, the base config's
    combination is the one default run, and the valid pick is the combination with the best valid."""
    p = tmp_path / "grid.yaml"
    p.write_text(f"config: configs/distill_scientific.yaml\nruns_root: {tmp_path / 'runs'}\nseed: 7\n"
                 "params:\n  curriculum.pacing,kd.lambda_kd: [[linear, 1.0], [root, 3.0], [root, 1.0]]\n")
    sweep = load_sweep(p)
    key = "curriculum.pacing,kd.lambda_kd"
    defaults = {key: default_value(sweep, key)}
    assert defaults == {key: ["root", 3.0]}  # configs/distill_scientific.yaml: root pacing, λ=3
    got = command(sweep, key, ["linear", 1.0], defaults)
    assert got[3] == str(tmp_path / "runs" / "curriculum.pacing=linear,kd.lambda_kd=1.0")
    assert got[4:8] == ["--set", "curriculum.pacing=linear", "--set", "kd.lambda_kd=1.0"]
    assert command(sweep, key, ["root", 3.0], defaults)[3] == str(tmp_path / "runs" / "default")
    for name, valid in (("curriculum.pacing=linear,kd.lambda_kd=1.0", 0.050), ("default", 0.048),
                        ("curriculum.pacing=root,kd.lambda_kd=1.0", 0.052)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"test": {"mean": {"ndcg@10": 0.04}},
                                                    "valid": {"mean": {"ndcg@10": valid}}}))
    from ckd.mechanisms_report import picked_on_valid
    assert picked_on_valid(collect(sweep, defaults)[key]["points"]) == "root / 1.0 (valid 0.0520)"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"config: configs/distill_scientific.yaml\nruns_root: {tmp_path}\n"
                   "params:\n  curriculum.pacing,kd.lambda_kd: [[linear, 1.0], [root]]\n")
    with pytest.raises(SweepError, match=r"a list of 2 values, one per setting; got \['root'\]"):
        load_sweep(bad)
