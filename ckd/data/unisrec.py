"""Reader for one domain in the UniSRec processed layout.

Files per domain ``D`` in folder ``root/D``: ``D.train.inter``, ``D.valid.inter``, ``D.test.inter``
(RecBole atomic: ``user_id:token  item_id_list:token_seq  item_id:token``), ``D.text`` (token ->
"title. categories. brand. "), ``D.item2index``, ``D.user2index`` and optional raw float32 feature
matrices ``D.feat1CLS`` / ``D.feat3CLS`` ([items, dim], row r = item index r). All indices are the
file's own 0-based ones; the multi-domain layer maps them to global ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INTER_HEADER = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
TEXT_HEADER = ["item_id:token", "text:token_seq"]
MAX_HISTORY = 50
FEATURE_SUFFIXES = ("feat1CLS", "feat3CLS")


class DataFormatError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


@dataclass
class Split:
    """Rows of one split: user index, history (oldest first, local item indices), target."""

    users: np.ndarray  # int64 [N]
    histories: list[np.ndarray]  # each int64 [len], len >= 1
    targets: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return int(self.targets.shape[0])


@dataclass
class DomainData:
    """Everything one domain folder provides, plus what it lacks and what was rebuilt."""

    name: str
    item_tokens: list[str]  # local item index -> token (ASIN or source id)
    num_users: int
    train: Split
    valid: Split
    test: Split
    texts: list[str] | None  # local item index -> text, or None if the domain has no text
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [items, d]
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        return len(self.item_tokens)

    def num_interactions(self) -> int:
        """Interactions the files hold: a user with n training items has n-1 train rows, plus
        one valid and one test target, so the total is len(train) + 3 * users."""
        return len(self.train) + 3 * len(self.test)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not UTF-8 ({exc})") from None


def _parse_int(token: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: {what} {token!r} is not an integer") from None


def read_index(path: Path) -> dict[str, int]:
    """Read ``token<TAB>index`` lines (``.item2index`` / ``.user2index``)."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataFormatError(f"{path}:{lineno}: expected 2 tab-separated columns, got {len(parts)}")
        out[parts[0]] = _parse_int(parts[1], path, lineno, "index")
    return out


def read_inter(path: Path, num_items: int | None = None) -> Split:
    """Read a RecBole atomic ``.inter`` file with the UniSRec header."""
    lines = _read_lines(path)
    if not lines or lines[0].split("\t") != INTER_HEADER:
        raise DataFormatError(f"{path}:1: header must be {'<TAB>'.join(INTER_HEADER)}")
    users, hists, targets = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DataFormatError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}")
        u = _parse_int(parts[0], path, lineno, "user id")
        hist = [_parse_int(x, path, lineno, "history item") for x in parts[1].split(" ") if x]
        t = _parse_int(parts[2], path, lineno, "target item")
        if not hist:
            raise DataFormatError(f"{path}:{lineno}: empty history")
        if num_items is not None:
            bad = [i for i in hist + [t] if i < 0 or i >= num_items]
            if bad:
                raise DataFormatError(
                    f"{path}:{lineno}: item index {bad[0]} outside 0..{num_items - 1} of item2index"
                )
        users.append(u)
        hists.append(np.asarray(hist, dtype=np.int64))
        targets.append(t)
    return Split(np.asarray(users, dtype=np.int64), hists, np.asarray(targets, dtype=np.int64))


def read_text(path: Path, item2index: dict[str, int]) -> tuple[list[str], int]:
    """Read ``.text`` aligned to item indices; returns (texts, number of items without text)."""
    lines = _read_lines(path)
    if not lines or lines[0].split("\t") != TEXT_HEADER:
        raise DataFormatError(f"{path}:1: header must be {'<TAB>'.join(TEXT_HEADER)}")
    texts = [""] * len(item2index)
    seen = [False] * len(item2index)
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise DataFormatError(f"{path}:{lineno}: expected item token<TAB>text")
        idx = item2index.get(parts[0])
        if idx is None:
            continue  # text for an item that the interactions never use
        texts[idx] = parts[1].strip()
        seen[idx] = True
    return texts, seen.count(False)


def read_features(path: Path, num_items: int, dim: int = 512) -> np.ndarray:
    """Read a raw float32 [num_items, dim] matrix; its size must match exactly."""
    size = path.stat().st_size
    if size != num_items * dim * 4:
        raise DataFormatError(
            f"{path}: {size} bytes is not float32 [{num_items}, {dim}] ({num_items * dim * 4} bytes)"
        )
    return np.fromfile(path, dtype="<f4").reshape(num_items, dim)


def rebuild_train_from_test(test: Split, valid: Split) -> Split:
    """Rebuild ``train.inter`` rows from test histories (the UniSRec rule: for training items
    t_0..t_{n-1}, rows (t_0..t_{k-1})[-50:] -> t_k for k = n-1..1)."""
    users, hists, targets = [], [], []
    for u, h, _t in zip(test.users, test.histories, test.targets):
        train_items = h[:-1]  # the last history item is the valid target
        for k in range(len(train_items) - 1, 0, -1):
            users.append(int(u))
            hists.append(train_items[max(0, k - MAX_HISTORY):k].copy())
            targets.append(int(train_items[k]))
    return Split(np.asarray(users, dtype=np.int64), hists, np.asarray(targets, dtype=np.int64))


def load_domain(root: str | Path, name: str, feature_dim: int = 512) -> DomainData:
    """Load domain ``name`` from ``root/name``; what is missing is listed, not fatal, as long as
    item2index and a test split exist."""
    folder = Path(root) / name
    if not folder.is_dir():
        raise DataFormatError(f"{folder}: domain folder not found (data root {Path(root).resolve()})")
    f = lambda suffix: folder / f"{name}.{suffix}"  # noqa: E731
    item2index = read_index(f("item2index"))
    tokens = [""] * len(item2index)
    for tok, idx in item2index.items():
        if not 0 <= idx < len(tokens):
            raise DataFormatError(f"{f('item2index')}: index {idx} for {tok} is not in 0..{len(tokens) - 1}")
        tokens[idx] = tok
    missing, notes = [], []
    n_items = len(tokens)
    test = read_inter(f("test.inter"), n_items)
    valid = read_inter(f("valid.inter"), n_items) if f("valid.inter").is_file() else None
    if valid is None:
        missing.append(f"{name}.valid.inter")
        valid = Split(test.users.copy(), [h[:-1] if len(h) > 1 else h for h in test.histories],
                      np.asarray([h[-1] for h in test.histories], dtype=np.int64))
        notes.append("valid rebuilt from test histories")
    if f("train.inter").is_file():
        train = read_inter(f("train.inter"), n_items)
    else:
        missing.append(f"{name}.train.inter")
        train = rebuild_train_from_test(test, valid)
        capped = sum(1 for h in test.histories if len(h) >= MAX_HISTORY)
        notes.append(
            f"train rebuilt from test histories ({len(train)} rows); {capped} users have a test "
            f"history capped at {MAX_HISTORY} items, so their interactions before that window "
            f"cannot be recovered"
        )
    num_users = len(read_index(f("user2index"))) if f("user2index").is_file() else int(test.users.max()) + 1
    if not f("user2index").is_file():
        missing.append(f"{name}.user2index")
    texts = None
    if f("text").is_file():
        texts, without = read_text(f("text"), item2index)
        if without:
            notes.append(f"{without} items have no text")
    else:
        missing.append(f"{name}.text")
    features = {}
    for suffix in FEATURE_SUFFIXES:
        if f(suffix).is_file():
            features[suffix] = read_features(f(suffix), n_items, feature_dim)
    return DomainData(name, tokens, num_users, train, valid, test, texts, features, missing, notes)
