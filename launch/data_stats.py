"""Per-domain statistics of the real data: users, items, interactions, average length, text coverage.

    ckd-data-stats [--data-dir D] [--domains Scientific,Games] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from ckd.config import default_data_dir
from ckd.data.unisrec import DataFormatError, load_domain


def domain_stats(root: str | Path, name: str) -> dict:
    """Statistics of one domain folder, as data_stats prints them."""
    d = load_domain(root, name)
    inter = d.num_interactions()
    with_text = sum(1 for t in d.texts if t) if d.texts is not None else 0
    return {"domain": name, "users": d.num_users, "items": d.num_items, "interactions": inter,
            "avg_length": round(inter / max(len(d.test), 1), 4), "train_rows": len(d.train),
            "text_coverage": round(with_text / d.num_items, 4),
            "features": {k: list(v.shape) for k, v in d.features.items()},
            "missing": d.missing, "notes": d.notes}


def discover_domains(root: str | Path) -> list[str]:
    """Folders under ``root`` that hold a ``<name>.test.inter``."""
    return sorted(p.name for p in Path(root).iterdir() if (p / f"{p.name}.test.inter").is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="data root (default $CKD_DATA_DIR or ../shared/data/amazon)")
    ap.add_argument("--domains", default="", help="comma list (default: every domain folder)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    root = args.data_dir or default_data_dir()
    if not Path(root).is_dir():
        print(f"error: data root {root} not found (set --data-dir or CKD_DATA_DIR)", file=sys.stderr)
        return 2
    names = [n for n in args.domains.split(",") if n] or discover_domains(root)
    try:
        stats = [domain_stats(root, n) for n in names]
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{'domain':<14} {'users':>8} {'items':>8} {'interactions':>13} {'avg len':>8} {'train rows':>11} "
          f"{'text':>6}  features / missing")
    for s in stats:
        extra = ", ".join(f"{k} {v}" for k, v in s["features"].items())
        if s["missing"]:
            extra += ("; " if extra else "") + "missing " + ", ".join(s["missing"])
        print(f"{s['domain']:<14} {s['users']:>8,} {s['items']:>8,} {s['interactions']:>13,} "
              f"{s['avg_length']:>8.2f} {s['train_rows']:>11,} {s['text_coverage']:>6.1%}  {extra}")
        for note in s["notes"]:
            print(f"{'':<14} note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
