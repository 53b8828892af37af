"""Raw Amazon 2018 files -> one domain in the UniSRec processed layout.

Inputs: reviews ``<Category>.json.gz`` (one JSON object per line with ``reviewerID``, ``asin``,
``overall``, ``unixReviewTime``) or a ratings CSV (``item,user,rating,timestamp``, optional header
line), plain or gzipped; and ``meta_<Category>.json.gz`` (JSON lines with ``asin``, ``title``,
``category`` (list), ``brand``, ...). The format of each file is sniffed from its content (gzip
magic bytes; a first non-blank character ``{`` means JSON lines), not from its name.

Processing (the UniSRec procedure, made deterministic; every rule here is tested):

1. Exact duplicate records (same user, item, rating and timestamp) keep only their first
   occurrence (UniSRec keeps interactions in a set, which drops exactly these).
2. Items without metadata are dropped: an item has metadata when its *first* record in the meta
   file has a non-blank ``title``.
3. Iterative k-core (k = 5): every round drops all interactions of users and of items with fewer
   than k interactions (repeats count), until a round drops nothing. The k-core is unique, so the
   result does not depend on the removal order.
4. Users are indexed 0.. in order of the file position of their first *kept* interaction.
   Each user's interactions are sorted by timestamp; equal timestamps keep file order (stable).
   Items are indexed 0.. in order of first appearance when walking users in index order and each
   user's sequence in time order (UniSRec's rule, with its set-iteration order replaced by file
   order).
5. Leave-one-out: last item -> test, second-to-last -> valid, the rest -> train; histories keep
   the last 50 items. ``train.inter`` rows for training items t_0..t_{n-1} are
   (t_0..t_{k-1})[-50:] -> t_k for k = n-1 down to 1.
6. Item text is ``clean(title) + ' ' + clean(category) + ' ' + clean(brand) + ' '``, where a field
   that is absent or cleans to "" contributes nothing (not even its space). ``clean`` joins lists
   with spaces, unescapes HTML, removes ``"``, newlines and carriage returns, turns tabs into spaces
   (the file is tab-separated), strips surrounding white space, ends a non-empty field with exactly
   one ``.``, and empties a field of 2,000 or more characters. ``.text`` rows follow meta-file order.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ckd.data.unisrec import INTER_HEADER, MAX_HISTORY, TEXT_HEADER, DataFormatError

TEXT_FIELDS = ("title", "category", "brand")
MAX_FIELD_CHARS = 2000
CSV_HEADER = ["item", "user", "rating", "timestamp"]
_STRIP_CHARS = re.compile(r'["\n\r]')


class EmptyDomainError(ValueError):
    """Nothing survives the filters (metadata, k-core)."""


# ----------------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline); gzip and decoding errors name the file/line."""
    fh = _open_text(path)
    lineno = 0
    try:
        with fh:
            for lineno, line in enumerate(fh, start=1):
                yield lineno, line.rstrip("\r\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"{path}:{lineno + 1}: unreadable ({exc})") from None


def _is_json_lines(path: Path) -> bool:
    for _, line in _lines(path):
        if line.strip():
            return line.lstrip().startswith("{")
    return False


@dataclass
class RawInteractions:
    """Interactions in file order, with users and items interned to dense integer codes."""

    user_tokens: list[str]
    item_tokens: list[str]
    users: np.ndarray  # int64 [N] codes into user_tokens
    items: np.ndarray  # int64 [N] codes into item_tokens
    timestamps: np.ndarray  # int64 [N]
    lines: int  # records read (non-blank lines, header excluded)
    duplicates: int  # exact duplicate records dropped


def _json_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise DataFormatError(f"{path}:{lineno}: expected a JSON object")
    return rec


def _review_fields(path: Path, lineno: int, line: str, is_json: bool) -> tuple[str, str, float, int] | None:
    """(user, item, rating, timestamp) of one line; None for a blank line or the CSV header."""
    if not line.strip():
        return None
    if is_json:
        rec = _json_record(path, lineno, line)
        missing = [k for k in ("reviewerID", "asin", "overall", "unixReviewTime") if k not in rec]
        if missing:
            raise DataFormatError(f"{path}:{lineno}: review lacks {', '.join(missing)}")
        user, item, rating, ts = rec["reviewerID"], rec["asin"], rec["overall"], rec["unixReviewTime"]
    else:
        cols = next(csv.reader([line]))
        if lineno == 1 and [c.strip().lower() for c in cols] == CSV_HEADER:
            return None
        if len(cols) != 4:
            raise DataFormatError(f"{path}:{lineno}: expected 4 comma-separated columns "
                                  f"(item,user,rating,timestamp), got {len(cols)}")
        item, user, rating, ts = (c.strip() for c in cols)
    if not isinstance(user, str) or not isinstance(item, str) or not user or not item:
        raise DataFormatError(f"{path}:{lineno}: user and item must be non-empty strings")
    try:
        rating_f = float(rating)
    except (TypeError, ValueError):
        raise DataFormatError(f"{path}:{lineno}: rating {rating!r} is not a number") from None
    if isinstance(ts, bool) or isinstance(ts, float) and not ts.is_integer():
        raise DataFormatError(f"{path}:{lineno}: timestamp {ts!r} is not an integer")
    try:
        ts_i = int(ts)
    except (TypeError, ValueError):
        raise DataFormatError(f"{path}:{lineno}: timestamp {ts!r} is not an integer") from None
    return user, item, rating_f, ts_i


def read_reviews(path: str | Path) -> RawInteractions:
    """Read a reviews JSON-lines file or a ratings CSV (plain or gzipped), in file order."""
    path = Path(path)
    is_json = _is_json_lines(path)
    u2c: dict[str, int] = {}
    i2c: dict[str, int] = {}
    seen: set[tuple[int, int, float, int]] = set()
    users, items, times = [], [], []
    n_lines = duplicates = 0
    for lineno, line in _lines(path):
        rec = _review_fields(path, lineno, line, is_json)
        if rec is None:
            continue
        n_lines += 1
        user, item, rating, ts = rec
        u = u2c.setdefault(user, len(u2c))
        i = i2c.setdefault(item, len(i2c))
        key = (u, i, rating, ts)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        users.append(u)
        items.append(i)
        times.append(ts)
    return RawInteractions(list(u2c), list(i2c), np.asarray(users, dtype=np.int64),
                           np.asarray(items, dtype=np.int64), np.asarray(times, dtype=np.int64),
                           n_lines, duplicates)


def read_meta(path: str | Path, wanted: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """asin -> {title, category, brand} from the first record of each asin (meta-file order is
    the dict order). Only asins in ``wanted`` are kept when it is given."""
    path = Path(path)
    out: dict[str, dict[str, Any]] = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        rec = _json_record(path, lineno, line)
        asin = rec.get("asin")
        if not isinstance(asin, str) or not asin:
            raise DataFormatError(f"{path}:{lineno}: meta record has no asin")
        if asin in out or (wanted is not None and asin not in wanted):
            continue
        out[asin] = {k: rec[k] for k in TEXT_FIELDS if k in rec}
    return out


# ----------------------------------------------------------------------------- text


def clean_text(value: Any) -> str:
    """One text field the UniSRec way (see the module docstring, rule 6)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    text = html.unescape(text)
    text = _STRIP_CHARS.sub("", text).replace("\t", " ").strip()
    if not text:
        return ""
    text = text.rstrip(".") + "."
    if len(text) >= MAX_FIELD_CHARS:
        return ""
    return text


def item_text(meta: dict[str, Any]) -> str:
    """"title. categories. brand. " from one meta record; empty fields contribute nothing."""
    parts = [clean_text(meta[k]) for k in TEXT_FIELDS if k in meta]
    return "".join(p + " " for p in parts if p)


def has_metadata(meta: dict[str, Any] | None) -> bool:
    """Rule 2: a meta record with a non-blank title."""
    if meta is None:
        return False
    title = meta.get("title")
    if isinstance(title, (list, tuple)):
        title = " ".join(str(t) for t in title)
    return isinstance(title, str) and bool(title.strip())


# ----------------------------------------------------------------------------- processing


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Mask of the interactions in the iterative k-core, and the number of rounds that dropped
    something."""
    keep = np.ones(users.shape[0], dtype=bool)
    rounds = 0
    while True:
        u, i = users[keep], items[keep]
        cu = np.bincount(u, minlength=int(users.max(initial=-1)) + 1)
        ci = np.bincount(i, minlength=int(items.max(initial=-1)) + 1)
        ok = (cu[u] >= k) & (ci[i] >= k)
        if ok.all():
            return keep, rounds
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False
        rounds += 1


@dataclass
class ProcessedDomain:
    """The result of the processing: token lists in index order and one sequence per user."""

    user_tokens: list[str]  # user index -> reviewer id
    item_tokens: list[str]  # item index -> asin
    sequences: list[np.ndarray]  # user index -> item indices in time order
    texts: dict[str, str]  # asin -> text, in meta-file order
    stats: dict[str, Any]


def process(raw: RawInteractions, meta: dict[str, dict[str, Any]], k: int = 5) -> ProcessedDomain:
    """Apply rules 2-4 and 6 to interactions read by ``read_reviews``."""
    if k < 3:
        raise ValueError(f"k={k}: leave-one-out needs at least 3 interactions per user (k >= 3)")
    with_meta = np.asarray([has_metadata(meta.get(t)) for t in raw.item_tokens], dtype=bool)
    m = with_meta[raw.items] if raw.items.size else np.zeros(0, dtype=bool)
    users, items, times = raw.users[m], raw.items[m], raw.timestamps[m]
    pos = np.flatnonzero(m)  # file order of the surviving records
    keep, rounds = k_core(users, items, k)
    users, items, times, pos = users[keep], items[keep], times[keep], pos[keep]
    if users.size == 0:
        raise EmptyDomainError(f"no interaction survives metadata filtering and {k}-core")
    # Users in order of their first kept interaction (arrays are in file order).
    uniq_u, first_u = np.unique(users, return_index=True)
    user_order = uniq_u[np.argsort(first_u, kind="stable")]
    user_rank = np.empty(int(users.max()) + 1, dtype=np.int64)
    user_rank[user_order] = np.arange(user_order.size)
    ranks = user_rank[users]
    order = np.lexsort((pos, times, ranks))  # by user index, then time, then file position
    ranks, items = ranks[order], items[order]
    uniq_i, first_i = np.unique(items, return_index=True)
    item_order = uniq_i[np.argsort(first_i, kind="stable")]
    item_rank = np.empty(int(items.max()) + 1, dtype=np.int64)
    item_rank[item_order] = np.arange(item_order.size)
    local_items = item_rank[items]
    bounds = np.flatnonzero(np.diff(ranks)) + 1
    sequences = np.split(local_items, bounds)
    item_tokens = [raw.item_tokens[c] for c in item_order]
    kept = set(item_tokens)
    texts = {asin: item_text(rec) for asin, rec in meta.items() if asin in kept}
    lengths = np.asarray([len(s) for s in sequences])
    stats = {
        "records_read": raw.lines,
        "duplicates_dropped": raw.duplicates,
        "interactions_with_metadata": int(m.sum()),
        "items_without_metadata": int((~with_meta).sum()),
        "k_core": k,
        "k_core_rounds": rounds,
        "users": len(sequences),
        "items": len(item_tokens),
        "interactions": int(lengths.sum()),
        "avg_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "items_with_text": sum(1 for t in texts.values() if t),
    }
    return ProcessedDomain([raw.user_tokens[c] for c in user_order], item_tokens, sequences,
                           texts, stats)


def split_rows(seq: np.ndarray, max_history: int = MAX_HISTORY
               ) -> tuple[list[tuple[np.ndarray, int]], tuple[np.ndarray, int], tuple[np.ndarray, int]]:
    """Leave-one-out rows of one user's sequence: (train rows, valid row, test row)."""
    train = seq[:-2]
    rows = [(train[max(0, j - max_history):j], int(train[j])) for j in range(len(train) - 1, 0, -1)]
    valid = (train[-max_history:], int(seq[-2]))
    test = (seq[:-1][-max_history:], int(seq[-1]))
    return rows, valid, test


def write_unisrec(dom: ProcessedDomain, out_root: str | Path, name: str,
                  max_history: int = MAX_HISTORY, sources: dict[str, Any] | None = None) -> Path:
    """Write ``out_root/name/name.{train,valid,test}.inter, .text, .item2index, .user2index`` and
    ``stats.json``; returns the domain folder (readable by ``load_domain(out_root, name)``)."""
    folder = Path(out_root) / name
    folder.mkdir(parents=True, exist_ok=True)
    fmt = lambda h: " ".join(str(int(x)) for x in h)  # noqa: E731
    header = "\t".join(INTER_HEADER) + "\n"
    train, valid, test = [header], [header], [header]
    for u, seq in enumerate(dom.sequences):
        rows, v, t = split_rows(seq, max_history)
        train.extend(f"{u}\t{fmt(h)}\t{y}\n" for h, y in rows)
        valid.append(f"{u}\t{fmt(v[0])}\t{v[1]}\n")
        test.append(f"{u}\t{fmt(t[0])}\t{t[1]}\n")
    files = {
        "train.inter": "".join(train),
        "valid.inter": "".join(valid),
        "test.inter": "".join(test),
        "text": "\t".join(TEXT_HEADER) + "\n" + "".join(f"{a}\t{x}\n" for a, x in dom.texts.items()),
        "item2index": "".join(f"{a}\t{i}\n" for i, a in enumerate(dom.item_tokens)),
        "user2index": "".join(f"{r}\t{i}\n" for i, r in enumerate(dom.user_tokens)),
    }
    for suffix, content in files.items():
        (folder / f"{name}.{suffix}").write_text(content, encoding="utf-8", newline="\n")
    stats = dict(dom.stats, name=name, max_history=max_history,
                 train_rows=len(train) - 1, sources=sources or {})
    (folder / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_domain(reviews: str | Path, meta: str | Path, out_root: str | Path, name: str,
                   k: int = 5, max_history: int = MAX_HISTORY) -> dict[str, Any]:
    """Read raw files, process them and write the UniSRec layout; returns the stats."""
    reviews, meta = Path(reviews), Path(meta)
    raw = read_reviews(reviews)
    records = read_meta(meta, wanted=set(raw.item_tokens))
    dom = process(raw, records, k=k)
    sources = {"reviews": {"path": str(reviews), "sha256": _sha256(reviews)},
               "meta": {"path": str(meta), "sha256": _sha256(meta)}}
    folder = write_unisrec(dom, out_root, name, max_history=max_history, sources=sources)
    return json.loads((folder / "stats.json").read_text())
