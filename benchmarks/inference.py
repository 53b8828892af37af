"""Inference efficiency of students and teachers: parameters, peak memory, full-ranking time.

    python -m benchmarks.inference --student sasrec_distilled=runs/sasrec_distilled/best \
        --teacher unisrec=runs/teachers/unisrec/best [--data-dir D] [--domain Scientific] \
        [--users 1000] [--device cpu|cuda] --out runs/efficiency.json

--out defaults to runs/efficiency.json; the committed results/efficiency.json (behind
docs/results.md, see results/MANIFEST.yaml) and any other existing file are replaced only with
--overwrite.

For each model, in a fresh subprocess (so peak memory is that model's alone): load the data, build
the batches of N test users of --domain (batch 256), then load the model and rank the domain's
whole catalogue for every user (scores + top-50), once to warm up and --repeats times timed; the
median pass gives ms per 1,000 users. Peak memory is measured from just before the model is
loaded to the end of the timed passes: on CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs; ru_maxrss where that is not allowed) minus the RSS before loading; on CUDA
torch.cuda.max_memory_allocated minus what the batches already held. Scoring ms per 1,000 pairs:
each batch's histories against that batch's targets (the in-batch candidates distillation asks a
teacher for). CPU runs use --threads torch threads (default 1, so numbers on a shared box compare).

A student checkpoint names its domains (config.json); a teacher's domains come from --domains, else
from data.domains in the config.yaml of its run directory (the checkpoint's parent), else --domain.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


TOP_K = 50
MiB = float(1 << 20)


class BenchError(RuntimeError):
    """A model could not be benchmarked (bad spec, checkpoint, data, or a failed worker)."""


# ----------------------------------------------------------------------------- memory probes


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _release_memory(device) -> None:
    """Free what a deleted model held, and hand the C heap's free pages back to the OS so the next
    RSS baseline does not count them (glibc keeps freed memory otherwise)."""
    import ctypes

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuPeak:
    """Peak resident memory added after ``start()``."""

    def start(self) -> None:
        import torch

        _release_memory(torch.device("cpu"))
        self.hwm_reset = _reset_peak_rss() and _status_kb("VmHWM") is not None
        self.rss0 = (_status_kb("VmRSS") or 0) * 1024
        self.maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def peak_bytes(self) -> tuple[int, str]:
        if self.hwm_reset:
            return (_status_kb("VmHWM") or 0) * 1024 - self.rss0, "peak RSS (VmHWM after clear_refs) - RSS before load"
        # ru_maxrss never resets: it overstates when something earlier peaked higher.
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(self.rss0, 0),
                "ru_maxrss - RSS before load (upper bound)")


class CudaPeak:
    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def peak_bytes(self) -> tuple[int, str]:
        import torch

        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.base,
                "torch.cuda.max_memory_allocated - allocated before load")


# ----------------------------------------------------------------------------- one model (worker)


def teacher_domains(checkpoint: Path, explicit: list[str] | None, fallback: str) -> tuple[list[str], int]:
    """Domains and max_len the teacher was trained on: --domains, else its run's config.yaml."""
    if explicit:
        return explicit, 50
    run_cfg = checkpoint.parent / "config.yaml"
    if run_cfg.is_file():
        import yaml

        data = (yaml.safe_load(run_cfg.read_text()) or {}).get("data", {})
        if data.get("domains"):
            return list(data["domains"]), int(data.get("max_len", 50))
    return [fallback], 50


def _batches(dataset, domain: str, users: int, batch_size: int, device):
    """Test examples of ``domain`` (the first ``users``) as student batches on ``device``."""
    import numpy as np

    from student.trainer import make_student_batch

    d = dataset.domain_index(domain)
    idx = np.nonzero(dataset.splits["test"].domains == d)[0][:users]
    if idx.size == 0:
        raise BenchError(f"no test users in domain {domain}")
    return [make_student_batch(dataset, "test", idx[i:i + batch_size]).to(device)
            for i in range(0, idx.size, batch_size)], int(idx.size)


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Benchmark one model described by ``spec`` (kind, name, checkpoint, data_dir, domain,
    domains, users, batch_size, repeats, device, threads) in this process."""
    import torch

    from ckd.data.multidomain import load_multidomain

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    ckpt = Path(spec["checkpoint"])
    kind = spec["kind"]
    if kind == "student":
        from student.checkpoint import read_student_config

        cfg = read_student_config(ckpt)
        domains, max_len = list(cfg["domains"]), int(cfg.get("max_len", 50))
    else:
        domains, max_len = teacher_domains(ckpt, spec.get("domains"), spec["domain"])
    if spec["domain"] not in domains:
        raise BenchError(f"{spec['name']}: domain {spec['domain']!r} is not among its domains {domains}")
    dataset = load_multidomain(spec["data_dir"], domains, max_len=max_len)
    batches, n_users = _batches(dataset, spec["domain"], int(spec["users"]), int(spec["batch_size"]), device)
    start, stop = dataset.domain_range(dataset.domain_index(spec["domain"]))
    k = min(TOP_K, stop - start)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def load():
        if kind == "student":
            from student.checkpoint import load_student

            return load_student(ckpt, dataset, device)
        import importlib

        from teachers.base import load_teacher

        for module in spec.get("teacher_modules") or []:
            importlib.import_module(module)  # teacher kinds defined outside `teachers` register on import
        return load_teacher(ckpt, dataset.vocab_hash(), device)

    if kind == "student":
        def full(m, b):
            return m.full_scores(b, start, stop)

        def pairs(m, b):
            return m.score(b, b.targets)
    else:
        def full(m, b):
            return m.full_scores(b.histories, b.lengths, start, stop)

        def pairs(m, b):
            return m.score(b.histories, b.lengths, b.targets)

    def timed(fn, m) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                out = fn(m, b)
        sync()
        del out
        return time.perf_counter() - t0

    def rank(m, b):
        return torch.topk(full(m, b), k, dim=1).indices

    probe = CudaPeak(device) if device.type == "cuda" else CpuPeak()
    # Cold: first load and pass in this process, one-time runtime set-up (kernels, thread pools,
    # allocator arenas) included. Then free everything and measure again from a clean baseline:
    # that steady-state peak is the model's own memory (weights + inference working set).
    probe.start()
    model = load()
    timed(rank, model)
    timed(pairs, model)
    cold, _ = probe.peak_bytes()
    del model
    _release_memory(device)

    probe.start()
    model = load()
    repeats = max(1, int(spec["repeats"]))
    timed(rank, model)  # warm-up for timing
    full_s = [timed(rank, model) for _ in range(repeats)]
    peak, how = probe.peak_bytes()
    timed(pairs, model)
    pair_s = [timed(pairs, model) for _ in range(repeats)]
    n_pairs = sum(len(b) * len(b) for b in batches)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return {"kind": kind, "params": int(params), "buffer_elements": int(buffers),
            "peak_memory_mb": round(peak / MiB, 3), "peak_memory_cold_mb": round(cold / MiB, 3),
            "infer_ms_per_1000_users": 1e6 * statistics.median(full_s) / n_users,
            "score_ms_per_1000_pairs": 1e6 * statistics.median(pair_s) / n_pairs,
            "checkpoint": str(ckpt), "users": n_users, "catalogue": stop - start, "domains": domains,
            "infer_s_repeats": [round(s, 6) for s in full_s], "memory_method": how}


def _worker(spec_json: str) -> int:
    try:
        out = measure(json.loads(spec_json))
    except Exception as exc:  # noqa: BLE001 - the parent reports it with the model's name
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- driver


def parse_named(values: list[str], what: str) -> list[tuple[str, str]]:
    """NAME=DIR pairs; a duplicate name or a missing '=' is an error."""
    out: list[tuple[str, str]] = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise BenchError(f"--{what} wants NAME=CHECKPOINT_DIR, got {v!r}")
        out.append((name, path))
    return out


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure one model in a fresh interpreter; raise BenchError with its message on failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.inference", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"error": f"worker exited {proc.returncode}: {proc.stderr[-2000:]}"}
    if proc.returncode != 0 or "error" in result:
        raise BenchError(f"{spec['kind']} {spec['name']} ({spec['checkpoint']}): {result.get('error')}")
    return result


def format_table(models: dict[str, dict[str, Any]]) -> str:
    head = f"{'model':<24} {'kind':<8} {'params':>12} {'peak MB':>9} {'ms/1k users':>12} {'ms/1k pairs':>12}"
    rows = [head, "-" * len(head)]
    for name, m in models.items():
        rows.append(f"{name:<24} {m['kind']:<8} {m['params']:>12,} {m['peak_memory_mb']:>9.1f} "
                    f"{m['infer_ms_per_1000_users']:>12.2f} {m['score_ms_per_1000_pairs']:>12.4f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return _worker(argv[1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--teacher", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--data-dir", default=None, help="data root (default: $CKD_DATA_DIR or ../shared/data/amazon)")
    ap.add_argument("--domain", default="Scientific", help="domain whose test users and catalogue are ranked")
    ap.add_argument("--domains", default="", help="comma list: the domains teachers were trained on "
                    "(default: from each teacher run's config.yaml)")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per model")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    ap.add_argument("--teacher-module", action="append", default=[], metavar="MODULE",
                    help="import MODULE before loading teachers (a kind defined outside the built-ins, "
                         "e.g. benchmarks.fixture_teacher)")
    ap.add_argument("--out", default="runs/efficiency.json")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    # Refused before anything is measured: a default path or a rerun must not clobber results.
    from ckd.reporting import overwrite_refusal

    refusal = overwrite_refusal(args.out, args.overwrite)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2

    from ckd.config import default_data_dir, json_dump
    from ckd.run_dir import git_sha
    from research.experiments import machine_description

    try:
        named = ([("student", n, p) for n, p in parse_named(args.student, "student")]
                 + [("teacher", n, p) for n, p in parse_named(args.teacher, "teacher")])
        if not named:
            raise BenchError("nothing to measure: give --student NAME=DIR and/or --teacher NAME=DIR")
        names = [n for _, n, _ in named]
        if len(set(names)) != len(names):
            raise BenchError(f"model names must be unique, got {names}")
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BenchError("--device cuda but torch sees no CUDA device")
        base = {"data_dir": str(args.data_dir or default_data_dir()), "domain": args.domain,
                "domains": [d.strip() for d in args.domains.split(",") if d.strip()] or None,
                "users": args.users, "batch_size": args.batch_size, "repeats": args.repeats,
                "device": args.device, "threads": args.threads, "teacher_modules": args.teacher_module}
        models: dict[str, dict[str, Any]] = {}
        for kind, name, path in named:
            t0 = time.perf_counter()
            models[name] = run_worker({**base, "kind": kind, "name": name, "checkpoint": path}, args.timeout)
            print(f"measured {kind} {name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    result = {"machine": machine_description(args.device, memory=True), "commit": git_sha(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": args.device,
              "command": "python -m benchmarks.inference " + " ".join(shlex.quote(a) for a in argv),
              "domain": args.domain, "users": args.users, "batch_size": args.batch_size, "repeats": args.repeats,
              "threads": args.threads, "top_k": TOP_K, "models": models}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_dump(result, out)
    print(format_table(models))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
