"""Parameter analysis (the paper's Figure 5): test NDCG@10 against one setting at a time, the others
at the config's values, with the shipped default marked.

    python -m research.param_analysis run  --sweep configs/params/scientific.yaml
    python -m research.param_analysis plot --sweep configs/params/scientific.yaml \
        --out runs/params_scientific.json --png runs/params_scientific.png

A sweep file names the base config, the runs root and, per parameter, its values:

    config: configs/distill_scientific.yaml
    runs_root: runs/params/scientific
    seed: 2024
    args: ["--set", "train.patience=5"]           # optional, added to every run
    params:
      kd.lambda_kd: [0.5, 1, 3, 10]
      kd.temperature: [0.5, 1, 2, 4]

A key may name several settings joined by commas, tuned together: each of its values is a list with
one value per setting, and the point sets them all (a grid, or any list of combinations):

    params:
      curriculum.pacing,curriculum.start_fraction: [[linear, 0.1], [root, 0.25], [step, 0.5]]

Its run directory is ``<runs_root>/<setting>=<value>,<setting>=<value>``; its default is the list of
the settings' defaults, so the combination of the base config is the one ``default`` run.

Each point is ``ckd-distill --config <config> --run-dir <runs_root>/<param>=<value> --set <param>=<value>
--set train.seed=<seed> <args>``; ``run`` trains the missing ones (a finished run directory is read,
not retrained). The default of a parameter is its value in the resolved base config plus ``args``;
every parameter's default point is that one base run, ``<runs_root>/default``, trained once.
An existing --out or --png is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ckd.config import ConfigError, load_yaml
from ckd.mechanisms_report import value_label
from ckd.reporting import overwrite_refusal

REPO = Path(__file__).resolve().parents[1]


class SweepError(ValueError):
    """A sweep file or a run directory that cannot be used."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    sweep = yaml.safe_load(Path(path).read_text())
    for key in ("config", "runs_root", "params"):
        if not isinstance(sweep, dict) or key not in sweep:
            raise SweepError(f"{path}: missing key {key!r}")
    if not isinstance(sweep["params"], dict) or not all(isinstance(v, list) and v for v in sweep["params"].values()):
        raise SweepError(f"{path}: params must map each setting to a non-empty list of values")
    for param, values in sweep["params"].items():
        for value in values:
            settings(param, value, where=str(path))  # a joint key's values must pair up with its settings
    sweep.setdefault("seed", 2024)
    sweep.setdefault("args", [])
    return sweep


def settings(param: str, value: Any, where: str = "sweep") -> list[tuple[str, Any]]:
    """The (setting, value) pairs one point sets: ``[(param, value)]``, or for a joint key
    (``a,b``) its settings paired with the point's list of values."""
    names = param.split(",")
    if len(names) == 1:
        return [(param, value)]
    if not isinstance(value, list) or len(value) != len(names):
        raise SweepError(f"{where}: {param}: each value must be a list of {len(names)} values, one per "
                         f"setting; got {value!r}")
    return list(zip(names, value))


def run_dir(sweep: dict[str, Any], param: str, value: Any, defaults: dict[str, Any] | None = None) -> Path:
    """``<runs_root>/<param>=<value>`` (a joint key: ``<a>=<x>,<b>=<y>``); the point at a parameter's
    default is the base config itself, the same run for every parameter: ``<runs_root>/default``
    (trained once, not once per parameter)."""
    if defaults is not None and param in defaults and value == defaults[param]:
        return Path(sweep["runs_root"]) / "default"
    return Path(sweep["runs_root"]) / ",".join(f"{name}={v}" for name, v in settings(param, value))


def command(sweep: dict[str, Any], param: str, value: Any, defaults: dict[str, Any] | None = None) -> list[str]:
    """The ckd-distill arguments of one point."""
    sets = [a for name, v in settings(param, value) for a in ("--set", f"{name}={v}")]
    return ["--config", sweep["config"], "--run-dir", str(run_dir(sweep, param, value, defaults)),
            *sets, "--set", f"train.seed={sweep['seed']}", *map(str, sweep["args"])]


def default_value(sweep: dict[str, Any], param: str) -> Any:
    """The parameter's value in the resolved base config (with the sweep's args); for a joint key
    the list of its settings' values."""
    if "," in param:
        return [default_value(sweep, name) for name in param.split(",")]
    from ckd.config import to_dict
    from launch.distill import parse_args, resolve_config

    cfg = to_dict(resolve_config(parse_args(["--config", sweep["config"], *map(str, sweep["args"])])))
    node: Any = cfg
    for part in param.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SweepError(f"{param}: not a setting of {sweep['config']}")
        node = node[part]
    return node


def collect(sweep: dict[str, Any], defaults: dict[str, Any] | None = None, metric: str = "ndcg@10") -> dict[str, Any]:
    """Per parameter: its points (value, test and valid metric means over domains, or None while
    pending) and default. The valid value is what a user tuning this setting would pick on."""
    out = {}
    for param, values in sweep["params"].items():
        pts = []
        for v in values:
            d = run_dir(sweep, param, v, defaults)
            m = d / "metrics.json"
            got = json.loads(m.read_text()) if m.is_file() else None
            pts.append({"value": v, **{f"{split}_{metric}": got[split]["mean"][metric] if got else None
                                       for split in ("test", "valid")}, "run_dir": str(d)})
        out[param] = {"points": pts, "default": (defaults or {}).get(param)}
    return out


def sweep_inputs(sweep_path: str, sweep: dict[str, Any], root: Path) -> list[str]:
    """The committed files a sweep's points depend on: the sweep, its base config and the deploy spec
    the runs are served from (``--set service.spec=`` in its args, else the config's)."""
    spec = next((str(a).split("=", 1)[1] for a in sweep.get("args") or [] if str(a).startswith("service.spec=")), None)
    if spec is None:
        cfg = load_yaml(root / sweep["config"]) if (root / sweep["config"]).is_file() else {}
        spec = (cfg.get("service") or {}).get("spec")
    return [str(sweep_path), str(sweep["config"])] + ([str(spec)] if spec else [])


def carry_points(result: dict[str, Any], previous: dict[str, Any] | None, prev_params: dict[str, Any] | None,
                 root: Path, configs: list[str], metric: str = "ndcg@10") -> int:
    """Fill each pending point of ``result`` (``collect``'s output) from the same point (parameter,
    value, run directory) of ``prev_params``, the params of the ``previous`` results JSON, marked as
    carried (research.carry), unless ``configs`` changed since. Returns how many were carried."""
    from research.carry import carry

    n = 0
    for param, r in result.items():
        before = {(str(q.get("value")), q.get("run_dir")): q for q in ((prev_params or {}).get(param) or {}).get(
            "points") or []}
        for i, q in enumerate(r["points"]):
            prev = before.get((str(q["value"]), q["run_dir"]))
            if q[f"test_{metric}"] is not None or prev is None or prev.get(f"test_{metric}") is None:
                continue
            got = carry(prev, previous or {}, root, configs)
            if not isinstance(got, str):
                r["points"][i] = got
                n += 1
    return n


def draw(result: dict[str, Any], metric: str, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(result)
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.2), dpi=150, squeeze=False)
    for ax, p in zip(axes[0], params):
        pts = [q for q in result[p]["points"] if q[f"test_{metric}"] is not None]
        numeric = all(isinstance(q["value"], (int, float)) for q in result[p]["points"])
        xs = [q["value"] if numeric else i for i, q in enumerate(pts)]
        joint = "," in p  # a joint key's points are combinations, not a scale: no line between them
        ax.plot(xs, [q[f"test_{metric}"] for q in pts], marker="o", linestyle="none" if joint else "-")
        d = result[p]["default"]
        for x, q in zip(xs, pts):
            if q["value"] == d:
                ax.scatter([x], [q[f"test_{metric}"]], s=120, facecolors="none", edgecolors="red", zorder=3,
                           label="shipped default")
        if not numeric:
            ax.set_xticks(xs, [value_label(q["value"]) for q in pts], rotation=45 if joint else 0,
                          ha="right" if joint else "center", fontsize=7 if joint else None)
        ax.set_title(p.replace(",", " / "), fontsize=9)
        ax.set_ylabel(f"test {metric}" if ax is axes[0][0] else "")
        ax.grid(alpha=0.3)
        if any(q["value"] == d for q in pts):
            ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["run", "plot"])
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--metric", default="ndcg@10")
    ap.add_argument("--out", default="runs/params.json")
    ap.add_argument("--png", default="runs/params.png")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        defaults = {p: default_value(sweep, p) for p in sweep["params"]}
    except (SweepError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.action == "run":
        failed = 0
        for param, values in sweep["params"].items():
            for v in values:
                if (run_dir(sweep, param, v, defaults) / "metrics.json").is_file():
                    print(f"{param}={v}: finished, skipped", flush=True)
                    continue
                cmd = command(sweep, param, v, defaults)
                print(f"{param}={v}: ckd-distill {' '.join(cmd)}", flush=True)
                rc = subprocess.run([sys.executable, "-m", "launch.distill", *cmd], cwd=REPO).returncode
                failed += rc != 0
        return 1 if failed else 0
    for p in (args.out, args.png):
        refusal = overwrite_refusal(p, args.overwrite)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
    result = collect(sweep, defaults, args.metric)
    from ckd.run_dir import git_sha
    from research.carry import load_previous
    from research.plan_schema import PlanError

    try:  # points whose run directories are not on this machine keep their recorded value
        previous = load_previous(Path(args.out))
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    carried = carry_points(result, previous, (previous or {}).get("params"), REPO,
                           sweep_inputs(args.sweep, sweep, REPO), args.metric) if previous else 0

    doc = {"sweep": str(args.sweep), "config": sweep["config"], "args": list(map(str, sweep["args"])),
           "metric": f"test {args.metric} (mean over domains)", "seed": sweep["seed"], "png": str(args.png),
           "commit": git_sha(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "command": " ".join(["python -m research.param_analysis", *(argv or sys.argv[1:])]),
           "params": result, "commands": {p: [" ".join(["ckd-distill", *command(sweep, p, v, defaults)])
                                              for v in vals] for p, vals in sweep["params"].items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    draw(result, args.metric, args.png, title=Path(args.sweep).stem)
    for p, r in result.items():
        cells = ", ".join(f"{value_label(q['value'])}: {q[f'test_{args.metric}']:.4f}"
                          if q[f"test_{args.metric}"] is not None else f"{value_label(q['value'])}: pending"
                          for q in r["points"])
        print(f"{p} (default {value_label(r['default'])}): {cells}")
    print(f"written {args.out}, {args.png}" + (f" ({carried} point(s) carried from the previous {args.out}: "
                                                  "run directories not on this machine)" if carried else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
