"""The offline-cache alternative to on-the-fly soft labels, computed exactly from data and configs.

    python -m benchmarks.offline_cache                               # Scientific + Games, demo student
    python -m benchmarks.offline_cache --domains Scientific --fixture-teachers 2 --rate-batches 2

For the same run as the student config describes (--config, default the demo student: its
curriculum, batch size, length buckets, seed and train.epochs), the batches of every epoch are
rebuilt exactly as student.trainer.Trainer.epoch_batches builds them (same sampler, same seeds; no
training), and from them the soft labels an offline cache would have to hold for M teachers:

  in_batch_per_epoch   what the run distils: each epoch's batches with their own in-batch
                       candidates (the batch's distinct targets, + kd.num_sampled). Batches are
                       reshuffled every epoch and the curriculum pool grows, so every epoch's labels
                       differ: sum over epochs and batches of rows x candidates x M x 4 bytes.
  in_batch_fixed_once  the same labels cached once per row (the candidates of the first batch the
                       row is in): smaller, but training must then replay the same batches every
                       epoch (no reshuffling), or the cached columns are not the batch's candidates.
  whole_catalogue      every row once against the whole catalogue: rows x items x M x 4 bytes;
                       independent of order, curriculum and epochs.
  top_<K>              the top-K-logits variant some systems cache: rows x K x M x (4-byte score
                       + 4-byte item id). The in-batch KD of this project cannot be computed from it
                       (a batch's candidates are mostly outside a row's top K); a different loss.
Sizes count float32 scores (4 bytes); a cache of the integrated mixture q instead of the teachers'
scores is M times smaller but freezes the integration (temperatures, weights) into the cache.

Curriculum: the pool of rows grows over epochs (rows per epoch are listed), so the cache must be
built for train.epochs before the first step (early stopping decides later how many are used);
"labels per row" is how many times a row's labels are stored under per-epoch candidates. The same
numbers without the curriculum are given for comparison.

Precompute time: each teacher of --spec (defaults as benchmarks/distill_throughput.py: the demo
teachers for Scientific, runs/bench/teachers_<domain>/ for others) is loaded in this process and
times Teacher.score on real batches of the run (B rows, in-batch and whole-catalogue candidates,
--threads torch threads); per row, time = a + b * C (a: encoding the history, b: one candidate),
fitted through the two widths, prices every variant and the 1M-item extrapolation. A domain
without built teachers borrows the cost model of a measured domain (flagged). Precomputing runs
the teachers one after the other on one device (sum) or one device each (max); writing the cache
uses a measured disk write rate (--disk-mib MiB written and fsynced). Time to first step: offline,
precompute + write; on the fly, service start-up + first step, read from a distill_throughput JSON
(--throughput-json) when there is one.

Extrapolation to --catalogue items (default 1M): the domain's rows, and rows scaled with the
catalogue (rows per item kept); in-batch widths do not grow with the catalogue, whole-catalogue
widths do.

Writes JSON (default runs/bench_offline_cache.json; an existing file, and anything under results/,
only with --overwrite) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.distill_throughput import REPO, BenchError, domain_specs, fixture_spec, machine, refuse_out

DEFAULT_OUT = "runs/bench_offline_cache.json"
DEFAULT_CONFIG = "configs/demo/student.yaml"
SCORE_BYTES = 4  # float32
INDEX_BYTES = 4  # int32 item id of a top-K entry


# ----------------------------------------------------------------------------- the run's batches


def resolve(config: str, domain: str, data_dir: str, overrides: list[str], curriculum: bool | None = None):
    """The student config of the run for ``domain`` (as launch/distill.py resolves it)."""
    from launch.distill import parse_args, resolve_config

    argv = ["--config", config, "--teachers", "none", "--set", f"data.domains=[{domain}]"]
    if data_dir:
        argv += ["--data-dir", data_dir]
    for s in overrides:
        argv += ["--set", s]
    if curriculum is not None:
        argv += ["--set", f"curriculum.enabled={str(curriculum).lower()}"]
    cfg = resolve_config(parse_args(argv))
    if cfg.curriculum.enabled and cfg.curriculum.teacher_signal != "none":
        raise BenchError("a teacher-driven curriculum orders rows by teacher scores (a whole-data teacher pass "
                         "before training): run with --set curriculum.teacher_signal=none")
    return cfg


def run_batches(cfg, dataset, epochs: int) -> list[list[np.ndarray]]:
    """Row indices of every batch of epochs 0..epochs-1, built by the trainer's own code (world size 1)."""
    from student.pipeline import build_sampler
    from student.trainer import Trainer

    acc = SimpleNamespace(num_processes=1, process_index=0)
    sampler = build_sampler(cfg, dataset, acc)
    shim = SimpleNamespace(cfg=cfg, sampler=sampler, dataset=dataset, acc=acc)
    return [Trainer.epoch_batches(shim, e) for e in range(epochs)]


def label_counts(batches: list[list[np.ndarray]], targets: np.ndarray, catalogue: int, num_sampled: int
                 ) -> dict[str, Any]:
    """Exact counts of the run: rows, in-batch candidate widths, per epoch and in all."""
    per_epoch = []
    first_width: dict[int, int] = {}
    for e, epoch in enumerate(batches):
        rows = cells = 0
        for idx in epoch:
            distinct = int(np.unique(targets[idx]).shape[0])
            width = distinct + min(num_sampled, catalogue - distinct)
            rows += len(idx)
            cells += len(idx) * width
            for r in idx.tolist():
                first_width.setdefault(r, width)
        per_epoch.append({"epoch": e, "batches": len(epoch), "rows": rows, "in_batch_cells": cells,
                          "mean_width": cells / max(rows, 1)})
    return {"per_epoch": per_epoch, "rows_seen": sum(p["rows"] for p in per_epoch),
            "cells_per_epoch_total": sum(p["in_batch_cells"] for p in per_epoch),
            "unique_rows": len(first_width), "fixed_once_cells": int(sum(first_width.values()))}


def variants(counts: dict[str, Any], catalogue: int, teachers: int, topk: list[int]) -> list[dict[str, Any]]:
    """Entries and bytes of each cache variant (module docstring), for ``teachers`` teachers."""
    u = counts["unique_rows"]
    out = [
        {"variant": "in_batch_per_epoch", "entries": counts["cells_per_epoch_total"] * teachers,
         "bytes": counts["cells_per_epoch_total"] * teachers * SCORE_BYTES, "scored_rows": counts["rows_seen"],
         "scored_cells": counts["cells_per_epoch_total"]},
        {"variant": "in_batch_fixed_once", "entries": counts["fixed_once_cells"] * teachers,
         "bytes": counts["fixed_once_cells"] * teachers * SCORE_BYTES, "scored_rows": u,
         "scored_cells": counts["fixed_once_cells"]},
        {"variant": "whole_catalogue", "entries": u * catalogue * teachers,
         "bytes": u * catalogue * teachers * SCORE_BYTES, "scored_rows": u, "scored_cells": u * catalogue},
    ]
    for k in topk:
        kk = min(k, catalogue)
        out.append({"variant": f"top_{k}", "entries": u * kk * teachers,
                    "bytes": u * kk * teachers * (SCORE_BYTES + INDEX_BYTES), "scored_rows": u,
                    "scored_cells": u * catalogue})  # finding the top K scores the whole catalogue
    return out


# ----------------------------------------------------------------------------- teacher cost


def measure_teacher_cost(spec_path: str, dataset, batches: list[np.ndarray], threads: int, repeats: int
                         ) -> dict[str, dict[str, float]]:
    """Per teacher of the spec: ms per row at the in-batch and the whole-catalogue width on the run's
    own batches, and the fitted per-row cost a + b * C."""
    import torch

    from cluster.deploy import load_spec
    from student.trainer import make_student_batch
    from teachers.base import load_teacher

    spec = load_spec(spec_path)
    for module in spec.teacher_modules:
        __import__(module)
    torch.set_num_threads(threads)
    start, stop = dataset.domain_range(0)
    whole = torch.arange(start, stop)
    sel = batches[: repeats + 1]
    out = {}
    for t in spec.teachers:
        model = load_teacher(t.checkpoint, expected_vocab_hash=dataset.vocab_hash())
        times: dict[str, list[float]] = {"in_batch": [], "whole_catalogue": []}
        widths = []
        rows = 0
        with torch.inference_mode():
            for i, idx in enumerate(sel):
                b = make_student_batch(dataset, "train", idx)
                cands = {"in_batch": torch.unique(b.targets), "whole_catalogue": whole}
                for kind, c in cands.items():
                    t0 = time.perf_counter()
                    model.score(b.histories, b.lengths, c)
                    if i > 0:  # the first batch warms up (and builds the item cache)
                        times[kind].append(time.perf_counter() - t0)
                if i > 0:
                    widths.append(int(cands["in_batch"].shape[0]))
                    rows += len(idx)
        c1, c2 = float(np.mean(widths)), float(stop - start)
        t1 = 1e3 * sum(times["in_batch"]) / rows  # ms per row
        t2 = 1e3 * sum(times["whole_catalogue"]) / rows
        b_ms = max(0.0, (t2 - t1) / (c2 - c1)) if c2 > c1 else 0.0
        a_ms = max(0.0, t1 - b_ms * c1)
        out[t.name] = {"kind": model.describe().name, "ms_per_1000_rows_in_batch": 1e3 * t1,
                       "ms_per_1000_rows_whole_catalogue": 1e3 * t2, "in_batch_width": c1, "catalogue": c2,
                       "a_ms_per_row": a_ms, "b_us_per_candidate": 1e3 * b_ms, "rows_timed_per_width": rows,
                       "threads": threads}
        del model
    return out


def precompute_seconds(cost: dict[str, dict[str, float]], rows: int, cells: int) -> dict[str, float]:
    """Seconds to score ``rows`` rows with ``cells`` (row, candidate) pairs in all, per teacher, then
    all teachers on one device (sum) and one device each (max)."""
    per = {n: (c["a_ms_per_row"] * rows + c["b_us_per_candidate"] * 1e-3 * cells) / 1e3 for n, c in cost.items()}
    return {"per_teacher": per, "one_device": sum(per.values()), "device_per_teacher": max(per.values(), default=0.0)}


def disk_write_mib_s(mib: int, directory: str | None = None) -> float:
    """Sequential write rate of ``mib`` MiB to a temporary file, fsync included."""
    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory) as fh:
        t0 = time.perf_counter()
        for _ in range(mib):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
        return mib / (time.perf_counter() - t0)


def on_the_fly_first_step(path: str, domain: str) -> dict[str, Any] | None:
    """Start-up + first step of on-the-fly distillation from a distill_throughput JSON (own cores and
    in-batch candidates preferred)."""
    p = Path(path)
    if not p.is_file():
        return None
    runs = [r for r in json.loads(p.read_text()).get("runs", []) if r.get("domain") == domain
            and r.get("teachers_source") not in (None, "none")]
    if not runs:
        return None
    runs.sort(key=lambda r: (r.get("candidates") != "in_batch", r.get("layout") != "own"))
    r = runs[0]
    return {"time_to_first_step_s": r["time_to_first_step_s"], "service_start_s": r.get("service_start_s"),
            "source": f"{p} ({r.get('tag')})", "teachers": r.get("teacher_names")}


# ----------------------------------------------------------------------------- one domain


def domain_report(args: argparse.Namespace, domain: str, spec: str | None, cost_cache: dict[str, Any],
                  disk_rate: float) -> dict[str, Any]:
    from ckd.data.multidomain import load_multidomain

    cfg = resolve(args.config, domain, args.data_dir, args.overrides)
    dataset = load_multidomain(cfg.data.data_dir, cfg.data.domains, max_len=cfg.data.max_len)
    epochs = args.epochs or cfg.train.epochs
    start, stop = dataset.domain_range(0)
    catalogue = stop - start
    targets = dataset.splits["train"].targets
    batches = run_batches(cfg, dataset, epochs)
    counts = label_counts(batches, targets, catalogue, cfg.kd.num_sampled)
    no_cur = label_counts(run_batches(resolve(args.config, domain, args.data_dir, args.overrides, curriculum=False),
                                      dataset, epochs), targets, catalogue, cfg.kd.num_sampled)
    m = args.teachers_count
    cost, cost_note = None, None
    if args.teacher_cost:
        cost, cost_note = args.teacher_cost, "given with --teacher-cost"
    elif not args.no_rate:
        if args.fixture_teachers:
            with tempfile.TemporaryDirectory() as tmp:
                spec_path = Path(tmp) / "spec.yaml"
                import yaml

                spec_path.write_text(yaml.safe_dump(fixture_spec(dataset, args.fixture_teachers, Path(tmp))))
                cost = measure_teacher_cost(str(spec_path), dataset, batches[-1], args.threads, args.rate_batches)
            cost_note = f"{args.fixture_teachers} generated fixture teacher(s)"
        elif spec is not None and _spec_ready(spec):
            cost = measure_teacher_cost(spec, dataset, batches[-1], args.threads, args.rate_batches)
            cost_note = f"measured from {spec}"
        elif cost_cache:
            src, cost = next(iter(cost_cache.items()))
            cost_note = f"borrowed from {src} (no built teachers for {domain}: {spec})"
        if cost is not None and "borrowed" not in (cost_note or ""):
            cost_cache.setdefault(domain, cost)
        if cost is not None and not args.teachers_count_given:
            m = len(cost)
    rows = variants(counts, catalogue, m, args.topk)
    fly = on_the_fly_first_step(args.throughput_json, domain) if args.throughput_json else None
    for v in rows:
        v["gib"] = v["bytes"] / (1 << 30)
        v["write_s"] = v["bytes"] / (disk_rate * (1 << 20)) if disk_rate else None
        if cost is not None:
            pre = precompute_seconds(cost, v["scored_rows"], v["scored_cells"])
            v["precompute_s"] = pre
            v["first_step_s"] = pre["one_device"] + (v["write_s"] or 0.0)
    # Extrapolation to a catalogue of args.catalogue items.
    scale = args.catalogue / catalogue
    ext = []
    for rows_mode, f in (("same_rows", 1.0), ("rows_scaled", scale)):
        c = {"unique_rows": int(round(counts["unique_rows"] * f)),
             "rows_seen": int(round(counts["rows_seen"] * f)),
             "cells_per_epoch_total": int(round(counts["cells_per_epoch_total"] * f)),
             "fixed_once_cells": int(round(counts["fixed_once_cells"] * f))}
        for v in variants(c, args.catalogue, m, args.topk):
            v.update(rows=rows_mode, gib=v["bytes"] / (1 << 30))
            if cost is not None:
                v["precompute_s"] = precompute_seconds(cost, v["scored_rows"], v["scored_cells"])
            ext.append(v)
    per_epoch_rows = [p["rows"] for p in counts["per_epoch"]]
    return {
        "domain": domain, "config": args.config, "epochs": epochs, "catalogue": catalogue,
        "train_rows": int(len(targets)), "batch_size": cfg.train.batch_size, "teachers": m,
        "kd_num_sampled": cfg.kd.num_sampled,
        "curriculum": {"enabled": cfg.curriculum.enabled, "pacing": cfg.curriculum.pacing,
                       "start_fraction": cfg.curriculum.start_fraction, "full_at_epoch": cfg.curriculum.full_at_epoch,
                       "rows_per_epoch": per_epoch_rows,
                       "labels_per_row_in_batch_per_epoch": counts["rows_seen"] / max(counts["unique_rows"], 1),
                       "unique_rows": counts["unique_rows"],
                       "without_curriculum": {"rows_seen": no_cur["rows_seen"],
                                              "in_batch_per_epoch_bytes": no_cur["cells_per_epoch_total"] * m * SCORE_BYTES,
                                              "unique_rows": no_cur["unique_rows"]}},
        "counts": counts, "variants": rows, "extrapolation": {"catalogue": args.catalogue, "rows": ext},
        "teacher_cost": cost, "teacher_cost_source": cost_note, "on_the_fly": fly}


def _spec_ready(spec: str) -> bool:
    from ckd.config import ConfigError
    from cluster.deploy import load_spec

    try:
        load_spec(spec)
        return True
    except ConfigError:
        return False


# ----------------------------------------------------------------------------- output


def _size(b: float) -> str:
    for unit, f in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b:.0f} B"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _cost_text(name: str, c: dict[str, float]) -> str:
    text = f"{name} {c['a_ms_per_row']:.3f} ms/row + {c['b_us_per_candidate']:.4f} us/candidate"
    if "ms_per_1000_rows_in_batch" in c:
        text += (f" ({c['ms_per_1000_rows_in_batch']:.0f} ms/1000 rows in-batch at C={c['in_batch_width']:.0f}, "
                 f"{c['ms_per_1000_rows_whole_catalogue']:.0f} at the whole catalogue)")
    return text


def print_report(res: dict[str, Any]) -> None:
    for d in res["domains"]:
        cur = d["curriculum"]
        print(f"\n{d['domain']}: {d['train_rows']:,} train rows, {d['catalogue']:,} items, {d['teachers']} teacher(s), "
              f"batch {d['batch_size']}, {d['epochs']} epochs (train.epochs of {d['config']}); curriculum "
              f"{'on' if cur['enabled'] else 'off'}: rows per epoch {cur['rows_per_epoch']}")
        print(f"  teacher cost: {d['teacher_cost_source'] or 'not measured'}"
              + ("" if not d["teacher_cost"] else ": " + "; ".join(_cost_text(n, c) for n, c in d["teacher_cost"].items())))
        head = f"  {'variant':22s} {'entries':>15s} {'size':>10s} {'precompute':>11s} {'per teacher dev':>15s} " \
               f"{'write':>8s} {'first step':>10s}"
        print(head)
        for v in d["variants"]:
            pre = v.get("precompute_s") or {}
            print(f"  {v['variant']:22s} {v['entries']:>15,d} {_size(v['bytes']):>10s} {_dur(pre.get('one_device')):>11s} "
                  f"{_dur(pre.get('device_per_teacher')):>15s} {_dur(v.get('write_s')):>8s} "
                  f"{_dur(v.get('first_step_s')):>10s}")
        fly = d.get("on_the_fly")
        print("  on the fly: nothing stored; the teachers score the in_batch_per_epoch cells during training, "
              "overlapped with the student's steps; " +
              (f"first step after {_dur(fly['time_to_first_step_s'])} (service start {_dur(fly['service_start_s'])}; "
               f"{fly['source']})" if fly else
               "time to first step: run benchmarks/distill_throughput.py first (--throughput-json)"))
        print(f"  labels stored per row under per-epoch candidates: {cur['labels_per_row_in_batch_per_epoch']:.2f} "
              f"(unique rows {cur['unique_rows']:,}); without the curriculum the per-epoch cache would be "
              f"{_size(cur['without_curriculum']['in_batch_per_epoch_bytes'])}")
        ext = d["extrapolation"]
        print(f"  extrapolated to {ext['catalogue']:,} items:")
        for v in ext["rows"]:
            pre = v.get("precompute_s") or {}
            print(f"    {v['rows']:12s} {v['variant']:22s} {_size(v['bytes']):>10s}  precompute {_dur(pre.get('one_device'))}")


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="Scientific,Games")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="the student run (data.domains is set per domain)")
    ap.add_argument("--epochs", type=int, default=0, help="epochs the cache covers (default train.epochs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--spec", action="append", default=[], metavar="[DOMAIN=]SPEC",
                    help="teachers whose scoring rate prices the precompute (defaults: module docstring)")
    ap.add_argument("--fixture-teachers", type=int, default=0, metavar="N", help="time N generated teachers instead")
    ap.add_argument("--teachers", dest="teachers_count", type=int, default=0,
                    help="teachers the cache holds (default: those of the spec, else 2)")
    ap.add_argument("--no-rate", action="store_true", help="sizes only: do not load or time any teacher")
    ap.add_argument("--teacher-cost", action="append", default=[], metavar="NAME=A,B",
                    help="a teacher's scoring cost instead of timing it: A ms per row (history) and B us per "
                         "candidate, e.g. from the teacher_cost block of an earlier run on other hardware")
    ap.add_argument("--rate-batches", type=int, default=5, help="batches timed per teacher and width")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the teachers' timing")
    ap.add_argument("--topk", default="10,100", help="K of the top-K-logits variants")
    ap.add_argument("--catalogue", type=int, default=1_000_000, help="catalogue size to extrapolate to")
    ap.add_argument("--disk-mib", type=int, default=128, help="MiB written to measure the disk (0: skip)")
    ap.add_argument("--throughput-json", default="runs/bench_distill_throughput.json",
                    help="distill_throughput output, for the on-the-fly time to first step")
    ap.add_argument("--data-dir", default="")
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output (a relative path is relative to the repository)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out (required under results/)")
    args = ap.parse_args(argv)
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    args.topk = [int(k) for k in args.topk.split(",") if k.strip()]
    args.teachers_count_given = args.teachers_count > 0
    if not args.teachers_count:
        args.teachers_count = args.fixture_teachers or 2
    if args.rate_batches < 1:
        ap.error("--rate-batches must be >= 1")
    cost = {}
    for item in args.teacher_cost:
        name, sep, rest = item.partition("=")
        try:
            a, b = (float(x) for x in rest.split(","))
        except ValueError:
            ap.error(f"--teacher-cost {item!r}: want NAME=A_MS_PER_ROW,B_US_PER_CANDIDATE")
        if not sep or not name or a < 0 or b < 0:
            ap.error(f"--teacher-cost {item!r}: want NAME=A_MS_PER_ROW,B_US_PER_CANDIDATE (both >= 0)")
        cost[name] = {"a_ms_per_row": a, "b_us_per_candidate": b}
    args.teacher_cost = cost
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_cli(argv)
    why = refuse_out(args.out, args.overwrite)
    if why:
        print(why, file=sys.stderr)
        return 2
    os.chdir(REPO)
    tmp = Path(tempfile.mkdtemp(prefix="bench_offline_"))
    try:
        specs = domain_specs(args.spec, args.domains, tmp)
        disk = disk_write_mib_s(args.disk_mib, str(REPO / "runs") if (REPO / "runs").is_dir() else None) \
            if args.disk_mib > 0 else 0.0
        res: dict[str, Any] = {"benchmark": "offline_cache", "command": " ".join(shlex.quote(a) for a in sys.argv),
                               "machine": machine(), "disk_write_mib_s": disk, "domains": []}
        cost_cache: dict[str, Any] = {}
        # Domains with built teachers first, so the others can borrow their cost model.
        order = sorted(args.domains, key=lambda d: not (args.fixture_teachers or _spec_ready(specs[d])))
        for d in order:
            print(f"{d} ...", flush=True)
            res["domains"].append(domain_report(args, d, specs.get(d), cost_cache, disk))
        res["domains"].sort(key=lambda r: args.domains.index(r["domain"]))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print_report(res)
    print(f"\ndisk write {disk:.0f} MiB/s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
