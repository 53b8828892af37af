"""Anytime curves (research/anytime.py): steps to 95% of the final value and to the reference's
final value, checked by hand on fabricated run directories; and a real run records its test curve."""
from __future__ import annotations

import json

import pytest

from research.anytime import CurveError, compare, main, read_curve, steps_to_reach


def _run(tmp_path, name, values, best):
    d = tmp_path / name
    d.mkdir()
    hist = [{"epoch": e, "global_step": 100 * (e + 1), "test_ndcg@10": v} for e, v in enumerate(values)]
    (d / "metrics.json").write_text(json.dumps({"best_epoch": best, "history": hist}))
    return d


@pytest.mark.unit
def test_steps_to_reach_by_hand(tmp_path):
    off = read_curve(_run(tmp_path, "off", [0.02, 0.04, 0.05, 0.06, 0.061], best=4))
    on = read_curve(_run(tmp_path, "on", [0.03, 0.058, 0.062, 0.063, 0.0625], best=3))
    assert off["final"] == 0.061 and on["final"] == 0.063
    assert steps_to_reach(off, 0.95 * 0.061) == 400  # 0.05795: first reached by 0.06 at epoch 3
    r = compare({"no curriculum": off, "curriculum": on})
    assert r["reference"] == "no curriculum"
    assert r["runs"]["curriculum"]["steps_to_95pct_of_final"] == 300  # 0.95 * 0.063 = 0.05985: 0.058 < it, 0.062 >= it
    assert r["runs"]["curriculum"]["steps_to_reference_final"] == 300  # first >= 0.061 is 0.062
    assert r["runs"]["no curriculum"]["steps_to_reference_final"] == 500
    assert r["runs"]["curriculum"]["fewer_steps_than_reference_pct"] == 40.0  # (500 - 300) / 500


@pytest.mark.unit
def test_cli_writes_json_and_png_and_refuses_runs_without_a_curve(tmp_path, capsys):
    a = _run(tmp_path, "a", [0.01, 0.02], best=1)
    b = tmp_path / "b"
    b.mkdir()
    (b / "metrics.json").write_text(json.dumps({"best_epoch": 0, "history": [{"epoch": 0, "valid_ndcg@10": 0.1}]}))
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["--run", f"x={a}", "--out", str(out), "--png", str(png)]) == 0
    assert json.loads(out.read_text())["runs"]["x"]["final"] == 0.02 and png.stat().st_size > 1000
    assert main(["--run", f"x={a}", "--out", str(out), "--png", str(png)]) == 2  # no clobber
    assert main(["--run", f"y={b}", "--out", str(tmp_path / "d.json"), "--png", str(tmp_path / "d.png")]) == 2
    assert "record_test_curve" in capsys.readouterr().err
    with pytest.raises(CurveError):
        read_curve(tmp_path / "missing")
