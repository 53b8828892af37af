"""Run the distillation experiment suite from one script and collect its results in one JSON file.

    python launch/experiments.py --teachers unisrec=runs/teachers/unisrec_textid/best \
        --teachers recformer=runs/teachers/recformer/best --suite main --out results/experiments_main.json

Results go to --out (default ``<runs-root>/experiments.json``, outside the committed results/). An
existing --out is written into only with --overwrite: its runs are kept and the ones run now
replaced (so ``--only`` can re-run part of a suite); results/MANIFEST.yaml says which page uses it.

Every run is ``launch/distill.py`` with the base config plus the variant's overrides, so ablations
differ from the full method by exactly the switches named here. Teachers are served once for the
whole suite: on the embedded local Ray (default) or, with ``--no-ray``, by gRPC servers started in
this process on ``--device`` (the static-endpoint path; what a GPU box without Ray uses). Teacher
rows come from the teachers' own run directories (their metrics.json, test split).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout: configs and runs/ are relative to it

from ckd.affinity import available_cpus, format_cpus
from ckd.run_dir import git_sha

# name -> (group, model, variant, overrides); "{all}" marks runs that use every teacher.
SUITES: dict[str, list[tuple[str, str, str, str, list[str]]]] = {
    "main": [
        ("sasrec_alone", "baseline", "sasrec", "alone", ["service.enabled=false", "curriculum.enabled=false"]),
        ("sasrec_distilled", "distilled", "sasrec", "distilled", []),
        ("ablation_no_curriculum", "ablation", "sasrec", "no-curriculum", ["curriculum.enabled=false"]),
        ("ablation_positive_only", "ablation", "sasrec", "positive-only", ["kd.in_batch_negatives=false"]),
        ("ablation_mean_integration", "ablation", "sasrec", "mean-integration", ["kd.integration=mean"]),
    ],
    # Full budget (early stopping). The alone baseline uses its own best settings (batch 2048,
    # lr 1e-3: RecBole's, patience 10); "no teachers" is the distilled run's settings without KD.
    "full": [
        ("sasrec_alone", "baseline", "sasrec", "alone",
         ["service.enabled=false", "curriculum.enabled=false", "train.batch_size=2048", "train.lr=0.001",
          "train.patience=10"]),
        ("sasrec_distilled", "distilled", "sasrec", "distilled", []),
        ("ablation_no_teachers", "ablation", "sasrec", "no teachers (same batch, lr)",
         ["service.enabled=false", "curriculum.enabled=false"]),
    ],
    # One student for Scientific + Office14 (mixed batches); teachers of Scientific cover its rows.
    "multidomain": [
        ("sasrec_alone", "baseline", "sasrec", "alone",
         ["service.enabled=false", "curriculum.enabled=false", "data.domains=[Scientific,Office14]"]),
        ("sasrec_distilled", "distilled", "sasrec", "distilled", ["data.domains=[Scientific,Office14]"]),
    ],
    "universality": [
        (f"{k}_{v}", "universality", k, v, (["service.enabled=false", "curriculum.enabled=false"] if v == "alone"
                                             else []) + [f"model.kind={k}"] + extra)
        # Learning rates chosen on the alone runs' valid NDCG@10 (docs/benchmarks.md §6): FM 0.005 ->
        # 0.002 and LightGCN 0.02 -> 0.001 (0.02 peaked after one epoch); DeepFM was not swept.
        for k, extra in (("fm", ["train.lr=0.002"]), ("deepfm", ["train.lr=0.005"]), ("lightgcn", ["train.lr=0.001"]))
        for v in ("alone", "distilled")
    ],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def ram_gib() -> float:
    """The machine's physical memory in GiB; NaN where the OS does not say (no sysconf)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError, AttributeError):
        return float("nan")


def machine_description(device: str, memory: bool = False) -> str:
    """"2 cores (AMD EPYC), Linux", plus the cores this process is pinned to when it may not use all
    of them (a run started under taskset inherits them: its times are those of fewer cores), the
    machine's RAM when ``memory`` (for a page about memory), and the GPU on a CUDA device."""
    desc = f"{os.cpu_count()} cores ({cpu_name()}), {platform.system()}"
    try:
        allowed = available_cpus()
    except (AttributeError, OSError):  # no affinity on this OS: nothing to say
        allowed = set()
    if allowed and len(allowed) < (os.cpu_count() or 0):
        desc += f", pinned to {len(allowed)} of them (cpus {format_cpus(allowed)})"
    ram = ram_gib() if memory else float("nan")
    if not math.isnan(ram):  # unknown: nothing to say
        desc += f", {ram:.0f} GiB RAM"
    if device.startswith("cuda"):
        import torch

        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def serve_locally(teachers: dict[str, str], device: str, data_dir: str, domains: list[str]):
    """gRPC servers in this process, one per teacher, on ``device``; returns (endpoints, servers)."""
    from ckd.data.multidomain import load_multidomain
    from teachers.base import load_teacher
    from teachers.server import start_server

    prefixes = {h for h, _ in load_multidomain(data_dir, domains).prefix_vocabularies()}
    servers = {}
    for n, p in teachers.items():
        teacher = load_teacher(p, device=device)
        if teacher.vocab_hash not in prefixes:  # the students' contract check says the same, later
            raise SystemExit(f"teacher {n} ({p}) was trained on none of {domains}'s leading domains")
        servers[n] = start_server(teacher, name=n)
    return {n: [s.address] for n, s in servers.items()}, servers


def serve_on_ray(teachers: dict[str, str], replicas: int):
    from cluster.deploy import start_embedded

    spec = {"namespace": "ckd-experiments",
            "teachers": [{"name": n, "checkpoint": p, "replicas": replicas} for n, p in teachers.items()]}
    address, dep = start_embedded(spec, num_cpus=max(2, replicas * len(teachers) + 1))
    return address, dep


def run_one(name: str, overrides: list[str], base: list[str], out_root: Path, env: dict[str, str]) -> dict:
    run_dir = out_root / name
    cmd = [sys.executable, "-m", "launch.distill", *base, "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.time()
    log = open(out_root / f"{name}.out", "w")
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    # As a user types it: the console script, paths relative to the checkout.
    shown = "ckd-distill " + " ".join(c if " " not in c else repr(c) for c in cmd[3:]).replace(str(REPO) + "/", "")
    if proc.returncode != 0:
        return {"command": shown, "run_dir": str(run_dir), "error": f"exit {proc.returncode}, see {name}.out"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"command": shown, "run_dir": str(run_dir), "wall_s": round(time.time() - t0, 1), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teachers", action="append", default=[], metavar="NAME=CKPT_DIR",
                    help="a teacher checkpoint to serve (repeatable); its run dir's metrics.json gives its row")
    ap.add_argument("--suite", default="main", help=f"comma list of {sorted(SUITES)}")
    ap.add_argument("--config", default=str(REPO / "configs" / "distill_scientific.yaml"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every run")
    ap.add_argument("--only", default="", help="comma list of run names to (re)run")
    ap.add_argument("--teacher-row", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="add a teacher's own test row (its run dir's metrics.json) without serving it")
    ap.add_argument("--single-teacher-ablations", action="store_true", help="add one run per teacher alone")
    ap.add_argument("--no-ray", action="store_true", help="serve teachers with in-process gRPC servers")
    ap.add_argument("--device", default="cpu", help="device of in-process teacher servers (--no-ray)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (a GPU box can take several)")
    ap.add_argument("--runs-root", default="runs/experiments")
    ap.add_argument("--out", default=None, help="results JSON (default <runs-root>/experiments.json)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into an existing --out (its other runs are kept, the runs named here replaced)")
    ap.add_argument("--name-suffix", default="",
                    help="appended to every run name (and run directory), e.g. _scientificmm, so that one "
                         "manifest can hold the same suite on several domains")
    args = ap.parse_args(argv)
    # Refused before any teacher is served or run trained: hours of work must not end in a clobber.
    from ckd.reporting import overwrite_refusal

    args.out = args.out or str(Path(args.runs_root) / "experiments.json")
    refusal = overwrite_refusal(args.out, args.overwrite, action="write into it (its other runs are kept)")
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2

    from ckd.config import default_data_dir, load_config
    from student.config import DistillConfig

    data_dir = args.data_dir or default_data_dir()
    teachers = dict(t.split("=", 1) for t in args.teachers)
    base_cfg = load_config(DistillConfig, args.config, overrides=args.overrides)
    runs = [r for s in args.suite.split(",") if s for r in SUITES[s]]
    if args.single_teacher_ablations and len(teachers) > 1:
        runs += [(f"ablation_only_{n}", "ablation", "sasrec", f"only-{n}", [f"service.teachers=[{n}]"])
                 for n in teachers]
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r[0] in keep]
    runs = [(name + args.name_suffix, *rest) for name, *rest in runs]
    out_root = Path(args.runs_root)
    out_root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CKD_DATA_DIR": data_dir}

    servers, dep = {}, None
    base = ["--config", args.config, "--data-dir", data_dir, "--set", "train.progress=false"]
    base += [x for o in args.overrides for x in ("--set", o)]
    needs_teachers = any("service.enabled=false" not in r[4] for r in runs)
    if needs_teachers:
        if not teachers:
            ap.error("the suite has distilled runs: give --teachers NAME=CKPT_DIR")
        if args.no_ray:
            endpoints, servers = serve_locally(teachers, args.device, data_dir, base_cfg.data.domains)
            base += ["--set", f"service.endpoints={json.dumps(endpoints)}", "--set", "service.spec="]
        else:
            address, dep = serve_on_ray(teachers, args.replicas)
            base += ["--ray-address", address, "--set", "service.namespace=ckd-experiments", "--set", "service.spec="]
        base += ["--set", f"service.teachers=[{','.join(teachers)}]"]
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {"runs": {}}
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as ex:
            futs = {name: (group, model, variant, ex.submit(run_one, name, ov, base, out_root, env))
                    for name, group, model, variant, ov in runs}
            for name, (group, model, variant, fut) in futs.items():
                res = fut.result()
                results["runs"][name] = {"group": group, "model": model, "variant": variant, **res}
                status = res.get("error") or "ndcg@10 " + " ".join(
                    f"{d}={v['ndcg@10']:.4f}" for d, v in res["metrics"]["test"].items())
                print(f"{name:<32} {status}", flush=True)
    finally:
        for s in servers.values():
            s.stop(1.0)
        if dep is not None:
            dep.shutdown()
    rows = {n: Path(p).parent for n, p in teachers.items()}
    rows.update({n: Path(p) for n, p in (t.split("=", 1) for t in args.teacher_row)})
    for n, run_dir in rows.items():
        m = run_dir / "metrics.json"
        if m.is_file():
            results["runs"][f"teacher_{n}"] = {"group": "teacher", "model": n, "variant": "teacher",
                                               "command": f"see docs/teachers.md ({run_dir})",
                                               "run_dir": str(run_dir), "metrics": json.loads(m.read_text())}
    results.update(machine=machine_description(args.device if args.no_ray else "cpu"), commit=git_sha(),
                   created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {out_path}")
    return 0 if all("error" not in r for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
