"""The same inference benchmark on two checkouts, alternating, in one window: what a code change did.

    git worktree add /tmp/before <commit>          # or any clone at the commit to compare with
    python -m benchmarks.code_ab --tree before=/tmp/before --tree after=. --rounds 3 \\
        --out runs/bench/code_ab.json -- --student deepfm=runs/union/deepfm_joint_distilled/seed2024/best \\
        --domain Games --repeats 5

Everything after ``--`` goes to ``python -m benchmarks.inference`` unchanged, except that an argument
(or the PATH of a NAME=PATH argument) naming an existing file or folder is made absolute, since each
tree's benchmark runs with that tree as its working directory (so its own code, workers included, is
what is measured). Round r measures the trees in the given order, reversed on odd rounds, so a drift
of the box over the window does not favour one. Prints, per model and tree, the median over rounds of
the median ms per 1,000 users and the range of peak memory, and per round the ratio of each tree to
the first; writes them and every round's raw numbers, with each tree's commit (refused when a tree
has uncommitted changes: the numbers would name no code), to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class ABError(RuntimeError):
    """A tree is missing, dirty or its benchmark failed; the message says which."""


def tree_commit(path: Path) -> str:
    """The commit checked out at ``path``; an ABError when it is no git checkout or has changes."""
    def git(*args: str) -> str:
        got = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True)
        if got.returncode != 0:
            raise ABError(f"{path}: not a git checkout ({got.stderr.strip()})")
        return got.stdout.strip()

    if git("status", "--porcelain", "--untracked-files=no"):
        raise ABError(f"{path}: has uncommitted changes to tracked files; commit or stash them first")
    return git("rev-parse", "HEAD")


def absolute_paths(args: list[str], cwd: Path) -> list[str]:
    """``args`` with each argument, or the PATH of each NAME=PATH, that exists under ``cwd`` made absolute."""
    out = []
    for a in args:
        name, sep, rest = a.partition("=")
        if sep and not a.startswith("-") and rest and (cwd / rest).exists():
            out.append(f"{name}={(cwd / rest).resolve()}")
        elif not a.startswith("-") and (cwd / a).exists():
            out.append(str((cwd / a).resolve()))
        else:
            out.append(a)
    return out


def measure_tree(tree: Path, bench_args: list[str], timeout: float) -> dict[str, Any]:
    """One ``benchmarks.inference`` run with ``tree`` as working directory; its models' results."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        got = subprocess.run([sys.executable, "-m", "benchmarks.inference", *bench_args, "--out", str(out)],
                             cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        if got.returncode != 0 or not out.is_file():
            raise ABError(f"{tree}: benchmarks.inference exited {got.returncode}: {got.stderr[-1500:]}")
        return json.loads(out.read_text())["models"]


def summarise(trees: list[str], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and tree: median over rounds of ms per 1,000 users, its range, peak memory range; and
    per model the per-round ratio of each tree to the first tree."""
    models = list(rounds[0]["trees"][trees[0]])
    out: dict[str, Any] = {}
    for m in models:
        per_tree = {}
        for t in trees:
            ms = [r["trees"][t][m]["infer_ms_per_1000_users"] for r in rounds]
            mb = [r["trees"][t][m]["peak_memory_mb"] for r in rounds]
            per_tree[t] = {"infer_ms_median": statistics.median(ms), "infer_ms_min": min(ms), "infer_ms_max": max(ms),
                           "peak_mb_min": min(mb), "peak_mb_max": max(mb)}
        ratios = {t: [r["trees"][t][m]["infer_ms_per_1000_users"] / r["trees"][trees[0]][m]["infer_ms_per_1000_users"]
                      for r in rounds] for t in trees[1:]}
        out[m] = {"trees": per_tree, "ratio_to_first": ratios,
                  "ratio_to_first_median": {t: statistics.median(v) for t, v in ratios.items()}}
    return out


def format_table(trees: list[str], summary: dict[str, Any]) -> str:
    head = f"{'model':<36} {'tree':<10} {'ms/1k users (median)':>21} {'range':>17} {'peak MB range':>17} {'vs ' + trees[0]:>12}"
    lines = [head, "-" * len(head)]
    for m, s in summary.items():
        for t in trees:
            p = s["trees"][t]
            ratio = "" if t == trees[0] else f"{s['ratio_to_first_median'][t]:.2f}x"
            lines.append(f"{m:<36} {t:<10} {p['infer_ms_median']:>21.1f} "
                         f"{p['infer_ms_min']:>8.1f}-{p['infer_ms_max']:<8.1f} "
                         f"{p['peak_mb_min']:>8.1f}-{p['peak_mb_max']:<8.1f} {ratio:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, bench = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.code_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="NAME=CHECKOUT, two or more; the first is the reference")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark run")
    ap.add_argument("--out", default="runs/bench/code_ab.json")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(ours)
    from ckd.config import json_dump
    from research.experiments import machine_description

    try:
        named = [t.partition("=") for t in args.tree]
        if len(named) < 2 or any(not n or not sep or not p for n, sep, p in named):
            raise ABError("give two or more --tree NAME=CHECKOUT")
        trees = {n: Path(p).resolve() for n, _, p in named}
        if len(trees) != len(named):
            raise ABError("tree names must be unique")
        if not bench or "--out" in bench:
            raise ABError("give the benchmark's arguments after --, without --out (this command sets it)")
        if args.rounds < 1:
            raise ABError("--rounds must be at least 1")
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise ABError(f"{out} exists; pass --overwrite to replace it")
        commits = {n: tree_commit(p) for n, p in trees.items()}
        bench_args = absolute_paths(bench, Path.cwd())
        names, rounds = list(trees), []
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            got = {}
            for n in order:
                t0 = time.perf_counter()
                got[n] = measure_tree(trees[n], bench_args, args.timeout)
                print(f"round {r}: {n} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            rounds.append({"round": r, "order": order, "trees": got})
    except (ABError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = summarise(names, rounds)
    result = {"kind": "code_ab", "machine": machine_description("cpu", memory=True),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": "python -m benchmarks.code_ab " + " ".join(shlex.quote(a) for a in argv),
              "trees": {n: {"path": str(trees[n]), "commit": commits[n]} for n in names},
              "benchmark_args": bench_args, "summary": summary, "rounds": rounds}
    out.parent.mkdir(parents=True, exist_ok=True)
    json_dump(result, out)
    print(format_table(names, summary))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
