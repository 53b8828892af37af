"""Turn raw Amazon 2018 files into one domain in the UniSRec layout.

    ckd-prepare-data --reviews Industrial_and_Scientific.json.gz \
        --meta meta_Industrial_and_Scientific.json.gz --out data/ --name Scientific

writes ``data/Scientific/Scientific.{train,valid,test}.inter, .text, .item2index, .user2index``
and ``stats.json`` (readable with ``ckd.data.unisrec.load_domain("data", "Scientific")``). The
reviews file may also be a ratings CSV (``item,user,rating,timestamp``). Rules: see
ckd/data/raw_amazon.py.
"""
from __future__ import annotations

import argparse
import json
import sys


from ckd.data.raw_amazon import EmptyDomainError, prepare_domain
from ckd.data.unisrec import MAX_HISTORY, DataFormatError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reviews", required=True, help="<Category>.json.gz reviews or ratings CSV")
    p.add_argument("--meta", required=True, help="meta_<Category>.json.gz")
    p.add_argument("--out", required=True, help="data root; the domain goes to OUT/NAME/")
    p.add_argument("--name", required=True, help="domain name (file prefix)")
    p.add_argument("--k", type=int, default=5, help="k-core threshold (default 5)")
    p.add_argument("--max-history", type=int, default=MAX_HISTORY, help="history cap (default 50)")
    args = p.parse_args(argv)
    try:
        stats = prepare_domain(args.reviews, args.meta, args.out, args.name, k=args.k,
                               max_history=args.max_history)
    except (DataFormatError, EmptyDomainError, ValueError) as exc:
        print(f"prepare_data: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
