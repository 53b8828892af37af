"""Regenerate the results pages (and Figure 1 with its JSON sidecar) from the committed JSON alone.

    ckd-report                                # every page of results/MANIFEST.yaml
    ckd-report --page docs/results.md         # one page (repeatable)
    ckd-report --check                        # re-render in memory, compare with the pages on disk
    ckd-report --draft                  # a draft from uncommitted changes (the header says so)
    ckd-report --experiments A.json [--experiments B.json] --out PAGE.md
               [--efficiency E.json] [--figure F.png] [--domain Scientific] [--overwrite]
                                              # an ad-hoc page, not one of the manifest's
    ckd-report --union U.json --out PAGE.md [--efficiency E.json] [--overwrite]
    ckd-report --union U.json --out PAGE.md --domain-efficiency Scientific=E1.json
               --domain-efficiency Games=E2.json [--figure F.png] [--overwrite]
                                              # an ad-hoc page of the union experiment's kind
                                              # (its Figure 1: one panel per domain)
    ckd-report --mechanisms M.json --out PAGE.md [--figure ANYTIME.png] [--overwrite]
                                              # an ad-hoc page of the mechanisms study's kind
                                              # (python -m research.mechanisms collect; its figure:
                                              # the anytime curves)

results/MANIFEST.yaml lists, for each page, the JSON files behind it, its figure and its domain.
A page is written only from a clean git tree (no uncommitted change to a tracked file, every input
committed), and its header names the commit it was generated at; --draft writes a draft.
--check writes nothing: it compares each page below its header (and the figure's sidecar JSON)
with what the JSON gives now, and exits 1 on any difference.

Tables: test Recall/NDCG@10/50 per domain (one row per run, grouped), ablations (NDCG@10 deltas to
the full method), universality (each student alone vs distilled, relative gain), efficiency
(parameters, peak memory, inference ms per 1,000 users, training steps/s and its distilled-to-alone
ratio). The figure plots each teacher, SASRec alone and each distilled student: x = inference ms
per 1,000 users (log), y = test NDCG@10 on the page's domain, circle area = peak memory.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ckd.reporting import (MANIFEST, PageSpec, ReportError, draw_figure, figure_points, load_efficiency,
                           load_experiments, load_results_manifest, merge_experiments, overwrite_refusal,
                           page_body, render_report)
from ckd.mechanisms_report import anytime_points, draw_anytime, load_mechanisms, render_mechanisms_page
from ckd.union_report import draw_union_figure, load_union, render_union_page, union_figure_points

REPO = Path(__file__).resolve().parents[1]  # the checkout: the manifest's paths are relative to it
PROG = "ckd-report"
DRAFT_FLAG = "--draft"


# ----------------------------------------------------------------------------- git state


@dataclass(frozen=True)
class TreeState:
    """What the pages would be generated from: the commit, and what is not in it."""

    commit: str  # HEAD's full sha; "" when ``root`` is not a git checkout
    changes: list[str] = field(default_factory=list)  # `git status --porcelain` lines, tracked files
    untracked_inputs: list[str] = field(default_factory=list)  # inputs git does not track
    error: str = ""

    @property
    def clean(self) -> bool:
        return bool(self.commit) and not self.changes and not self.untracked_inputs and not self.error


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"git {' '.join(args)} failed")
    return proc.stdout


def git_tree_state(root: str | os.PathLike[str], inputs: list[Path]) -> TreeState:
    """The commit of ``root`` and whether it is clean for these ``inputs``. Untracked files in
    general do not matter (they change no page), but an input that is not committed does: a page
    must be reproducible from the commit its header names."""
    root = Path(root).resolve()
    try:
        commit = _git(root, "rev-parse", "--verify", "HEAD").strip()
        changes = [ln for ln in _git(root, "status", "--porcelain", "--untracked-files=no").splitlines() if ln]
        tracked = set(_git(root, "ls-files", "--full-name", "-z").split("\0"))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return TreeState(commit="", error=f"{root} is not a git checkout with a commit ({exc})")
    untracked = []
    for p in inputs:
        try:
            rel = Path(p).resolve().relative_to(root).as_posix()
        except ValueError:
            rel = None  # outside the repository: never committed here
        if rel is None or rel not in tracked:
            untracked.append(rel or str(p))
    return TreeState(commit=commit, changes=changes, untracked_inputs=untracked)


def tree_refusal(state: TreeState) -> str | None:
    """Why a page may not be written from this tree (None: it may)."""
    if state.clean:
        return None
    if state.error:
        why = state.error
    else:
        parts = []
        if state.changes:
            shown = "; ".join(state.changes[:5]) + ("; ..." if len(state.changes) > 5 else "")
            parts.append(f"{len(state.changes)} uncommitted change(s) to tracked files ({shown})")
        if state.untracked_inputs:
            parts.append(f"input(s) not committed: {', '.join(state.untracked_inputs)}")
        why = " and ".join(parts)
    return (f"refusing to write results pages from a dirty tree: {why}. Commit first, so the page names "
            f"the commit it comes from, or pass {DRAFT_FLAG} for a draft whose header says so.")


# ----------------------------------------------------------------------------- pages


def _label(path: Path, root: Path) -> str:
    """How a file is named on the page: root-relative when inside the repository."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _files(efficiency: Path | dict[str, Path] | None) -> list[Path]:
    """The efficiency file(s): one path, or a union page's {domain: path}."""
    if isinstance(efficiency, dict):
        return list(efficiency.values())
    return [efficiency] if efficiency else []


def _link(target: Path, page: Path) -> str:
    """``target`` as a markdown link from ``page``: relative to its folder, '/'-separated."""
    return os.path.relpath(Path(target).resolve(), Path(page).resolve().parent).replace(os.sep, "/")


def render_page(experiments: list[Path], efficiency: Path | dict[str, Path] | None, out: Path, figure: Path | None,
                domain: str, command: str, root: Path = REPO, generated_at: str = "",
                draft: bool = False, union: Path | None = None,
                mechanisms: Path | None = None, see_first: tuple[Path, str] | None = None) -> tuple[str, dict | None]:
    """The page's text and the figure's sidecar dict (None without efficiency results or figure).
    ``union``: the page is the union experiment's (ckd.union_report) from that JSON instead; its
    ``efficiency`` may be {domain: path}, the panels of its figure. ``mechanisms``: the page is the
    mechanisms study's (ckd.mechanisms_report); its figure is the anytime curves (none while no
    curriculum row has a curve). ``see_first``: (page, why) of a page this one links before anything."""
    if mechanisms is not None:
        m = load_mechanisms(mechanisms, _label(mechanisms, root))
        sidecar = anytime_points(m) if figure else None
        link = _link(figure, out) if sidecar is not None else None
        text = render_mechanisms_page(m, generated_by=command, generated_at=generated_at, draft=draft,
                                      figure_link=link) + "\n"
        return text, sidecar
    if union is not None:
        u = load_union(union, _label(union, root))
        if isinstance(efficiency, dict):
            effs = {d: load_efficiency(p, _label(p, root)) for d, p in efficiency.items()}
            sidecar = union_figure_points(u, effs)  # its skipped rows are listed even without a figure
            link = _link(figure, out) if figure else None
            text = render_union_page(u, None, generated_by=command, generated_at=generated_at, draft=draft,
                                     effs=effs, figure_link=link, sidecar=sidecar) + "\n"
            return text, sidecar if figure else None
        eff = load_efficiency(efficiency, _label(efficiency, root)) if efficiency else None
        text = render_union_page(u, eff, generated_by=command, generated_at=generated_at, draft=draft) + "\n"
        return text, None
    exp = merge_experiments([load_experiments(p, _label(p, root)) for p in experiments])
    eff = load_efficiency(efficiency, _label(efficiency, root)) if efficiency else None
    sidecar, link = None, None
    if eff is not None and figure:
        sidecar = figure_points(exp, eff, domain)
        link = _link(figure, out)
    first = (_link(see_first[0], out), see_first[1]) if see_first is not None else None
    text = render_report(exp, eff, domain=domain, figure_link=link, generated_by=command,
                         generated_at=generated_at, draft=draft, see_first=first) + "\n"
    return text, sidecar


def build_report(experiments: str | Path | list[str | Path], efficiency: str | Path | dict[str, Path] | None,
                 out: str | Path,
                 figure: str | Path | None, domain: str = "Scientific", command: str = PROG,
                 root: Path = REPO, generated_at: str = "", draft: bool = False,
                 union: str | Path | None = None, mechanisms: str | Path | None = None,
                 see_first: tuple[Path, str] | None = None) -> dict[str, Path]:
    """Write the page (and the figure with its sidecar when there are efficiency results);
    returns the paths written. No git check here: ``main`` decides whether writing is allowed."""
    paths = [Path(p) for p in (experiments if isinstance(experiments, list) else [experiments])]
    out = Path(out)
    fig = Path(figure) if figure else None
    eff = {d: Path(p) for d, p in efficiency.items()} if isinstance(efficiency, dict) else \
        (Path(efficiency) if efficiency else None)
    text, sidecar = render_page(paths, eff, out, fig, domain, command,
                                root, generated_at, draft, Path(union) if union else None,
                                Path(mechanisms) if mechanisms else None, see_first)
    written = {"page": out}
    if sidecar is not None and fig is not None:
        fig.parent.mkdir(parents=True, exist_ok=True)
        draw = draw_anytime if mechanisms else (draw_union_figure if "panels" in sidecar else draw_figure)
        draw(sidecar, fig)
        sidecar_path = fig.with_suffix(".json")
        sidecar_path.write_text(json.dumps(sidecar, indent=2) + "\n")
        written |= {"figure": fig, "sidecar": sidecar_path}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return written


def _spec_paths(spec: PageSpec, root: Path) -> tuple[list[Path], Path | dict[str, Path] | None, Path, Path | None,
                                                     Path | None, Path | None]:
    exps = [root / e for e in spec.experiments]
    eff: Path | dict[str, Path] | None = root / spec.efficiency if spec.efficiency else None
    if spec.efficiency_by_domain:
        eff = {d: root / p for d, p in spec.efficiency_by_domain}
    union = root / spec.union if spec.union else None
    mech = root / spec.mechanisms if spec.mechanisms else None
    missing = [str(p) for p in exps + _files(eff) + [x for x in (union, mech) if x] if not p.is_file()]
    if missing:
        raise ReportError(f"{spec.page}: input(s) listed in {MANIFEST} not found: {', '.join(missing)}")
    return exps, eff, root / spec.page, (root / spec.figure if spec.figure else None), union, mech


def _see_first_path(spec: PageSpec, root: Path) -> tuple[Path, str] | None:
    """The manifest's page-to-read-first of ``spec`` as (absolute path, why)."""
    return (root / spec.see_first[0], spec.see_first[1]) if spec.see_first else None


def check_page(spec: PageSpec, root: Path) -> list[str]:
    """Differences between the page (and sidecar) on disk and what the JSON gives now, below the
    header; [] when they match."""
    exps, eff, out, fig, union, mech = _spec_paths(spec, root)
    text, sidecar = render_page(exps, eff, out, fig, spec.domain, f"{PROG} --page {spec.page}", root, union=union,
                                mechanisms=mech, see_first=_see_first_path(spec, root))
    if not out.is_file():
        return [f"{spec.page}: missing"]
    problems = []
    body_now, body_disk = page_body(text).splitlines(), page_body(out.read_text()).splitlines()
    if body_now != body_disk:
        diff = difflib.unified_diff(body_disk, body_now, f"{spec.page} (on disk)", f"{spec.page} (from JSON)",
                                    lineterm="", n=1)
        problems.append("\n".join(diff))
    if sidecar is not None and fig is not None:
        side = fig.with_suffix(".json")
        if not side.is_file() or json.loads(side.read_text()) != json.loads(json.dumps(sidecar)):
            problems.append(f"{side.relative_to(root).as_posix()}: differs from the plotted values")
    return problems


def _manifest_path(args: argparse.Namespace, root: Path) -> Path:
    """--manifest (relative to the root like the paths it lists), default <root>/results/MANIFEST.yaml."""
    return root / (args.manifest or MANIFEST)  # an absolute --manifest stays absolute


def _run_manifest(args: argparse.Namespace, root: Path, state: TreeState | None) -> int:
    manifest = load_results_manifest(_manifest_path(args, root), label=args.manifest or MANIFEST)
    specs = [manifest.page(p) for p in args.page] if args.page else manifest.pages
    if args.check:
        failed = 0
        for spec in specs:
            problems = check_page(spec, root)
            print(("DIFFERS " if problems else "same    ") + spec.page)
            for p in problems:
                print(p)
            failed += bool(problems)
        return 1 if failed else 0
    # Every input is checked (and the tree judged) before the first page is written: writing one
    # page makes the tree dirty for the next.
    resolved = [(spec, *_spec_paths(spec, root)) for spec in specs]
    inputs = [_manifest_path(args, root)] + [p for _, exps, eff, _, _, union, mech in resolved
                                                     for p in exps + _files(eff) + [x for x in (union, mech) if x]]
    state = state or git_tree_state(root, inputs)
    refusal = tree_refusal(state)
    if refusal and not args.draft_ok:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    for spec, exps, eff, out, fig, union, mech in resolved:
        written = build_report(exps, eff, out, fig, spec.domain, f"{PROG} --page {spec.page}", root,
                               generated_at=state.commit, draft=not state.clean, union=union, mechanisms=mech,
                               see_first=_see_first_path(spec, root))
        for what, path in written.items():
            print(f"written {what}: {_label(path, root)}" + (" (draft)" if what == "page" and not state.clean else ""))
    return 0


def _run_adhoc(args: argparse.Namespace, argv: list[str], root: Path, state: TreeState | None) -> int:
    if not args.out:
        print("error: an ad-hoc page (--experiments/--union/--mechanisms) needs --out; the manifest's pages are "
              "written by "
              f"`{PROG}` or `{PROG} --page PAGE`", file=sys.stderr)
        return 2
    manifest_path = _manifest_path(args, root)
    if manifest_path.is_file():
        manifest = load_results_manifest(manifest_path, label=args.manifest or MANIFEST)
        owned = {(root / s.page).resolve(): s.page for s in manifest.pages}
        owned |= {(root / s.figure).resolve(): s.page for s in manifest.pages if s.figure}
        owned |= {(root / s.figure).with_suffix(".json").resolve(): s.page for s in manifest.pages if s.figure}
        for target in [args.out] + ([args.figure] if args.figure else []):
            page = owned.get(Path(target).resolve())
            if page:
                print(f"error: {target} is written for {page}, a page of {manifest.source}: regenerate it "
                      f"with `{PROG} --page {page}` (or change the manifest)", file=sys.stderr)
                return 2
    efficiency = args.efficiency
    if efficiency and not Path(efficiency).is_file():
        print(f"note: {efficiency} not found: no efficiency table, no figure", file=sys.stderr)
        efficiency = None
    if args.domain_efficiency:  # a union page's panels: each DOMAIN=PATH must exist
        efficiency = {}
        for item in args.domain_efficiency:
            dom, sep, path = item.partition("=")
            if not sep or not dom or not path or dom in efficiency:
                print(f"error: --domain-efficiency {item!r}: expected DOMAIN=PATH, each domain once", file=sys.stderr)
                return 2
            if not Path(path).is_file():
                print(f"error: --domain-efficiency {dom}: {path} not found", file=sys.stderr)
                return 2
            efficiency[dom] = path
    figure = args.figure if efficiency or args.mechanisms else None
    for target in [Path(args.out)] + ([Path(figure), Path(figure).with_suffix(".json")] if figure else []):
        refusal = overwrite_refusal(target, args.overwrite)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
    inputs = [Path(p) for p in args.experiments or []] + \
        [Path(p) for p in _files(efficiency) + [args.union, args.mechanisms] if p]
    state = state or git_tree_state(root, inputs)
    refusal = tree_refusal(state)
    if refusal and not args.draft_ok:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    command = PROG + " " + " ".join(shlex.quote(a) for a in argv)
    written = build_report(args.experiments or [], efficiency, args.out, figure, args.domain, command.strip(), root,
                           generated_at=state.commit, draft=not state.clean, union=args.union,
                           mechanisms=args.mechanisms)
    for what, path in written.items():
        print(f"written {what}: {path}")
    return 0


def main(argv: list[str] | None = None, state: TreeState | None = None) -> int:
    """Entry point (``ckd-report``). ``state``: the tree state to judge instead of asking git (tests)."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page", action="append", default=[], help="a page of the manifest to regenerate (repeatable; "
                    "default: every page)")
    ap.add_argument("--check", action="store_true", help="write nothing; compare the pages with the JSON")
    ap.add_argument(DRAFT_FLAG, dest="draft_ok", action="store_true",
                    help="write from a tree with uncommitted changes; the page's header marks it a draft")
    ap.add_argument("--root", default=str(REPO), help="repository root the manifest's paths are relative to")
    ap.add_argument("--manifest", default=None, help=f"results manifest, relative to --root (default {MANIFEST})")
    adhoc = ap.add_argument_group("ad-hoc page (not in the manifest)")
    adhoc.add_argument("--experiments", action="append", default=None,
                       help="experiment results JSON (repeatable: the runs are merged)")
    adhoc.add_argument("--union", default=None, help="union experiment results JSON (python -m research.union "
                       "collect): a page like docs/results_union.md, instead of --experiments")
    adhoc.add_argument("--mechanisms", default=None, help="mechanisms study results JSON (python -m "
                       "research.mechanisms collect): a page of its own kind; --figure is then its anytime curves")
    adhoc.add_argument("--efficiency", default=None, help="inference benchmark JSON; a missing file is reported "
                       "and skipped")
    adhoc.add_argument("--domain-efficiency", action="append", default=None, metavar="DOMAIN=PATH",
                       help="with --union: the inference benchmark measured on DOMAIN (repeatable); each is a "
                       "panel of the union Figure 1")
    adhoc.add_argument("--out", default=None, help="the page to write")
    adhoc.add_argument("--figure", default=None, help="Figure 1 PNG (needs --efficiency)")
    adhoc.add_argument("--domain", default="Scientific", help="domain of the figure's y axis and the efficiency table")
    adhoc.add_argument("--overwrite", action="store_true", help="replace an existing --out / --figure")
    given = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(given)
    root = Path(args.root).resolve()
    adhoc_page = args.experiments or args.union or args.mechanisms
    if sum(bool(x) for x in (args.experiments, args.union, args.mechanisms)) > 1:
        ap.error("--experiments, --union and --mechanisms each make a page of their own kind: give one")
    if args.mechanisms and (args.efficiency or args.domain_efficiency):
        ap.error("--mechanisms: the page has no efficiency section (its --figure is the anytime curves)")
    if args.domain_efficiency and not args.union:
        ap.error("--domain-efficiency is for a union page (--union); other pages take --efficiency and --domain")
    if args.domain_efficiency and args.efficiency:
        ap.error("--efficiency and --domain-efficiency: give the union page's benchmarks one way")
    if args.union and args.figure and not args.domain_efficiency:
        ap.error("--figure: the union page's Figure 1 needs --domain-efficiency DOMAIN=PATH (one panel each)")
    if adhoc_page and (args.page or args.check):
        ap.error("--page/--check regenerate manifest pages; --experiments/--union/--mechanisms make an ad-hoc page")
    if not adhoc_page and (args.out or args.figure or args.efficiency or args.domain_efficiency or args.overwrite):
        ap.error("--out/--figure/--efficiency/--overwrite are for an ad-hoc page (with --experiments, --union or "
                 "--mechanisms); "
                 f"the manifest's pages are set in {MANIFEST}")
    try:
        if adhoc_page:
            return _run_adhoc(args, given, root, state)
        return _run_manifest(args, root, state)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
