"""Results outlive their run directories (research/carry.py): a collect on a machine without the run
directories keeps the finished entries of the JSON it replaces, marked, unless their config changed
since; a finished run directory here always wins; the page says how many results were carried."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ckd.union_report import load_union, render_union_page
from research import param_analysis, union
from research.carry import config_unchanged
from tests.test_union_report import m, tiny_tree, write_json

pytestmark = pytest.mark.unit
ARGV = ["--plan", "configs/plan.yaml", "collect", "--out", "results/experiments_union.json", "--overwrite"]


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def committed_tree(root: Path) -> str:
    """tiny_tree's plan and configs committed in a git repository at ``root``; returns the commit."""
    tiny_tree(root)
    git(root, "init", "-q")
    git(root, "add", "configs")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "configs")
    return git(root, "rev-parse", "HEAD")


def collect_at(root: Path, commit: str) -> dict:
    """Run collect, then stamp the JSON with ``commit`` as the commit the collect ran at (the code's
    own repository is another one)."""
    assert union.main(["--root", str(root), *ARGV]) == 0
    out = root / "results" / "experiments_union.json"
    data = json.loads(out.read_text())
    data["commit"] = commit
    out.write_text(json.dumps(data))
    return data


def test_a_collect_without_run_directories_keeps_the_recorded_results(tmp_path, capsys):
    commit = committed_tree(tmp_path)
    first = collect_at(tmp_path, commit)
    shutil.rmtree(tmp_path / "runs")  # a fresh machine: no run directory at all

    assert union.main(["--root", str(tmp_path), *ARGV]) == 0
    assert "5 result(s) carried" in capsys.readouterr().out  # teachers pre and tid, three runs of alone
    data = json.loads((tmp_path / "results" / "experiments_union.json").read_text())
    for name in ("pre", "tid"):
        t = data["teachers"][name]
        assert t["carried"] == {"from_commit": commit, "collected": first["created"]}
        assert {k: v for k, v in t.items() if k != "carried"} == first["teachers"][name]
    assert data["teachers"]["late"]["status"] == "pending"  # it was not finished: nothing to carry
    s1 = data["students"]["alone"]["seeds"][0]
    assert s1["status"] == "done" and [r["carried"]["from_commit"] for r in s1["runs"]] == [commit, commit]
    assert s1["test"]["mean"]["ndcg@10"] == pytest.approx(0.06)  # (.05 + .07) / 2, as before
    assert s1["runs"][1]["test"] == {"Office14": m(0.07)}
    s2 = data["students"]["alone"]["seeds"][1]  # seed 2: its Scientific run finished, Office14 never ran
    assert s2["status"] == "partial" and s2["runs"][0]["carried"]["from_commit"] == commit
    assert data["retrain_teachers"]["finished"] == first["retrain_teachers"]["finished"] == 2

    text = render_union_page(load_union(tmp_path / "results" / "experiments_union.json"))
    assert f"5 of these results were recorded by an earlier collect (commit(s) `{commit[:12]}`)" in text


def test_a_changed_config_is_not_carried_and_a_finished_run_here_wins(tmp_path, capsys):
    commit = committed_tree(tmp_path)
    collect_at(tmp_path, commit)
    # this machine has a finished run of tid with another result; pre's run directory is gone
    write_json(tmp_path / "runs/t/tid/metrics.json", {
        "valid": {"Scientific": m(0.3), "Office14": m(0.3)}, "test": {"Scientific": m(0.3), "Office14": m(0.3)},
        "kind": "unisrec", "checkpoint": "runs/t/tid/best", "best_epoch": 0})
    shutil.rmtree(tmp_path / "runs/t/pre")
    (tmp_path / "configs" / "pre.yaml").write_text("train: {epochs: 9}\n")  # changed since the commit

    assert union.main(["--root", str(tmp_path), *ARGV]) == 0
    data = json.loads((tmp_path / "results" / "experiments_union.json").read_text())
    pre, tid = data["teachers"]["pre"], data["teachers"]["tid"]
    assert pre["status"] == "pending" and "carried" not in pre
    assert f"configs/pre.yaml changed since commit {commit[:12]}" in pre["detail"]
    assert "carried" not in tid and tid["test"]["Scientific"]["ndcg@10"] == pytest.approx(0.3)


def test_config_unchanged_refuses_a_dirty_or_unknown_commit(tmp_path):
    commit = committed_tree(tmp_path)
    assert config_unchanged(tmp_path, commit, ["configs/pre.yaml"]) == (True, "")
    for bad in (None, "unknown", commit + "-dirty"):
        ok, why = config_unchanged(tmp_path, bad, ["configs/pre.yaml"])
        assert not ok and "not a clean commit" in why
    ok, why = config_unchanged(tmp_path, commit, ["configs/absent.yaml"])
    assert not ok and "not in commit" in why


def test_a_config_whose_comments_changed_is_unchanged_and_one_whose_values_changed_is_not(tmp_path):
    commit = committed_tree(tmp_path)
    pre = tmp_path / "configs" / "pre.yaml"
    recorded = pre.read_text()
    pre.write_text("# a comment added after the results were recorded\n" + recorded.replace(": ", ":   "))
    assert pre.read_text() != recorded and config_unchanged(tmp_path, commit, ["configs/pre.yaml"]) == (True, "")
    pre.write_text("train: {epochs: 9}\n")
    ok, why = config_unchanged(tmp_path, commit, ["configs/pre.yaml"])
    assert not ok and why == f"configs/pre.yaml changed since commit {commit[:12]}"
    pre.write_text(recorded + "\n  bad: [unclosed\n")  # no longer parses: changed, not an error
    assert not config_unchanged(tmp_path, commit, ["configs/pre.yaml"])[0]


def test_parameter_points_are_carried_only_where_pending(tmp_path):
    commit = committed_tree(tmp_path)
    result = {"kd.lambda_kd": {"default": 1.0, "points": [
        {"value": 0.3, "test_ndcg@10": None, "run_dir": "runs/p/a"},
        {"value": 1.0, "test_ndcg@10": 0.07, "run_dir": "runs/p/default"}]}}
    prev_params = {"kd.lambda_kd": {"default": 1.0, "points": [
        {"value": 0.3, "test_ndcg@10": 0.05, "run_dir": "runs/p/a"},
        {"value": 1.0, "test_ndcg@10": 0.09, "run_dir": "runs/p/default"}]}}
    previous = {"commit": commit, "created": "then", "params": prev_params}
    assert param_analysis.carry_points(result, previous, prev_params, tmp_path, ["configs/pre.yaml"]) == 1
    a, default = result["kd.lambda_kd"]["points"]
    assert (a["test_ndcg@10"], a["carried"]["from_commit"]) == (0.05, commit)
    assert default == {"value": 1.0, "test_ndcg@10": 0.07, "run_dir": "runs/p/default"}  # here wins


def test_a_retrain_is_checked_against_the_recorded_entry_when_its_run_directory_is_gone(tmp_path):
    """The recorded teacher's run directory is not on this machine; its carried entry holds the
    numbers. The retrain's resolved config must be the committed config's recipe."""
    from ckd.config import load_config, to_dict
    from research.retrain_check import RetrainCheckError, compare_to_entry
    from teachers.config import TeacherConfig

    repo = Path(__file__).resolve().parents[1]
    cfg = "configs/union/unim2rec.yaml"
    resolved = to_dict(load_config(TeacherConfig, repo / cfg))
    resolved["data"]["data_dir"] = "/elsewhere"  # where the data lives is not the recipe
    run = tmp_path / "retrained"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps(resolved))
    (run / "run.json").write_text(json.dumps({"git_sha": "c" * 40, "argv": ["ckd-train-teacher", "--config", cfg]}))
    got = {"Scientific": m(0.0551), "Office14": m(0.0500), "Games": m(0.0329)}
    (run / "metrics.json").write_text(json.dumps({"test": got, "checkpoint_sha256": "b" * 64, "best_epoch": 5,
                                                  "stages": {"train": {"history": [{"train_s": 60.0, "eval_s": 6.0}]}}}))
    entry = {"config": cfg, "run_dir": "runs/union/teachers/unim2rec", "machine": "box A", "best_epoch": 5,
             "checkpoint_sha256": "a" * 64, "carried": {"from_commit": "d" * 40, "collected": "then"},
             "test": {"Scientific": m(0.0551), "Office14": m(0.0525), "Games": m(0.0329)}}
    r = compare_to_entry(entry, run, repo)
    assert r["per_domain"]["Office14"]["ndcg@10"]["abs_diff"] == pytest.approx(0.0025)
    assert [r["per_domain"][d]["within_tolerance"] for d in ("Scientific", "Office14", "Games")] == [True, False, True]
    assert (r["within_tolerance"], r["same_checkpoint_bytes"], r["recorded_commit"]) == (False, False, "d" * 40)
    assert r["retrain_time_s"] == 66.0 and r["recorded_machine"] == "box A"

    resolved["train"]["lr"] = 0.5  # another recipe
    (run / "config.yaml").write_text(json.dumps(resolved))
    with pytest.raises(RetrainCheckError, match="is not the run of configs/union/unim2rec.yaml: train.lr: 0.001 in "
                                                "the config, 0.5 in the run"):
        compare_to_entry(entry, run, repo)


def test_a_result_is_not_carried_once_a_file_it_depends_on_changed(tmp_path):
    """The distilled student depends on its deploy spec and on the configs of the teachers served
    (and of the pre-training they start from): change one and the carried result is refused."""
    from tests.test_union_report import write_resolved

    commit = committed_tree(tmp_path)
    write_json(tmp_path / "runs/dist/seed1/metrics.json", {"valid": {"Scientific": m(0.2), "Office14": m(0.2)},
                                                          "test": {"Scientific": m(0.2), "Office14": m(0.2)}})
    write_resolved(tmp_path, "configs/dist.yaml", "runs/dist/seed1", 1)
    collect_at(tmp_path, commit)
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "configs" / "pre.yaml").write_text("train: {epochs: 9}\n")  # tid starts from pre; tid is served

    assert union.main(["--root", str(tmp_path), *ARGV]) == 0
    data = json.loads((tmp_path / "results" / "experiments_union.json").read_text())
    why = f"configs/pre.yaml changed since commit {commit[:12]}"
    assert why in data["teachers"]["tid"]["detail"] and why in data["students"]["dist"]["seeds"][0]["runs"][0]["detail"]
    assert data["students"]["alone"]["seeds"][0]["status"] == "done"  # the alone runs depend on none of it


def test_an_older_json_without_per_run_metrics_is_carried_with_the_plan_of_today(tmp_path):
    """The committed union JSON of session 13 kept test metrics per seed only; a teacher carried
    from it shows today's plan note; an entry carried before is checked against its first origin,
    so a later collect from a dirty tree keeps it."""
    import yaml

    commit = committed_tree(tmp_path)
    first = collect_at(tmp_path, commit)
    for s in first["students"].values():
        for rec in s["seeds"]:
            for r in rec["runs"]:
                r.pop("test", None), r.pop("valid", None)
    first["commit"] = commit + "-dirty"  # collected later from a dirty tree ...
    first["teachers"]["tid"]["carried"] = {"from_commit": commit, "collected": "earlier"}  # ... tid carried before
    out = tmp_path / "results" / "experiments_union.json"
    out.write_text(json.dumps(first))
    shutil.rmtree(tmp_path / "runs")
    plan = yaml.safe_load((tmp_path / "configs" / "plan.yaml").read_text())
    plan["teachers"][1]["note"] = "a note written today"
    (tmp_path / "configs" / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))

    assert union.main(["--root", str(tmp_path), *ARGV]) == 0
    data = json.loads(out.read_text())
    tid = data["teachers"]["tid"]
    assert tid["carried"] == {"from_commit": commit, "collected": "earlier"} and tid["note"] == "a note written today"
    assert data["teachers"]["pre"]["status"] == "pending"  # recorded only by the dirty collect: not verifiable
    assert "not a clean commit" in data["teachers"]["pre"]["detail"]


def test_execution_settings_are_not_the_recipe():
    from research.union import contradictions

    raw = {"train": {"threads": 1, "device": "cpu", "lr": 0.001, "stages": [{"max_train_rows": {"Games": 60000}}]}}
    run = {"train": {"threads": 8, "device": "cuda", "lr": 0.001, "stages": [
        {"name": "train", "max_train_rows": {"Games": 60000}}]}, "data": {"data_dir": "/x"}}
    assert contradictions(raw, run) == []
    run["train"]["stages"][0]["max_train_rows"]["Games"] = 50000
    assert contradictions(raw, run) == ["train.stages[0].max_train_rows.Games: 60000 in the config, 50000 in the run"]


def test_mechanisms_rows_depend_on_their_pool_and_not_on_their_seed_list():
    from research.mechanisms import _without_seeds, load_plan, row_inputs

    repo = Path(__file__).resolve().parents[1]
    plan = load_plan(repo / "configs/mechanisms/scientific.yaml")
    row = next(r for r in plan.rows if r.name == "corrupted_both")
    assert row_inputs(plan, row, repo) == ["configs/demo/student.yaml", "configs/mechanisms/serve_corrupted.yaml",
                                           "configs/demo/unisrec.yaml", "configs/demo/unim2rec.yaml"]
    assert _without_seeds("x --seeds 2024 7 11 --parallel 1 --runs-root r") == _without_seeds(
        "x --seeds 2024 7 --parallel 2 --runs-root r") == "x --runs-root r"


def test_run_on_a_fresh_machine_skips_recorded_work_but_trains_the_teachers_still_needed(tmp_path, capsys):
    """Without --only, `run` repeats nothing the committed JSON records, except the teachers a step
    still to run is served or starts from (their checkpoints are needed here); --only trains what it names."""
    commit = committed_tree(tmp_path)
    collect_at(tmp_path, commit)
    shutil.rmtree(tmp_path / "runs")
    base = ["--root", str(tmp_path), "--plan", "configs/plan.yaml", "run", "--dry-run"]
    assert union.main(base) == 0
    out = capsys.readouterr().out
    assert "8 step(s) selected, 0 finished here, 3 recorded from another machine, 5 to run" in out
    # dist (not finished anywhere) is served tid, which starts from pre: both recorded, both needed here
    assert "teacher pre: would run" in out and "teacher tid: would run" in out
    assert "student alone seed 1 (a_sci): recorded in results/experiments_union.json" in out
    assert "student alone seed 2 (a_sci): recorded" in out and "student alone seed 2 (a_off): would run" in out
    assert "student dist seed 1 (dist): would run" in out
    assert union.main(base + ["--only", "alone"]) == 0
    assert "student alone seed 1 (a_sci): would run" in capsys.readouterr().out
    # an unreadable results JSON: --only trains what it names without estimates; a plain run refuses
    (tmp_path / "results" / "experiments_union.json").write_text("{not json")
    assert union.main(base + ["--only", "alone"]) == 0
    assert "(expected unknown)" in capsys.readouterr().out
    assert union.main(base) != 0
    assert "not valid JSON" in capsys.readouterr().err


def test_a_teacher_retrained_here_keeps_the_recorded_run_it_replaces(tmp_path):
    """A teacher retrained in its own run directory (e.g. on a new machine, whose students still need
    it served) replaces the recorded entry on the page, which keeps the recorded run's facts and the
    retrain check of the two; collecting again keeps them."""
    commit = committed_tree(tmp_path)
    first = collect_at(tmp_path, commit)
    two = {"Scientific": m(0.12), "Office14": m(0.061)}  # Office14 0.001 off the recorded 0.06
    write_json(tmp_path / "runs/t/tid/metrics.json", {
        "valid": two, "test": two, "kind": "unisrec", "checkpoint": "runs/t/tid/best", "checkpoint_sha256": "c" * 64,
        "vocab_hash": "h" * 64, "params": 2000, "best_epoch": 0,
        "stages": {"finetune": {"best_epoch": 0, "history": [{"epoch": 0, "train_s": 30.0, "eval_s": 5.0}]}}})
    (tmp_path / "runs/t/tid/run.json").write_text(json.dumps({"git_sha": "e" * 40}))

    data = collect_at(tmp_path, commit)
    tid = data["teachers"]["tid"]
    sup = tid["supersedes"]
    assert tid["checkpoint_sha256"] == "c" * 64 and tid["trained_commit"] == "e" * 40  # the page's row: this run
    assert (sup["checkpoint_sha256"], sup["machine"]) == ("b" * 64, first["teachers"]["tid"]["machine"])
    assert sup["comparable"] and sup["within_tolerance"] and not sup["same_checkpoint_bytes"]
    assert sup["per_domain"]["Office14"]["abs_diff"] == pytest.approx(0.001)
    assert sup["per_domain"]["Scientific"]["abs_diff"] == 0.0
    assert "supersedes" not in data["teachers"]["pre"]  # the same run collected again replaces nothing

    again = collect_at(tmp_path, commit)
    assert again["teachers"]["tid"]["supersedes"] == sup
    text = render_union_page(load_union(tmp_path / "results" / "experiments_union.json"))
    assert "- Text+ID (retrained in place): within 0.002 on every domain: **yes**" in text
    assert "| Text+ID (retrained in place) | Office14 | 0.0600 | 0.0610 | 0.0010 | yes |" in text

    # Retrained in place once more (another machine again): the run it replaces had itself replaced
    # the first one, whose facts and check stay on the page (the carried students rest on it).
    three = {"Scientific": m(0.1205), "Office14": m(0.061)}
    metrics = json.loads((tmp_path / "runs/t/tid/metrics.json").read_text())
    write_json(tmp_path / "runs/t/tid/metrics.json",
               {**metrics, "valid": three, "test": three, "checkpoint_sha256": "d" * 64})
    (tmp_path / "runs/t/tid/run.json").write_text(json.dumps({"git_sha": "f" * 40}))
    third = collect_at(tmp_path, commit)["teachers"]["tid"]
    assert third["checkpoint_sha256"] == "d" * 64 and third["supersedes"]["checkpoint_sha256"] == "c" * 64
    assert third["supersedes"]["per_domain"]["Scientific"]["abs_diff"] == pytest.approx(0.0005)
    assert third["supersedes"]["supersedes"] == sup
    text = render_union_page(load_union(tmp_path / "results" / "experiments_union.json"))
    assert "| Text+ID (retrained in place) | Scientific | 0.1200 | 0.1205 | 0.0005 | yes |" in text
    assert "| Text+ID (an earlier retrain) | Office14 | 0.0600 | 0.0610 | 0.0010 | yes |" in text
    assert f"at `{'e' * 40}` (checkpoint `{'c' * 16}`), retrained in its run directory on" in text
    older = next(ln for ln in text.splitlines() if ln.startswith("- Text+ID (an earlier retrain):"))
    assert f"(checkpoint `{'b' * 16}`), retrained in its run directory on" in older  # the first run ...
    assert f"at `{'e' * 40}` in " in older and older.endswith("That run was replaced in turn (above).")  # ... by the second

    # Rebuilt once more from a clean commit, and the seeded rebuild gave the same checkpoint bytes:
    # another run (its commit and time differ), recorded as a retrain with the same bytes, not merged
    # into the run it reproduced; collecting that again changes nothing.
    (tmp_path / "runs/t/tid/run.json").write_text(json.dumps({"git_sha": "a" * 40}))
    fourth = collect_at(tmp_path, commit)["teachers"]["tid"]
    check = fourth["supersedes"]
    assert (fourth["checkpoint_sha256"], fourth["trained_commit"]) == ("d" * 64, "a" * 40)
    assert (check["checkpoint_sha256"], check["trained_commit"]) == ("d" * 64, "f" * 40)
    assert check["same_checkpoint_bytes"] and check["within_tolerance"]
    assert check["per_domain"]["Scientific"]["abs_diff"] == 0.0
    assert check["supersedes"]["checkpoint_sha256"] == "c" * 64
    assert collect_at(tmp_path, commit)["teachers"]["tid"] == fourth
    text = render_union_page(load_union(tmp_path / "results" / "experiments_union.json"))
    assert "same checkpoint bytes: yes" in text

    # A run recorded from a dirty tree, rebuilt from a clean one with the same bytes: the clean run
    # takes its place (it verifies it), keeping what it had superseded; no retrain link to the dirty one.
    (tmp_path / "runs/t/tid/run.json").write_text(json.dumps({"git_sha": "b" * 40 + "-dirty"}))
    dirty = collect_at(tmp_path, commit)["teachers"]["tid"]
    assert dirty["supersedes"]["trained_commit"] == "a" * 40
    (tmp_path / "runs/t/tid/run.json").write_text(json.dumps({"git_sha": "9" * 40}))
    clean = collect_at(tmp_path, commit)["teachers"]["tid"]
    assert clean["trained_commit"] == "9" * 40 and clean["supersedes"] == dirty["supersedes"]


def test_estimates_on_a_fresh_machine_come_from_the_recorded_times():
    """With nothing finished here, a step's expected time is what the committed JSON recorded for its
    run directory, else the median over the other seeds of the same run; a time measured here wins."""
    previous = {
        "teachers": {"pre": {"run_dir": "runs/t/pre", "train_s": 600.0},
                     "late": {"run_dir": "runs/t/late", "train_s": None}},
        "students": {"alone": {"seeds": [{"seed": 1, "runs": [{"run_dir": "runs/a/seed1", "wall_s": 100.0}]},
                                         {"seed": 2, "runs": [{"run_dir": "runs/a/seed2", "wall_s": 400.0}]},
                                         "not a seed record"]}},
    }
    est = union.Estimator()
    est.record_previous(previous)
    teacher = union.Step("teacher", "pre", "configs/pre.yaml", "runs/t/pre")
    seed = {s: union.Step("student", "alone", "configs/a.yaml", f"runs/a/seed{s}", seed=s) for s in (1, 2, 3)}
    assert est.estimate(teacher) == 600.0
    assert est.estimate(union.Step("teacher", "late", "configs/late.yaml", "runs/t/late")) is None
    assert est.estimate(seed[1]) == 100.0  # its own recorded time
    assert est.estimate(seed[3]) == 250.0  # (100 + 400) / 2: the other seeds of the same run
    assert est.estimate(union.Step("student", "dist", "configs/d.yaml", "runs/d/seed1", seed=1)) is None
    assert est.eta([teacher, seed[3]]) == "~14.2 min for 2 step(s)"
    est.record(seed[2], 50.0)  # measured here: this machine's pace beats another machine's record
    assert est.estimate(seed[3]) == 50.0 and est.estimate(seed[1]) == 50.0
    for junk in (None, {}, {"teachers": [1], "students": {"x": {"seeds": None}}}):
        empty = union.Estimator()
        empty.record_previous(junk)  # nothing usable: no estimate, no error
        assert empty.recorded == {} and empty.estimate(seed[1]) is None


def test_a_config_moved_onto_a_base_is_unchanged_until_its_base_changes(tmp_path):
    """A copy rewritten as ``base:`` plus its one change keeps its recorded results; an edit of the
    base it now names is a change of it, read from the recorded commit and the work tree alike."""
    commit = committed_tree(tmp_path)
    cfg = tmp_path / "configs"
    recorded = yaml.safe_load((cfg / "pre.yaml").read_text())
    assert recorded["train"]["epochs"] == 2 and recorded["train"]["batch_size"] == 64  # tiny_tree's
    (cfg / "recipe.yaml").write_text(yaml.safe_dump({**recorded, "train": {**recorded["train"], "epochs": 5}}))
    (cfg / "pre.yaml").write_text("# the recipe, two epochs\nbase: recipe.yaml\ntrain: {epochs: 2}\n")
    assert config_unchanged(tmp_path, commit, ["configs/pre.yaml"]) == (True, "")
    (cfg / "recipe.yaml").write_text(yaml.safe_dump({**recorded, "train": {**recorded["train"], "batch_size": 32}}))
    ok, why = config_unchanged(tmp_path, commit, ["configs/pre.yaml"])
    assert not ok and why == f"configs/pre.yaml changed since commit {commit[:12]}"
