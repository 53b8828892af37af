"""The distillation throughput benchmark's run plan (benchmarks/distill_throughput.py): a
multi-domain entry (one student on several domains, as the union student) and the steady-state
settings reach every run; what cannot be measured is refused before anything starts."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.distill_throughput import BenchError, domain_specs, entry_domains, plan_jobs


def _args(**kw) -> argparse.Namespace:
    base = dict(student_cpus="0", teacher_cpus="0", layouts=["shared"], config="configs/union/sasrec_joint_distilled.yaml",
                data_dir="", batch_size=1024, threads=1, seed=2024, curriculum=False, kd_precision="float32",
                prefetch=4, warmup=2, steps=10, fixture_teachers=0, teacher_gpus=None, teacher_precision="float32",
                overrides=[], warm_epochs=1, teacher_memo_mib=512, domains=["Scientific+Office14+Games"],
                candidates=["in_batch"], labels_dropped=False, targets_on="step", prefetch_cpus="student")
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.unit
def test_a_plus_joined_entry_is_one_student_on_those_domains():
    assert entry_domains("Scientific+Office14+Games") == ["Scientific", "Office14", "Games"]
    assert entry_domains("Games") == ["Games"]


@pytest.mark.unit
def test_union_plan_carries_the_steady_state_settings(tmp_path: Path):
    spec = "configs/union/serve.yaml"
    jobs = plan_jobs(_args(), {"Scientific+Office14+Games": spec}, tmp_path)
    assert [j["teachers"] for j in jobs] == ["none", "spec"]  # the no-teacher baseline, then the distilled run
    assert all(j["warm_epochs"] == 1 and j["teacher_memo_mib"] == 512 for j in jobs)
    assert jobs[1]["spec"] == spec and jobs[1]["baseline"] == jobs[0]["tag"]


@pytest.mark.unit
def test_what_a_multi_domain_entry_cannot_measure_is_refused(tmp_path: Path):
    with pytest.raises(BenchError, match="whole_catalogue.*in_batch"):
        plan_jobs(_args(candidates=["in_batch", "whole_catalogue"]), {"Scientific+Office14+Games": "x"}, tmp_path)
    with pytest.raises(BenchError, match="--spec Scientific\\+Office14\\+Games="):
        domain_specs([], ["Scientific+Office14+Games"], tmp_path)


@pytest.mark.unit
def test_rounds_alternate_baseline_and_distilled_and_report_the_median(tmp_path: Path):
    from benchmarks.distill_throughput import ratios_over_rounds

    jobs = plan_jobs(_args(rounds=3), {"Scientific+Office14+Games": "configs/union/serve.yaml"}, tmp_path)
    assert [(j["teachers"], j["round"]) for j in jobs] == [("none", 0), ("spec", 0), ("none", 1), ("spec", 1),
                                                          ("none", 2), ("spec", 2)]
    assert all(j["baseline"] == jobs[i - 1]["tag"] for i, j in enumerate(jobs) if j["teachers"] == "spec")
    rows = [{"domain": "d", "candidates": "in_batch", "layout": "own", "ratio": x} for x in (0.8, 1.1, 0.9)]
    (g,) = ratios_over_rounds(rows)
    assert (g["median"], g["min"], g["max"], g["rounds"]) == (0.9, 0.8, 1.1, 3)


@pytest.mark.unit
def test_the_interference_control_is_a_twin_of_each_distilled_run_in_every_round(tmp_path: Path):
    from benchmarks.distill_throughput import build_table, ratios_over_rounds

    jobs = plan_jobs(_args(rounds=2, labels_dropped=True), {"Scientific+Office14+Games": "configs/union/serve.yaml"},
                     tmp_path)
    # Per round: no teachers, the twin (teachers served, labels dropped), the distilled run.
    assert [(j["teachers"], bool(j.get("labels_dropped")), j["round"]) for j in jobs] == [
        ("none", False, 0), ("spec", True, 0), ("spec", False, 0),
        ("none", False, 1), ("spec", True, 1), ("spec", False, 1)]
    for k in (0, 1):
        base, twin, dist = jobs[3 * k: 3 * k + 3]
        assert twin["baseline"] == dist["baseline"] == base["tag"] and dist["labels_dropped_twin"] == twin["tag"]
        assert twin["spec"] == dist["spec"] and twin["candidates"] == dist["candidates"] == "in_batch"
    # Hand-computed: alone 1.0 and 0.8 steps/s, twin 0.9 and 0.8, distilled 0.81 and 0.72.
    speeds = {0: (1.0, 0.9, 0.81), 1: (0.8, 0.8, 0.72)}
    runs = []
    for j in jobs:
        alone, twin, dist = speeds[j["round"]]
        r = {"tag": j["tag"], "domain": j["domain"], "candidates": j["candidates"], "layout": j["layout"],
             "round": j["round"], "student_cpus": "0", "step_ms": 1.0, "ce_ms": 2.0}
        if j["teachers"] == "none":
            runs.append({**r, "teachers_source": "none", "steps_per_s": alone})
        else:
            runs.append({**r, "teachers_source": "spec", "baseline": j["baseline"], "steps_per_s":
                         twin if j.get("labels_dropped") else dist, "labels_dropped": bool(j.get("labels_dropped")),
                         **({"labels_dropped_twin": j["labels_dropped_twin"]} if j.get("labels_dropped_twin") else {})})
    rows = build_table(runs)
    assert len(rows) == 2  # the twins are not rows of their own
    assert [r["ratio"] for r in rows] == pytest.approx([0.81, 0.9])
    assert [r["labels_dropped_ratio"] for r in rows] == pytest.approx([0.9, 1.0])
    assert [r["kd_work_ratio"] for r in rows] == pytest.approx([0.9, 0.9])
    (g,) = ratios_over_rounds(rows)
    assert g["median"] == pytest.approx(0.855) and g["labels_dropped"]["median"] == pytest.approx(0.95)
    assert g["kd_work"]["min"] == pytest.approx(0.9)


@pytest.mark.integration
def test_the_twin_fetches_every_label_from_a_real_teacher_and_trains_on_ce_alone(tmp_path: Path, data_dir):
    """The interference control, run for real: one fixture teacher served by embedded Ray, the twin
    job in its own worker process. It must ask the teacher for labels (calls recorded by the
    TeacherPool) yet do none of the KD maths (no kd_ms), timing only the CE it trains on."""
    from benchmarks.distill_throughput import run_job

    args = _args(domains=["Scientific"], config="configs/demo/student.yaml", batch_size=64, warmup=1, steps=2,
                 fixture_teachers=1, warm_epochs=0, teacher_memo_mib=0, prefetch=2, labels_dropped=True,
                 data_dir=str(data_dir))
    jobs = plan_jobs(args, {}, tmp_path)
    (twin,) = [j for j in jobs if j.get("labels_dropped")]
    r = run_job(twin, timeout=600, log_dir=tmp_path / "logs")
    assert r["teacher_calls"] >= 3  # warmup + timed steps, each batch's labels fetched
    assert "kd_ms" not in r and r["ce_ms"] > 0
    assert r["teacher_names"] == ["fixture0"]


@pytest.mark.unit
def test_the_label_pipeline_settings_reach_the_runs_with_teachers_only(tmp_path: Path):
    jobs = plan_jobs(_args(student_cpus="0", teacher_cpus="1-2", layouts=["own", "shared"], targets_on="prefetch",
                           prefetch_cpus="teachers", overrides=["train.lr=0.002"]),
                     {"Scientific+Office14+Games": "configs/union/serve.yaml"}, tmp_path)
    by = {(j["layout"], j["teachers"]): j for j in jobs}
    assert by[("own", "spec")]["extra_sets"] == ["kd.targets_on=prefetch", "service.prefetch_cpus=1-2",
                                                 "train.lr=0.002"]
    # shared: nothing pinned, so the prefetch threads stay with the student
    assert by[("shared", "spec")]["extra_sets"] == ["kd.targets_on=prefetch", "train.lr=0.002"]
    assert all(j["extra_sets"] == ["train.lr=0.002"] for j in jobs if j["teachers"] == "none")
    # Both modes side by side: per round the baseline, then one distilled run per mode, each named.
    both = plan_jobs(_args(targets_on="step,prefetch", rounds=2),
                     {"Scientific+Office14+Games": "configs/union/serve.yaml"}, tmp_path)
    assert [(j["teachers"], j.get("targets_on"), j["round"]) for j in both] == [
        ("none", None, 0), ("spec", "step", 0), ("spec", "prefetch", 0),
        ("none", None, 1), ("spec", "step", 1), ("spec", "prefetch", 1)]
    assert len({j["tag"] for j in both}) == 6 and both[2]["baseline"] == both[0]["tag"]
    with pytest.raises(BenchError, match="--targets-on"):
        plan_jobs(_args(targets_on="gpu"), {"Scientific+Office14+Games": "configs/union/serve.yaml"}, tmp_path)


@pytest.mark.integration
def test_a_real_benchmark_run_times_the_kd_targets_in_the_prefetch_threads(tmp_path: Path, data_dir):
    """A real distilled run (fixture teacher on embedded Ray, layout own) with --targets-on prefetch
    --prefetch-cpus teachers: the teachers' side of the KD term is timed in the prefetch threads (the
    pool's kd_targets stage), the step times the KD loss, and the
    student process stays on its core. (That the threads run on the given cores is read back from
    /proc in tests/test_servicer.py.)"""
    import os

    from benchmarks.distill_throughput import run_job

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("layout own needs two cores")
    args = _args(domains=["Scientific"], config="configs/demo/student.yaml", batch_size=64, warmup=1, steps=2,
                 fixture_teachers=1, warm_epochs=0, teacher_memo_mib=0, prefetch=2, layouts=["own"],
                 student_cpus=str(cores[0]), teacher_cpus=str(cores[1]), targets_on="prefetch",
                 prefetch_cpus="teachers", data_dir=str(data_dir))
    (dist,) = [j for j in plan_jobs(args, {}, tmp_path) if j["teachers"] != "none"]
    r = run_job(dist, timeout=600, log_dir=tmp_path / "logs")
    assert r["kd_targets_prefetch_ms"] > 0 and r["kd_loss_ms"] > 0
    assert r["student_cpus"] == str(cores[0])
