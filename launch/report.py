"""Write docs/results.md and Figure 1 (PNG + JSON sidecar) from the result JSON files alone.

    python launch/report.py [--experiments results/experiments.json ...] [--efficiency results/efficiency.json]
                            [--out docs/results.md] [--figure docs/figure1.png] [--domain Scientific]

Several --experiments manifests (one per suite or per domain) are merged into one page.

Tables: test Recall/NDCG@10/50 per domain (one row per run, grouped), ablations (NDCG@10 deltas to
the full method), universality (each student alone vs distilled, relative gain), efficiency
(parameters, peak memory, inference ms per 1,000 users, training steps/s and its distilled-to-alone
ratio). The figure plots each teacher, SASRec alone and each distilled student: x = inference ms
per 1,000 users (log), y = test NDCG@10 on --domain, circle area = peak memory; the plotted values
go to <figure>.json. Without --efficiency file the page has no efficiency table and no figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckd.reporting import (ReportError, draw_figure, figure_points, load_efficiency,  # noqa: E402
                           load_experiments, merge_experiments, render_report)


def build_report(experiments: str | Path | list[str | Path], efficiency: str | Path | None, out: str | Path,
                 figure: str | Path | None, domain: str = "Scientific",
                 command: str = "python launch/report.py") -> dict[str, Path]:
    """Write the page (and the figure with its sidecar when there are efficiency results);
    returns the paths written."""
    paths = experiments if isinstance(experiments, list) else [experiments]
    exp = merge_experiments([load_experiments(p) for p in paths])
    eff = load_efficiency(efficiency) if efficiency else None
    out = Path(out)
    written = {"page": out}
    link = None
    if eff is not None and figure:
        fig_path = Path(figure)
        sidecar = figure_points(exp, eff, domain)
        draw_figure(sidecar, fig_path)
        sidecar_path = fig_path.with_suffix(".json")
        sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
        written |= {"figure": fig_path, "sidecar": sidecar_path}
        link = os.path.relpath(fig_path, out.parent).replace(os.sep, "/")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(exp, eff, domain=domain, figure_link=link, generated_by=command) + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", action="append", default=None,
                    help="experiment manifest (repeatable: the runs are merged; default results/experiments.json)")
    ap.add_argument("--efficiency", default="results/efficiency.json",
                    help="inference benchmark JSON; a missing file is reported and skipped")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--figure", default="docs/figure1.png")
    ap.add_argument("--domain", default="Scientific", help="domain of the figure's y axis and the efficiency table")
    args = ap.parse_args(argv)
    efficiency = args.efficiency
    if efficiency and not Path(efficiency).is_file():
        print(f"note: {efficiency} not found: no efficiency table, no figure", file=sys.stderr)
        efficiency = None
    given = argv if argv is not None else sys.argv[1:]
    command = "python launch/report.py " + " ".join(shlex.quote(a) for a in given)
    try:
        written = build_report(args.experiments or ["results/experiments.json"], efficiency, args.out, args.figure, args.domain, command.strip())
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for what, path in written.items():
        print(f"written {what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
