"""The demo's plumbing (launch/quickstart.py): the committed plan resolves, finished steps are reused
only while their inputs are unchanged, child tables are kept off the console, and the final table
names every model per domain. No training here: the demo itself is timed by hand (README)."""
import json

import pytest

from launch import quickstart as qs

pytestmark = pytest.mark.unit

TABLE = """2026-12-01 23:37:40,871 [rank0] INFO results (best epoch 6)
split  domain          recall@10    ndcg@10  recall@50    ndcg@50
-----------------------------------------------------------------
valid  Scientific         0.1121     0.0581     0.2196     0.0814
test   mean               0.0997     0.0532     0.1906     0.0729

run directory: runs/demo/student_alone
"""


def test_the_committed_plan_resolves_to_teachers_then_both_students(tmp_path):
    plan = qs.load_plan(qs.REPO / qs.DEFAULT_PLAN, str(tmp_path), ["train.lr=0.003"])
    keys = [s.key for s in plan.steps]
    assert keys[-2:] == ["student_alone", "student_distilled"] and all(k.startswith("teacher_") for k in keys[:-2])
    for s in plan.steps:
        assert all(p.is_file() for p in s.inputs if p.name != "metrics.json"), s.inputs
        assert s.argv[0] in ("launch.train_teacher", "launch.distill")
    alone, distilled = plan.steps[-2], plan.steps[-1]
    assert "--teachers" in alone.argv and "--teachers" not in distilled.argv
    # --set reaches both students, so the two stay comparable
    assert "train.lr=0.003" in alone.argv and "train.lr=0.003" in distilled.argv
    # the distilled student depends on every teacher's result, the student alone on none
    teacher_metrics = {s.run_dir / "metrics.json" for s in plan.steps[:-2]}
    assert teacher_metrics <= set(distilled.inputs) and not teacher_metrics & set(alone.inputs)


def test_the_demo_serve_spec_serves_the_checkpoints_the_plan_trains():
    from cluster.deploy import load_spec
    from ckd.config import load_yaml

    plan = load_yaml(qs.REPO / qs.DEFAULT_PLAN)
    student = load_yaml(qs.REPO / plan["student"]["config"])
    spec = load_spec(qs.REPO / student["service"]["spec"], check_checkpoints=False)
    trained = {str((qs.REPO / t["run_dir"] / "best").resolve()) for t in plan["teachers"]}
    assert {t.checkpoint for t in spec.teachers} == trained
    assert all("--config configs/demo/" in t.build for t in spec.teachers)


def _step(tmp_path, name="s"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text("a: 1\n")
    return qs.Step(key=name, title=name, group="student", label=name, argv=["launch.distill", "--config", str(cfg)],
                   run_dir=tmp_path / "runs" / name, expected_s=60, inputs=[cfg])


def test_a_step_is_reused_only_while_its_inputs_are_unchanged(tmp_path):
    step = _step(tmp_path)
    stamp = step.fingerprint(str(tmp_path))
    assert qs.prepare_run_dir(step, stamp, fresh=False) == "train"
    step.run_dir.mkdir(parents=True)
    (step.run_dir / qs.STAMP).write_text(json.dumps({"fingerprint": stamp}))
    assert qs.prepare_run_dir(step, stamp, fresh=False) == "resume"  # no metrics.json yet
    (step.run_dir / "metrics.json").write_text("{}")
    assert qs.prepare_run_dir(step, stamp, fresh=False) == "reuse"
    step.inputs[0].write_text("# what this config is for\na:   1   # unchanged value\n")
    assert step.fingerprint(str(tmp_path)) == stamp  # a comment or layout edit keeps the finished run
    step.inputs[0].write_text("a: 2\n")  # the config changed: the old run is stale and goes
    assert step.fingerprint(str(tmp_path)) != stamp
    assert qs.prepare_run_dir(step, step.fingerprint(str(tmp_path)), fresh=False) == "train"
    assert not step.run_dir.exists()


def test_fresh_retrains_and_a_foreign_directory_is_never_removed(tmp_path):
    step = _step(tmp_path)
    stamp = step.fingerprint(str(tmp_path))
    step.run_dir.mkdir(parents=True)
    (step.run_dir / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="not made by the demo"):
        qs.prepare_run_dir(step, stamp, fresh=True)
    assert (step.run_dir / "metrics.json").is_file()
    (step.run_dir / qs.STAMP).write_text(json.dumps({"fingerprint": stamp}))
    assert qs.prepare_run_dir(step, stamp, fresh=True) == "train" and not step.run_dir.exists()


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_child_tables_are_kept_off_the_console_and_bars_pass(chunk):
    text = "\rbar  10%|#| 1/10\rbar 100%|#| 10/10\r   \r" + TABLE
    f = qs.ConsoleFilter()
    out = "".join(f.feed(text[i: i + chunk]) for i in range(0, len(text), chunk)) + f.close()
    assert "recall@10" not in out and "0.0532" not in out and "-----" not in out
    assert "bar 100%|#| 10/10\r" in out and "results (best epoch 6)\n" in out
    assert out.endswith("run directory: runs/demo/student_alone\n")


def _row(group, label, domains):
    return {"group": group, "label": label, "best_epoch": 3,
            "test": {d: dict(zip(qs.METRICS, vals)) for d, vals in domains.items()}}


def test_the_table_has_every_model_per_domain_and_says_who_is_below_the_student():
    rows = [_row("teacher", "T1", {"A": (0.12, 0.065, 0.24, 0.09)}),
            _row("teacher", "T2", {"A": (0.10, 0.050, 0.20, 0.08), "B": (0.2, 0.1, 0.3, 0.12)}),
            _row("student", "alone", {"A": (0.10, 0.052, 0.19, 0.073), "B": (0.1, 0.05, 0.2, 0.06)}),
            _row("student", "distilled", {"A": (0.11, 0.060, 0.23, 0.089), "B": (0.1, 0.04, 0.2, 0.05)})]
    out = qs.format_results(rows)
    a, b = out.split("Test, B")
    assert a.startswith("Test, A") and all(f"  {n}" in a for n in ("T1", "T2", "alone", "distilled"))
    assert "0.0520 -> 0.0600 (+15.4%)" in a and "better on 4 of 4" in a
    assert "note: T2 is below" in a and "T1 is below" not in a and "T1 and" not in a
    assert "T1" in b and "   -" in b.split("T1")[1].splitlines()[0]  # T1 has no domain B
    assert "(-20.0%)" in b and "better on 0 of 4" in b
